"""Retrieval and evaluation: faiss search, recall@N, localisation, panorama collapse, the evaluate stage.

Every number is checked against a hand-worked case or a brute-force numpy computation; faiss and h5py are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.manifest import (
    Split,
    load_ground_truth,
    radius_neighbours,
    write_split,
)
from netvlad_core.errors import NetVLADError
from netvlad_core.evaluation import EvalConfig, evaluate, example_queries
from netvlad_core.retrieval import (
    collapse_panoramas,
    estimate_positions,
    exact_search,
    first_correct_rank,
    localisation_errors,
    panorama_id_from_path,
    panorama_ids_from_paths,
    recall_at_n,
    search,
)

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ hand-worked case
# Six database images on a line (metres) with 2-D descriptors (i, 0); four queries.
HAND_DB_UTM = np.array([[0, 0], [10, 0], [100, 0], [110, 0], [200, 0], [210, 0]], dtype=float)
HAND_DB = np.array([[i, 0] for i in range(6)], dtype=np.float32)
HAND_Q_UTM = np.array([[5, 0], [105, 0], [500, 0], [102, 0]], dtype=float)
HAND_Q = np.array([[2.9, 0], [0.2, 0], [4.6, 0], [1.6, 0]], dtype=np.float32)
# rankings by descriptor distance, worked by hand
HAND_RANKING = np.array([[3, 2, 4, 1, 5, 0], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 1, 3, 0, 4, 5]])
# positives within 25 m: q0 {0, 1}, q1 {2, 3}, q2 none, q3 {2, 3} -> first correct ranks 4, 3, none, 1
HAND_FIRST_CORRECT = np.array([4, 3, 0, 1])


def hand_positives() -> list[np.ndarray]:
    return radius_neighbours(HAND_DB_UTM, HAND_Q_UTM, 25.0)


def brute_force(db: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = ((q.astype(np.float64)[:, None, :] - db.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, axis=1), order


def brute_recall(order: np.ndarray, positives: list[np.ndarray], n: int) -> float:
    return sum(bool(set(row[:n].tolist()) & set(p.tolist())) for row, p in zip(order, positives)) / len(order)


def test_hand_case_search_recall_and_localisation():
    distances, indices = search(HAND_DB, HAND_Q, 10)
    assert indices.shape == (4, 6)  # k clipped to num_db
    np.testing.assert_array_equal(indices, HAND_RANKING)
    # ‖q‖² + ‖d‖² − 2 q·d in float32: the error is absolute, about 1e-7 × (‖q‖² + ‖d‖²) (here ≤ 34)
    np.testing.assert_allclose(distances[0], [0.01, 0.81, 1.21, 3.61, 4.41, 8.41], rtol=1e-6, atol=1e-5)

    positives = hand_positives()
    assert [sorted(p.tolist()) for p in positives] == [[0, 1], [2, 3], [], [2, 3]]
    np.testing.assert_array_equal(first_correct_rank(indices, positives), HAND_FIRST_CORRECT)
    assert recall_at_n(indices, positives, [1, 3, 4, 5]) == {1: 0.25, 3: 0.5, 4: 0.75, 5: 0.75}

    # k=1: the top match's position; errors 105, 105, 290, 2
    errors = localisation_errors(estimate_positions(indices, distances, HAND_DB_UTM, 1), HAND_Q_UTM)
    np.testing.assert_allclose(errors, [105, 105, 290, 2])
    # k=2 uniform for q3: mean of db2 (100, 0) and db1 (10, 0) = (55, 0), 47 m from (102, 0)
    est = estimate_positions(indices, distances, HAND_DB_UTM, 2, "uniform")
    np.testing.assert_allclose(est[3], [55, 0])
    # inverse distance: descriptor distances 0.4 and 0.6
    est = estimate_positions(indices, distances, HAND_DB_UTM, 2, "inverse_distance")
    w = np.array([1 / (0.4 + 1e-6), 1 / (0.6 + 1e-6)])
    np.testing.assert_allclose(est[3], (w[0] * HAND_DB_UTM[2] + w[1] * HAND_DB_UTM[1]) / w.sum(), rtol=1e-5)
    # softmax on squared distances 0.16, 0.36 with temperature 0.1
    est = estimate_positions(indices, distances, HAND_DB_UTM, 2, "softmax", temperature=0.1)
    w = np.exp(-np.array([0.0, 0.2]) / 0.1)
    np.testing.assert_allclose(est[3], (w[0] * HAND_DB_UTM[2] + w[1] * HAND_DB_UTM[1]) / w.sum(), rtol=1e-4)
    # an empty ranking slot gets no weight; an all-empty ranking gives NaN
    est = estimate_positions(np.array([[-1, 2], [-1, -1]]), np.array([[np.inf, 1.0], [np.inf, np.inf]]), HAND_DB_UTM, 2)
    np.testing.assert_allclose(est[0], [100, 0])
    assert np.isnan(est[1]).all()


def test_random_case_matches_brute_force_and_batching():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    db_utm = rng.uniform(0, 200, size=(300, 2))
    q_utm = rng.uniform(0, 200, size=(50, 2))
    positives = radius_neighbours(db_utm, q_utm, 25.0)

    distances, indices = search(db, q, 20)
    bf_dist, bf_order = brute_force(db, q)
    np.testing.assert_array_equal(indices, bf_order[:, :20])
    np.testing.assert_allclose(distances, bf_dist[:, :20], rtol=1e-4, atol=1e-4)
    recalls = recall_at_n(indices, positives, [1, 5, 20])
    for n in (1, 5, 20):
        assert recalls[n] == pytest.approx(brute_recall(bf_order, positives, n))
    errors = localisation_errors(estimate_positions(indices, distances, db_utm, 1), q_utm)
    np.testing.assert_allclose(errors, np.linalg.norm(db_utm[bf_order[:, 0]] - q_utm, axis=1))

    batched = search(db, q, 20, batch_size=21)
    np.testing.assert_array_equal(batched[1], indices)
    np.testing.assert_allclose(batched[0], distances, rtol=1e-5, atol=1e-6)


def test_search_reads_h5py_datasets_in_batches(tmp_path):
    rng = np.random.default_rng(1)
    db = rng.normal(size=(120, 8)).astype(np.float16)
    q = rng.normal(size=(30, 8)).astype(np.float16)
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["db"], h5["query"] = db, q
    with h5py.File(tmp_path / "f.h5", "r") as h5:
        from_h5 = search(h5["db"], h5["query"], 5, batch_size=7)
    from_numpy = search(db.astype(np.float32), q.astype(np.float32), 5)
    np.testing.assert_array_equal(from_h5[1], from_numpy[1])


# ---------------------------------------------------------------------------------------- blocked exact search
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force_ranking(db: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 squared distances, every row ranked by (distance, database index)."""
    d = ((q.astype(np.float64)[:, None, :] - db.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    order = np.stack([np.lexsort((np.arange(d.shape[1]), row)) for row in d])
    return np.take_along_axis(d, order, axis=1), order


def dyadic_case(num_db: int = 90, num_q: int = 17, dim: int = 12, seed: int = 0):
    """Descriptors with entries in {-1, -0.75, …, 1}: every product and sum is exact in float16 and float32, so
    any two equal distances are equal in every blocking. Planted: exact duplicates of database rows (exact ties,
    some in other blocks than their original), rows one step away from another (near ties: 2 steps² apart),
    queries equal to a database row (distance 0) and a query halfway between two rows."""
    rng = np.random.default_rng(seed)
    db = rng.integers(-4, 5, size=(num_db, dim)) / 4.0
    db[[40, 41, 89]] = db[3]  # ties with row 3, in later blocks
    db[[7, 60]] = db[5]
    db[50] = db[8]
    db[50, 0] += 0.25 if db[8, 0] < 1 else -0.25  # a near tie of row 8
    q = rng.integers(-4, 5, size=(num_q, dim)) / 4.0
    q[0], q[1], q[2] = db[3], db[8], db[5]
    q[3] = (db[8] + db[50]) / 2  # equidistant from rows 8 and 50 (entries in steps of 1/8: still exact)
    return db, q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_exact_search_equals_float64_brute_force_with_planted_ties(dtype, device):
    db, q = dyadic_case()
    bf_dist, bf_order = brute_force_ranking(db, q)
    assert bf_dist[0, 0] == 0 and bf_dist[0, 1] == 0  # query 0 sits on the tied rows 3, 40, 41, 89
    np.testing.assert_array_equal(bf_order[0, :4], [3, 40, 41, 89])
    np.testing.assert_array_equal(bf_order[3, :2], [8, 50])
    assert bf_dist[3, 0] == bf_dist[3, 1] > 0
    for k in (1, 4, 30, 90, 500):
        for block_rows, query_rows in ((512, 1024), (7, 3), (1, 1), (40, 17)):
            dist, idx = exact_search(db.astype(dtype), q.astype(dtype), k, device=device, block_rows=block_rows,
                                     query_rows=query_rows)
            kk = min(k, len(db))
            assert dist.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (len(q), kk)
            np.testing.assert_array_equal(idx, bf_order[:, :kk], err_msg=f"k={k} blocks {block_rows}×{query_rows}")
            np.testing.assert_array_equal(dist, bf_dist[:, :kk])
            assert not np.signbit(dist).any()  # an exact match is +0, not -0


@pytest.mark.parametrize("device", DEVICES)
def test_exact_search_random_float16_matches_brute_force(device):
    rng = np.random.default_rng(5)
    db = rng.normal(size=(700, 96)).astype(np.float16)
    q = rng.normal(size=(60, 96)).astype(np.float16)
    bf_dist, bf_order = brute_force_ranking(db, q)
    dist, idx = exact_search(db, q, 25, device=device, block_rows=64, query_rows=16)
    np.testing.assert_allclose(dist, bf_dist[:, :25], rtol=1e-5, atol=1e-4)
    # the ranking equals brute force wherever neighbouring distances are farther apart than float32 rounding
    gaps = np.diff(bf_dist[:, :26], axis=1)  # gaps[:, r]: rank r to rank r + 1
    clear = (gaps[:, :25] > 1e-3) & np.concatenate([np.ones((len(q), 1), bool), gaps[:, :24] > 1e-3], axis=1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(idx[clear], bf_order[:, :25][clear])


def test_exact_search_blocks_equal_one_block_and_read_files_in_blocks(tmp_path):
    db, q = dyadic_case(num_db=300, num_q=40, dim=20, seed=3)
    one = exact_search(db, q, 50, block_rows=len(db), query_rows=len(q))
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["db"], h5["query"] = db.astype(np.float16), q.astype(np.float16)
    memmap = np.lib.format.open_memmap(tmp_path / "db.npy", mode="w+", dtype=np.float16, shape=db.shape)
    memmap[:] = db
    memmap.flush()
    with h5py.File(tmp_path / "f.h5", "r") as h5:
        inputs = {"h5py": (h5["db"], h5["query"]), "memmap": (np.load(tmp_path / "db.npy", mmap_mode="r"), q)}
        for name, (db_in, q_in) in inputs.items():
            for block_rows, query_rows in ((13, 5), (299, 39), (1, 40)):
                blocked = exact_search(db_in, q_in, 50, block_rows=block_rows, query_rows=query_rows)
                np.testing.assert_array_equal(blocked[1], one[1], err_msg=f"{name} {block_rows}×{query_rows}")
                np.testing.assert_array_equal(blocked[0], one[0])
    # random (non-dyadic) data: the same rankings, distances up to float rounding of the GEMM shapes
    rng = np.random.default_rng(4)
    db, q = rng.normal(size=(400, 64)).astype(np.float32), rng.normal(size=(30, 64)).astype(np.float32)
    whole = exact_search(db, q, 20, block_rows=400, query_rows=30)
    blocked = exact_search(db, q, 20, block_rows=33, query_rows=7)
    np.testing.assert_array_equal(blocked[1], whole[1])
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-5, atol=1e-5)


def test_search_exact_path_is_exact_search_and_bad_inputs_are_user_errors():
    db, q = dyadic_case()
    via_search = search(db, q, 10, batch_size=4)
    direct = exact_search(db, q, 10)
    np.testing.assert_array_equal(via_search[1], direct[1])
    np.testing.assert_array_equal(via_search[0], direct[0])
    empty = exact_search(db, q[:0], 5)
    assert empty[0].shape == (0, 5) and empty[1].shape == (0, 5)
    for kwargs, match in (({"block_rows": 0}, "block rows must be at least 1"),
                          ({"query_rows": 0}, "query rows must be at least 1")):
        with pytest.raises(NetVLADError, match=match):
            exact_search(db, q, 5, **kwargs)
    with pytest.raises(NetVLADError, match="k must be at least 1"):
        exact_search(db, q, 0)
    with pytest.raises(NetVLADError, match="empty database"):
        exact_search(db[:0], q, 5)
    with pytest.raises(NetVLADError, match="do not match"):
        exact_search(db, q[:, :5], 5)


def test_approximate_index():
    rng = np.random.default_rng(2)
    db = rng.normal(size=(400, 16)).astype(np.float32)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    exact = search(db, q, 10)
    # an IVF index probing all of its lists is exact
    ivf = search(db, q, 10, index_factory="IVF4,Flat", index_params="nprobe=4")
    np.testing.assert_array_equal(ivf[1], exact[1])
    # a lossy index still returns valid rankings of the right shape, deterministically for a seed
    pq = search(db, q, 10, index_factory="IVF4,PQ4", train_seed=3)
    assert pq[1].shape == (40, 10) and pq[1].max() < 400
    np.testing.assert_array_equal(search(db, q, 10, index_factory="IVF4,PQ4", train_seed=3)[1], pq[1])
    pca = search(db, q, 10, index_factory="PCA8,Flat")
    assert pca[1].shape == (40, 10)

    with pytest.raises(NetVLADError, match="not valid"):
        search(db, q, 5, index_factory="NoSuchIndex")
    with pytest.raises(NetVLADError, match="cannot be trained on 400 database vectors"):
        search(db, q, 5, index_factory="IVF1024,Flat")
    with pytest.raises(NetVLADError, match="do not apply"):
        search(db, q, 5, index_factory="IVF4,Flat", index_params="bogus=1")
    with pytest.raises(NetVLADError, match="do not match"):
        search(db, q[:, :8], 5)


def test_panorama_ids_and_collapse():
    assert panorama_id_from_path("000/000829_pitch1_yaw1.jpg") == "000/000829"
    assert panorama_id_from_path("000/000829_pitch2_yaw12.jpg") == "000/000829"
    assert panorama_id_from_path("03814/Ab-Cd_EfGhIjKlMnOpQrSt_012_030.png") == "03814/Ab-Cd_EfGhIjKlMnOpQrSt"
    assert panorama_id_from_path("@585001.1@4477001.2@17@T@40.4@-80.0@PANO_ID@3@@@@@@@.jpg") == "PANO_ID"
    assert panorama_id_from_path("queries/img 7.jpg") == "queries/img 7"
    paths = ["000/000001_pitch1_yaw1.jpg", "000/000001_pitch1_yaw2.jpg", "000/000002_pitch1_yaw1.jpg",
             "000/000002_pitch2_yaw1.jpg", "001/000003_pitch1_yaw1.jpg"]
    np.testing.assert_array_equal(panorama_ids_from_paths(paths), [0, 0, 1, 1, 2])

    indices = np.array([[1, 0, 3, 4, 2], [2, 3, 1, -1, -1]])
    distances = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, np.inf, np.inf]], dtype=np.float32)
    idx, dist = collapse_panoramas(indices, distances, panorama_ids_from_paths(paths), 3)
    np.testing.assert_array_equal(idx, [[1, 3, 4], [2, 1, -1]])
    np.testing.assert_allclose(dist, [[0.1, 0.3, 0.4], [0.1, 0.3, np.inf]])


