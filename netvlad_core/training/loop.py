"""The recipe-agnostic training loop: set-up, checkpoint and resume, DVCLive, DDP, the trunk cache, validation.

A *recipe* (:mod:`.triplet`, :mod:`.places`; :class:`.recipe.Recipe`) supplies an epoch's order of units (queries,
place batches), the training of the rest of an epoch from a position in that order (its batches, its loss, its
steps, its mid-epoch checkpoints through :meth:`Run.save_checkpoint`), and its own checkpointed state. The loop does
the rest, the same for every recipe:

1. set-up: the inputs checked, the model on the device in eval mode (BatchNorm layers keep their running statistics,
   no dropout: a step does not depend on how a batch is composed), the trunk cache planned, the optimiser and its
   schedule (:mod:`.optim`), the run's identity (:func:`.state.run_identity`);
2. start fresh (every RNG seeded from ``seed``) or resume rank 0's checkpoint (sent to every rank) when its identity
   matches, restoring the DVCLive files before DVCLive opens the folder;
3. the trunk cache (:mod:`netvlad_core.trunk_cache`) built once for every train and val image, when planned: the
   recipe then runs the model's trainable part on cached activations, and so does the validation;
4. epochs: the recipe's epoch, then the schedule's epoch step (``schedule: step``), recall@1/5/10 on the val split,
   the best weights by recall@``best_by`` (in memory and in the checkpoint), the next epoch's order, an epoch-end
   checkpoint, and early stop after ``patience`` epochs without improvement;
5. rank 0 writes ``out`` once, with the best epoch's weights (an interrupted run leaves no ``out``), ends DVCLive and
   removes the checkpoint (and the trunk cache, unless kept).

On CPU (deterministic algorithms on, ordered loaders) a resumed run ends with the same weights, bit for bit, as an
uninterrupted one. Under torchrun (``dist``) rank 0 alone reads the checkpoint, writes checkpoints, DVCLive files and
the model, and logs; the model a step runs is wrapped once in DistributedDataParallel with gradients summed
(:mod:`.ddp`), each recipe scaling its per-rank loss so that a step equals the single-process step.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..datasets.manifest import GroundTruth, Split
from ..device import prepare_model
from ..distributed import DistContext, broadcast_object
from ..errors import NetVLADError
from ..features import model_fingerprint
from ..io import save_state
from ..models.build import ModelConfig
from .config import RECALL_NS, TrainConfig, TrainResult
from .live import NoLive
from .optim import build_optimiser, steps_per_optimisation_step
from .state import CHECKPOINT_NAME, TrainState, load_checkpoint, run_identity, seed_everything
from .validation import validate_recall


@dataclass(eq=False)
class Run:
    """What stays fixed during a run: the inputs, the recipe, DVCLive, where the checkpoint goes, and the trunk
    cache with the trainable part that runs on it (``None``: train on images)."""

    cfg: TrainConfig
    device: torch.device
    dist: DistContext | None
    model_cfg: ModelConfig
    train_split: Split
    val_split: Split
    val_gt: GroundTruth
    recipe: object  # a .recipe.Recipe
    live: object  # dvclive.Live on rank 0, NoLive elsewhere
    live_dir: Path
    checkpoint_path: Path
    identity: str | None  # None on ranks other than 0
    say: Callable[[str], None]
    show: bool
    step: Callable | None = None  # the recipe's optimisation step, built once (DDP wrapping included)
    trunk_cache: object | None = None
    part: torch.nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def distributed(self) -> bool:
        return self.dist is not None and self.dist.enabled

    def log_row(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Log ``metrics`` (in this order) as one DVCLive step."""
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()
        state.live_step = self.live.step

    def save_checkpoint(self, state: TrainState) -> None:
        """Write the checkpoint atomically (rank 0 only)."""
        if self.is_main:
            save_state(self.checkpoint_path, state.to_checkpoint(self.identity, self.live_dir),
                       replaces_input=True)  # the checkpoint it resumed from

    def after_step(self, state: TrainState) -> None:
        """After every optimisation step: the per-step schedules (linear, cosine) advance."""
        if steps_per_optimisation_step(self.cfg):
            state.scheduler.step()


@contextlib.contextmanager
def deterministic(device: torch.device):
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


def state_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def check_outputs(out: Path, live_dir: Path, checkpoint_dir: Path, val_split: Split, val_gt: GroundTruth) -> None:
    """Refuse an output inside the folders training rewrites and a val split whose ground truth does not fit."""
    for folder, flag in ((live_dir, "live-dir"), (checkpoint_dir, "checkpoint-dir")):
        if out.resolve().is_relative_to(folder.resolve()):
            raise NetVLADError(f"{out}: the output model lies in the {flag} folder {folder}, which training "
                               f"rewrites; put it elsewhere")
    if len(val_gt.positives) != val_split.num_queries:
        raise NetVLADError(f"val split {val_split.name!r}: ground truth has {len(val_gt.positives)} queries but the "
                           f"manifest {val_split.num_queries}")


