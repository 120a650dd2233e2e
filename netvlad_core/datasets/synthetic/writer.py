"""Writing the dataset: the rendered images, the Pittsburgh-style ``.mat`` files, the pose CSVs and
``synthetic.json``; reading a dataset back (its configuration, a mosaic of views, a raw-pixel baseline)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import NetVLADError
from ...io import atomic_path
from ..specs import DBStruct, read_dbstruct, write_dbstruct
from .camera import QUERY_CONDITIONS
from .city import _db_poses, _District, _Pose, _query_poses
from .config import MAT_HEADER, META_JSON, SPLITS, SyntheticConfig
from .workers import _WORKER, _districts, _init_worker, _start_methods, _work


def _write_mat_deterministic(path: Path, spec: DBStruct) -> None:
    """``write_dbstruct`` with the 116-byte header text (scipy puts a timestamp there) made fixed."""
    with atomic_path(path) as tmp:
        write_dbstruct(tmp, spec)
        with open(tmp, "r+b") as fh:
            fh.seek(0)
            fh.write(MAT_HEADER.ljust(116, b" ")[:116])


def _split_poses(cfg: SyntheticConfig, districts: dict[str, _District]) -> dict[str, tuple[list[_Pose], list[_Pose]]]:
    out = {}
    for i, split in enumerate(SPLITS):
        d = districts[split]
        db = _db_poses(cfg, split, d)
        q = _query_poses(cfg, split, i, d, db)
        out[split] = (db, q)
    return out


def _utm(d: _District, poses: list[_Pose]) -> np.ndarray:
    return np.array([[d.origin[0] + p.x, d.origin[1] + p.y] for p in poses], dtype=np.float64).reshape(-1, 2)


def _check_geometry(utm: dict[str, tuple[np.ndarray, np.ndarray]], thr: float = 25.0) -> None:
    """Every query has a database image within ``thr``; val/test are farther than ``thr`` from train."""
    from scipy.spatial import cKDTree

    for split, (db, q) in utm.items():
        dist, _ = cKDTree(db).query(q)
        if (dist > thr).any():
            raise NetVLADError(
                f"synthetic split {split}: {int((dist > thr).sum())} queries have no database image within {thr} m "
                "(lower query_offset_m or db_spacing_m)"
            )
    train = np.vstack(utm["train"])
    tree = cKDTree(train)
    for split in ("val", "test"):
        dist, _ = tree.query(np.vstack(utm[split]))
        if dist.min() <= thr:
            raise NetVLADError(f"synthetic split {split} comes within {thr} m of train")  # cannot happen: 2 km apart


def _image_tasks(poses: dict[str, tuple[list[_Pose], list[_Pose]]], images: Path) -> list[tuple[int, dict, str]]:
    """One (split index, pose, output file) per image: each split's database images, then its queries."""
    tasks = []
    for i, split in enumerate(SPLITS):
        db, q = poses[split]
        tasks += [(i, asdict(p), str(images / p.path)) for p in db]
        tasks += [(i, asdict(p), str(images / "queries_real" / p.path)) for p in q]
    return tasks


def _render_images(cfg: SyntheticConfig, tasks: list[tuple[int, dict, str]], workers: int,
                   progress: bool) -> dict[str, str]:
    """Render and write every task's image, in this process (``workers`` <= 1) or in a pool; returns each
    output file's condition name."""
    from multiprocessing import get_context

    from tqdm import tqdm

    conditions: dict[str, str] = {}
    bar = tqdm(total=len(tasks), desc="render synthetic city", unit="img", disable=not progress)
    if workers <= 1:
        _init_worker(asdict(cfg), pool_worker=False)
        try:
            for t in tasks:
                path, cond = _work(t)
                conditions[path] = cond
                bar.update()
        finally:
            _WORKER.clear()
    else:
        with get_context("fork" if "fork" in _start_methods() else "spawn").Pool(
            workers, initializer=_init_worker, initargs=(asdict(cfg),)
        ) as pool:
            for path, cond in pool.imap_unordered(_work, tasks, chunksize=8):
                conditions[path] = cond
                bar.update()
    bar.close()
    return conditions


