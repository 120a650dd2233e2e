"""The optimiser and learning-rate schedule of a run: the paper's SGD with a step schedule (per epoch), or the
published place recipes' AdamW/SGD with a linear warm-up then a linear or cosine decay (per optimisation step)."""

from __future__ import annotations

import math

import torch

from ..errors import NetVLADError
from .config import TrainConfig


def lr_factor(step: int, *, warmup: int, total: int, final: float, shape: str) -> float:
    """The learning rate over ``lr`` before optimisation step ``step`` (0-based): ``(step + 1) / warmup`` during
    the warm-up, then from 1 down to ``final`` at step ``total - 1``, linearly or along half a cosine."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    if shape == "linear":
        return 1.0 - (1.0 - final) * t
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimiser(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """The optimiser over the trainable parameters (SGD or AdamW) and its schedule: ``StepLR`` (stepped once per
    epoch) for ``schedule: step``, else a ``LambdaLR`` of :func:`lr_factor` over ``epochs × steps_per_epoch``
    optimisation steps (stepped after every step: :func:`steps_per_optimisation_step`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NetVLADError("the model has no trainable parameters (check trainable-blocks and the pooling)")
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "step":
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    total, warmup, final, shape = cfg.epochs * max(1, steps_per_epoch), cfg.warmup_steps, cfg.final_lr_factor, \
        cfg.schedule

    def factor(step: int) -> float:
        return lr_factor(step, warmup=warmup, total=total, final=final, shape=shape)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_optimisation_step(cfg: TrainConfig) -> bool:
    """Whether the schedule steps after every optimisation step (linear, cosine) rather than every epoch (step)."""
    return cfg.schedule != "step"