def _plan_trunk_cache(recipe, model, model_cfg, train_split: Split, val_split: Split, cfg: TrainConfig,
                      checkpoint_dir: Path, device, dist, say):
    """The trunk cache's plan (:func:`netvlad_core.trunk_cache.plan_trunk_cache`), or ``None`` when the recipe
    augments its images: the frozen trunk would see no augmentation, so ``auto`` trains on images (and says so in
    one line) and ``on`` is an error."""
    from ..trunk_cache import plan_trunk_cache

    if recipe.augments and cfg.trunk_cache != "off":
        if cfg.trunk_cache == "on":
            raise NetVLADError(f"trunk-cache on contradicts augment {cfg.places.augment}: the cached frozen trunk "
                               f"would see no augmentation; use trunk-cache auto or off, or augment none")
        say(f"train: trunk cache off: augment {cfg.places.augment} needs the whole model on augmented images")
        return None
    return plan_trunk_cache(model, model_cfg, train_split, val_split, mode=cfg.trunk_cache,
                            dtype=cfg.trunk_cache_dtype, folder=checkpoint_dir, device=device, dist=dist,
                            keep_free=recipe.checkpoint_bytes(model), log=say)


def _start_state(run: Run, recipe, model, optimizer, scheduler) -> tuple[TrainState, bool]:
    """Resume rank 0's checkpoint (sent to every rank) when its identity matches, else a fresh state."""
    checkpoint = load_checkpoint(run.checkpoint_path, run.identity, run.say) if run.is_main else None
    if run.distributed:  # every rank resumes from rank 0's checkpoint (need not exist elsewhere)
        checkpoint = broadcast_object(checkpoint, run.dist, what="sharing the checkpoint")
    if checkpoint is not None:
        state = TrainState.from_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                           recipe_state=recipe.state_from_checkpoint,
                                           live_dir=run.live_dir if run.is_main else None)
        run.say(f"train: resuming from {run.checkpoint_path} at epoch {state.epoch + 1}, {recipe.unit} "
                f"{state.position} of {len(state.order)}")
        return state, True
    rng = seed_everything(run.cfg.seed)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, epoch=0, position=0,
                       order=recipe.epoch_order(0), best_recall={}, best_epoch=0, epochs_without_improvement=0,
                       best_model=None, live_step=0, stopped=False, recipe_state=recipe.fresh_state())
    return state, False


