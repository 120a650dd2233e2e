"""The built-in synthetic city: file layout (read independently with scipy), the 25 m guarantees,
determinism, image sizes, and that the renderer is geometry-consistent."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from netvlad_core.datasets import synthetic as syn
from netvlad_core.datasets.specs import read_dbstruct
from netvlad_core.errors import NetVLADError

TINY = dict(width=64, height=48, train_blocks=1, val_blocks=1, test_blocks=2, db_spacing_m=8.0, headings=2,
            train_queries=6, val_queries=4, test_queries=5)
FIELDS = ["whichSet", "dbImageFns", "utmDb", "qImageFns", "utmQ", "numImages", "numQueries", "posDistThr",
          "posDistSqThr", "nonTrivPosDistSqThr"]


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    out = {"a": root / "a", "b": root / "b", "c": root / "c"}
    syn.render_dataset(syn.SyntheticConfig(seed=3, **TINY), out["a"], workers=2, progress=False)
    syn.render_dataset(syn.SyntheticConfig(seed=3, **TINY), out["b"], workers=1, progress=False)
    syn.render_dataset(syn.SyntheticConfig(seed=4, **TINY), out["c"], workers=2, progress=False)
    return out


def _mat(path: Path):
    """The dbStruct as scipy reads it, without the project's reader."""
    return loadmat(path, squeeze_me=True, struct_as_record=False)["dbStruct"]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_mat_layout_read_independently(renders: dict[str, Path]) -> None:
    root = renders["a"]
    for split in syn.SPLITS:
        path = root / f"synthetic_{split}.mat"
        assert path.read_bytes()[:116] == syn.MAT_HEADER.ljust(116, b" ")
        raw = loadmat(path)["dbStruct"]
        assert list(raw.dtype.names) == FIELDS  # Pittsburgh field order
        s = _mat(path)
        assert s.whichSet == split
        db = list(np.atleast_1d(s.dbImageFns))
        q = list(np.atleast_1d(s.qImageFns))
        assert s.utmDb.shape == (2, len(db)) and s.utmQ.shape == (2, len(q))
        assert int(s.numImages) == len(db) and int(s.numQueries) == len(q)
        assert np.asarray(s.numImages).dtype.kind == "i"
        assert (float(s.posDistThr), float(s.posDistSqThr), float(s.nonTrivPosDistSqThr)) == (25.0, 625.0, 100.0)
        assert len(q) == syn.SyntheticConfig(**TINY).queries(split)
        assert len(db) == 2 * len({p.rsplit("_yaw", 1)[0] for p in db})  # two headings per position
        for p in db:
            assert p.startswith(f"{split}/") and p.count("/") == 2 and p.endswith(".jpg")
            assert (root / "images" / p).is_file()
        for p in q:
            assert p.startswith(f"{split}/") and p.count("/") == 2
            assert (root / "images" / "queries_real" / p).is_file()
        # UTM-like coordinates around the fixed origin
        assert 584_000 < s.utmDb[0].min() and s.utmDb[0].max() < 592_000
        assert 4_476_000 < s.utmDb[1].min() and s.utmDb[1].max() < 4_478_000
        # the project's reader agrees with scipy
        spec = read_dbstruct(path)
        assert spec.db_image_fns == db and spec.q_image_fns == q
        np.testing.assert_array_equal(spec.utm_db, s.utmDb.T)
        np.testing.assert_array_equal(spec.utm_q, s.utmQ.T)


def test_positives_within_25m_and_splits_disjoint(renders: dict[str, Path]) -> None:
    pts = {}
    for split in syn.SPLITS:
        s = _mat(renders["a"] / f"synthetic_{split}.mat")
        db, q = s.utmDb.T, s.utmQ.T
        d = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1))
        assert (d.min(axis=1) <= 25.0).all(), split  # every query has a positive
        pts[split] = np.vstack([db, q])
    for other in ("val", "test"):
        d = np.sqrt(((pts[other][:, None, :] - pts["train"][None, :, :]) ** 2).sum(-1))
        assert d.min() > 25.0
    d = np.sqrt(((pts["val"][:, None, :] - pts["test"][None, :, :]) ** 2).sum(-1))
    assert d.min() > 25.0