def _write_split(root: Path, split: str, d: _District, db: list[_Pose], q: list[_Pose],
                 conditions: dict[str, str]) -> None:
    """``synthetic_<split>.mat`` and ``poses_<split>.csv`` into ``root`` (``conditions`` by image file)."""
    images = root / "images"
    utm_db, utm_q = _utm(d, db), _utm(d, q)
    spec = DBStruct(which_set=split, db_image_fns=[p.path for p in db], utm_db=utm_db,
                    q_image_fns=[p.path for p in q], utm_q=utm_q)
    _write_mat_deterministic(root / f"synthetic_{split}.mat", spec)
    with open(root / f"poses_{split}.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "role", "utm_east", "utm_north", "yaw_deg", "camera_height_m", "hfov_deg",
                    "heading_index", "condition"])
        for p, (e, n) in zip(db + q, np.vstack([utm_db, utm_q])):
            full = str(images / p.path) if p.role == "database" else str(images / "queries_real" / p.path)
            w.writerow([p.path, p.role, f"{e:.3f}", f"{n:.3f}", f"{math.degrees(p.yaw) % 360:.2f}",
                        f"{p.cam_h:.2f}", f"{math.degrees(p.hfov):.2f}", p.heading, conditions[full]])


def render_dataset(cfg: SyntheticConfig, out_dir: str | Path, *, workers: int = 2, progress: bool = True) -> None:
    """Render the synthetic city into ``out_dir`` (see the package docstring for the layout).

    All or nothing: everything is written into a temporary sibling folder which replaces ``out_dir``
    at the end. An existing ``out_dir`` is replaced only when it is empty or a previous synthetic
    dataset (it has ``synthetic.json``); anything else is refused with :class:`NetVLADError`.
    The same ``cfg`` gives byte-identical files for any ``workers``.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NetVLADError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / META_JSON).is_file():
            raise NetVLADError(f"{out_dir}: folder is not empty and holds no synthetic dataset; refusing to replace it")
    districts = _districts(cfg)
    poses = _split_poses(cfg, districts)
    _check_geometry({s: (_utm(districts[s], db), _utm(districts[s], q)) for s, (db, q) in poses.items()})

    with atomic_path(out_dir, is_dir=True) as tmp:
        conditions = _render_images(cfg, _image_tasks(poses, tmp / "images"), workers, progress)
        counts = {}
        for split in SPLITS:
            db, q = poses[split]
            _write_split(tmp, split, districts[split], db, q, conditions)
            counts[split] = {"database": len(db), "queries": len(q)}
        (tmp / META_JSON).write_text(json.dumps({"dataset": "synthetic", "config": asdict(cfg), "counts": counts},
                                                indent=2) + "\n")


def prepare_synthetic_dataset(cfg: SyntheticConfig, out_dir: str | Path, *, splits: Sequence[str] | None = None,
                              workers: int = 2, progress: bool = True) -> list[Path]:
    """The built-in dataset as ``netvlad download --dataset synthetic`` writes it: the city rendered into
    ``out_dir/raw`` and read back like Pittsburgh into ``out_dir/<split>/`` folders; returns those folders.

    Every option and ``out_dir`` are checked before anything is rendered: ``out_dir`` may be missing, empty or a
    previous synthetic download (it has ``raw/synthetic.json``); a file or any other folder is refused. All or
    nothing: the whole folder is built under a temporary name that replaces ``out_dir`` at the end.
    """
    from ..official import build_splits

    cfg.validate()
    if workers < 0:
        raise NetVLADError(f"workers must be >= 0, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise NetVLADError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "raw" / META_JSON).is_file():
            raise NetVLADError(f"{out_dir}: folder is not empty and holds no synthetic dataset; refusing to replace it")
    with atomic_path(out_dir, is_dir=True) as tmp:
        render_dataset(cfg, tmp / "raw", workers=workers, progress=progress)
        build_splits("synthetic", tmp, spec_dir=tmp / "raw", image_root=tmp / "raw" / "images", splits=splits)
    return [out_dir / s.name for s in sorted(out_dir.iterdir()) if (s / "split.json").is_file()]


def read_config(dataset_dir: str | Path) -> SyntheticConfig:
    """The :class:`SyntheticConfig` a dataset folder was rendered with (from ``synthetic.json``)."""
    path = Path(dataset_dir) / META_JSON
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found (not a synthetic dataset folder)")
    try:
        meta = json.loads(path.read_text())
        known = {f.name for f in fields(SyntheticConfig)}
        return SyntheticConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise NetVLADError(f"{path}: not a synthetic dataset description ({e})") from None


def _read_poses(dataset_dir: Path, split: str) -> list[dict[str, str]]:
    path = dataset_dir / f"poses_{split}.csv"
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found (not a synthetic dataset folder)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def render_mosaic(dataset_dir: str | Path, out_png: str | Path, *, split: str = "test", pairs: int = 4,
                  seed: int = 1) -> Path:
    """Save a PNG with ``pairs`` rows: a database image (left) beside a query of the same place (right).

    Queries are picked at random (``seed``), preferring a different condition per row; the database
    image is the nearest in position among those with the query's heading index. ``docs/synthetic.png``
    is ``render_mosaic(<default dataset>, "docs/synthetic.png")``. Written atomically.
    """
    from PIL import Image, ImageDraw

    dataset_dir = Path(dataset_dir)
    rows = _read_poses(dataset_dir, split)
    db = [r for r in rows if r["role"] == "database"]
    qs = [r for r in rows if r["role"] == "query"]
    if not db or not qs:
        raise NetVLADError(f"{dataset_dir}: split {split} has no database images or no queries")
    db_xy = np.array([[float(r["utm_east"]), float(r["utm_north"])] for r in db])
    db_heading = np.array([int(r["heading_index"]) for r in db])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(qs))
    chosen, seen = [], set()
    for i in order:  # prefer a different condition per row
        if qs[i]["condition"] not in seen or len(seen) >= len(QUERY_CONDITIONS):
            chosen.append(i)
            seen.add(qs[i]["condition"])
        if len(chosen) == pairs:
            break
    tiles = []
    for i in chosen:
        q = qs[i]
        qxy = np.array([float(q["utm_east"]), float(q["utm_north"])])
        dist = np.linalg.norm(db_xy - qxy, axis=1)
        dist = np.where(db_heading == int(q["heading_index"]), dist, np.inf)
        j = int(np.argmin(dist))
        db_img = Image.open(dataset_dir / "images" / db[j]["path"]).convert("RGB")
        q_img = Image.open(dataset_dir / "images" / "queries_real" / q["path"]).convert("RGB")
        tiles.append((db_img, q_img, f"database {db[j]['path']}", f"query ({q['condition']}), {dist[j]:.1f} m away"))
    w, h = tiles[0][0].size
    pad, label = 4, 14
    mosaic = Image.new("RGB", (2 * w + 3 * pad, len(tiles) * (h + label + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(mosaic)
    for r, (a, b, la, lb) in enumerate(tiles):
        y = pad + r * (h + label + pad)
        mosaic.paste(a, (pad, y + label))
        mosaic.paste(b, (2 * pad + w, y + label))
        draw.text((pad, y + 1), la, fill=(0, 0, 0))
        draw.text((2 * pad + w, y + 1), lb, fill=(0, 0, 0))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:  # 256 adaptive colours keep the file small (about 300 KB)
        mosaic.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            tmp, format="PNG", optimize=True)
    return out_png


def pixel_baseline_recall(dataset_dir: str | Path, split: str = "test", *, size: tuple[int, int] = (16, 12),
                          ns: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Recall@N of nearest-neighbour search on raw pixels (grey, ``size``, mean-removed, L2-normalised).

    A difficulty check for the synthetic city: if raw pixels already localise most queries, the
    task is too easy to say anything about a learnt descriptor.
    """
    from PIL import Image

    dataset_dir = Path(dataset_dir)
    spec = read_dbstruct(dataset_dir / f"synthetic_{split}.mat")
    root = dataset_dir / "images"

    def vec(p: Path) -> np.ndarray:
        a = np.asarray(Image.open(p).convert("L").resize(size, Image.BILINEAR), np.float32).ravel()
        a = a - a.mean()
        return a / max(np.linalg.norm(a), 1e-6)

    db = np.stack([vec(root / p) for p in spec.db_image_fns])
    q = np.stack([vec(root / "queries_real" / p) for p in spec.q_image_fns])
    rank = np.argsort(-(q @ db.T), axis=1, kind="stable")
    dist = np.linalg.norm(spec.utm_q[:, None, :] - spec.utm_db[None, :, :], axis=2)
    hit = np.take_along_axis(dist, rank, axis=1) <= spec.pos_dist_thr
    return {n: float(hit[:, :n].any(axis=1).mean()) for n in ns}
