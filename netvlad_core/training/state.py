"""The loop's whole state (:class:`TrainState`), its checkpoint, and the hash a checkpoint must carry to be resumed.

A checkpoint (``<checkpoint_dir>/train_state.pt``, written atomically, read with ``weights_only=True``) holds the
model, optimiser and scheduler state, the best model so far, the RNG states (torch, numpy, python, the recipe's
generator), the epoch, the epoch's order (queries or place batches) and the position in it, the best recall and
the epochs without improvement, the DVCLive step and files, and the recipe's own state (the triplet recipe's negative
cache and mining counts). It is resumed only when its :func:`run_identity` matches."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..datasets.manifest import Split, split_fingerprint
from ..errors import NetVLADError
from ..io import load_state
from .config import TrainConfig
from .live import live_history, restore_live_history

CHECKPOINT_NAME = "train_state.pt"
CHECKPOINT_FORMAT = 3  # 2: the DVCLive history travels with the checkpoint; 3: recipe-agnostic, "recipe_state"
# Options that change what is computed; the rest (workers, progress, paths) do not enter the checkpoint hash. The
# trunk-cache options enter it as what they resolve to (off, float16 or float32: see run_identity).
_NOT_IN_IDENTITY = ("workers", "cache_memmap", "trunk_cache", "trunk_cache_dtype", "keep_trunk_cache")


def rng_states(generator: np.random.Generator) -> dict:
    """Every RNG state as weights-only-loadable parts (tensors, ints, strings, lists); ``generator`` is the
    recipe's (the triplet recipe's negative sampling)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(x) for x in py_state], "gauss_next": gauss_next},
        "mining": generator.bit_generator.state,
    }


def restore_rng_states(states: dict, generator: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    generator.bit_generator.state = states["mining"]


def seed_everything(seed: int) -> np.random.Generator:
    """Seed the global torch, python and numpy RNGs from ``seed``; returns the recipe's generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return np.random.default_rng(seed)


@dataclass(eq=False)
class TrainState:
    """Everything a checkpoint holds: the model, optimiser and scheduler (live objects, updated in place), the
    recipe's generator, where the loop stands, and the recipe's own state (``recipe_state``: an object with
    ``to_checkpoint()`` and a matching ``from_checkpoint``). The torch, numpy and python RNGs are global: a
    checkpoint takes and restores their states too. ``live_step`` follows DVCLive's step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    epoch: int  # 0-based, the epoch in progress
    position: int  # units (queries, place batches) of order done
    order: np.ndarray  # the epoch's units in visiting order
    best_recall: dict[int, float]  # {} before the first validation
    best_epoch: int  # 1-based, 0 before the first validation
    epochs_without_improvement: int
    best_model: dict | None  # the best epoch's state dict (rank 0 only)
    live_step: int
    stopped: bool  # early stop
    recipe_state: object

    def to_checkpoint(self, identity: str, live_dir: Path) -> dict:
        """The checkpoint (tensors, numbers, strings, lists and dicts only: it loads with ``weights_only=True``),
        with the DVCLive files of ``live_dir`` as text."""
        return {
            "format": CHECKPOINT_FORMAT, "identity": identity,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_model": self.best_model, "rng": rng_states(self.rng),
            "epoch": self.epoch, "position": self.position,
            "order": torch.from_numpy(np.asarray(self.order, dtype=np.int64).copy()),
            "best_recall": {int(k): float(v) for k, v in self.best_recall.items()}, "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement, "live_step": self.live_step,
            "stopped": self.stopped, "recipe_state": self.recipe_state.to_checkpoint(),
            "live_files": live_history(live_dir),
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, *, model: torch.nn.Module, optimizer, scheduler,
                        recipe_state: Callable[[dict], object], live_dir: Path | None) -> TrainState:
        """The state of ``checkpoint`` (from :meth:`to_checkpoint`): loaded into ``model``, ``optimizer`` and
        ``scheduler``, the RNG states restored, the recipe's state read by ``recipe_state``, and the DVCLive files
        restored into ``live_dir`` (``None``: not, on ranks other than 0) before DVCLive opens it."""
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        rng = np.random.default_rng(0)  # its state is replaced by the checkpoint's
        restore_rng_states(checkpoint["rng"], rng)
        if live_dir is not None:  # the curves as they were at the checkpoint, even if `dvc repro` deleted the folder
            restore_live_history(live_dir, checkpoint["live_files"])
        return cls(model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, epoch=int(checkpoint["epoch"]),
                   position=int(checkpoint["position"]), order=checkpoint["order"].numpy().copy(),
                   best_recall={int(k): float(v) for k, v in checkpoint["best_recall"].items()},
                   best_epoch=int(checkpoint["best_epoch"]),
                   epochs_without_improvement=int(checkpoint["epochs_without_improvement"]),
                   best_model=checkpoint["best_model"], live_step=int(checkpoint["live_step"]),
                   stopped=bool(checkpoint["stopped"]), recipe_state=recipe_state(checkpoint["recipe_state"]))


def run_identity(cfg: TrainConfig, model_cfg, init_fingerprint: str, train_split: Split, val_split: Split,
                 device, trunk_cache: str = "off", data: str = "") -> str:
    """The hash a checkpoint must carry to be resumed: the training parameters (except workers, cache-memmap and
    the trunk-cache options), the model config, the initial weights' fingerprint, both splits' content and image
    files (:func:`netvlad_core.datasets.manifest.split_fingerprint`), the device type, the checkpoint format, what
    the trunk cache resolved to (``off``, ``float16`` or ``float32``: the trunk cache changes the result by float
    rounding in float32, slightly more in float16, so a run resumes only with the same one), and ``data``: the
    recipe's own training data (the places recipe's place of every image)."""
    params = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_IDENTITY}
    blob = json.dumps({"train": params, "model": model_cfg.to_dict(), "init_weights": init_fingerprint,
                       "train_split": split_fingerprint(train_split), "val_split": split_fingerprint(val_split),
                       "device": device.type, "format": CHECKPOINT_FORMAT, "trunk_cache": trunk_cache, "data": data},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_checkpoint(path: Path, identity: str, log: Callable[[str], None]) -> dict | None:
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


def checkpoint_bytes(model: torch.nn.Module, num_queries: int, num_negatives: int, moments: int = 1) -> int:
    """Disk room a run's checkpoint needs, written atomically beside the previous one (so twice): the model and the
    best epoch's weights, ``moments`` optimiser tensors per trainable parameter (SGD's momentum: 1; AdamW: 2), the
    triplet recipe's negative cache (``num_queries`` × ``num_negatives``; 0 for the places recipe), plus 1 MiB for
    the rest (RNG states, order, the DVCLive curves)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    optim = moments * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * (2 * state + optim + num_queries * num_negatives * 8 + 2**20)
