"""Descriptors that are finite as stored but not once the search upcasts and squares them (float64 near 1e300,
float32 near 1e20) never give a ranking by database order: evaluate, validation, mining and localize refuse them in
one line that names the file (or image) and the first bad row."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from netvlad_core.mining import MiningConfig, empty_negative_cache, mine_triplets
from netvlad_core.retrieval import NonFiniteDistances, exact_search, search
from netvlad_core.training import descriptor_error
from tests.conftest import make_split
from tests.test_evaluation import evaluate_cli, place_features, utm_split


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_order(db: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = ((q[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")


@pytest.mark.parametrize("factory", [None, "Flat"])
def test_search_refuses_rows_that_overflow_once_upcast_or_squared(factory):
    db, q = unit_rows(20, 8, 0).astype(np.float32), unit_rows(5, 8, 1).astype(np.float32)
    _, idx = search(db, q, 20, index_factory=factory)
    np.testing.assert_array_equal(idx, brute_force_order(db, q))  # the finite case ranks as brute force

    wide = db.astype(np.float64)
    wide[7, 3] = 1e300  # finite in float64, inf in float32
    with pytest.raises(NonFiniteDistances) as e:
        search(wide, q, 5, index_factory=factory)
    assert (e.value.role, e.value.row) == ("database", 7)

    huge = q.copy()
    huge[2, 0] = 1e20  # finite in float32, its square is not
    with pytest.raises(NonFiniteDistances) as e:
        search(db, huge, 5, index_factory=factory)
    assert (e.value.role, e.value.row) == ("query", 2)
    assert str(e.value).startswith("query row 2: squared norm inf")


def test_a_distance_that_overflows_with_finite_norms_is_refused():
    """‖q‖² and ‖d‖² of 2.25e38 are finite float32 numbers; their sum is not."""
    db = np.zeros((6, 4), np.float32)
    db[4, 0] = 1.5e19
    q = np.zeros((3, 4), np.float32)
    q[1, 0] = -1.5e19
    assert np.isfinite((db.astype(np.float32) ** 2).sum(1)).all() and np.isfinite((q ** 2).sum(1)).all()
    with pytest.raises(NonFiniteDistances) as e:
        exact_search(db, q, 3, block_rows=4)
    assert (e.value.role, e.value.row) == ("database", 4) and "query row 1" in str(e.value)


@pytest.mark.parametrize("dtype, value, dataset, row", [("float64", 1e300, "db", 7), ("float32", 1e20, "query", 2)])
def test_evaluate_refuses_features_that_overflow_in_one_line_naming_file_and_row(tmp_path, dtype, value, dataset,
                                                                                 row):
    split_dir, split = utm_split(tmp_path)
    db, q = place_features(split, tmp_path / "feats.h5")
    arrays = {"db": db.astype(dtype), "query": q.astype(dtype)}
    arrays[dataset][row, 0] = value
    with h5py.File(tmp_path / "feats.h5", "r+") as h5:
        for name in ("db", "query"):
            del h5[name]
            h5.create_dataset(name, data=arrays[name])
    result, out = evaluate_cli(tmp_path, split_dir, "--recall-n", "1", "--recall-n", "5")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    role = "database" if dataset == "db" else "query"
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'feats.h5'}: {role} row {row}: "), lines
    assert not out.exists() or not any(out.iterdir())


def test_mining_and_validation_name_the_image_whose_descriptor_overflows(tmp_path):
    split = load_split(make_split(tmp_path, num_db=6, num_q=4))
    db, q = unit_rows(6, 8, 0).astype(np.float32), unit_rows(2, 8, 1).astype(np.float32)
    q[1, 4] = 1e20
    query_ids = [1, 3]  # the block's queries: row 1 is the split's query 3
    with pytest.raises(NonFiniteDistances) as e:
        mine_triplets(query_ids, q, db, train_positives=[np.array([0])] * 4, positives=[np.array([0])] * 4,
                      negative_cache=empty_negative_cache(4, 2), rng=np.random.default_rng(0),
                      cfg=MiningConfig(num_negatives=2, num_negatives_sampled=3), device="cpu")
    error = descriptor_error(e.value, split, query_ids=query_ids)
    assert isinstance(error, NetVLADError)
    assert str(error).startswith(f"{split.query_files()[3]} (query image 3 of the split, the model's descriptor): "
                                 f"query row 1: squared norm inf")

    db[4, 0] = np.float32(3e19)
    with pytest.raises(NonFiniteDistances) as e:
        exact_search(db, unit_rows(2, 8, 1).astype(np.float32), 5)
    assert str(descriptor_error(e.value, split)).startswith(f"{split.db_files()[4]} (database image 4 of the split")


def test_validation_recall_refuses_a_model_whose_descriptor_overflows(tmp_path):
    from netvlad_core.datasets.manifest import load_ground_truth
    from netvlad_core.models import ModelConfig
    from netvlad_core.training import validate_recall

    split_dir = make_split(tmp_path, num_db=6, num_q=3)
    split, gt = load_split(split_dir), load_ground_truth(split_dir)

    class Overflowing(torch.nn.Module):
        """The mean colour times 1e20: finite float32 numbers whose squares are not."""
        out_dim = 3

        def forward(self, images):
            return images.mean((2, 3)) * 1e20

    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
    with pytest.raises(NetVLADError) as e:
        validate_recall(Overflowing(), split, gt, device=torch.device("cpu"), batch_size=4, num_workers=0,
                        amp="off", model_cfg=cfg)
    assert str(e.value).startswith(f"{split.query_files()[0]} (query image 0 of the split, the model's descriptor): "
                                   f"query row 0: squared norm inf")