def test_every_image_decodes_at_the_stated_size(renders: dict[str, Path]) -> None:
    root = renders["a"] / "images"
    jpgs = sorted(root.rglob("*.jpg"))
    expected = 0
    for split in syn.SPLITS:
        s = _mat(renders["a"] / f"synthetic_{split}.mat")
        expected += int(s.numImages) + int(s.numQueries)
    assert len(jpgs) == expected
    for p in jpgs:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)
            im.load()


def test_same_seed_is_byte_identical_for_any_worker_count(renders: dict[str, Path]) -> None:
    a, b = _files(renders["a"]), _files(renders["b"])
    assert a == b
    assert sum(k.endswith(".jpg") for k in a) > 100


def test_another_seed_is_another_city(renders: dict[str, Path]) -> None:
    a, c = _files(renders["a"]), _files(renders["c"])
    for split in syn.SPLITS:
        assert a[f"synthetic_{split}.mat"] != c[f"synthetic_{split}.mat"]
    shared = [k for k in a if k.endswith(".jpg") and k in c]
    assert sum(a[k] != c[k] for k in shared) > 0.95 * len(shared)


def test_views_are_geometry_consistent() -> None:
    """Two views a metre apart look alike; the same heading 30+ m away does not (correlation of 4×4 block means)."""
    cfg = syn.SyntheticConfig(seed=0, width=96, height=72, train_blocks=4)
    district = syn._districts(cfg)["train"]
    axis, c, s0, s1, _ = district.streets[0]
    assert axis == 0
    cond = syn._database_condition(0, 0)
    cond.noise = 0.0
    rng = np.random.default_rng(0)

    def view(x: float) -> np.ndarray:
        cam = syn._Camera(x, c, math.radians(45), 2.5, math.radians(65), 0.62)
        img = syn._render(district, cam, cond, cfg.width, cfg.height, [], rng).astype(np.float64).mean(-1)
        img = img.reshape(18, 4, 24, 4).mean(axis=(1, 3))
        img -= img.mean()
        return img / np.linalg.norm(img)

    again = view(s0 + 20.0)
    np.testing.assert_array_equal(again, view(s0 + 20.0))  # rendering is a pure function of the pose
    near = float((again * view(s0 + 21.0)).sum())
    far = [float((again * view(s0 + 20.0 + k)).sum()) for k in (30.0, 45.0, 60.0)]
    assert near > 0.65 and max(far) < near - 0.2, (near, far)


def test_pixel_baseline_recall_is_a_recall(renders: dict[str, Path]) -> None:
    rec = syn.pixel_baseline_recall(renders["a"], "test", ns=(1, 5, 10_000))
    assert 0.0 <= rec[1] <= rec[5] <= rec[10_000] == 1.0  # every query has a positive somewhere


def test_mosaic(renders: dict[str, Path], tmp_path: Path) -> None:
    out = syn.render_mosaic(renders["a"], tmp_path / "m.png", pairs=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width == 2 * 64 + 12 and im.height > 3 * 48


def test_read_config_round_trips(renders: dict[str, Path]) -> None:
    assert syn.read_config(renders["a"]) == syn.SyntheticConfig(seed=3, **TINY)


@pytest.mark.parametrize("bad", [dict(width=8), dict(seed=-1), dict(db_spacing_m=40.0), dict(headings=0),
                                 dict(test_queries=0), dict(jpeg_quality=101)])
def test_bad_options_are_user_errors(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(NetVLADError, match=next(iter(bad))):
        syn.render_dataset(syn.SyntheticConfig(**{**TINY, **bad}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NetVLADError, match="not empty"):
        syn.render_dataset(syn.SyntheticConfig(**TINY), tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"
