"""Weakly supervised triplet training of a place model (NetVLAD's recipe), resumable bit for bit.

One epoch visits the train queries that have a database image within the training radius, in an order drawn
from ``(seed, epoch)``, in *refresh blocks* of ``cache_refresh_rate`` queries. Each block:

1. writes a checkpoint (except the first block of an epoch, whose state the previous epoch-end checkpoint holds);
2. refreshes the descriptor cache: every database image and the block's queries are encoded with the current
   weights by :func:`netvlad_core.features.encode_batches` (float16 on GPU, float32 on CPU; in memory or a
   ``np.memmap`` file);
3. mines every query of the block at once (:func:`netvlad_core.mining.mine_triplets`: one batched distance
   computation, best positive in feature space, hard negatives violating the margin, negative cache);
4. trains on batches of ``batch_size`` consecutive queries of the block (skipped queries drop out of their
   batch; a batch with none left is no step). Each query contributes ``[q, p, n_1..n_k]`` images to one forward
   pass; the loss is the sum over the batch's triplets divided by their number.

With the trunk cache (``trunk_cache``: ``auto``/``on``; :mod:`netvlad_core.trunk_cache`) the frozen trunk's output at
the freeze boundary is computed once, before the first epoch, for every train and val image; steps 2 and 4 and the
validation then run only the model's trainable part (:meth:`netvlad_core.models.PlaceModel.split_trunk`) on the
cached activations, and no image is decoded again. In float32 storage this is the image run up to float rounding; in
float16 (the default) the activations are rounded to float16 first, which moves the result slightly.

After each epoch: the learning rate schedule steps (StepLR), recall@1/5/10 is measured on the validation split
with :mod:`netvlad_core.retrieval`, the weights of the best epoch by recall@5 are kept (in memory and in the
checkpoint), an epoch-end checkpoint is written, and training stops after ``patience`` epochs without improvement
(0 = never early-stop). ``out`` is written once, when training ends, with the best epoch's weights: an interrupted
run leaves no ``out``.

The model runs in eval mode throughout: BatchNorm layers keep their ImageNet running statistics (their affine
parameters still learn where trainable) and there is no dropout, so a step does not depend on how a batch is
composed and needs no random numbers. Only parameters with ``requires_grad`` (the trainable backbone blocks
and the pooling layer) are optimised.

Checkpoints (``<checkpoint_dir>/train_state.pt``, written atomically, read with ``weights_only=True``; one
:class:`TrainState`, the loop's whole state, through :meth:`TrainState.to_checkpoint`) hold the model, optimiser
and scheduler state, the best model so far, the negative cache, the RNG states (torch, numpy, python, the mining
generator), the epoch, the epoch's query order and the position in it, the best recall and
the epochs without improvement, the DVCLive step, and the DVCLive files written so far (metrics.json,
params.yaml and the plots' .tsv files, as text). A checkpoint is resumed only when its hash (:func:`run_identity`)
matches: the training parameters (all but ``workers``, ``cache_memmap`` and the trunk-cache options, which enter
as what they resolved to: ``off``, ``float16`` or ``float32``), the initial model's config and
weights (sha256 of the state dict), the device type, the checkpoint format, and both splits' content
(:func:`netvlad_core.datasets.manifest.split_fingerprint`: dataset and split names, thresholds, image root, every
manifest row's role, path, UTM and timestamp, and each image file's size and mtime); otherwise a one-line notice is
printed and training starts over. On resume the DVCLive files are restored from the checkpoint before DVCLive
opens the folder (``dvc repro`` deletes it before rerunning the stage), so the curves equal an uninterrupted run's.
The checkpoint (and the trunk cache, unless ``keep_trunk_cache``) is deleted after a successful finish. On CPU
(deterministic algorithms on, ordered loaders) a resumed run ends with the same weights, bit for bit, as an
uninterrupted one.

Under torchrun (``dist``, :mod:`netvlad_core.distributed`) ``batch_size`` is the global batch. Cache refreshes and
validation are sharded over the ranks (:func:`netvlad_core.features.encode_rounds`); rank 0 holds the cache, mines
and sends the triplets to every rank, so all ranks train on the single-process triplets. Each global batch's
queries are split into contiguous slices, one per rank; the model is wrapped in DistributedDataParallel whose
gradients are summed (not averaged) while each rank's loss is its triplets' sum divided by the global batch's
triplet count: a step equals the single-process step up to float rounding. A rank with no query in a batch (fewer
queries than ranks) runs one blank image with weight 0 to join the all-reduce. Rank 0 alone reads the checkpoint
(and sends it to the others, so it only has to exist on the first machine), writes checkpoints, DVCLive files and
the model, and logs. The checkpoint does not depend on the number of processes: a run resumes with another number
(bit for bit only with the same one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import option
from .datasets.images import load_image
from .datasets.manifest import GroundTruth, Split, split_fingerprint
from .device import autocast, prepare_model, to_device
from .distributed import DistContext, all_reduce_sum, broadcast_object, shard_indices
from .errors import NetVLADError
from .features import encode_rounds, model_fingerprint
from .io import load_state, save_state
from .mining import MiningConfig, MiningStats, Triplets, batch_loss, batch_loss_sum, empty_negative_cache, mine_triplets
from .models.build import ModelConfig

CHECKPOINT_NAME = "train_state.pt"
CHECKPOINT_FORMAT = 2  # 2: the DVCLive history travels with the checkpoint ("live_files")
RECALL_NS = (1, 5, 10)
# Options that change what is computed; the rest (workers, progress, paths) do not enter the checkpoint hash. The
# trunk-cache options enter it as what they resolve to (off, float16 or float32: see run_identity).
_NOT_IN_IDENTITY = ("workers", "cache_memmap", "trunk_cache", "trunk_cache_dtype", "keep_trunk_cache")


@dataclass
class TrainConfig:
    """Training hyper-parameters (the paper's by default); the triplet mining is ``mining`` (params.yaml group
    ``mining``), the rest the ``train`` stage's options (params.yaml group ``train``)."""

    epochs: int = option(30, "Maximum number of epochs.")
    lr: float = option(1e-4, "SGD learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(1e-3, "SGD weight decay.")
    lr_step: int = option(5, "Multiply the learning rate by lr-gamma every this many epochs.")
    lr_gamma: float = option(0.5, "Learning-rate factor applied every lr-step epochs.")
    batch_size: int = option(4, "Queries per optimisation step (each with its positive and negatives); under "
                             "torchrun the global batch.")
    cache_refresh_rate: int = option(1000, "Queries between descriptor-cache refreshes (and checkpoints).")
    patience: int = option(10, "Stop after this many epochs without a better validation recall@5 (0 = never).")
    seed: int = option(0, "Seed of the query order and the negative sampling.")
    max_queries_per_epoch: int = option(0, "Train on at most this many queries per epoch (0 = all).")
    encode_batch_size: int = option(16, "Images per forward pass when refreshing the cache and validating.")
    workers: int = option(2, "DataLoader worker processes for decoding images.")
    amp: str = option("bf16", "Autocast dtype on GPU: bf16, fp16 or fp32 (ignored on CPU).")
    cache_memmap: bool = option(False, "Keep the database descriptor cache in a memory-mapped file in the "
                                "checkpoint dir instead of RAM.")
    trunk_cache: str = option("auto", "Frozen-trunk activation cache (the backbone's output at the freeze boundary, "
                              "computed once into the checkpoint dir; refreshes, steps and validation then run only "
                              "the trainable layers): auto (when there is a frozen trunk and the file fits the free "
                              "disk), on (required), off.")
    trunk_cache_dtype: str = option("float16", "Storage of the trunk cache: float16 (half the disk; changes the "
                                    "results slightly) or float32 (the same results up to float rounding).")
    keep_trunk_cache: bool = option(False, "Keep the trunk cache after a successful run (a later run with the same "
                                    "trunk weights, splits and input size reuses it).")
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "lr-step": self.lr_step, "batch-size": self.batch_size,
                    "cache-refresh-rate": self.cache_refresh_rate, "encode-batch-size": self.encode_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise NetVLADError(f"{name} must be >= 1, got {value}")
        for name, value in {"patience": self.patience, "max-queries-per-epoch": self.max_queries_per_epoch,
                            "workers": self.workers}.items():
            if value < 0:
                raise NetVLADError(f"{name} must be >= 0, got {value}")
        if not self.lr > 0:
            raise NetVLADError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise NetVLADError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise NetVLADError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.lr_gamma <= 1:
            raise NetVLADError(f"lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise NetVLADError(f"amp must be bf16, fp16 or fp32, got {self.amp!r}")
        from .trunk_cache import DTYPES, MODES

        if self.trunk_cache not in MODES:
            raise NetVLADError(f"trunk-cache must be one of {', '.join(MODES)}, got {self.trunk_cache!r}")
        if self.trunk_cache_dtype not in DTYPES:
            raise NetVLADError(f"trunk-cache-dtype must be one of {', '.join(DTYPES)}, got "
                               f"{self.trunk_cache_dtype!r}")
        self.mining.validate()


@dataclass
class TrainResult:
    """What a finished run reports."""

    best_recall: dict[int, float]
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    resumed: bool
    skipped_queries: int  # over all epochs: queries without a violating negative (or a positive)
    out: Path


# ----------------------------------------------------------------------------------------------- model helpers

def apply_trainable_blocks(model: torch.nn.Module, model_cfg, trainable_blocks: int | None):
    """Move the freeze boundary of a loaded model to ``trainable_blocks`` (backbone units counted from the end;
    ``-1`` all, ``0`` none; ``None`` the backbone's own default, e.g. vgg16's conv5_1..conv5_3) via
    ``model.backbone.set_trainable_blocks``, and return the updated config, which records the number used."""
    from .models.backbones import default_trainable_blocks

    if trainable_blocks is None:
        trainable_blocks = default_trainable_blocks(model_cfg.backbone, model_cfg.layers)
    new_cfg = dataclasses.replace(model_cfg, trainable_blocks=trainable_blocks)
    new_cfg.validate()
    model.backbone.set_trainable_blocks(trainable_blocks)
    return new_cfg


def train_model_file(init_model: str | os.PathLike, train_split_dir: str | os.PathLike,
                     val_split_dir: str | os.PathLike, out: str | os.PathLike, *, live_dir: str | os.PathLike,
                     checkpoint_dir: str | os.PathLike, cfg: TrainConfig, trainable_blocks: int | None, run,
                     log: Callable[[str], None] = print, report: Callable[[str], None] = print
                     ) -> TrainResult | None:
    """The ``train`` stage: the model in ``init_model`` with its freeze boundary at ``trainable_blocks``
    (:func:`apply_trainable_blocks`), trained with :func:`train` on the splits in ``train_split_dir`` and
    ``val_split_dir``; ``run`` is a :class:`~netvlad_core.config.RunConfig`. Progress notices go to ``log``, the
    one-line summary to ``report``; returns the result on rank 0 (``None`` on the other ranks under torchrun)."""
    from .datasets.manifest import load_ground_truth, load_split
    from .distributed import distributed_session
    from .io import distinct_paths
    from .models import load_model

    distinct_paths({"--init-model": init_model}, {"--out": out})
    cfg.validate()
    train_data, val_data = load_split(train_split_dir), load_split(val_split_dir)
    train_gt, val_gt = load_ground_truth(train_split_dir), load_ground_truth(val_split_dir)
    model, model_cfg = load_model(init_model)
    model_cfg = apply_trainable_blocks(model, model_cfg, trainable_blocks)
    with distributed_session(run.device, run.dist_timeout) as dist:
        result = train(model, model_cfg, train_data, train_gt, val_data, val_gt, out=out, live_dir=live_dir,
                       checkpoint_dir=checkpoint_dir, cfg=cfg, device=dist.device, progress=run.progress, log=log,
                       dist=dist)
    if not dist.is_main:
        return None
    r = result.best_recall
    report(f"train: best epoch {result.best_epoch} of {result.epochs_run} (R@1 {100 * r[1]:.1f} R@5 {100 * r[5]:.1f} "
        f"R@10 {100 * r[10]:.1f} on {val_data.name}){' early stop' if result.stopped_early else ''}"
        f"{', resumed' if result.resumed else ''}{f', {dist.world_size} processes' if dist.enabled else ''} -> {out}")
    return result


# ---------------------------------------------------------------------------------------------- descriptor cache

def encode_into(model: torch.nn.Module, files: Sequence[Path], out: np.ndarray | None, *, model_cfg: ModelConfig,
                device: torch.device, batch_size: int, num_workers: int, amp: str, progress: bool = False,
                desc: str = "cache", dist: DistContext | None = None) -> np.ndarray | None:
    """Encode ``files`` into the rows of ``out`` (an array or memmap of the cache dtype) with the batched encoder.

    Under torchrun (``dist`` with several processes) the files are shared out among the ranks
    (:func:`netvlad_core.features.encode_rounds`) and the rows gathered in order; a rank may pass ``out=None``
    to take part without keeping them (rank 0 keeps the cache, the others only encode)."""
    from tqdm import tqdm

    show = progress and (dist is None or dist.is_main)
    with tqdm(total=len(files), desc=desc, unit="img", leave=False, disable=not show) as bar:
        for idx, batch in encode_rounds(model, files, height=model_cfg.input_height, width=model_cfg.input_width,
                                        mean=model_cfg.mean, std=model_cfg.std, device=device, batch_size=batch_size,
                                        num_workers=num_workers, amp=amp, dist=dist):
            if out is not None:
                out[idx] = batch.astype(out.dtype, copy=False)
            bar.update(len(idx))
    return out


def allocate_cache(rows: int, dim: int, dtype, memmap_path: Path | None) -> np.ndarray:
    """An uninitialised ``(rows, dim)`` cache: in memory, or a ``np.memmap`` at ``memmap_path``.

    The memory-mapped file's blocks are reserved up front (``posix_fallocate``): a sparse file on a full disk would
    kill the process with SIGBUS at the first write into a page that cannot be stored; this way a full disk is one
    error here, and the file is removed."""
    from .io import reserve_space

    if memmap_path is None:
        return np.empty((rows, dim), dtype=dtype)
    memmap_path.parent.mkdir(parents=True, exist_ok=True)
    cache = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=dtype, shape=(rows, dim))
    try:
        reserve_space(memmap_path, memmap_path.stat().st_size)
    except BaseException:
        del cache
        memmap_path.unlink(missing_ok=True)
        raise
    return cache


def cache_dtype(device: torch.device):
    """float16 on GPU (half the memory; mining distances are computed in float32), float32 on CPU."""
    return np.float16 if device.type == "cuda" else np.float32


# ----------------------------------------------------------------------------------------------- triplet images

class TripletBatches(Dataset):
    """Item ``i`` = ``(images, counts)`` of the ``i``-th batch: per query ``[q, p, n_1..n_k]`` images stacked, and
    the number of negatives of each query. Images with a side under ``min_side`` pixels (the model's stride) are
    refused."""

    def __init__(self, batches: list[list[Triplets]], split: Split, model_cfg: ModelConfig, *, min_side: int = 1):
        self.batches = batches
        self.db_files, self.q_files = split.db_files(), split.query_files()
        self.model_cfg = model_cfg
        self.min_side = int(min_side)

    def __len__(self) -> int:
        return len(self.batches)

    def loader(self, *, num_workers: int, pin_memory: bool = False):
        """The items in order, decoded by ``num_workers`` processes; an unreadable image raises its one-line
        :class:`NetVLADError` from the iteration, as without workers
        (:func:`netvlad_core.datasets.images.checked_loader`)."""
        from .datasets.images import checked_loader

        return checked_loader(self, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)

    def _load(self, path: Path) -> torch.Tensor:
        m = self.model_cfg
        return load_image(path, m.input_height, m.input_width, m.mean, m.std, min_side=self.min_side)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, counts = [], []
        for t in self.batches[i]:
            images.append(self._load(self.q_files[t.query]))
            images.append(self._load(self.db_files[t.positive]))
            images.extend(self._load(self.db_files[n]) for n in t.negatives)
            counts.append(len(t.negatives))
        return torch.stack(images), torch.tensor(counts, dtype=torch.int64)


class CachedTripletBatches:
    """:class:`TripletBatches` from the trunk cache: item ``i`` = ``(activations, counts)`` of the ``i``-th batch,
    the frozen trunk's cached output for ``[q, p, n_1..n_k]`` of each query instead of the decoded images."""

    def __init__(self, batches: list[list[Triplets]], cache):
        self.batches = batches
        self.cache = cache

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, counts = [], []
        for t in self.batches[i]:
            rows.append(self.cache.rows("train_q", [t.query]))
            rows.append(self.cache.rows("train_db", [t.positive, *t.negatives]))
            counts.append(len(t.negatives))
        return self.cache.activations(np.concatenate(rows)), torch.tensor(counts, dtype=torch.int64)

    def loader(self, **_):
        return (self[i] for i in range(len(self)))


# -------------------------------------------------------------------------------------------------- validation

def validate_recall(model: torch.nn.Module, split: Split, gt: GroundTruth, *, device: torch.device, batch_size: int,
                    num_workers: int, amp: str, model_cfg: ModelConfig, progress: bool = False,
                    dist: DistContext | None = None, cached: tuple | None = None) -> dict[int, float]:
    """recall@1/5/10 of ``model`` on ``split`` (exact search on ``device`` over freshly encoded descriptors). Under
    torchrun the encoding is sharded, rank 0 searches and every rank returns rank 0's figures. ``cached``:
    ``(trainable part, trunk cache)`` — encode the split's rows ``val_db``/``val_q`` of the trunk cache with the
    model's trainable part instead of its images."""
    from .retrieval import exact_search, recall_at_n

    keep = dist is None or dist.is_main
    out_db = np.empty((split.num_db, model.out_dim), np.float32) if keep else None
    out_q = np.empty((split.num_queries, model.out_dim), np.float32) if keep else None
    if cached is not None:
        from .trunk_cache import encode_cached

        part, cache = cached
        db, q = (encode_cached(part, cache, cache.rows(name), out, device=device, batch_size=batch_size, amp=amp,
                               progress=progress, desc=desc, dist=dist)
                 for name, out, desc in (("val_db", out_db, "val db"), ("val_q", out_q, "val queries")))
    else:
        db = encode_into(model, split.db_files(), out_db, model_cfg=model_cfg, device=device, batch_size=batch_size,
                         num_workers=num_workers, amp=amp, progress=progress, desc="val db", dist=dist)
        q = encode_into(model, split.query_files(), out_q, model_cfg=model_cfg, device=device, batch_size=batch_size,
                        num_workers=num_workers, amp=amp, progress=progress, desc="val queries", dist=dist)
    recall = None
    if keep:
        _, idx = exact_search(db, q, max(RECALL_NS), device=device)
        recall = recall_at_n(idx, gt.positives, RECALL_NS)
    if dist is not None:
        recall = broadcast_object(recall, dist, what="sharing the validation recall")
    return recall


# --------------------------------------------------------------------------------------------- RNG and identity

def rng_states(mining_rng: np.random.Generator) -> dict:
    """Every RNG state as weights-only-loadable parts (tensors, ints, strings, lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(x) for x in py_state], "gauss_next": gauss_next},
        "mining": mining_rng.bit_generator.state,
    }


def restore_rng_states(states: dict, mining_rng: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    mining_rng.bit_generator.state = states["mining"]


def run_identity(cfg: TrainConfig, model_cfg, init_fingerprint: str, train_split: Split, val_split: Split,
                 device: torch.device, trunk_cache: str = "off") -> str:
    """The hash a checkpoint must carry to be resumed: the training parameters (except workers, cache-memmap and
    the trunk-cache options), the model config, the initial weights' fingerprint, both splits' content and image
    files (:func:`netvlad_core.datasets.manifest.split_fingerprint`), the device type, the checkpoint format, and
    what the trunk cache resolved to (``off``, ``float16`` or ``float32``: the trunk cache changes the result by
    float rounding in float32, slightly more in float16, so a run resumes only with the same one)."""
    params = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_IDENTITY}
    blob = json.dumps({"train": params, "model": model_cfg.to_dict(), "init_weights": init_fingerprint,
                       "train_split": split_fingerprint(train_split), "val_split": split_fingerprint(val_split),
                       "device": device.type, "format": CHECKPOINT_FORMAT, "trunk_cache": trunk_cache},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def epoch_query_order(usable: np.ndarray, seed: int, epoch: int, max_queries: int) -> np.ndarray:
    """The queries of ``epoch`` in visiting order: a permutation drawn from ``(seed, epoch)``, cut to
    ``max_queries``."""
    order = np.random.default_rng([seed, epoch]).permutation(usable)
    return order[:max_queries] if max_queries else order


# ----------------------------------------------------------------------------------------------------- DVCLive

_LIVE_SUMMARY_FILES = ("metrics.json", "params.yaml")


def _live_history_paths(live_dir: Path) -> list[Path]:
    """The DVCLive files that hold the curves and the summary: metrics.json, params.yaml, plots/metrics/**/*.tsv."""
    paths = [live_dir / name for name in _LIVE_SUMMARY_FILES]
    paths += sorted((live_dir / "plots" / "metrics").rglob("*.tsv"))
    return [p for p in paths if p.is_file()]


def live_history(live_dir: str | os.PathLike) -> dict[str, str]:
    """DVCLive's files in ``live_dir`` as ``{relative posix path: text}`` (metrics.json, params.yaml and every
    .tsv under plots/metrics), for the checkpoint: strings load with ``weights_only=True``."""
    live_dir = Path(live_dir)
    files = {}
    for p in _live_history_paths(live_dir):
        with open(p, encoding="utf-8", newline="") as f:
            files[p.relative_to(live_dir).as_posix()] = f.read()
    return files


def restore_live_history(live_dir: str | os.PathLike, files: dict[str, str]) -> None:
    """Make ``live_dir``'s DVCLive files exactly ``files`` (from :func:`live_history`): files of that kind not in it
    (rows logged after the checkpoint, or a folder `dvc repro` emptied) are removed, the others (re)written, each
    atomically. Called before DVCLive opens the folder, so a resumed run's curves equal an uninterrupted run's."""
    live_dir = Path(live_dir)
    for p in _live_history_paths(live_dir):
        if p.relative_to(live_dir).as_posix() not in files:
            p.unlink()
    for rel, text in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise NetVLADError(f"checkpoint: bad DVCLive file name {rel!r}")
        target = live_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------------ the loop

@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic algorithms on CPU for the duration (restored afterwards)."""
    if device.type != "cpu":
        yield
        return
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def _state_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _NoLive:
    """What ranks other than 0 log to: nothing (only rank 0 writes DVCLive files)."""

    def __init__(self) -> None:
        self.step = 0
        self.summary: dict = {}

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def log_params(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        self.step += 1

    def end(self) -> None:
        pass


@dataclass(eq=False)
class TrainState:
    """Everything a checkpoint holds: the model, optimiser and scheduler (live objects, updated in place), the
    mining generator, and where the loop stands. The torch, numpy and python RNGs are global: a checkpoint takes
    and restores their states too. ``live_step`` follows DVCLive's step (:func:`_log_row` keeps it equal)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mining_rng: np.random.Generator
    negative_cache: np.ndarray  # (train queries, num_negatives) int64, -1 = empty
    epoch: int  # 0-based, the epoch in progress
    position: int  # queries of query_order done
    query_order: np.ndarray  # the epoch's queries in visiting order
    best_recall: dict[int, float]  # {} before the first validation
    best_epoch: int  # 1-based, 0 before the first validation
    epochs_without_improvement: int
    best_model: dict | None  # the best epoch's state dict (rank 0 only)
    live_step: int
    skipped_queries: int  # over the finished epochs
    stopped: bool  # early stop
    epoch_stats: MiningStats  # the epoch in progress, so far

    @classmethod
    def fresh(cls, cfg: TrainConfig, *, model: torch.nn.Module, optimizer, scheduler, num_queries: int,
              usable: np.ndarray) -> TrainState:
        """The start of a new run: the global RNGs seeded from ``cfg.seed``, an empty negative cache, epoch 0."""
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        return cls(model=model, optimizer=optimizer, scheduler=scheduler, mining_rng=np.random.default_rng(cfg.seed),
                   negative_cache=empty_negative_cache(num_queries, cfg.mining.num_negatives), epoch=0, position=0,
                   query_order=epoch_query_order(usable, cfg.seed, 0, cfg.max_queries_per_epoch), best_recall={},
                   best_epoch=0, epochs_without_improvement=0, best_model=None, live_step=0, skipped_queries=0,
                   stopped=False, epoch_stats=MiningStats())

    def to_checkpoint(self, identity: str, live_dir: Path) -> dict:
        """The checkpoint (tensors, numbers, strings, lists and dicts only: it loads with ``weights_only=True``),
        with the DVCLive files of ``live_dir`` as text."""
        return {
            "format": CHECKPOINT_FORMAT, "identity": identity,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_model": self.best_model,
            "negative_cache": torch.from_numpy(self.negative_cache.copy()), "rng": rng_states(self.mining_rng),
            "epoch": self.epoch, "position": self.position,
            "query_order": torch.from_numpy(np.asarray(self.query_order, dtype=np.int64).copy()),
            "best_recall": {int(k): float(v) for k, v in self.best_recall.items()}, "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement, "live_step": self.live_step,
            "skipped_queries": self.skipped_queries, "stopped": self.stopped, "epoch_stats": asdict(self.epoch_stats),
            "live_files": live_history(live_dir),
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, *, model: torch.nn.Module, optimizer, scheduler,
                        live_dir: Path | None) -> TrainState:
        """The state of ``checkpoint`` (from :meth:`to_checkpoint`): loaded into ``model``, ``optimizer`` and
        ``scheduler``, the RNG states restored, and the DVCLive files restored into ``live_dir`` (``None``: not,
        on ranks other than 0) before DVCLive opens it."""
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        mining_rng = np.random.default_rng(0)  # its state is replaced by the checkpoint's
        restore_rng_states(checkpoint["rng"], mining_rng)
        if live_dir is not None:  # the curves as they were at the checkpoint, even if `dvc repro` deleted the folder
            restore_live_history(live_dir, checkpoint["live_files"])
        return cls(model=model, optimizer=optimizer, scheduler=scheduler, mining_rng=mining_rng,
                   negative_cache=checkpoint["negative_cache"].numpy().copy(), epoch=int(checkpoint["epoch"]),
                   position=int(checkpoint["position"]), query_order=checkpoint["query_order"].numpy().copy(),
                   best_recall={int(k): float(v) for k, v in checkpoint["best_recall"].items()},
                   best_epoch=int(checkpoint["best_epoch"]),
                   epochs_without_improvement=int(checkpoint["epochs_without_improvement"]),
                   best_model=checkpoint["best_model"], live_step=int(checkpoint["live_step"]),
                   skipped_queries=int(checkpoint["skipped_queries"]), stopped=bool(checkpoint["stopped"]),
                   epoch_stats=MiningStats(**{k: int(v) for k, v in checkpoint["epoch_stats"].items()}))


# One optimisation step of a (global) batch: (this rank's images, counts; None when it has no query of the batch,
# the batch's triplets) -> the batch's loss. Chosen once per run by _step_function.
TrainStep = Callable[[torch.Tensor | None, torch.Tensor | None, list[Triplets]], float]


@dataclass(eq=False)
class _Run:
    """What stays fixed during a run (and the descriptor cache, allocated at the first refresh on rank 0)."""

    cfg: TrainConfig
    device: torch.device
    dist: DistContext | None
    model_cfg: ModelConfig
    train_split: Split
    train_gt: GroundTruth
    val_split: Split
    val_gt: GroundTruth
    usable: np.ndarray  # the train queries with a database image within the training radius
    step: TrainStep
    live: object  # dvclive.Live on rank 0, _NoLive elsewhere
    live_dir: Path
    checkpoint_path: Path
    identity: str | None  # None on ranks other than 0
    say: Callable[[str], None]
    show: bool
    db_cache: np.ndarray | None = None
    # the frozen-trunk activation cache and the model's trainable part that runs on it (None: train on images)
    trunk_cache: object | None = None
    part: torch.nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def distributed(self) -> bool:
        return self.dist is not None and self.dist.enabled

    @property
    def memmap_path(self) -> Path | None:
        return self.checkpoint_path.parent / "db_cache.npy" if self.cfg.cache_memmap else None


def _check_inputs(out: Path, live_dir: Path, checkpoint_dir: Path, train_split: Split, train_gt: GroundTruth,
                  val_split: Split, val_gt: GroundTruth) -> np.ndarray:
    """Refuse outputs inside the folders training rewrites and splits that cannot be trained on; return the usable
    train queries (those with a database image within the training radius)."""
    for folder, flag in ((live_dir, "live-dir"), (checkpoint_dir, "checkpoint-dir")):
        if out.resolve().is_relative_to(folder.resolve()):
            raise NetVLADError(f"{out}: the output model lies in the {flag} folder {folder}, which training "
                               f"rewrites; put it elsewhere")
    if len(train_gt.train_positives) != train_split.num_queries:
        raise NetVLADError(f"train split {train_split.name!r}: ground truth has {len(train_gt.train_positives)} "
                           f"queries but the manifest {train_split.num_queries}")
    if len(val_gt.positives) != val_split.num_queries:
        raise NetVLADError(f"val split {val_split.name!r}: ground truth has {len(val_gt.positives)} queries but the "
                           f"manifest {val_split.num_queries}")
    usable = np.array([i for i, p in enumerate(train_gt.train_positives) if len(p)], dtype=np.int64)
    if len(usable) == 0:
        raise NetVLADError(f"train split {train_split.name!r}: no query has a database image within "
                           f"{train_split.train_pos_dist_thr:g} m, nothing to train on")
    if train_split.num_db < 2:
        raise NetVLADError(f"train split {train_split.name!r}: needs at least 2 database images")
    return usable


def _optimiser(model: torch.nn.Module, cfg: TrainConfig):
    """SGD over the trainable parameters and its StepLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NetVLADError("the model has no trainable parameters (check trainable-blocks and the pooling)")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def _log_row(run: _Run, state: TrainState, metrics: dict[str, float]) -> None:
    """Log ``metrics`` (in this order) as one DVCLive step."""
    for name, value in metrics.items():
        run.live.log_metric(name, value)
    run.live.next_step()
    state.live_step = run.live.step


def _save_checkpoint(run: _Run, state: TrainState) -> None:
    """Write the checkpoint atomically (rank 0 only)."""
    if run.is_main:
        save_state(run.checkpoint_path, state.to_checkpoint(run.identity, run.live_dir))


def _train_epoch(run: _Run, state: TrainState) -> None:
    """The rest of the epoch from ``state.position``, one refresh block after the other: a checkpoint (except
    before the epoch's first block, whose state the previous epoch-end checkpoint holds), refresh and mine, train."""
    from tqdm import tqdm

    cfg = run.cfg
    with tqdm(total=len(state.query_order), initial=state.position, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
              unit="query", disable=not run.show) as bar:
        while state.position < len(state.query_order):
            if state.position > 0:
                _save_checkpoint(run, state)
            block = state.query_order[state.position:state.position + cfg.cache_refresh_rate]
            mined = _refresh_and_mine(run, state, block)
            _train_block(run, state, mined, bar)
            state.position += len(block)
            if isinstance(run.db_cache, np.memmap):
                run.db_cache.flush()


def _refresh_and_mine(run: _Run, state: TrainState, block: np.ndarray) -> list[Triplets | None]:
    """Cache refresh (every database image and the block's queries, current weights; sharded under torchrun) and
    mining of the whole block at once (rank 0, which sends the triplets to every rank): one entry per query of
    the block, ``None`` for a skipped one. The mining counts go to ``state.epoch_stats``."""
    cfg, split, model = run.cfg, run.train_split, state.model
    out_dim, dtype = int(model.out_dim), cache_dtype(run.device)
    if run.db_cache is None and run.is_main:  # under torchrun only rank 0 keeps the cache and mines
        run.db_cache = allocate_cache(split.num_db, out_dim, dtype, run.memmap_path)
    q_out = np.empty((len(block), out_dim), dtype) if run.is_main else None
    if run.trunk_cache is not None:  # the trainable part on the cached trunk activations
        from .trunk_cache import encode_cached

        cache = run.trunk_cache
        encode = functools.partial(encode_cached, run.part, cache, device=run.device, batch_size=cfg.encode_batch_size,
                                   amp=cfg.amp, progress=run.show, dist=run.dist)
        encode(cache.rows("train_db"), run.db_cache, desc="cache db")
        q_cache = encode(cache.rows("train_q", block), q_out, desc="cache queries")
    else:
        query_files = split.query_files()
        encode = functools.partial(encode_into, model, model_cfg=run.model_cfg, device=run.device,
                                   batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                                   progress=run.show, dist=run.dist)
        encode(split.db_files(), run.db_cache, desc="cache db")
        q_cache = encode([query_files[i] for i in block], q_out, desc="cache queries")
    mined = stats = None
    if run.is_main:
        mined, stats = mine_triplets(block, q_cache, run.db_cache, train_positives=run.train_gt.train_positives,
                                     positives=run.train_gt.positives, negative_cache=state.negative_cache,
                                     rng=state.mining_rng, cfg=cfg.mining, device=run.device)
    if run.distributed:
        mined, stats = broadcast_object((mined, stats), run.dist, what="sending the mined triplets")
    state.epoch_stats.add(stats)
    return mined


def _train_block(run: _Run, state: TrainState, mined: list[Triplets | None], bar) -> None:
    """The optimisation steps of a block: batches of ``batch_size`` consecutive queries (skipped ones drop out; a
    batch with none left is no step), each rank training on its contiguous slice of every batch."""
    cfg = run.cfg
    groups = [mined[i:i + cfg.batch_size] for i in range(0, len(mined), cfg.batch_size)]
    batches = [[t for t in g if t is not None] for g in groups]
    # this rank's slice of each global batch (all of it in a single process)
    parts = [[b[i] for i in shard_indices(len(b), run.dist.rank, run.dist.world_size)] for b in batches] \
        if run.distributed else batches
    nonempty = [p for p in parts if p]
    if run.trunk_cache is not None:  # cached trunk activations instead of decoded images
        batches_of = CachedTripletBatches(nonempty, run.trunk_cache)
    else:
        batches_of = TripletBatches(nonempty, run.train_split, run.model_cfg,
                                    min_side=int(getattr(state.model, "stride", None) or 1))
    loaded = iter(batches_of.loader(num_workers=min(cfg.workers, len(nonempty)), pin_memory=run.device.type == "cuda"))
    for group, triplets, part in zip(groups, batches, parts):
        if triplets:
            images, counts = next(loaded) if part else (None, None)
            loss = run.step(images, counts, triplets)
            violating = sum(len(t.negatives) for t in triplets)
            _log_row(run, state, {"train/loss": loss,
                                  "train/violating_fraction": violating / (len(triplets) * cfg.mining.num_negatives),
                                  "train/lr": state.optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(len(group))


def _end_epoch(run: _Run, state: TrainState) -> None:
    """Schedule step, validation, best model, early stop, next epoch's order, epoch-end checkpoint."""
    cfg = run.cfg
    with warnings.catch_warnings():  # an epoch whose queries were all skipped made no optimizer step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        state.scheduler.step()
    stats = state.epoch_stats
    state.skipped_queries += stats.skipped
    recall = validate_recall(state.model, run.val_split, run.val_gt, device=run.device,
                             batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                             model_cfg=run.model_cfg, progress=run.show, dist=run.dist,
                             cached=(run.part, run.trunk_cache) if run.trunk_cache is not None else None)
    _log_row(run, state, {**{f"val/recall@{n}": r for n, r in recall.items()},
                          "train/skipped_queries": stats.skipped,
                          "train/epoch_violating_fraction": stats.violating_fraction, "epoch": state.epoch + 1})
    if not state.best_recall or recall[5] > state.best_recall[5]:
        state.best_recall, state.best_epoch, state.epochs_without_improvement = dict(recall), state.epoch + 1, 0
        if run.is_main:  # kept in memory and in the checkpoint; `out` is written once, when training ends
            state.best_model = _state_copy(state.model)
    else:
        state.epochs_without_improvement += 1
    run.say(f"train: epoch {state.epoch + 1}: recall@1/5/10 = {recall[1]:.4f}/{recall[5]:.4f}/{recall[10]:.4f}, "
            f"{stats.skipped} of {stats.queries} queries skipped"
            + (" (best)" if state.best_epoch == state.epoch + 1
               else f", {state.epochs_without_improvement} without improvement"))
    state.stopped = cfg.patience > 0 and state.epochs_without_improvement >= cfg.patience
    state.epoch += 1
    state.position = 0
    state.epoch_stats = MiningStats()
    state.query_order = epoch_query_order(run.usable, cfg.seed, state.epoch, cfg.max_queries_per_epoch)
    _save_checkpoint(run, state)


def _finish(run: _Run, state: TrainState, out: Path, model_cfg) -> None:
    """Rank 0: the best weights to ``out`` (written only now: an interrupted run leaves no ``out``), the DVCLive
    summary, and the checkpoint, the memory-mapped cache and the trunk cache (unless kept) removed."""
    from .models import save_model

    final = copy.deepcopy(state.model).cpu() if run.device.type != "cpu" else state.model
    final.load_state_dict(state.best_model)
    save_model(out, final, model_cfg)
    for n in RECALL_NS:
        run.live.summary[f"best/recall@{n}"] = state.best_recall[n]
    run.live.summary["best/epoch"] = state.best_epoch
    run.live.end()
    run.checkpoint_path.unlink(missing_ok=True)
    if run.memmap_path is not None:
        run.memmap_path.unlink(missing_ok=True)
    if run.trunk_cache is not None and not run.cfg.keep_trunk_cache:
        from .trunk_cache import remove_trunk_cache

        run.trunk_cache = None
        remove_trunk_cache(run.checkpoint_path.parent)


def train(
    model: torch.nn.Module,
    model_cfg,
    train_split: Split,
    train_gt: GroundTruth,
    val_split: Split,
    val_gt: GroundTruth,
    *,
    out: str | os.PathLike,
    live_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    dist: DistContext | None = None,
) -> TrainResult:
    """Train ``model`` (loaded from the k-means-initialised model file, config ``model_cfg``) with triplets from
    ``train_split``; write the best model by validation recall@5 to ``out`` when training ends (not before, so an
    interrupted run leaves no ``out``). See the module docstring.

    Under torchrun (``dist`` with several processes; ``device`` is this rank's): cache refreshes and validation
    are sharded over the ranks; rank 0 keeps the descriptor cache, mines and sends the triplets to every rank;
    each global batch of ``cfg.batch_size`` queries is divided among the ranks (contiguous slices) and the model
    is wrapped in DistributedDataParallel with the gradients *summed*, each rank's loss being its triplets' sum
    over the batch's triplet count — so a step equals the single-process step on the same batch. Rank 0 alone
    reads the checkpoint (and sends it to the others), writes checkpoints, DVCLive files and ``out``, and logs."""
    from dvclive import Live

    # ---- set up: inputs checked, model on the device, optimiser, the run's identity
    cfg.validate()
    is_main = dist is None or dist.is_main
    say = log if is_main else (lambda msg: None)
    out, live_dir, checkpoint_dir = Path(out), Path(live_dir), Path(checkpoint_dir)
    usable = _check_inputs(out, live_dir, checkpoint_dir, train_split, train_gt, val_split, val_gt)
    model = prepare_model(model, device).eval()
    # the frozen-trunk cache: decided (and announced) now, built once the checkpoint is resumed or not
    from .trunk_cache import build_trunk_cache, cache_identity, plan_trunk_cache

    plan = plan_trunk_cache(model, model_cfg, train_split, val_split, mode=cfg.trunk_cache,
                            dtype=cfg.trunk_cache_dtype, folder=checkpoint_dir, device=device, dist=dist, log=say)
    # only rank 0 reads and writes checkpoints, so only it stats the image files for the identity
    identity = run_identity(cfg, model_cfg, model_fingerprint(model), train_split, val_split, device,
                            trunk_cache=plan.dtype if plan is not None else "off") if is_main else None
    optimizer, scheduler = _optimiser(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None

    # ---- start fresh or resume
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME
    checkpoint = _load_checkpoint(checkpoint_path, identity, say) if is_main else None
    if dist is not None and dist.enabled:  # every rank resumes from rank 0's checkpoint (need not exist elsewhere)
        checkpoint = broadcast_object(checkpoint, dist, what="sharing the checkpoint")
    resumed = checkpoint is not None
    if resumed:
        state = TrainState.from_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                           live_dir=live_dir if is_main else None)
        say(f"train: resuming from {checkpoint_path} at epoch {state.epoch + 1}, query {state.position} of "
            f"{len(state.query_order)}")
    else:
        state = TrainState.fresh(cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                                 num_queries=train_split.num_queries, usable=usable)
    del checkpoint
    live = Live(dir=str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None) if is_main else _NoLive()
    live.step = state.live_step
    net = plan.part if plan is not None else model  # what a step runs: the trainable part on cached activations
    blank = (1, *plan.shape) if plan is not None else (1, 3, model_cfg.input_height, model_cfg.input_width)
    step = _step_function(net, optimizer, scaler, cfg, device, model_cfg, dist, blank)  # builds the DDP model, once
    if not resumed:
        live.log_params({k: v for k, v in asdict(cfg).items()})
    run = _Run(cfg=cfg, device=device, dist=dist, model_cfg=model_cfg, train_split=train_split, train_gt=train_gt,
               val_split=val_split, val_gt=val_gt, usable=usable, step=step, live=live, live_dir=live_dir,
               checkpoint_path=checkpoint_path, identity=identity, say=say, show=progress and is_main)
    if plan is not None and state.epoch < cfg.epochs and not state.stopped:
        key = cache_identity(plan, model_cfg, train_split, val_split, device=device, amp=cfg.amp) if is_main else None
        run.trunk_cache = build_trunk_cache(plan, key, model_cfg=model_cfg, device=device,
                                            batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                                            stride=int(getattr(model, "stride", None) or 1), progress=run.show,
                                            dist=dist, log=say)
        run.part = plan.part

    # ---- epochs of refresh blocks, each epoch ended by validation and a checkpoint
    with _deterministic(device):
        while state.epoch < cfg.epochs and not state.stopped:
            _train_epoch(run, state)
            _end_epoch(run, state)

    # ---- finish: the best weights go to `out`, written only now (an interrupted run leaves no `out` behind)
    if is_main:
        _finish(run, state, out, model_cfg)
    return TrainResult(best_recall=state.best_recall, best_epoch=state.best_epoch, epochs_run=state.epoch,
                       stopped_early=state.stopped, resumed=resumed, skipped_queries=state.skipped_queries, out=out)


def _train_step(model, optimizer, scaler, images: torch.Tensor, counts: torch.Tensor, device: torch.device,
                cfg: TrainConfig) -> tuple[float, int]:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        desc = model(to_device(images, device))
    loss, num_triplets = batch_loss(desc.float(), counts.tolist(), margin=cfg.mining.margin, loss=cfg.mining.loss)
    _backward_and_step(loss, optimizer, scaler)
    return float(loss.detach()), num_triplets


def _backward_and_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """Backpropagate ``loss`` and take one optimiser step (through the fp16 gradient scaler when there is one)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _step_function(model: torch.nn.Module, optimizer, scaler, cfg: TrainConfig, device: torch.device,
                   model_cfg: ModelConfig, dist: DistContext | None,
                   blank_shape: tuple[int, ...] | None = None) -> TrainStep:
    """The step of a run, chosen once: :func:`_train_step` in a single process; under torchrun
    :func:`_distributed_train_step` on the model wrapped (here, once) by :func:`_wrap_ddp`. ``model`` is the whole
    model on images, or its trainable part on trunk activations; ``blank_shape`` is the shape of the blank input a
    rank without a query runs (one image by default)."""
    if dist is None or not dist.enabled:
        def step(images, counts, triplets):
            return _train_step(model, optimizer, scaler, images, counts, device, cfg)[0]

        return step
    ddp_model = _wrap_ddp(model, device)

    def distributed_step(images, counts, triplets):
        return _distributed_train_step(ddp_model, optimizer, scaler, images, counts, device, cfg, model_cfg=model_cfg,
                                       dist=dist, num_triplets=sum(len(t.negatives) for t in triplets),
                                       blank_shape=blank_shape)

    return distributed_step


def _wrap_ddp(model: torch.nn.Module, device: torch.device):
    """``model`` in DistributedDataParallel with gradients summed over the ranks (:func:`_sum_gradients`); buffers
    are not synced (eval mode: BatchNorm is frozen)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}  # torch < 2.14
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        **no_buffer_sync)
    ddp_model.register_comm_hook(None, _sum_gradients)
    return ddp_model


def _sum_gradients(state, bucket):
    """DistributedDataParallel communication hook: all-reduce a gradient bucket as a *sum* (the default hook
    averages); each rank's loss is already scaled by the global batch's triplet count."""
    import torch.distributed as torch_dist

    return torch_dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _distributed_train_step(ddp_model, optimizer, scaler, images: torch.Tensor | None, counts: torch.Tensor | None,
                            device: torch.device, cfg: TrainConfig, *, model_cfg: ModelConfig, dist: DistContext,
                            num_triplets: int, blank_shape: tuple[int, ...] | None = None) -> float:
    """One optimisation step of a global batch under DistributedDataParallel: this rank's queries (``images``,
    ``counts``; ``None`` when the batch has fewer queries than there are ranks) give the loss
    ``Σ its triplet losses / num_triplets`` (the global batch's triplet count); the summed gradients are then the
    single-process gradient of the batch's mean loss. Returns the global batch's loss (all ranks)."""
    optimizer.zero_grad(set_to_none=True)
    if images is None:
        # Nothing to train on here, but every rank must join the gradient all-reduce: one blank image whose
        # output is multiplied by 0 gives every trainable parameter a zero gradient.
        with autocast(device, cfg.amp):
            shape = blank_shape or (1, 3, model_cfg.input_height, model_cfg.input_width)
            desc = ddp_model(to_device(torch.zeros(*shape), device))
        local = desc.float().sum() * 0.0
    else:
        with autocast(device, cfg.amp):
            desc = ddp_model(to_device(images, device))
        local = batch_loss_sum(desc.float(), counts.tolist(), margin=cfg.mining.margin, loss=cfg.mining.loss)
    loss = local / max(num_triplets, 1)
    _backward_and_step(loss, optimizer, scaler)
    return float(all_reduce_sum(float(loss.detach()), dist, what="summing the loss")[0])


def _load_checkpoint(path: Path, identity: str, log: Callable[[str], None]) -> dict | None:
    """The checkpoint at ``path`` when it was made by this very run configuration; ``None`` (after a one-line
    notice) when it is missing, unreadable or from other parameters."""
    if not path.exists():
        return None
    try:
        state = load_state(path)
    except NetVLADError as e:
        log(f"train: ignoring checkpoint: {e}; starting over")
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log(f"train: ignoring checkpoint {path}: unknown format; starting over")
        return None
    if state.get("identity") != identity:
        log(f"train: ignoring checkpoint {path}: made with other parameters, initial model, splits or image "
            "files; starting over")
        return None
    return state
