"""The frozen-trunk activation cache of a training run: the backbone's output at the freeze boundary, computed once.

Training changes only the layers after the freeze boundary (:meth:`netvlad_core.models.PlaceModel.split_trunk`:
the trainable backbone units, the pooling, the whitening); the *frozen trunk* before it is fixed, runs in eval mode
(its BatchNorm layers keep their running statistics) and sees no data augmentation, so its output for an image never
changes. :func:`build_trunk_cache` computes it once for every image a run touches — the train database and queries,
the val database and queries, rows in that order (:data:`PARTS`) — into one ``np.memmap`` ``.npy`` file
``trunk_cache.npy`` in the checkpoint folder (float16 by default, float32 on request); cache refreshes, training
steps and validation then run only the trainable part on those rows (:func:`encode_cached`), and no image is decoded
again. For a CNN a row is the activation map at the boundary (C × h × w); for a vision transformer
(:mod:`netvlad_core.models.vit`) it is the frozen blocks' output tokens (prefix and patch tokens, after the position
embedding: tokens × C), and the trainable part runs the remaining blocks, the final norm and the head on them.

Next to it, ``trunk_cache.json`` holds the cache's identity and a progress counter: the sha256 of the trunk's
weights and buffers, the freeze boundary, both splits' content
(:func:`netvlad_core.datasets.manifest.split_fingerprint`: manifest rows, thresholds, image root, each image file's
size and modification time), the input size and normalisation, the storage dtype, the activation shape, the device
type and autocast dtype (a GPU computes the trunk under autocast). A file is used or resumed only when its identity
is the same; otherwise it is deleted and rebuilt. Images are told apart by size and modification time, not content:
one replaced by another of the same size with its time restored keeps the old activations. Rows are committed in rounds
(memmap flushed, then the counter written atomically): an interrupted build resumes at the counter.

Under torchrun the images are shared out as in :func:`netvlad_core.features.encode_rounds` (each rank its share of
every round, rows gathered in order) and rank 0 alone writes the file; every rank then reads the same file, so the
checkpoint folder must be one every process sees (one machine, or a shared file system) — otherwise ``auto`` turns
the cache off and ``on`` is an error. The file's space is checked and reserved (``posix_fallocate``) before the
first image is read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .datasets.manifest import Split, split_fingerprint
from .device import autocast, to_device
from .distributed import DistContext, all_reduce_sum, barrier, broadcast_object, gather_batch, num_rounds, shard_indices
from .errors import NetVLADError
from .features import encode_rounds, model_fingerprint
from .io import _size, atomic_path, ensure_free_space, reserve_space

CACHE_NAME = "trunk_cache.npy"
SIDECAR_NAME = "trunk_cache.json"
MODES = ("auto", "on", "off")
DTYPES = ("float16", "float32")
#: The row blocks of the file, in order: train database, train queries, val database, val queries.
PARTS = ("train_db", "train_q", "val_db", "val_q")
FORMAT = 1


@dataclass
class TrunkCache:
    """An open, complete trunk cache: ``array`` (rows × C × h × w, or rows × tokens × C for a transformer;
    read-only memmap) and the first row of each part of :data:`PARTS`."""

    path: Path
    array: np.ndarray
    offsets: dict[str, int]

    def rows(self, part: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Row numbers of ``part``'s images ``indices`` (all of them for ``None``)."""
        lo = self.offsets[part]
        hi = self.offsets[PARTS[PARTS.index(part) + 1]] if part != PARTS[-1] else len(self.array)
        if indices is None:
            return np.arange(lo, hi, dtype=np.int64)
        return lo + np.asarray(indices, dtype=np.int64)

    def activations(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The activations of ``rows`` as one float32 tensor (N, C, h, w)."""
        return torch.from_numpy(np.asarray(self.array[np.asarray(rows, dtype=np.int64)], dtype=np.float32))


@dataclass
class TrunkPlan:
    """What a run will cache: the trunk and the trainable part of the model, the activation shape per image, the
    storage dtype, the images (in row order) and where the file goes."""

    trunk: torch.nn.Module
    part: torch.nn.Module
    shape: tuple[int, ...]  # per image: (C, h, w), or (tokens, C) for a transformer
    dtype: str
    files: list[Path]
    offsets: dict[str, int]
    folder: Path

    @property
    def nbytes(self) -> int:
        return len(self.files) * int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def path(self) -> Path:
        return self.folder / CACHE_NAME

    def describe(self) -> str:
        per_image = f"{self.shape[0]} tokens × {self.shape[1]}" if len(self.shape) == 2 else "×".join(
            map(str, self.shape))
        return (f"{len(self.files)} images × {per_image} {self.dtype} activations at the freeze boundary "
                f"({_size(self.nbytes // max(len(self.files), 1))} per image) = {_size(self.nbytes)} in {self.path}")


def activation_shape(trunk: torch.nn.Module, height: int, width: int, device: torch.device) -> tuple[int, ...]:
    """(C, h, w) — (tokens, C) for a transformer — of the trunk's output for one image of ``height`` × ``width``
    (one forward of a blank image)."""
    param = next(trunk.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    with torch.inference_mode():
        out = trunk(to_device(torch.zeros(1, 3, height, width, dtype=dtype), device))
    return tuple(int(s) for s in out.shape[1:])


def plan_trunk_cache(model: torch.nn.Module, model_cfg, train_split: Split, val_split: Split, *, mode: str,
                     dtype: str, folder: Path, device: torch.device, dist: DistContext | None = None,
                     keep_free: int = 0, log: Callable[[str], None] = print) -> TrunkPlan | None:
    """The cache a run uses (``None``: none, train on images as before), decided on rank 0 and the same on every
    rank. ``mode``: ``off`` → ``None``; ``auto`` → a plan when the model has a frozen trunk, the file fits the free
    disk of ``folder`` (with a margin) and every process sees ``folder``, with a one-line notice either way;
    ``on`` → a plan, or a one-line :class:`NetVLADError` saying why not. ``keep_free``: bytes the run writes into
    ``folder`` besides the cache (its checkpoint), which the cache must leave free in both modes."""
    if mode not in MODES:
        raise NetVLADError(f"trunk-cache must be one of {', '.join(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise NetVLADError(f"trunk-cache-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if mode == "off":
        return None
    is_main = dist is None or dist.is_main
    split = getattr(model, "split_trunk", lambda: None)()
    if split is None:
        why = "the model has no frozen trunk to cache (every backbone unit trains, or the backbone cannot be cut at " \
              "its freeze boundary)"
        if mode == "on":
            raise NetVLADError(f"trunk-cache on: {why}")
        if is_main:
            log(f"train: trunk cache off: {why}")
        return None
    trunk, part = split
    files = train_split.db_files() + train_split.query_files() + val_split.db_files() + val_split.query_files()
    counts = (train_split.num_db, train_split.num_queries, val_split.num_db, val_split.num_queries)
    offsets = {name: int(sum(counts[:i])) for i, name in enumerate(PARTS)}
    plan = TrunkPlan(trunk=trunk, part=part, shape=activation_shape(trunk, model_cfg.input_height,
                                                                    model_cfg.input_width, device),
                     dtype=dtype, files=files, offsets=offsets, folder=Path(folder))
    problem = None
    if is_main:
        plan.folder.mkdir(parents=True, exist_ok=True)
        existing = plan.path.stat().st_size if plan.path.is_file() else 0
        free = shutil.disk_usage(plan.folder).free + existing
        margin = max(plan.nbytes // 10, 256 * 2**20)
        if free < plan.nbytes + keep_free + (margin if mode == "auto" else 0):
            besides = f" + {_size(keep_free)} for the checkpoint" if keep_free else ""
            problem = f"needs {_size(plan.nbytes)}{besides} in {plan.folder}, {_size(free)} free"
    if dist is not None and dist.enabled:
        problem = broadcast_object(problem, dist, what="sharing the trunk-cache decision")
        if problem is None:
            problem = _check_shared_folder(plan.folder, dist)
    if problem is not None:
        if mode == "on":
            raise NetVLADError(f"trunk-cache on: {problem}")
        if is_main:
            log(f"train: trunk cache off: {problem}")
        return None
    if is_main:
        log(f"train: trunk cache on: {plan.describe()}")
    return plan


def _check_shared_folder(folder: Path, dist: DistContext) -> str | None:
    """``None`` when every rank sees the file rank 0 writes into ``folder``; otherwise why not."""
    token = hashlib.sha256(f"{folder.resolve()}:{np.random.SeedSequence().entropy}".encode()).hexdigest()
    token = broadcast_object(token, dist, what="sharing the trunk-cache probe")
    probe = folder / f".trunk_cache_probe.{token[:16]}"
    if dist.is_main:
        probe.write_text(token)
    barrier(dist, "waiting for the trunk-cache probe")
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    missing = int(all_reduce_sum(0.0 if seen else 1.0, dist, what="checking the trunk-cache folder")[0])
    if dist.is_main:
        probe.unlink(missing_ok=True)
    if missing:
        return f"{missing} of the {dist.world_size} processes cannot see {folder} (the checkpoint dir must be shared)"
    return None


def cache_identity(plan: TrunkPlan, model_cfg, train_split: Split, val_split: Split, *, device: torch.device,
                   amp: str) -> str:
    """The hash a cache file must carry to be used or resumed (see the module docstring)."""
    blob = json.dumps({"format": FORMAT, "trunk": model_fingerprint(plan.trunk), "backbone": model_cfg.backbone,
                       "trainable_blocks": model_cfg.trainable_blocks,
                       "train_split": split_fingerprint(train_split), "val_split": split_fingerprint(val_split),
                       "rows": len(plan.files), "offsets": plan.offsets, "shape": list(plan.shape),
                       "dtype": plan.dtype, "height": model_cfg.input_height, "width": model_cfg.input_width,
                       "mean": [float(v) for v in model_cfg.mean], "std": [float(v) for v in model_cfg.std],
                       "device": device.type, "amp": amp if device.type == "cuda" else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Flat(torch.nn.Module):
    """The trunk with its output flattened to rows, as :func:`~netvlad_core.features.encode_rounds` gathers them."""

    def __init__(self, trunk: torch.nn.Module, shape: tuple[int, ...], stride: int):
        super().__init__()
        self.trunk = trunk
        self.out_dim = int(np.prod(shape))
        self.stride = stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).flatten(1)


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(path: Path, identity: str, done: int, total: int) -> None:
    with atomic_path(path, replaces_input=True) as tmp:  # the build's own progress record
        tmp.write_text(json.dumps({"identity": identity, "done": int(done), "rows": int(total)}))


def _open_existing(plan: TrunkPlan, identity: str) -> tuple[np.memmap, int] | None:
    """The cache file and its committed row count when both it and its sidecar match ``identity``."""
    side = _read_sidecar(plan.folder / SIDECAR_NAME)
    if side is None or side.get("identity") != identity or not plan.path.is_file():
        return None
    try:
        array = np.lib.format.open_memmap(plan.path, mode="r+")
    except (OSError, ValueError):
        return None
    if array.shape != (len(plan.files), *plan.shape) or array.dtype != np.dtype(plan.dtype):
        return None
    return array, int(side.get("done", 0))


def remove_trunk_cache(folder: str | Path) -> None:
    """Delete the cache file and its sidecar in ``folder`` (if any)."""
    for name in (SIDECAR_NAME, CACHE_NAME):
        (Path(folder) / name).unlink(missing_ok=True)


def build_trunk_cache(plan: TrunkPlan, identity: str, *, model_cfg, device: torch.device, batch_size: int,
                      num_workers: int, amp: str, stride: int = 1, progress: bool = False,
                      dist: DistContext | None = None, log: Callable[[str], None] = print) -> TrunkCache:
    """Compute (or finish, or reuse) the cache ``plan`` describes and return it open read-only on every rank.

    Resumable: rank 0 resumes a file whose sidecar carries ``identity`` from its committed row count, and discards
    any other. Under torchrun each rank encodes its share of every round and rank 0 writes the gathered rows."""
    from tqdm import tqdm

    is_main = dist is None or dist.is_main
    side_path = plan.folder / SIDECAR_NAME
    total = len(plan.files)
    array = None
    done = 0
    if is_main:
        existing = _open_existing(plan, identity)
        if existing is None:
            remove_trunk_cache(plan.folder)
            ensure_free_space(plan.path, plan.nbytes)
            array = np.lib.format.open_memmap(plan.path, mode="w+", dtype=plan.dtype, shape=(total, *plan.shape))
            try:
                reserve_space(plan.path, plan.path.stat().st_size)
            except BaseException:
                del array
                remove_trunk_cache(plan.folder)
                raise
            _write_sidecar(side_path, identity, 0, total)
        else:
            array, done = existing
            if 0 < done < total:
                log(f"train: resuming the trunk cache {plan.path} at image {done} of {total}")
    if dist is not None and dist.enabled:
        done = int(broadcast_object(done, dist, what="sharing the trunk-cache position"))
    if done < total:
        flat = _Flat(plan.trunk, plan.shape, stride)
        with tqdm(total=total, initial=done, desc="trunk cache", unit="img", leave=False,
                  disable=not (progress and is_main)) as bar:
            for idx, rows in encode_rounds(flat, plan.files, height=model_cfg.input_height,
                                           width=model_cfg.input_width, mean=model_cfg.mean, std=model_cfg.std,
                                           device=device, batch_size=batch_size, num_workers=num_workers, amp=amp,
                                           dist=dist, start=done):
                if is_main:
                    block = rows.reshape(len(idx), *plan.shape).astype(plan.dtype, copy=False)
                    if not np.isfinite(block).all():
                        bad = int(idx[int(np.flatnonzero(~np.isfinite(block.reshape(len(idx), -1)).all(1))[0])])
                        raise NetVLADError(f"{plan.files[bad]}: the trunk's activations are not finite in "
                                           f"{plan.dtype} (try --trunk-cache-dtype float32)")
                    array[idx] = block
                    array.flush()
                    _write_sidecar(side_path, identity, int(idx[-1]) + 1, total)
                bar.update(len(idx))
    if is_main:
        array.flush()
        del array
    if dist is not None and dist.enabled:
        barrier(dist, "waiting for rank 0 to write the trunk cache")
    return TrunkCache(path=plan.path, array=np.load(plan.path, mmap_mode="r"), offsets=dict(plan.offsets))


def _cached_batches(part: torch.nn.Module, cache: TrunkCache, rows: np.ndarray, device: torch.device,
                    amp: str, batch_size: int, positions: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(positions), batch_size):
        pos = positions[lo:lo + batch_size]
        with torch.inference_mode(), autocast(device, amp):
            out = part(to_device(cache.activations(rows[pos]), device))
        yield pos, out.float().cpu().numpy()


def encode_cached(part: torch.nn.Module, cache: TrunkCache, rows: np.ndarray, out: np.ndarray | None, *,
                  device: torch.device, batch_size: int, amp: str, progress: bool = False, desc: str = "cache",
                  dist: DistContext | None = None) -> np.ndarray | None:
    """Descriptors of the cache rows ``rows`` into ``out`` (row ``i`` of ``out`` ← ``rows[i]``) with the trainable
    part, in batches of ``batch_size``. Under torchrun in rounds like :func:`netvlad_core.features.encode_rounds`
    (rank ``k`` takes batch ``round·world + k``, rows gathered on every rank); a rank may pass ``out=None``."""
    from tqdm import tqdm

    part.eval()
    rows = np.asarray(rows, dtype=np.int64)
    show = progress and (dist is None or dist.is_main)
    with tqdm(total=len(rows), desc=desc, unit="img", leave=False, disable=not show) as bar:
        if dist is None or not dist.enabled:
            for pos, desc_rows in _cached_batches(part, cache, rows, device, amp, batch_size, np.arange(len(rows))):
                if out is not None:
                    out[pos] = desc_rows.astype(out.dtype, copy=False)
                bar.update(len(pos))
            return out
        mine = shard_indices(len(rows), dist.rank, dist.world_size, block=batch_size)
        local = _cached_batches(part, cache, rows, device, amp, batch_size, mine)
        for _ in range(num_rounds(len(rows), batch_size, dist.world_size)):
            item = next(local, None)
            pos, desc_rows = item if item is not None else (None, None)
            pos, desc_rows = gather_batch(desc_rows, pos, ctx=dist, capacity=batch_size, dim=int(part.out_dim),
                                          what="gathering descriptors")
            if out is not None:
                out[pos] = desc_rows.astype(out.dtype, copy=False)
            bar.update(len(pos))
    return out
