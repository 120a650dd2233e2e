"""Global descriptors of a split's images, cached in one HDF5 file (resumable).

File layout: datasets ``db`` (num_db × dim) and ``query`` (num_queries × dim), rows in the order of the split's
image lists, float32 (or float16 on request); attributes ``complete`` (True once finished), ``split``, ``dataset``,
``model`` (the model config as JSON), ``model_fingerprint``, ``dim``, ``dtype``.

While running, the file lives under a hidden ``.<name>.partial`` sibling with progress counters, and what it is made
from under ``.<name>.partial.json`` (kept out of the HDF5 file, so that the finished file holds nothing of the machine
that made it: the same model and split give the same bytes in any checkout); an interrupted run resumes there only
if that identity is the same: the model fingerprint (sha256 of the
weights), the split's content (:func:`netvlad_core.datasets.manifest.split_fingerprint`: dataset and split names,
image root, every manifest row's role, path, UTM and timestamp, and each image file's size and mtime), the
descriptor size and dtype, and the input size and normalisation. Otherwise the partial file is discarded and the
extraction starts over. Only a finished file is renamed to the final name.

Under torchrun (a :class:`~netvlad_core.distributed.DistContext` with several processes) every rank encodes its
blocks of each round of ``world × batch_size`` images (:mod:`netvlad_core.distributed`), the round's rows are
gathered in image order, and only rank 0 touches the files: the same partial file, the same progress counters
(committed after whole rounds), so an interrupted run resumes from rank 0's counters with any number of processes.
Each rank's batches are the single-process run's batches, so the rows equal a single-process run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from .config import RunConfig, option
from .datasets.images import ImageFiles
from .datasets.manifest import Split
from .device import autocast, prepare_model, to_device
from .distributed import DistContext, barrier, broadcast_object, gather_batch, num_rounds, pad_rounds, shard_indices
from .errors import NetVLADError
from .io import (
    atomic_path,
    disk_full_error,
    ensure_free_space,
    is_disk_full,
    open_h5_for_reading,
    require_file,
    reserve_space,
)
from .models.build import ModelConfig


@dataclass
class FeatureConfig:
    """How images are encoded into global descriptors (``features``, and the encoding passes of ``pca``)."""

    batch_size: int = option(16, "Images per forward pass.")
    num_workers: int = option(2, "DataLoader worker processes for decoding images.", name="workers")
    float16: bool = option(False, "Store descriptors as float16 (half the disk) instead of float32.")
    amp: str = option("bf16", "Autocast dtype on GPU: bf16, fp16 or fp32 (ignored on CPU).")
    flush_every: int = option(20, "Batches between progress commits of a resumable run.", cli=False)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise NetVLADError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise NetVLADError(f"workers must be >= 0, got {self.num_workers}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise NetVLADError(f"amp must be bf16, fp16 or fp32, got {self.amp!r}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes, bytes): identifies the weights that made a file."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def image_loader(files: Sequence[Path], *, height: int, width: int, mean, std, batch_size: int,
                 num_workers: int, start: int = 0, pin_memory: bool = False,
                 indices: Sequence[int] | None = None, min_side: int = 1):
    """An iterable of batches ``(images, indices)`` of ``files[start:]`` (or of ``files[i] for i in indices``) in
    order; the indices are positions in ``files``. Images with a side under ``min_side`` pixels (the model's
    stride) are refused. An unreadable image raises its one-line :class:`NetVLADError` from the iteration, also
    when it was decoded in a worker process (:func:`netvlad_core.datasets.images.checked_loader`)."""
    from .datasets.images import checked_loader

    ds = ImageFiles(files, height, width, mean, std, min_side=min_side)
    if indices is not None:
        ds = Subset(ds, [int(i) for i in indices])
    elif start:
        ds = Subset(ds, range(start, len(files)))
    return checked_loader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          pin_memory=pin_memory, persistent_workers=False)


@torch.inference_mode()
def encode_batches(model: torch.nn.Module, loader, device: torch.device, amp: str = "bf16"
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, descriptors float32)`` per batch of ``loader`` (:func:`image_loader`); the model is in
    eval mode."""
    model.eval()
    for images, idx in loader:
        with autocast(device, amp):
            out = model(to_device(images, device))
        yield idx.numpy(), out.float().cpu().numpy()


