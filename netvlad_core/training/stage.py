"""The ``train`` stage's library call: a model file and split folders in, the trained model file out."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from ..errors import NetVLADError
from .config import TrainConfig, TrainResult
from .loop import train


def apply_trainable_blocks(model: torch.nn.Module, model_cfg, trainable_blocks: int | None):
    """Move the freeze boundary of a loaded model to ``trainable_blocks`` (backbone units counted from the end;
    ``-1`` all, ``0`` none; ``None`` the backbone's own default, e.g. vgg16's conv5_1..conv5_3) via
    ``model.backbone.set_trainable_blocks``, and return the updated config, which records the number used."""
    from ..models.backbones import default_trainable_blocks

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
    (:func:`apply_trainable_blocks`), trained with :func:`.loop.train` on the splits in ``train_split_dir`` and
    ``val_split_dir`` (places recipe: the places of ``train_split_dir``,
    :func:`netvlad_core.datasets.places.load_places`); ``run`` is a :class:`~netvlad_core.config.RunConfig`.
    Progress notices go to ``log``, the one-line summary to ``report``; returns the result on rank 0 (``None`` on
    the other ranks under torchrun)."""
    from ..datasets.manifest import load_ground_truth, load_split
    from ..distributed import distributed_session
    from ..io import distinct_paths
    from ..models import load_model

    distinct_paths({"--init-model": init_model}, {"--out": out},
                   folders={"--live-dir": live_dir, "--checkpoint-dir": checkpoint_dir})
    cfg.validate()
    train_data, val_data = load_split(train_split_dir), load_split(val_split_dir)
    val_gt = load_ground_truth(val_split_dir)
    train_gt, places = None, None
    if cfg.recipe == "places":
        from ..datasets.places import load_places

        places = load_places(train_split_dir, train_data, cell_size_m=cfg.places.cell_size_m,
                             heading_sectors=cfg.places.heading_sectors, min_images=cfg.places.images_per_place)
        log(f"train: {places.describe()}")
    else:
        train_gt = load_ground_truth(train_split_dir)
    model, model_cfg = load_model(init_model)
    model_cfg = _freeze_boundary(model, model_cfg, cfg, trainable_blocks)
    with distributed_session(run.device, run.dist_timeout) as dist:
        result = train(model, model_cfg, train_data, train_gt, val_data, val_gt, out=out, live_dir=live_dir,
                       checkpoint_dir=checkpoint_dir, cfg=cfg, device=dist.device, progress=run.progress, log=log,
                       dist=dist, places=places)
    if not dist.is_main:
        return None
    r = result.best_recall
    report(f"train: best epoch {result.best_epoch} of {result.epochs_run} (R@1 {100 * r[1]:.1f} "
           f"R@5 {100 * r[5]:.1f} R@10 {100 * r[10]:.1f} on {val_data.name}), {cfg.recipe} recipe"
           f"{', early stop' if result.stopped_early else ''}{', resumed' if result.resumed else ''}"
           f"{f', {dist.world_size} processes' if dist.enabled else ''} -> {out}")
    return result


def _freeze_boundary(model: torch.nn.Module, model_cfg, cfg: TrainConfig, trainable_blocks: int | None):
    """The freeze boundary at ``trainable_blocks`` (FT2, ``only_projections``: none, only the projections train)."""
    if cfg.only_projections:
        if trainable_blocks not in (None, 0):
            raise NetVLADError(f"--trainable-blocks {trainable_blocks} contradicts --only-projections (which trains "
                               f"no backbone block): leave it unset or 0")
        trainable_blocks = 0
    model_cfg = apply_trainable_blocks(model, model_cfg, trainable_blocks)
    if cfg.only_projections:
        model.train_only_projections()
    return model_cfg
