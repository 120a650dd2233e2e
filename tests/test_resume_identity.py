"""Resume identity: a partial features file or a train checkpoint is resumed only when made from the same split
content (manifest rows, image root, image files' size and mtime), not merely a split with the same name and counts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.images import load_image
from netvlad_core.datasets.manifest import load_split, split_fingerprint
from netvlad_core.features import FeatureConfig, extract_split_features, read_features
from tests.conftest import TINY_MODEL_CONFIG, TinyModel, make_split

CPU = torch.device("cpu")


def _one_by_one(model, files) -> np.ndarray:
    c = TINY_MODEL_CONFIG
    with torch.no_grad():
        return np.stack([model(load_image(f, c.input_height, c.input_width, c.mean, c.std)[None])[0].numpy()
                         for f in files])


def _interrupt(model: TinyModel, split, out: Path, cfg: FeatureConfig, after: int) -> None:
    model.fail_after, model.calls = after, 0
    with pytest.raises(KeyboardInterrupt):
        extract_split_features(model, TINY_MODEL_CONFIG, split, out, device=CPU, cfg=cfg, progress=False)
    model.fail_after, model.calls = None, 0
    assert (out.parent / f".{out.name}.partial").exists() and not out.exists()


def _replace_image(path: Path, seed: int) -> None:
    """Rewrite ``path`` with other content (same name), and move its mtime on by a second, as a copy would."""
    st = path.stat()
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((64, 48), Image.BILINEAR).save(path, quality=90)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_partial_of_another_split_with_the_same_name_and_counts_is_not_resumed(tmp_path):
    # Two splits named alike ("tiny"/"test"), with the same counts, over different images in different roots.
    first = load_split(make_split(tmp_path / "a", seed=0))
    second = load_split(make_split(tmp_path / "b", seed=1))
    assert (first.dataset, first.name, first.num_db, first.num_queries) == \
        (second.dataset, second.name, second.num_db, second.num_queries)
    torch.manual_seed(0)
    model = TinyModel()
    out = tmp_path / "f.h5"
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    _interrupt(model, first, out, cfg, after=4)  # 4 db batches of the first split committed
    extract_split_features(model, TINY_MODEL_CONFIG, second, out, device=CPU, cfg=cfg, progress=False)
    db, q, _ = read_features(out)
    np.testing.assert_allclose(db, _one_by_one(model, second.db_files()), atol=1e-5)
    np.testing.assert_allclose(q, _one_by_one(model, second.query_files()), atol=1e-5)


def test_partial_is_not_resumed_after_an_image_file_was_replaced(tmp_path):
    split = load_split(make_split(tmp_path))
    torch.manual_seed(0)
    model = TinyModel()
    out = tmp_path / "f.h5"
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    _interrupt(model, split, out, cfg, after=3)  # db rows 0..5 committed
    _replace_image(split.db_files()[1], seed=99)  # an image whose row the partial file already holds
    extract_split_features(model, TINY_MODEL_CONFIG, split, out, device=CPU, cfg=cfg, progress=False)
    db, _, _ = read_features(out)
    np.testing.assert_allclose(db, _one_by_one(model, split.db_files()), atol=1e-5)


def test_partial_of_the_same_inputs_is_still_resumed(tmp_path):
    split = load_split(make_split(tmp_path))
    torch.manual_seed(0)
    model = TinyModel()
    out = tmp_path / "f.h5"
    cfg = FeatureConfig(batch_size=2, num_workers=0, flush_every=1)
    _interrupt(model, split, out, cfg, after=3)
    again = load_split(split_dir=tmp_path / "splits" / "test")  # read anew, as a rerun does
    extract_split_features(model, TINY_MODEL_CONFIG, again, out, device=CPU, cfg=cfg, progress=False)
    batches = -(-split.num_db // 2) + -(-split.num_queries // 2)
    assert model.calls == batches - 3, "the rerun must continue after the committed batches"


def test_split_fingerprint_covers_rows_root_and_files(tmp_path):
    split = load_split(make_split(tmp_path, num_db=6, num_q=3))
    base = split_fingerprint(split)
    assert split_fingerprint(load_split(tmp_path / "splits" / "test")) == base, "same inputs, same fingerprint"
    utm = split.db_utm.copy()
    utm[2, 1] += 0.001
    changed = {
        "path": dataclasses.replace(split, db_paths=split.db_paths[::-1]),
        "utm": dataclasses.replace(split, db_utm=utm),
        "timestamp": dataclasses.replace(split, q_timestamps=np.array([1.0, np.nan, 3.0])),
        "role": dataclasses.replace(split, db_paths=split.db_paths[:-1], q_paths=split.db_paths[-1:] + split.q_paths,
                                    db_utm=split.db_utm[:-1], q_utm=np.concatenate([split.db_utm[-1:], split.q_utm])),
        "image root": dataclasses.replace(split, image_root=tmp_path / "elsewhere"),
        "threshold": dataclasses.replace(split, pos_dist_thr=30.0),
    }
    prints = {what: split_fingerprint(s) for what, s in changed.items()}
    assert all(p != base for p in prints.values()), [w for w, p in prints.items() if p == base]
    assert len(set(prints.values())) == len(prints)
    # One image file changes: same size but a new mtime, then other bytes of another size.
    without_files = split_fingerprint(split, files=False)
    path = split.query_files()[0]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = split_fingerprint(split)
    assert touched != base
    path.write_bytes(path.read_bytes() + b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert split_fingerprint(split) not in (base, touched), "the size counts"
    assert split_fingerprint(split, files=False) == without_files, "files=False reads only the manifest rows"


def test_train_checkpoint_identity_changes_with_an_image_file(tmp_path):
    from netvlad_core.models import ModelConfig
    from netvlad_core.training import TrainConfig, run_identity

    train_split = load_split(make_split(tmp_path / "t", name="train"))
    val_split = load_split(make_split(tmp_path / "v", name="val", seed=1))
    args = (TrainConfig(), ModelConfig(), "0" * 64, train_split, val_split, CPU)
    before = run_identity(*args)
    assert run_identity(*args) == before
    _replace_image(train_split.db_files()[0], seed=5)
    assert run_identity(*args) != before, "a train image was replaced: the checkpoint must not be resumed"
    other = load_split(make_split(tmp_path / "t2", name="train", seed=3))  # same name and counts, other images
    assert run_identity(TrainConfig(), ModelConfig(), "0" * 64, other, val_split, CPU) != run_identity(*args)