def _open_live(run: Run, state: TrainState, resumed: bool) -> None:
    from dvclive import Live

    run.live = Live(dir=str(run.live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None) if run.is_main \
        else NoLive()
    run.live.step = state.live_step
    if not resumed:
        run.live.log_params({k: v for k, v in asdict(run.cfg).items()})


def _build_trunk_cache(run: Run, plan, model, state: TrainState) -> None:
    """Build (or resume, or reuse) the planned trunk cache, unless training is already over."""
    from ..trunk_cache import build_trunk_cache, cache_identity

    if plan is None or state.epoch >= run.cfg.epochs or state.stopped:
        return
    cfg, device = run.cfg, run.device
    key = cache_identity(plan, run.model_cfg, run.train_split, run.val_split, device=device, amp=cfg.amp) \
        if run.is_main else None
    run.trunk_cache = build_trunk_cache(plan, key, model_cfg=run.model_cfg, device=device,
                                        batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                                        stride=int(getattr(model, "stride", None) or 1), progress=run.show,
                                        dist=run.dist, log=run.say)
    run.part = plan.part


def validate(run: Run, state: TrainState) -> dict[int, float]:
    """recall@1/5/10 of the model on the val split (on the trunk cache's rows when there is one)."""
    cfg = run.cfg
    return validate_recall(state.model, run.val_split, run.val_gt, device=run.device,
                           batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                           model_cfg=run.model_cfg, progress=run.show, dist=run.dist,
                           cached=(run.part, run.trunk_cache) if run.trunk_cache is not None else None)


def end_epoch(run: Run, state: TrainState) -> None:
    """Schedule step, validation, best model, early stop, next epoch's order, epoch-end checkpoint."""
    cfg = run.cfg
    if not steps_per_optimisation_step(cfg):
        with warnings.catch_warnings():  # an epoch whose queries were all skipped made no optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            state.scheduler.step()
    metrics, summary = run.recipe.end_epoch(state)
    recall = validate(run, state)
    run.log_row(state, {**{f"val/recall@{n}": r for n, r in recall.items()}, **metrics, "epoch": state.epoch + 1})
    n = cfg.best_by
    if not state.best_recall or recall[n] > state.best_recall[n]:
        state.best_recall, state.best_epoch, state.epochs_without_improvement = dict(recall), state.epoch + 1, 0
        if run.is_main:  # kept in memory and in the checkpoint; `out` is written once, when training ends
            state.best_model = state_copy(state.model)
    else:
        state.epochs_without_improvement += 1
    run.say(f"train: epoch {state.epoch + 1}: recall@1/5/10 = {recall[1]:.4f}/{recall[5]:.4f}/{recall[10]:.4f}, "
            f"{summary}" + (" (best)" if state.best_epoch == state.epoch + 1
                            else f", {state.epochs_without_improvement} without improvement"))
    state.stopped = cfg.patience > 0 and state.epochs_without_improvement >= cfg.patience
    state.epoch += 1
    state.position = 0
    state.order = run.recipe.epoch_order(state.epoch)
    run.save_checkpoint(state)


def finish(run: Run, state: TrainState, out: Path) -> None:
    """Rank 0: the best weights to ``out`` (written only now: an interrupted run leaves no ``out``), the DVCLive
    summary, and the checkpoint, the recipe's files and the trunk cache (unless kept) removed."""
    from ..models import save_model

    final = copy.deepcopy(state.model).cpu() if run.device.type != "cpu" else state.model
    final.load_state_dict(state.best_model)
    save_model(out, final, run.model_cfg)
    for n in RECALL_NS:
        run.live.summary[f"best/recall@{n}"] = state.best_recall[n]
    run.live.summary["best/epoch"] = state.best_epoch
    run.live.end()
    run.checkpoint_path.unlink(missing_ok=True)
    run.recipe.cleanup(run)
    if run.trunk_cache is not None and not run.cfg.keep_trunk_cache:
        from ..trunk_cache import remove_trunk_cache

        run.trunk_cache = None
        remove_trunk_cache(run.checkpoint_path.parent)


def train(model: torch.nn.Module, model_cfg, train_split: Split, train_gt: GroundTruth | None, val_split: Split,
          val_gt: GroundTruth, *, out: str | os.PathLike, live_dir: str | os.PathLike,
          checkpoint_dir: str | os.PathLike, cfg: TrainConfig, device: torch.device, progress: bool = True,
          log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr), dist: DistContext | None = None,
          places=None) -> TrainResult:
    """Train ``model`` (config ``model_cfg``) with the recipe ``cfg.recipe`` on ``train_split`` (triplet: with its
    ground truth ``train_gt``; places: the places ``places``, a :class:`netvlad_core.datasets.places.Places`, or
    else the places view of ``train_split``); write the best model by validation recall@``cfg.best_by`` on
    ``val_split`` to ``out`` when training ends. See the module docstring, :mod:`.triplet` and :mod:`.places`."""
    from .recipe import make_recipe

    cfg.validate()
    is_main = dist is None or dist.is_main
    say = log if is_main else (lambda msg: None)
    out, live_dir, checkpoint_dir = Path(out), Path(live_dir), Path(checkpoint_dir)
    check_outputs(out, live_dir, checkpoint_dir, val_split, val_gt)
    recipe = make_recipe(cfg, train_split, train_gt, places)
    model = prepare_model(model, device).eval()
    plan = _plan_trunk_cache(recipe, model, model_cfg, recipe.split, val_split, cfg, checkpoint_dir, device, dist, say)
    identity = run_identity(cfg, model_cfg, model_fingerprint(model), recipe.split, val_split, device,
                            trunk_cache=plan.dtype if plan is not None else "off",
                            data=recipe.data_fingerprint()) if is_main else None
    optimizer, scheduler = build_optimiser(model, cfg, recipe.steps_per_epoch())
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    run = Run(cfg=cfg, device=device, dist=dist, model_cfg=model_cfg, train_split=recipe.split, val_split=val_split,
              val_gt=val_gt, recipe=recipe, live=None, live_dir=live_dir,
              checkpoint_path=checkpoint_dir / CHECKPOINT_NAME, identity=identity, say=say,
              show=progress and is_main)
    state, resumed = _start_state(run, recipe, model, optimizer, scheduler)
    _open_live(run, state, resumed)
    net = plan.part if plan is not None else model  # what a step runs: the trainable part on cached activations
    blank = (1, *plan.shape) if plan is not None else (1, 3, model_cfg.input_height, model_cfg.input_width)
    run.step = recipe.step_function(run, net, optimizer, scaler, blank)  # builds the DDP model, once
    _build_trunk_cache(run, plan, model, state)
    with deterministic(device):
        while state.epoch < cfg.epochs and not state.stopped:
            recipe.train_epoch(run, state)
            end_epoch(run, state)
    if is_main:
        finish(run, state, out)
    return TrainResult(best_recall=state.best_recall, best_epoch=state.best_epoch, epochs_run=state.epoch,
                       stopped_early=state.stopped, resumed=resumed, skipped_queries=recipe.skipped(state), out=out,
                       recipe=cfg.recipe)


def epoch_permutation(units: np.ndarray, seed: int, epoch: int, limit: int) -> np.ndarray:
    """``units`` in the visiting order of ``epoch``: a permutation drawn from ``(seed, epoch)``, cut to ``limit``
    (0 = all)."""
    order = np.random.default_rng([seed, epoch]).permutation(units)
    return order[:limit] if limit else order
