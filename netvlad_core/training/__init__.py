"""Training a place model: one recipe-agnostic loop and one module per recipe.

- :mod:`.loop`: set-up, checkpoint and resume, DVCLive, DDP wrapping, the trunk cache, per-epoch validation, the
  best model; :mod:`.state` the checkpointed state and the run's identity, :mod:`.live` the DVCLive files that
  travel with a checkpoint, :mod:`.optim` the optimiser and schedule, :mod:`.ddp` the torchrun step plumbing,
  :mod:`.validation` the per-epoch recall@N.
- :mod:`.triplet`: the paper's recipe (mined triplets, descriptor-cache refreshes); the default.
- :mod:`.places`: P × K place batches with pytorch-metric-learning's multi-similarity loss and miner (GSV-Cities,
  SALAD, SuperPlace), on GSV-Cities or the places view of any split with UTM (:mod:`netvlad_core.datasets.places`).
- :mod:`.stage`: the ``train`` stage's call (files in, model file out).
"""

from .config import RECALL_NS, RECIPES, PlacesConfig, TrainConfig, TrainResult
from .live import live_history, restore_live_history
from .loop import train
from .stage import apply_trainable_blocks, train_model_file
from .state import CHECKPOINT_FORMAT, CHECKPOINT_NAME, TrainState, checkpoint_bytes, run_identity
from .validation import descriptor_error, encode_into, validate_recall

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "RECALL_NS", "RECIPES", "PlacesConfig", "TrainConfig",
           "TrainResult", "TrainState", "apply_trainable_blocks", "checkpoint_bytes", "descriptor_error",
           "encode_into", "live_history", "restore_live_history", "run_identity", "train", "train_model_file",
           "validate_recall"]