# ------------------------------------------------------------------------------------------ evaluate


def make_split(tmp_path: Path, *, views: int = 1, seed: int = 0) -> tuple[Path, Split]:
    """A small split whose database images are tiny JPEGs; ``views`` database views per panorama."""
    rng = np.random.default_rng(seed)
    num_places, num_queries = 12, 9
    place_utm = np.stack([np.arange(num_places) * 40.0, np.zeros(num_places)], axis=1)
    db_paths, db_utm = [], []
    for p in range(num_places):
        for v in range(views):
            db_paths.append(f"db/{p:06d}_pitch1_yaw{v + 1}.jpg")
            db_utm.append(place_utm[p] + [v * 0.5, 0])
    q_places = np.arange(num_queries) % num_places
    q_utm = place_utm[q_places] + rng.uniform(-5, 5, size=(num_queries, 2))
    q_paths = [f"queries/q{i:03d}.jpg" for i in range(num_queries)]
    image_root = tmp_path / "images"
    for i, rel in enumerate(db_paths + q_paths):
        (image_root / rel).parent.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        Image.new("RGB", (32, 24), colour).save(image_root / rel, quality=80)
    split = Split(dataset="fake", name="test", image_root=image_root, db_paths=db_paths, db_utm=np.array(db_utm),
                  q_paths=q_paths, q_utm=q_utm)
    split_dir = tmp_path / "split"
    write_split(split, split_dir)
    return split_dir, split


