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

After each epoch: the learning rate schedule steps (StepLR), recall@1/5/10 is measured on the validation split
with :mod:`netvlad_core.retrieval`, the weights of the best epoch by recall@5 are kept (in memory and in the
checkpoint), an epoch-end checkpoint is written, and training stops after ``patience`` epochs without improvement
(0 = never early-stop). ``out`` is written once, when training ends, with the best epoch's weights: an interrupted
run leaves no ``out``.

The model runs in eval mode throughout: BatchNorm layers keep their ImageNet running statistics (their affine
parameters still learn where trainable) and there is no dropout, so a step does not depend on how a batch is
composed and needs no random numbers. Only parameters with ``requires_grad`` (the trainable backbone blocks
and the pooling layer) are optimised.

Checkpoints (``<checkpoint_dir>/train_state.pt``, written atomically, read with ``weights_only=True``) hold the
model, optimiser and scheduler state, the best model so far, the negative cache, the RNG states (torch, numpy,
python, the mining generator), the epoch, the epoch's query order and the position in it, the best recall and
the epochs without improvement, the DVCLive step, and the DVCLive files written so far (metrics.json,
params.yaml and the plots' .tsv files, as text). A checkpoint is resumed only when its hash (:func:`run_identity`)
matches: the training parameters (all but ``workers`` and ``cache_memmap``), the initial model's config and
weights (sha256 of the state dict), the device type, the checkpoint format, and both splits' content
(:func:`netvlad_core.datasets.manifest.split_fingerprint`: dataset and split names, thresholds, image root, every
manifest row's role, path, UTM and timestamp, and each image file's size and mtime); otherwise a one-line notice is
printed and training starts over. On resume the DVCLive files are restored from the checkpoint before DVCLive
opens the folder (``dvc repro`` deletes it before rerunning the stage), so the curves equal an uninterrupted run's.
The checkpoint is deleted after a successful finish. On CPU (deterministic algorithms on, ordered loaders) a
resumed run ends with the same weights, bit for bit, as an uninterrupted one.

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

from .datasets.images import load_image
from .datasets.manifest import GroundTruth, Split, split_fingerprint
from .device import autocast, prepare_model, to_device
from .distributed import DistContext, all_reduce_sum, broadcast_object, shard_indices
from .errors import NetVLADError
from .features import encode_rounds, model_fingerprint
from .io import load_state, save_state
from .mining import (MiningConfig, MiningStats, Triplets, batch_loss, batch_loss_sum, empty_negative_cache,
                     mine_triplets)

CHECKPOINT_NAME = "train_state.pt"
CHECKPOINT_FORMAT = 2  # 2: the DVCLive history travels with the checkpoint ("live_files")
RECALL_NS = (1, 5, 10)
# Options that change what is computed; the rest (workers, progress, paths) do not enter the checkpoint hash.
_NOT_IN_IDENTITY = ("workers", "cache_memmap")


@dataclass
class TrainConfig:
    """Training hyper-parameters; names match the ``train`` stage's options (``_`` ↔ ``-``)."""

    epochs: int = 30
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_step: int = 5
    lr_gamma: float = 0.5
    batch_size: int = 4
    margin: float = 0.1
    loss: str = "squared"
    num_negatives: int = 10
    num_negatives_sampled: int = 1000
    cache_refresh_rate: int = 1000
    patience: int = 10
    seed: int = 0
    max_queries_per_epoch: int = 0  # 0 = every usable query
    encode_batch_size: int = 16
    workers: int = 2
    amp: str = "bf16"  # autocast on GPU: bf16, fp16 or fp32; ignored on CPU
    cache_memmap: bool = False  # keep the database descriptor cache in a np.memmap file in the checkpoint dir

    def mining(self) -> MiningConfig:
        return MiningConfig(margin=self.margin, loss=self.loss, num_negatives=self.num_negatives,
                            num_negatives_sampled=self.num_negatives_sampled)

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
        self.mining().validate()


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

def apply_trainable_blocks(model: torch.nn.Module, model_cfg, trainable_blocks: int):
    """Move the freeze boundary of a loaded model to ``trainable_blocks`` (backbone units counted from the end;
    ``-1`` all, ``0`` none) via ``model.backbone.set_trainable_blocks``, and return the updated config."""
    new_cfg = dataclasses.replace(model_cfg, trainable_blocks=trainable_blocks)
    new_cfg.validate()
    model.backbone.set_trainable_blocks(trainable_blocks)
    return new_cfg


def parse_trainable_blocks(value: str | int | None) -> int | None:
    """``None``/``"keep"``/``"none"``/``"null"`` → ``None`` (keep the model's boundary); otherwise an integer >= -1."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "keep", "none", "null")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise NetVLADError(f"trainable-blocks must be an integer >= -1 or 'keep', got {value!r}") from None
    if n < -1:
        raise NetVLADError(f"trainable-blocks must be an integer >= -1 or 'keep', got {value!r}")
    return n


def _model_dims(model_cfg) -> dict:
    d = model_cfg.to_dict()
    return {"height": int(d["input_height"]), "width": int(d["input_width"]),
            "mean": list(d["mean"]), "std": list(d["std"])}


# ---------------------------------------------------------------------------------------------- descriptor cache

def encode_into(model: torch.nn.Module, files: Sequence[Path], out: np.ndarray | None, *, dims: dict,
                device: torch.device, batch_size: int, num_workers: int, amp: str, progress: bool = False,
                desc: str = "cache", dist: DistContext | None = None) -> np.ndarray | None:
    """Encode ``files`` into the rows of ``out`` (an array or memmap of the cache dtype) with the batched encoder.

    Under torchrun (``dist`` with several processes) the files are shared out among the ranks
    (:func:`netvlad_core.features.encode_rounds`) and the rows gathered in order; a rank may pass ``out=None``
    to take part without keeping them (rank 0 keeps the cache, the others only encode)."""
    from tqdm import tqdm

    show = progress and (dist is None or dist.is_main)
    with tqdm(total=len(files), desc=desc, unit="img", leave=False, disable=not show) as bar:
        for idx, batch in encode_rounds(model, files, height=dims["height"], width=dims["width"], mean=dims["mean"],
                                        std=dims["std"], device=device, batch_size=batch_size,
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

    def __init__(self, batches: list[list[Triplets]], split: Split, dims: dict, *, min_side: int = 1):
        self.batches = batches
        self.db_files, self.q_files = split.db_files(), split.query_files()
        self.dims = dims
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
        d = self.dims
        return load_image(path, d["height"], d["width"], d["mean"], d["std"], min_side=self.min_side)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, counts = [], []
        for t in self.batches[i]:
            images.append(self._load(self.q_files[t.query]))
            images.append(self._load(self.db_files[t.positive]))
            images.extend(self._load(self.db_files[n]) for n in t.negatives)
            counts.append(len(t.negatives))
        return torch.stack(images), torch.tensor(counts, dtype=torch.int64)


# -------------------------------------------------------------------------------------------------- validation

def validate_recall(model: torch.nn.Module, split: Split, gt: GroundTruth, *, device: torch.device, batch_size: int,
                    num_workers: int, amp: str, dims: dict, progress: bool = False,
                    dist: DistContext | None = None) -> dict[int, float]:
    """recall@1/5/10 of ``model`` on ``split`` (exact faiss search over freshly encoded descriptors). Under
    torchrun the encoding is sharded, rank 0 searches and every rank returns rank 0's figures."""
    from .retrieval import recall_at_n, search

    keep = dist is None or dist.is_main
    db = encode_into(model, split.db_files(), np.empty((split.num_db, model.out_dim), np.float32) if keep else None,
                     dims=dims, device=device, batch_size=batch_size, num_workers=num_workers, amp=amp,
                     progress=progress, desc="val db", dist=dist)
    q = encode_into(model, split.query_files(),
                    np.empty((split.num_queries, model.out_dim), np.float32) if keep else None, dims=dims,
                    device=device, batch_size=batch_size, num_workers=num_workers, amp=amp, progress=progress,
                    desc="val queries", dist=dist)
    recall = None
    if keep:
        _, idx = search(db, q, max(RECALL_NS))
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
                 device: torch.device) -> str:
    """The hash a checkpoint must carry to be resumed: the training parameters (except workers and cache-memmap),
    the model config, the initial weights' fingerprint, both splits' content and image files
    (:func:`netvlad_core.datasets.manifest.split_fingerprint`), the device type and the checkpoint format."""
    params = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_IDENTITY}
    blob = json.dumps({"train": params, "model": model_cfg.to_dict(), "init_weights": init_fingerprint,
                       "train_split": split_fingerprint(train_split), "val_split": split_fingerprint(val_split),
                       "device": device.type, "format": CHECKPOINT_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def epoch_query_order(usable: np.ndarray, seed: int, epoch: int, max_queries: int) -> np.ndarray:
    """The queries of ``epoch`` in visiting order: a permutation drawn from ``(seed, epoch)``, cut to ``max_queries``."""
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
    from tqdm import tqdm

    from .models import save_model

    cfg.validate()
    is_main = dist is None or dist.is_main
    distributed = dist is not None and dist.enabled
    say = log if is_main else (lambda msg: None)
    show = progress and is_main
    out, live_dir, checkpoint_dir = Path(out), Path(live_dir), Path(checkpoint_dir)
    for folder, option in ((live_dir, "live-dir"), (checkpoint_dir, "checkpoint-dir")):
        if out.resolve().is_relative_to(folder.resolve()):
            raise NetVLADError(f"{out}: the output model lies in the {option} folder {folder}, which training "
                               f"rewrites; put it elsewhere")
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME
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

    dims = _model_dims(model_cfg)
    model = prepare_model(model, device).eval()
    # only rank 0 reads and writes checkpoints, so only it stats the image files for the identity
    identity = run_identity(cfg, model_cfg, model_fingerprint(model), train_split, val_split, device) \
        if is_main else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NetVLADError("the model has no trainable parameters (check trainable-blocks and the pooling)")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    mining_cfg = cfg.mining()
    mining_rng = np.random.default_rng(cfg.seed)

    # ---- start fresh or resume
    state = _load_checkpoint(checkpoint_path, identity, say) if is_main else None
    if distributed:  # every rank resumes from rank 0's checkpoint (it need not exist on the other machines)
        state = broadcast_object(state, dist, what="sharing the checkpoint")
    resumed = state is not None
    if resumed:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"], mining_rng)
        neg_cache = state["negative_cache"].numpy().copy()
        epoch, position = int(state["epoch"]), int(state["position"])
        order = state["query_order"].numpy().copy()
        best_recall = {int(k): float(v) for k, v in state["best_recall"].items()}
        best_epoch, no_improve = int(state["best_epoch"]), int(state["epochs_without_improvement"])
        best_state = state["best_model"]
        live_step, skipped_total = int(state["live_step"]), int(state["skipped_queries"])
        stopped = bool(state["stopped"])
        epoch_stats = MiningStats(**{k: int(v) for k, v in state["epoch_stats"].items()})
        if is_main:  # the curves as they were at the checkpoint, even if `dvc repro` deleted the folder
            restore_live_history(live_dir, state["live_files"])
        say(f"train: resuming from {checkpoint_path} at epoch {epoch + 1}, query {position} of {len(order)}")
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        neg_cache = empty_negative_cache(train_split.num_queries, cfg.num_negatives)
        epoch, position = 0, 0
        order = epoch_query_order(usable, cfg.seed, 0, cfg.max_queries_per_epoch)
        best_recall, best_epoch, no_improve, best_state = {}, 0, 0, None
        live_step, skipped_total, stopped = 0, 0, False
        epoch_stats = MiningStats()

    def checkpoint() -> None:
        if not is_main:
            return
        save_state(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "identity": identity,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "best_model": best_state, "negative_cache": torch.from_numpy(neg_cache.copy()),
            "rng": rng_states(mining_rng), "epoch": epoch, "position": position,
            "query_order": torch.from_numpy(np.asarray(order, dtype=np.int64).copy()),
            "best_recall": {int(k): float(v) for k, v in best_recall.items()}, "best_epoch": best_epoch,
            "epochs_without_improvement": no_improve, "live_step": live.step, "skipped_queries": skipped_total,
            "stopped": stopped, "epoch_stats": asdict(epoch_stats), "live_files": live_history(live_dir),
        })

    memmap_path = checkpoint_dir / "db_cache.npy" if cfg.cache_memmap else None
    dtype = cache_dtype(device)
    out_dim = int(model.out_dim)
    db_cache: np.ndarray | None = None

    live = Live(dir=str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None) if is_main else _NoLive()
    live.step = live_step
    train_model = model
    if distributed:  # gradients summed over the ranks; buffers are not synced (eval mode: BatchNorm is frozen)
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}  # torch < 2.14
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              **no_buffer_sync)
        train_model.register_comm_hook(None, _sum_gradients)
    if not resumed:
        live.log_params({k: v for k, v in asdict(cfg).items()})

    with _deterministic(device):
        while epoch < cfg.epochs and not stopped:
            with tqdm(total=len(order), initial=position, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="query",
                      disable=not show) as bar:
                while position < len(order):
                    if position > 0:
                        checkpoint()
                    block = order[position:position + cfg.cache_refresh_rate]
                    # -- cache refresh: all database images + this block's queries, current weights
                    if db_cache is None and is_main:  # under torchrun only rank 0 keeps the cache and mines
                        db_cache = allocate_cache(train_split.num_db, out_dim, dtype, memmap_path)
                    q_files = [train_split.query_files()[i] for i in block]
                    encode_into(model, train_split.db_files(), db_cache, dims=dims, device=device,
                                batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                                progress=show, desc="cache db", dist=dist)
                    q_cache = encode_into(model, q_files, np.empty((len(block), out_dim), dtype) if is_main else None,
                                          dims=dims, device=device, batch_size=cfg.encode_batch_size,
                                          num_workers=cfg.workers, amp=cfg.amp, progress=show, desc="cache queries",
                                          dist=dist)
                    # -- mining: one batched distance computation for the block
                    mined = stats = None
                    if is_main:
                        mined, stats = mine_triplets(block, q_cache, db_cache,
                                                     train_positives=train_gt.train_positives,
                                                     positives=train_gt.positives, negative_cache=neg_cache,
                                                     rng=mining_rng, cfg=mining_cfg, device=device)
                    if distributed:
                        mined, stats = broadcast_object((mined, stats), dist, what="sending the mined triplets")
                    epoch_stats.add(stats)
                    groups = [mined[i:i + cfg.batch_size] for i in range(0, len(mined), cfg.batch_size)]
                    sizes = [len(g) for g in groups]
                    batches = [[t for t in g if t is not None] for g in groups]
                    # this rank's slice of each global batch (all of it in a single process)
                    parts = [[b[i] for i in shard_indices(len(b), dist.rank, dist.world_size)] for b in batches] \
                        if distributed else batches
                    nonempty = [p for p in parts if p]
                    loader = TripletBatches(nonempty, train_split, dims,
                                            min_side=int(getattr(model, "stride", None) or 1)).loader(
                        num_workers=min(cfg.workers, len(nonempty)), pin_memory=device.type == "cuda")
                    loaded = iter(loader)
                    for size, triplets, part in zip(sizes, batches, parts):
                        if triplets and distributed:
                            images, counts = next(loaded) if part else (None, None)
                            loss_value = _distributed_train_step(
                                train_model, optimizer, scaler, images, counts, device, cfg, dims=dims, dist=dist,
                                num_triplets=sum(len(t.negatives) for t in triplets))
                        elif triplets:
                            images, counts = next(loaded)
                            loss_value, _ = _train_step(model, optimizer, scaler, images, counts, device, cfg)
                        if triplets:
                            violating = sum(len(t.negatives) for t in triplets)
                            live.log_metric("train/loss", loss_value)
                            live.log_metric("train/violating_fraction",
                                            violating / (len(triplets) * cfg.num_negatives))
                            live.log_metric("train/lr", optimizer.param_groups[0]["lr"])
                            live.next_step()
                            bar.set_postfix(loss=f"{loss_value:.4f}")
                        bar.update(size)
                    position += len(block)
                    db_cache.flush() if isinstance(db_cache, np.memmap) else None
            # -- end of epoch: schedule, validation, best model, early stop
            with warnings.catch_warnings():  # an epoch whose queries were all skipped made no optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            skipped_total += epoch_stats.skipped
            recall = validate_recall(model, val_split, val_gt, device=device, batch_size=cfg.encode_batch_size,
                                     num_workers=cfg.workers, amp=cfg.amp, dims=dims, progress=show, dist=dist)
            for n, r in recall.items():
                live.log_metric(f"val/recall@{n}", r)
            live.log_metric("train/skipped_queries", epoch_stats.skipped)
            live.log_metric("train/epoch_violating_fraction", epoch_stats.violating_fraction)
            live.log_metric("epoch", epoch + 1)
            live.next_step()
            if not best_recall or recall[5] > best_recall[5]:
                best_recall, best_epoch, no_improve = dict(recall), epoch + 1, 0
                if is_main:  # kept in memory and in the checkpoint; `out` is written once, when training ends
                    best_state = _state_copy(model)
            else:
                no_improve += 1
            say(f"train: epoch {epoch + 1}: recall@1/5/10 = {recall[1]:.4f}/{recall[5]:.4f}/{recall[10]:.4f}, "
                f"{epoch_stats.skipped} of {epoch_stats.queries} queries skipped"
                + (" (best)" if best_epoch == epoch + 1 else f", {no_improve} without improvement"))
            stopped = cfg.patience > 0 and no_improve >= cfg.patience
            epoch += 1
            position = 0
            epoch_stats = MiningStats()
            order = epoch_query_order(usable, cfg.seed, epoch, cfg.max_queries_per_epoch)
            checkpoint()

    # ---- finish: the best weights go to `out`, written only now (an interrupted run leaves no `out` behind)
    if is_main:
        final = copy.deepcopy(model).cpu() if device.type != "cpu" else model
        final.load_state_dict(best_state)
        save_model(out, final, model_cfg)
        for n in RECALL_NS:
            live.summary[f"best/recall@{n}"] = best_recall[n]
        live.summary["best/epoch"] = best_epoch
        live.end()
        checkpoint_path.unlink(missing_ok=True)
        if memmap_path is not None:
            memmap_path.unlink(missing_ok=True)
    return TrainResult(best_recall=best_recall, best_epoch=best_epoch, epochs_run=epoch, stopped_early=stopped,
                       resumed=resumed, skipped_queries=skipped_total, out=out)


