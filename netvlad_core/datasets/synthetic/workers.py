"""Rendering processes: each holds the districts once (set up by the pool initialiser) and renders and encodes
one image per task; every image's generator is seeded by (seed, split, role, index), so the files do not
depend on the number of workers or on which worker renders what."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .camera import _Camera, _database_condition, _movers, _query_condition
from .city import _District, _make_district, _make_palette, _Pose
from .config import SPLITS, SyntheticConfig
from .noise import _rng
from .render import _render

_WORKER: dict[str, Any] = {}  # per-process cache of the districts (set by the pool initialiser)


def _districts(cfg: SyntheticConfig) -> dict[str, _District]:
    pal = _make_palette(cfg.seed)
    return {s: _make_district(cfg.seed, i, cfg.blocks(s), pal) for i, s in enumerate(SPLITS)}


def _keep_freed_memory() -> None:
    """Let glibc keep freed heap memory in this (worker) process: every image allocates and frees the
    same large arrays, and returning them to the system each time costs more than the rendering."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def _init_worker(cfg_dict: dict, pool_worker: bool = True) -> None:
    if pool_worker:
        _keep_freed_memory()
    cfg = SyntheticConfig(**cfg_dict)
    _WORKER["cfg"] = cfg
    _WORKER["districts"] = _districts(cfg)


def _render_pose(cfg: SyntheticConfig, d: _District, split_index: int, pose: _Pose) -> tuple[np.ndarray, str]:
    role_key = 0 if pose.role == "database" else 1
    rng = _rng(cfg.seed, split_index, role_key, pose.index)
    cam = _Camera(pose.x, pose.y, pose.yaw, pose.cam_h, pose.hfov, pose.cy)
    if pose.role == "database":
        cond = _database_condition(cfg.seed, split_index)
        cond.gain = cond.gain * np.float32(rng.uniform(0.96, 1.04))
        movers = _movers(d, pose, rng, n_cars=1.0, n_people=0.5)
    else:
        cond = _query_condition(rng)
        movers = _movers(d, pose, rng, n_cars=4.0, n_people=5.0)
    return _render(d, cam, cond, cfg.width, cfg.height, movers, rng), cond.name


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def _work(task: tuple[int, dict, str]) -> tuple[str, str]:
    split_index, pose_dict, out_file = task
    cfg: SyntheticConfig = _WORKER["cfg"]
    d = _WORKER["districts"][SPLITS[split_index]]
    img, cond = _render_pose(cfg, d, split_index, _Pose(**pose_dict))
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_bytes(_encode_jpeg(img, cfg.jpeg_quality))
    return out_file, cond


def _start_methods() -> list[str]:
    from multiprocessing import get_all_start_methods

    return get_all_start_methods()