def write_features(path: Path, db: np.ndarray, q: np.ndarray, *, complete: bool = True, dtype=np.float32,
                   split_name: str = "test") -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("db", data=db.astype(dtype))
        h5.create_dataset("query", data=q.astype(dtype))
        h5.attrs["complete"] = complete
        h5.attrs["split"] = split_name
        h5.attrs["dataset"] = "fake"
        h5.attrs["model"] = json.dumps({"name": "fake"})
        h5.attrs["dim"] = db.shape[1]
    return path


def fake_features(split: Split, seed: int = 0, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors that encode the position (with noise), so some queries are right and some wrong."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(2, 32))
    db = split.db_utm / 100 @ basis + rng.normal(scale=0.05, size=(split.num_db, 32))
    q = split.q_utm / 100 @ basis + rng.normal(scale=noise, size=(split.num_queries, 32))
    return db.astype(np.float32), q.astype(np.float32)


def outputs(tmp_path: Path) -> dict:
    return dict(metrics_json=tmp_path / "out/metrics.json", plot_csv=tmp_path / "out/recall.csv",
                per_query_csv=tmp_path / "out/per_query.csv", retrievals_png=tmp_path / "out/retrievals.png")


def test_evaluate_matches_brute_force_and_writes_outputs(tmp_path):
    split_dir, split = make_split(tmp_path)
    db, q = fake_features(split)
    feats = write_features(tmp_path / "feats.h5", db, q, dtype=np.float16)
    out = outputs(tmp_path)
    cfg = EvalConfig(recall_ns=(1, 2, 5), num_examples=4, per_query_top=3, localisation_k=1)
    metrics = evaluate(feats, split_dir, model_name="fake", cfg=cfg, **out).metrics

    positives = load_ground_truth(split_dir).positives
    _, order = brute_force(db.astype(np.float16).astype(np.float32), q.astype(np.float16).astype(np.float32))
    for n in (1, 2, 5):
        assert metrics[f"recall@{n}"] == pytest.approx(brute_recall(order, positives, n))
    assert 0 < metrics["recall@1"] < 1  # the case is neither trivial nor hopeless
    errors = np.linalg.norm(split.db_utm[order[:, 0]] - split.q_utm, axis=1)
    assert metrics["median_error_m"] == pytest.approx(np.median(errors))
    assert metrics["localised_within_25m"] == pytest.approx(np.mean(errors <= 25))
    assert metrics["num_queries"] == 9 and metrics["num_db"] == 12
    assert "exact_recall@1" not in metrics
    assert json.loads(out["metrics_json"].read_text()) == metrics

    plot = pd.read_csv(out["plot_csv"])
    assert list(plot.columns) == ["model", "n", "recall"]
    assert plot["n"].tolist() == [1, 2, 5] and (plot["model"] == "fake").all()
    assert plot["recall"].tolist() == pytest.approx([metrics[f"recall@{n}"] for n in (1, 2, 5)], abs=1e-6)

    per_query = pd.read_csv(out["per_query_csv"], keep_default_na=True)
    assert len(per_query) == 9 and per_query["query_path"].tolist() == split.q_paths
    assert [list(map(int, s.split())) for s in per_query["top_indices"]] == order[:, :3].tolist()
    ranks = [next((r + 1 for r, i in enumerate(row) if i in set(p.tolist())), None) for row, p in zip(order, positives)]
    for got, want in zip(per_query["first_correct_rank"], ranks):
        assert (pd.isna(got) and (want is None or want > 5)) or got == want
    assert per_query["correct@1"].tolist() == [int(r == 1) for r in ranks]
    np.testing.assert_allclose(per_query["localisation_error_m"], errors, rtol=1e-5)

    png = out["retrievals_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] > 300
    np.testing.assert_array_equal(example_queries(9, 4), [0, 3, 5, 8])


def test_evaluate_with_approximate_index_reports_exact_recall(tmp_path):
    split_dir, split = make_split(tmp_path)
    db, q = fake_features(split)
    feats = write_features(tmp_path / "feats.h5", db, q)
    out = outputs(tmp_path)
    exact = evaluate(feats, split_dir, model_name="m", cfg=EvalConfig(recall_ns=(1, 5)), **out).metrics
    result = evaluate(feats, split_dir, model_name="m",
                      cfg=EvalConfig(recall_ns=(1, 5), index_factory="PCA4,Flat", num_examples=0), **out)
    approx = result.metrics
    assert result.settings["index"] == "PCA4,Flat"
    assert approx["exact_recall@1"] == exact["recall@1"] and approx["exact_recall@5"] == exact["recall@5"]


def test_evaluate_collapses_panoramas(tmp_path):
    split_dir, split = make_split(tmp_path, views=3)
    db, q = fake_features(split)
    feats = write_features(tmp_path / "feats.h5", db, q)
    out = outputs(tmp_path)
    metrics = evaluate(feats, split_dir, model_name="m", cfg=EvalConfig(recall_ns=(1, 3), collapse_panoramas=True,
                                                                       per_query_top=5, num_examples=0), **out).metrics
    per_query = pd.read_csv(out["per_query_csv"])
    panoramas = panorama_ids_from_paths(split.db_paths)
    _, order = brute_force(db, q)
    positives = load_ground_truth(split_dir).positives
    collapsed = []
    for s, row in zip(per_query["top_indices"], order):
        top = list(map(int, s.split()))
        assert len(top) == 5 and len(set(panoramas[top])) == 5  # one view per panorama
        want = [i for j, i in enumerate(row) if panoramas[i] not in set(panoramas[row[:j]])][:5]
        assert top == want
        collapsed.append(want)
    assert metrics["recall@3"] == pytest.approx(brute_recall(np.array(collapsed), positives, 3))


@pytest.mark.parametrize(
    "problem, match",
    [
        ("rows", "8 query rows but split 'test' has 9 queries"),
        ("db_rows", "11 database rows"),
        ("dim", "32-D but query descriptors are 16-D"),
        ("nan", "query row 4 contains NaN or inf"),
        ("incomplete", "incomplete features file"),
        ("other_split", "features of split 'val', but the split folder is split 'test'"),
        ("missing", "features file not found"),
    ],
)
def test_bad_features_file_writes_nothing(tmp_path, problem, match):
    split_dir, split = make_split(tmp_path)
    db, q = fake_features(split)
    path = tmp_path / "feats.h5"
    if problem == "rows":
        write_features(path, db, q[:8])
    elif problem == "db_rows":
        write_features(path, db[:11], q)
    elif problem == "dim":
        write_features(path, db, q[:, :16])
    elif problem == "nan":
        q[4, 3] = np.nan
        write_features(path, db, q)
    elif problem == "incomplete":
        write_features(path, db, q, complete=False)
    elif problem == "other_split":
        write_features(path, db, q, split_name="val")
    out = outputs(tmp_path)
    out["metrics_json"].parent.mkdir()
    out["metrics_json"].write_text("stale\n")
    with pytest.raises(NetVLADError, match=match) as info:
        evaluate(path, split_dir, model_name="m", **out)
    assert str(path) in str(info.value)
    assert out["metrics_json"].read_text() == "stale\n"  # the old output is left as it was
    assert sorted(p.name for p in out["metrics_json"].parent.iterdir()) == ["metrics.json"]


def test_bad_config_is_a_user_error(tmp_path):
    with pytest.raises(NetVLADError, match="weighting"):
        EvalConfig(localisation_weighting="median").validate()
    with pytest.raises(NetVLADError, match="recall N"):
        EvalConfig(recall_ns=(0, 5)).validate()


def run_stage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "stages.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_end_to_end(tmp_path):
    split_dir, split = make_split(tmp_path)
    db, q = fake_features(split)
    feats = write_features(tmp_path / "feats.h5", db, q)
    out = tmp_path / "metrics"
    args = ["--features", str(feats), "--split-dir", str(split_dir), "--metrics", str(out / "test_fake.json"),
            "--plot", str(out / "test_fake_recall.csv"), "--per-query", str(out / "test_fake_per_query.csv"),
            "--retrievals", str(out / "retrievals.png"), "--model-name", "fake",
            "--recall-n", "1", "--recall-n", "5", "--recall-n", "10", "--localisation-k", "2",
            "--localisation-weighting", "inverse_distance", "--no-collapse-panoramas", "--no-progress",
            "--settings", str(out / "eval_fake.json")]
    proc = run_stage(*args)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "test_fake.json").read_text())
    assert set(metrics) >= {"recall@1", "recall@5", "recall@10", "median_error_m", "localised_within_25m"}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    settings = json.loads((out / "eval_fake.json").read_text())
    assert settings["localisation_k"] == 2 and settings["localisation_weighting"] == "inverse_distance"
    assert settings["model"] == "fake" and settings["collapse_panoramas"] is False
    assert settings["collapse_panoramas_decided_by"] == "option"
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("evaluate fake: R@1 ") and "R@5" in line and "R@10" in line and "median error" in line
    assert len(pd.read_csv(out / "test_fake_recall.csv")) == 3
    assert len(pd.read_csv(out / "test_fake_per_query.csv")) == 9
    assert (out / "retrievals.png").stat().st_size > 1000

    bad = run_stage(*[a if a != str(feats) else str(tmp_path / "nope.h5") for a in args])
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope.h5'}: features file not found"