def _train_step(model, optimizer, scaler, images: torch.Tensor, counts: torch.Tensor, device: torch.device,
                cfg: TrainConfig) -> tuple[float, int]:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        desc = model(to_device(images, device))
    loss, num_triplets = batch_loss(desc.float(), counts.tolist(), margin=cfg.margin, loss=cfg.loss)
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


def _sum_gradients(state, bucket):
    """DistributedDataParallel communication hook: all-reduce a gradient bucket as a *sum* (the default hook
    averages); each rank's loss is already scaled by the global batch's triplet count."""
    import torch.distributed as torch_dist

    return torch_dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _distributed_train_step(ddp_model, optimizer, scaler, images: torch.Tensor | None, counts: torch.Tensor | None,
                            device: torch.device, cfg: TrainConfig, *, dims: dict, dist: DistContext,
                            num_triplets: int) -> float:
    """One optimisation step of a global batch under DistributedDataParallel: this rank's queries (``images``,
    ``counts``; ``None`` when the batch has fewer queries than there are ranks) give the loss
    ``Σ its triplet losses / num_triplets`` (the global batch's triplet count); the summed gradients are then the
    single-process gradient of the batch's mean loss. Returns the global batch's loss (all ranks)."""
    optimizer.zero_grad(set_to_none=True)
    if images is None:
        # Nothing to train on here, but every rank must join the gradient all-reduce: one blank image whose
        # output is multiplied by 0 gives every trainable parameter a zero gradient.
        with autocast(device, cfg.amp):
            desc = ddp_model(to_device(torch.zeros(1, 3, dims["height"], dims["width"]), device))
        local = desc.float().sum() * 0.0
    else:
        with autocast(device, cfg.amp):
            desc = ddp_model(to_device(images, device))
        local = batch_loss_sum(desc.float(), counts.tolist(), margin=cfg.margin, loss=cfg.loss)
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
