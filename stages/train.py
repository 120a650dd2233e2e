"""Stage `train`: the place model trained from the k-means-initialised model with the paper's triplet recipe or the
places recipe (resumable)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.mining import MiningConfig
from netvlad_core.models.build import ModelConfig
from netvlad_core.training import PlacesConfig, TrainConfig, train_model_file
from stages._common import run
from stages._options import RUN, Group, stage


@stage(cfg=Group(TrainConfig, "train"), mining=Group(MiningConfig, "mining"), places=Group(PlacesConfig, "places"),
       boundary=Group(ModelConfig, "model", only=("trainable_blocks",)), run_cfg=RUN)
def main(
    init_model: Path = typer.Option(..., help="Model file written by `kmeans` (the off-the-shelf model)."),
    train_split: Path = typer.Option(..., help="Split folder to train on (e.g. data/dataset/train): triplets mined "
                                     "from it, or its places (places.csv, else UTM cells)."),
    val_split: Path = typer.Option(..., help="Split folder for the per-epoch recall@N (e.g. data/dataset/val)."),
    out: Path = typer.Option(..., help="Output model file: the best epoch by validation recall@N (best-by), "
                             "written when training ends."),
    live_dir: Path = typer.Option(..., help="DVCLive folder for the training curves (e.g. metrics/train)."),
    checkpoint_dir: Path = typer.Option(..., help="Folder of the resume checkpoint (keep it out of DVC outputs); "
                                        "emptied after a successful finish."),
    *, cfg: TrainConfig, mining: MiningConfig, places: PlacesConfig, boundary: ModelConfig, run_cfg: RunConfig,
) -> None:
    """Train the place model: recipe triplet (the paper's) mines triplets from the train split (best positive within
    10 m in feature space, hard negatives beyond 25 m); recipe places trains on batches of P places x K images with
    the multi-similarity loss and miner (places from the split's places.csv, e.g. GSV-Cities, or its UTM cells and
    heading sectors). Keeps the best epoch by validation recall@N (best-by). Rerunning after an interruption
    resumes from the last checkpoint if it was made with the same parameters, initial model and splits (images
    included); otherwise it starts over with a notice. With the trunk cache (trunk-cache auto or on) the frozen
    backbone layers run once per image, before the first epoch, into the checkpoint dir, and training runs only the
    trainable layers on their cached output (not with augment: auto then trains on images). Under torchrun each
    process takes a share of every batch (batch-size, places-per-batch: the global batch) and rank 0 writes."""
    train_model_file(init_model, train_split, val_split, out, live_dir=live_dir, checkpoint_dir=checkpoint_dir,
                     cfg=dataclasses.replace(cfg, mining=mining, places=places),
                     trainable_blocks=boundary.trainable_blocks, run=run_cfg,
                     log=lambda message: typer.echo(message, err=True), report=typer.echo)


if __name__ == "__main__":
    run(main)
