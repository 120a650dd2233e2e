"""What a recipe supplies to the loop (:class:`Recipe`), and :func:`make_recipe`, the one place a recipe is chosen."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..datasets.manifest import GroundTruth, Split
from .config import TrainConfig
from .state import TrainState, checkpoint_bytes


class Recipe:
    """A training recipe: its data (``split``: the images the trunk cache holds as the train rows), an epoch's
    order of units, the rest of an epoch from ``state.position``, the optimisation step, and its own state."""

    name = ""
    unit = "unit"  # what the epoch's order counts (progress bar, resume notice)
    augments = False  # images are augmented: the trunk cache cannot serve the train images

    def __init__(self, cfg: TrainConfig, split: Split):
        self.cfg = cfg
        self.split = split

    def data_fingerprint(self) -> str:
        """What the run's identity needs beyond the split's content ("" when nothing)."""
        return ""

    def checkpoint_bytes(self, model: torch.nn.Module) -> int:
        return checkpoint_bytes(model, 0, 0, moments=2 if self.cfg.optimizer == "adamw" else 1)

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def fresh_state(self) -> object:
        raise NotImplementedError

    def state_from_checkpoint(self, saved: dict) -> object:
        raise NotImplementedError

    def step_function(self, run, net: torch.nn.Module, optimizer, scaler, blank_shape: tuple[int, ...]) -> Callable:
        raise NotImplementedError

    def train_epoch(self, run, state: TrainState) -> None:
        raise NotImplementedError

    def end_epoch(self, state: TrainState) -> tuple[dict[str, float], str]:
        """The epoch's own figures (DVCLive row, logged after the validation recall) and its summary words; the
        epoch's counters are reset."""
        return {}, ""

    def skipped(self, state: TrainState) -> int:
        return 0

    def cleanup(self, run) -> None:
        """Remove the recipe's own files once training has finished."""


def make_recipe(cfg: TrainConfig, train_split: Split, train_gt: GroundTruth | None, places=None) -> Recipe:
    """The recipe ``cfg.recipe`` over the training data (its inputs checked)."""
    if cfg.recipe == "places":
        from .places import PlacesRecipe

        return PlacesRecipe(cfg, train_split, places)
    from .triplet import TripletRecipe

    return TripletRecipe(cfg, train_split, train_gt)
