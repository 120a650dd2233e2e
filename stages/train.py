"""Stage `train`: weakly supervised triplet training from the k-means-initialised model (resumable)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.mining import MiningConfig
from netvlad_core.models.build import ModelConfig
from netvlad_core.training import TrainConfig, train_model_file
from stages._common import run
from stages._options import RUN, Group, stage


@stage(cfg=Group(TrainConfig, "train"), mining=Group(MiningConfig, "mining"),
       boundary=Group(ModelConfig, "model", only=("trainable_blocks",)), run_cfg=RUN)
def main(
    init_model: Path = typer.Option(..., help="Model file written by `kmeans` (the off-the-shelf model)."),
    train_split: Path = typer.Option(..., help="Split folder to mine triplets from (e.g. data/dataset/train)."),
    val_split: Path = typer.Option(..., help="Split folder for the per-epoch recall@N (e.g. data/dataset/val)."),
    out: Path = typer.Option(..., help="Output model file: the best epoch by validation recall@5, written when "
                             "training ends."),
    live_dir: Path = typer.Option(..., help="DVCLive folder for the training curves (e.g. metrics/train)."),
    checkpoint_dir: Path = typer.Option(..., help="Folder of the resume checkpoint (keep it out of DVC outputs); "
                                        "emptied after a successful finish."),
    *, cfg: TrainConfig, mining: MiningConfig, boundary: ModelConfig, run_cfg: RunConfig,
) -> None:
    """Train the place model with triplets mined from the train split (best positive within 10 m in feature space,
    hard negatives beyond 25 m); keep the best epoch by validation recall@5. Rerunning after an interruption
    resumes from the last checkpoint if it was made with the same parameters, initial model and splits (images
    included); otherwise it starts over with a notice. With the trunk cache (trunk-cache auto or on) the frozen
    backbone layers run once per image, before the first epoch, into the checkpoint dir, and training runs only the
    trainable layers on their cached output. Under torchrun each process takes a share of every batch
    (batch-size is the global batch) and rank 0 writes."""
    train_model_file(init_model, train_split, val_split, out, live_dir=live_dir, checkpoint_dir=checkpoint_dir,
                     cfg=dataclasses.replace(cfg, mining=mining), trainable_blocks=boundary.trainable_blocks,
                     run=run_cfg,
                     log=lambda message: typer.echo(message, err=True), report=typer.echo)


if __name__ == "__main__":
    run(main)