def encode_rounds(model: torch.nn.Module, files: Sequence[Path], *, height: int, width: int, mean, std,
                  device: torch.device, batch_size: int, num_workers: int, amp: str = "bf16",
                  dist: DistContext | None = None, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, descriptors float32)`` covering ``files[start:]`` in image order, on every rank.

    Single process: :func:`encode_batches`, one batch at a time. Under torchrun: one item per round of
    ``world × batch_size`` images, each rank encoding its ``batch_size`` block (the single-process run's batch
    ``round·world + rank``) and every rank receiving the whole round. Every rank must consume every item.
    Images smaller than the model's ``stride`` (when it has one) are refused.
    """
    loader_args = dict(height=height, width=width, mean=mean, std=std, batch_size=batch_size,
                       num_workers=num_workers, pin_memory=device.type == "cuda",
                       min_side=int(getattr(model, "stride", None) or 1))
    if dist is None or not dist.enabled:
        yield from encode_batches(model, image_loader(files, start=start, **loader_args), device, amp)
        return
    mine = shard_indices(len(files), dist.rank, dist.world_size, block=batch_size, start=start)
    rounds = num_rounds(len(files), batch_size, dist.world_size, start)
    local = encode_batches(model, image_loader(files, indices=mine, **loader_args), device, amp) if len(mine) else \
        iter(())
    dim = int(model.out_dim)
    for item in pad_rounds(local, rounds):
        idx, rows = item if item is not None else (None, None)
        yield gather_batch(rows, idx, ctx=dist, capacity=batch_size, dim=dim, what="gathering descriptors")


def encode_images(model: torch.nn.Module, files: Sequence[Path], *, height: int, width: int, mean, std,
                  device: torch.device, cfg: FeatureConfig, progress: bool = True, desc: str = "encode",
                  dist: DistContext | None = None, result_on: str = "all") -> np.ndarray | None:
    """All descriptors of ``files`` in memory as one float32 (or float16) array, in order.

    Under torchrun the images are sharded over the ranks (:func:`encode_rounds`); the array is returned on every
    rank (``result_on="all"``) or only on rank 0 (``"main"``: the other ranks get ``None`` and hold no copy).
    """
    from tqdm import tqdm

    if result_on not in ("all", "main"):
        raise ValueError(f"result_on must be 'all' or 'main', got {result_on!r}")
    if not len(files):
        raise NetVLADError("no images to encode")
    keep = dist is None or result_on == "all" or dist.is_main
    show = progress and (dist is None or dist.is_main)
    out: np.ndarray | None = None
    with tqdm(total=len(files), desc=desc, unit="img", disable=not show) as bar:
        for idx, desc_batch in encode_rounds(model, files, height=height, width=width, mean=mean, std=std,
                                             device=device, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                             amp=cfg.amp, dist=dist):
            if keep:
                if out is None:
                    out = np.empty((len(files), desc_batch.shape[1]),
                                   dtype=np.float16 if cfg.float16 else np.float32)
                out[idx] = desc_batch
            bar.update(len(idx))
    return out


#: Bytes reserved in a partial file beyond its datasets, for the attributes written when it is finished.
FINAL_ATTRIBUTES_BYTES = 256 * 1024


def _allocated_now():
    """Dataset creation properties: contiguous storage allocated when the dataset is created (not at the first
    write), so that :func:`~netvlad_core.io.reserve_space` can reserve it on disk before any work."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _partial_path(out_h5: Path) -> Path:
    return out_h5.with_name(f".{out_h5.name}.partial")


