"""Feature extraction: rows equal the model applied image by image; an interrupted run resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netvlad_core.datasets.images import load_image
from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from netvlad_core.features import FeatureConfig, extract_split_features, read_features
from tests.conftest import TINY_MODEL_CONFIG, TinyModel


def _one_by_one(model, files):
    c = TINY_MODEL_CONFIG
    with torch.no_grad():
        return np.stack([model(load_image(f, c.input_height, c.input_width, c.mean, c.std)[None])[0].numpy()
                         for f in files])


def test_features_match_single_image_forward(tiny_split, tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    split = load_split(tiny_split)
    out = extract_split_features(model, TINY_MODEL_CONFIG, split, tmp_path / "f.h5", device=torch.device("cpu"),
                                 cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    db, q, attrs = read_features(out)
    assert db.shape == (split.num_db, 8) and q.shape == (split.num_queries, 8)
    np.testing.assert_allclose(db, _one_by_one(model, split.db_files()), atol=1e-5)
    np.testing.assert_allclose(q, _one_by_one(model, split.query_files()), atol=1e-5)
    assert attrs["complete"] and attrs["split"] == "test"


def test_interrupted_extraction_resumes(tiny_split, tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    split = load_split(tiny_split)
    out = tmp_path / "f.h5"
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    model.fail_after = 4
    with pytest.raises(KeyboardInterrupt):
        extract_split_features(model, TINY_MODEL_CONFIG, split, out, device=torch.device("cpu"), cfg=cfg,
                               progress=False)
    assert not out.exists(), "an interrupted run must not leave a file under the final name"
    assert (tmp_path / ".f.h5.partial").exists()
    model.fail_after, model.calls = None, 0
    extract_split_features(model, TINY_MODEL_CONFIG, split, out, device=torch.device("cpu"), cfg=cfg, progress=False)
    total_batches = -(-split.num_db // 2) + -(-split.num_queries // 2)
    assert model.calls == total_batches - 4, "the second run must start after the committed batches"
    db, q, _ = read_features(out)
    np.testing.assert_allclose(db, _one_by_one(model, split.db_files()), atol=1e-5)
    np.testing.assert_allclose(q, _one_by_one(model, split.query_files()), atol=1e-5)


def test_partial_from_another_model_is_not_resumed(tiny_split, tmp_path):
    split = load_split(tiny_split)
    out = tmp_path / "f.h5"
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    torch.manual_seed(0)
    first = TinyModel()
    first.fail_after = 3
    with pytest.raises(KeyboardInterrupt):
        extract_split_features(first, TINY_MODEL_CONFIG, split, out, device=torch.device("cpu"), cfg=cfg,
                               progress=False)
    torch.manual_seed(1)
    other = TinyModel()
    extract_split_features(other, TINY_MODEL_CONFIG, split, out, device=torch.device("cpu"), cfg=cfg, progress=False)
    db, _, _ = read_features(out)
    np.testing.assert_allclose(db, _one_by_one(other, split.db_files()), atol=1e-5)


def test_corrupt_image_names_the_file(tiny_split, tmp_path):
    split = load_split(tiny_split)
    bad = split.db_files()[3]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(NetVLADError, match=str(bad)):
        extract_split_features(TinyModel(), TINY_MODEL_CONFIG, split, tmp_path / "f.h5", device=torch.device("cpu"),
                               cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_split_without_queries(tmp_path):
    from tests.conftest import make_split

    split = load_split(make_split(tmp_path, num_db=5, num_q=0))
    out = extract_split_features(TinyModel(), TINY_MODEL_CONFIG, split, tmp_path / "f.h5", device=torch.device("cpu"),
                                 cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    db, q, _ = read_features(out)
    assert db.shape == (5, 8) and q.shape == (0, 8)


def test_the_same_model_and_split_give_the_same_bytes_in_any_folder_and_after_a_resume(tmp_path):
    """The finished file holds nothing of the checkout that made it (the resume identity, with the image root and
    the files' times, stays in a sidecar that is removed): DVC sees the same hash on every machine. A resumed run
    writes the same datasets and attributes (HDF5 lays out a reopened file's header differently)."""
    import shutil
    import time

    from tests.conftest import make_split

    first_dir = make_split(tmp_path / "a")
    time.sleep(0.01)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another root, other mtimes
    second_dir = tmp_path / "b" / "splits" / "test"
    torch.manual_seed(0)
    model = TinyModel()
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    outs = []
    for split_dir, name in ((first_dir, "one.h5"), (second_dir, "two.h5")):
        model.calls = 0
        outs.append(extract_split_features(model, TINY_MODEL_CONFIG, load_split(split_dir), tmp_path / name,
                                           device=torch.device("cpu"), cfg=cfg, progress=False))
    model.fail_after, model.calls = 3, 0
    with pytest.raises(KeyboardInterrupt):
        extract_split_features(model, TINY_MODEL_CONFIG, load_split(first_dir), tmp_path / "three.h5",
                               device=torch.device("cpu"), cfg=cfg, progress=False)
    assert (tmp_path / ".three.h5.partial.json").is_file()
    model.fail_after, model.calls = None, 0
    outs.append(extract_split_features(model, TINY_MODEL_CONFIG, load_split(first_dir), tmp_path / "three.h5",
                                       device=torch.device("cpu"), cfg=cfg, progress=False))
    assert model.calls < -(-12 // 2) + -(-5 // 2), "the third run resumed"
    assert outs[0].read_bytes() == outs[1].read_bytes()
    (db0, q0, attrs0), (db2, q2, attrs2) = read_features(outs[0]), read_features(outs[2])
    np.testing.assert_array_equal(db0, db2)
    np.testing.assert_array_equal(q0, q2)
    assert {k: str(v) for k, v in attrs0.items()} == {k: str(v) for k, v in attrs2.items()}
    assert not list(tmp_path.glob(".*.partial*"))
