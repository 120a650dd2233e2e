"""What a training run is told (:class:`TrainConfig`, with the places recipe's :class:`PlacesConfig` and the triplet
recipe's :class:`~netvlad_core.mining.MiningConfig`) and what it reports (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import NetVLADError
from ..mining import MiningConfig

RECIPES = ("triplet", "places")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "linear", "cosine")
AUGMENTATIONS = ("none", "randaugment")
RECALL_NS = (1, 5, 10)


@dataclass
class PlacesConfig:
    """The places recipe (params.yaml group ``places``): batches of P places × K images, the multi-similarity loss
    and miner of pytorch-metric-learning (GSV-Cities' defaults), and how a split with UTM becomes places."""

    places_per_batch: int = option(120, "places: P, the places per batch (GSV-Cities: 120; SALAD: 60); under "
                                   "torchrun the global batch.")
    images_per_place: int = option(4, "places: K, the images drawn from each place of a batch; places with fewer are "
                                   "dropped (and counted).")
    cell_size_m: float = option(5.0, "places: side of the UTM cells a split with UTM is cut into (SuperPlace: 5 m); a "
                                "place is a cell with at least K images (and one heading sector, where the split "
                                "knows the view direction). Not used for a split with places.csv (GSV-Cities).")
    heading_sectors: int = option(4, "places: heading sectors of 360/N degrees from north ([0, 360/N), ...) a cell "
                                  "is divided into where the split knows the view direction (Pittsburgh's yaw in the "
                                  "file name, the built-in city's heading, a heading_deg column); 1 = one place per "
                                  "cell.")
    ms_alpha: float = option(1.0, "places: multi-similarity loss alpha (positive pairs).")
    ms_beta: float = option(50.0, "places: multi-similarity loss beta (negative pairs).")
    ms_base: float = option(0.0, "places: multi-similarity loss base (similarity margin).")
    miner_epsilon: float = option(0.1, "places: multi-similarity miner epsilon.")
    max_batches_per_epoch: int = option(0, "places: train on at most this many batches per epoch (0 = every place "
                                        "once).")
    checkpoint_every: int = option(50, "places: batches between mid-epoch checkpoints.")
    augment: str = option("none", "places: image augmentation on the image path: none or randaugment (GSV-Cities' "
                          "RandAugment, 3 ops). The frozen trunk's cache sees no augmentation: trunk-cache auto then "
                          "trains on images.")

    def validate(self) -> None:
        if self.places_per_batch < 2:
            raise NetVLADError(f"places-per-batch must be >= 2, got {self.places_per_batch}")
        if self.images_per_place < 2:
            raise NetVLADError(f"images-per-place must be >= 2, got {self.images_per_place}")
        if not self.cell_size_m > 0:
            raise NetVLADError(f"cell-size-m must be > 0, got {self.cell_size_m}")
        if not 1 <= self.heading_sectors <= 360:
            raise NetVLADError(f"heading-sectors must be in 1..360, got {self.heading_sectors}")
        if self.max_batches_per_epoch < 0 or self.checkpoint_every < 1:
            raise NetVLADError("max-batches-per-epoch must be >= 0 and checkpoint-every >= 1")
        if self.augment not in AUGMENTATIONS:
            raise NetVLADError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if not (self.ms_alpha > 0 and self.ms_beta > 0 and self.miner_epsilon >= 0):
            raise NetVLADError("ms-alpha and ms-beta must be > 0, miner-epsilon >= 0")


@dataclass
class TrainConfig:
    """Training hyper-parameters (the paper's triplet recipe by default); the triplet mining is ``mining``
    (params.yaml group ``mining``), the places recipe ``places`` (group ``places``), the rest the ``train`` stage's
    options (params.yaml group ``train``)."""

    recipe: str = option("triplet", "triplet (the paper's: mined triplets, cache refreshes) or places (P x K place "
                         "batches, multi-similarity loss and miner).")
    epochs: int = option(30, "Maximum number of epochs.")
    optimizer: str = option("sgd", "sgd (the paper's) or adamw (SALAD/SuperPlace).")
    lr: float = option(1e-4, "Learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(1e-3, "Weight decay (SGD's L2 term; AdamW's decoupled decay).")
    schedule: str = option("step", "step (x lr-gamma every lr-step epochs, the paper's), linear or cosine (per "
                           "optimisation step after the warm-up, down to final-lr-factor x lr at the last step).")
    lr_step: int = option(5, "step schedule: multiply the learning rate by lr-gamma every this many epochs.")
    lr_gamma: float = option(0.5, "step schedule: learning-rate factor applied every lr-step epochs.")
    warmup_steps: int = option(0, "Optimisation steps of linear warm-up from 0 to lr (linear and cosine schedules).")
    final_lr_factor: float = option(0.2, "linear/cosine schedules: the last step's learning rate over lr (SALAD's "
                                    "linear decay: 0.2).")
    best_by: int = option(5, "The validation recall@N (1, 5 or 10) that chooses the best epoch and counts patience.")
    batch_size: int = option(4, "triplet: queries per optimisation step (each with its positive and negatives); "
                             "under torchrun the global batch.")
    cache_refresh_rate: int = option(1000, "triplet: queries between descriptor-cache refreshes (and checkpoints).")
    patience: int = option(10, "Stop after this many epochs without a better validation recall (0 = never).")
    seed: int = option(0, "Seed of the query or place order, the negative sampling and the augmentation.")
    max_queries_per_epoch: int = option(0, "triplet: train on at most this many queries per epoch (0 = all).")
    encode_batch_size: int = option(16, "Images per forward pass when refreshing the cache and validating.")
    workers: int = option(2, "DataLoader worker processes for decoding images.")
    amp: str = option("bf16", "Autocast dtype on GPU: bf16, fp16 or fp32 (ignored on CPU).")
    cache_memmap: bool = option(False, "triplet: keep the database descriptor cache in a memory-mapped file in the "
                                "checkpoint dir instead of RAM.")
    trunk_cache: str = option("auto", "Frozen-trunk activation cache (the backbone's output at the freeze boundary, "
                              "computed once into the checkpoint dir; refreshes, steps and validation then run only "
                              "the trainable layers): auto (when there is a frozen trunk, the file fits the free "
                              "disk and no augmentation is asked for), on (required), off.")
    trunk_cache_dtype: str = option("float16", "Storage of the trunk cache: float16 (half the disk; changes the "
                                    "results slightly) or float32 (the same results up to float rounding).")
    keep_trunk_cache: bool = option(False, "Keep the trunk cache after a successful run (a later run with the same "
                                    "trunk weights, splits and input size reuses it).")
    only_projections: bool = option(False, "Train only the projections of a netvlad-linear head, everything else "
                                    "frozen (trainable-blocks 0): SuperPlace's second fine-tuning stage (FT2), run "
                                    "on a trained model (--init-model artifacts/model_trained.pt).")
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)
    places: PlacesConfig = dataclasses.field(default_factory=PlacesConfig)

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "lr-step": self.lr_step, "batch-size": self.batch_size,
                    "cache-refresh-rate": self.cache_refresh_rate, "encode-batch-size": self.encode_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise NetVLADError(f"{name} must be >= 1, got {value}")
        for name, value in {"patience": self.patience, "max-queries-per-epoch": self.max_queries_per_epoch,
                            "workers": self.workers, "warmup-steps": self.warmup_steps}.items():
            if value < 0:
                raise NetVLADError(f"{name} must be >= 0, got {value}")
        self._validate_optimiser()
        choices = {"recipe": (self.recipe, RECIPES), "amp": (self.amp, ("bf16", "fp16", "fp32")),
                   "best-by": (self.best_by, RECALL_NS)}
        from ..trunk_cache import DTYPES, MODES

        choices.update({"trunk-cache": (self.trunk_cache, MODES),
                        "trunk-cache-dtype": (self.trunk_cache_dtype, DTYPES)})
        for name, (value, valid) in choices.items():
            if value not in valid:
                raise NetVLADError(f"{name} must be one of {', '.join(map(str, valid))}, got {value!r}")
        self.mining.validate()
        self.places.validate()

    def _validate_optimiser(self) -> None:
        if not self.lr > 0:
            raise NetVLADError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise NetVLADError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise NetVLADError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.lr_gamma <= 1:
            raise NetVLADError(f"lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0 <= self.final_lr_factor <= 1:
            raise NetVLADError(f"final-lr-factor must be in [0, 1], got {self.final_lr_factor}")
        for name, value, valid in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES)):
            if value not in valid:
                raise NetVLADError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


@dataclass
class TrainResult:
    """What a finished run reports."""

    best_recall: dict[int, float]
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    resumed: bool
    skipped_queries: int  # triplet, over all epochs: queries without a violating negative (or a positive)
    out: Path
    recipe: str = "triplet"