@dataclass
class _PartialFeatures:
    """Rank 0's hidden partial features file and its resume record (``<partial>.json``, the identity it was made
    from); ``committed``: whether it holds rows a rerun can resume from."""

    path: Path
    h5: Any = None
    committed: bool = False

    @property
    def identity_file(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def open(self, stack: contextlib.ExitStack, identity: str, *, out_h5: Path, rows: dict[str, int], dim: int,
             dtype, rows_bytes: int) -> dict[str, int]:
        """Resume the partial file made from ``identity``, or start one (any other is discarded) with its space
        reserved; returns the rows done per role."""
        import h5py

        resume = False
        if self.path.exists():
            try:
                with h5py.File(self.path, "r"):
                    resume = self.identity_file.is_file() and self.identity_file.read_text() == identity
            except OSError:
                resume = False
            if not resume:
                self.discard()
        if not resume:  # the final file's size must be free before anything is written
            ensure_free_space(out_h5, rows_bytes + FINAL_ATTRIBUTES_BYTES)
        self.h5 = stack.enter_context(h5py.File(self.path, "r+" if resume else "w"))
        if resume:
            reserve_space(self.path, self.path.stat().st_size)
        else:
            self.h5.attrs["complete"] = False
            for role, n in rows.items():
                self.h5.create_dataset(role, shape=(n, dim), dtype=dtype, dcpl=_allocated_now())
                self.h5.attrs[f"{role}_done"] = 0
            self.h5.flush()  # the rows' space, and some for the final attributes, reserved before any image is read
            reserve_space(self.path, self.path.stat().st_size + FINAL_ATTRIBUTES_BYTES)
            with atomic_path(self.identity_file, replaces_input=True) as tmp:  # the resume record
                tmp.write_text(identity)
        done = {role: int(self.h5.attrs[f"{role}_done"]) for role in rows}
        self.committed = any(done.values())
        return done

    def commit(self, role: str, rows_done: int) -> None:
        self.h5.attrs[f"{role}_done"] = rows_done
        self.h5.flush()
        self.committed = True

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.identity_file.unlink(missing_ok=True)


def _features_identity(model_cfg: ModelConfig, split: Split, fingerprint: str, dim: int, dtype) -> str:
    """What a partial file must have been made from to be resumed (one stat per image: rank 0 only)."""
    from .datasets.manifest import split_fingerprint

    return json.dumps({"model": fingerprint, "split": split.name, "dataset": split.dataset,
                       "split_fingerprint": split_fingerprint(split, files=True), "num_db": split.num_db,
                       "num_queries": split.num_queries, "dim": dim, "dtype": np.dtype(dtype).name,
                       "height": model_cfg.input_height, "width": model_cfg.input_width,
                       "mean": [float(v) for v in model_cfg.mean],
                       "std": [float(v) for v in model_cfg.std]}, sort_keys=True)


def _encode_role(model, model_cfg: ModelConfig, files: list[Path], done: int, *, role: str, desc: str,
                 partial: _PartialFeatures | None, dtype, device: torch.device, cfg: FeatureConfig,
                 dist: DistContext | None, show: bool) -> None:
    """Encode ``files[done:]`` into the partial file's dataset ``role`` (rank 0; the other ranks encode their
    share), committing the progress every ``cfg.flush_every`` batches."""
    from tqdm import tqdm

    dset = partial.h5[role] if partial is not None else None
    rounds = encode_rounds(model, files, height=model_cfg.input_height, width=model_cfg.input_width,
                           mean=model_cfg.mean, std=model_cfg.std, device=device, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, amp=cfg.amp, dist=dist, start=done)
    with tqdm(total=len(files), initial=done, desc=desc, unit="img", disable=not show) as bar:
        for b, (idx, rows) in enumerate(rounds):
            lo = int(idx[0])  # a batch (or a round) is a contiguous run of original indices
            if not np.isfinite(rows).all():  # every rank sees the round: all raise the same error
                first_bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
                bad = lo + first_bad if dist is not None else lo
                raise NetVLADError(f"{files[bad]}: the model produced NaN/inf descriptors for this batch")
            if dset is not None:
                dset[lo:lo + len(idx)] = rows.astype(dtype)
                if (b + 1) % cfg.flush_every == 0:
                    partial.commit(role, lo + len(idx))
            bar.update(len(idx))
    if partial is not None:
        partial.commit(role, len(files))


def extract_split_features(model, model_cfg: ModelConfig, split: Split, out_h5: str | os.PathLike, *,
                           device: torch.device, cfg: FeatureConfig, progress: bool = True,
                           dist: DistContext | None = None) -> Path:
    """Encode every database and query image of ``split`` with ``model`` into ``out_h5`` (resumable: a partial file
    is resumed only when made from the same weights, split content and image files, see the module docstring).

    Under torchrun (``dist`` with several processes) the images are sharded over the ranks and rank 0 alone
    writes (and resumes) the file; every rank returns once the final file exists."""
    cfg.validate()
    out_h5 = Path(out_h5)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    model = prepare_model(model, device)
    fingerprint = model_fingerprint(model)
    dtype = np.float16 if cfg.float16 else np.float32
    dim = int(model.out_dim)
    roles = {"db": split.db_files(), "query": split.query_files()}
    rows_bytes = (split.num_db + split.num_queries) * dim * np.dtype(dtype).itemsize
    is_main = dist is None or dist.is_main
    partial = _PartialFeatures(_partial_path(out_h5)) if is_main else None  # only rank 0 opens and writes it
    try:
        with contextlib.ExitStack() as stack:
            done_by_role: dict[str, int] = {}
            if partial is not None:
                done_by_role = partial.open(stack, _features_identity(model_cfg, split, fingerprint, dim, dtype),
                                            out_h5=out_h5, rows={r: len(f) for r, f in roles.items()}, dim=dim,
                                            dtype=dtype, rows_bytes=rows_bytes)
            if dist is not None:
                done_by_role = broadcast_object(done_by_role, dist, what="sharing the resume position")
            for role, files in roles.items():
                if done_by_role[role] < len(files):
                    _encode_role(model, model_cfg, files, done_by_role[role], role=role, desc=f"{split.name} {role}",
                                 partial=partial, dtype=dtype, device=device, cfg=cfg, dist=dist,
                                 show=progress and is_main)
            if partial is not None:
                partial.h5.attrs.update({"split": split.name, "dataset": split.dataset,
                                         "model": json.dumps(model_cfg.to_dict(), sort_keys=True),
                                         "model_fingerprint": fingerprint, "dim": dim, "dtype": np.dtype(dtype).name,
                                         "feature_config": json.dumps(asdict(cfg), sort_keys=True), "complete": True})
    except BaseException as e:
        # A partial file that holds no committed rows is no use to a rerun; one written on a full disk may be
        # corrupt: remove both, so a failure leaves nothing behind but a partial a rerun can resume from.
        full = isinstance(e, Exception) and not isinstance(e, NetVLADError) and is_disk_full(e)
        if partial is not None and (full or not partial.committed):
            partial.discard()
        if full:
            raise disk_full_error(out_h5, rows_bytes) from None
        raise
    if partial is not None:
        os.replace(partial.path, out_h5)
        partial.identity_file.unlink(missing_ok=True)
    if dist is not None:
        barrier(dist, "waiting for rank 0 to finish the features file")
    return out_h5


def write_split_features(model_file: str | os.PathLike, split_dir: str | os.PathLike, out_h5: str | os.PathLike, *,
                         cfg: FeatureConfig, run: RunConfig, log: Callable[[str], None] = print) -> Path:
    """The ``features`` stage: encode the split in ``split_dir`` with the model in ``model_file`` into ``out_h5``
    (:func:`extract_split_features`; under torchrun sharded over the processes) and log one summary line."""
    from .datasets.manifest import load_split
    from .distributed import distributed_session
    from .io import distinct_paths
    from .models import load_model

    distinct_paths({"--model": model_file}, {"--out": out_h5})
    cfg.validate()
    split = load_split(split_dir)
    net, model_cfg = load_model(model_file)
    with distributed_session(run.device, run.dist_timeout) as dist:
        extract_split_features(net, model_cfg, split, out_h5, device=dist.device, cfg=cfg,
                               progress=run.progress, dist=dist)
        if dist.is_main:
            log(f"features: {split.num_db} database + {split.num_queries} query descriptors -> {out_h5}"
                + (f" ({dist.world_size} processes)" if dist.enabled else ""))
    return Path(out_h5)


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(db, query, attrs)`` from a finished features file, as float32 arrays."""

    path = require_file(path)
    try:
        with open_h5_for_reading(path) as h5:
            if not bool(h5.attrs.get("complete", False)):
                raise NetVLADError(f"{path}: features file is incomplete (interrupted extraction)")
            if "db" not in h5 or "query" not in h5:
                raise NetVLADError(f"{path}: missing 'db' or 'query' dataset")
            return h5["db"][()].astype(np.float32), h5["query"][()].astype(np.float32), dict(h5.attrs)
    except OSError as e:
        raise NetVLADError(f"{path}: not a readable HDF5 file ({e})") from None
