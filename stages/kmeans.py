"""Stage `kmeans`: cluster the sampled descriptors and write the k-means-initialised (off-the-shelf) model."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.clustering import KMeansConfig, initial_model
from netvlad_core.config import RunConfig
from netvlad_core.models.build import HEAD_FIELDS, ModelConfig
from stages._common import run
from stages._options import Group, stage


@stage(head=Group(ModelConfig, "model.head", only=HEAD_FIELDS), cfg=Group(KMeansConfig, "kmeans"),
       run_cfg=Group(RunConfig, only=("progress",)))
def main(
    descriptors: Path = typer.Option(..., help="HDF5 written by `sample`."),
    centroids_out: Path = typer.Option(..., help="Output HDF5 with the K×D centroids."),
    model_out: Path = typer.Option(..., help="Output model file (state dict + config) initialised from the "
                                   "centroids."),
    *, head: ModelConfig, cfg: KMeansConfig, run_cfg: RunConfig,
) -> None:
    """Run faiss k-means on the descriptor sample and initialise the NetVLAD layer from it. The centroids and the
    model are written together: both or neither."""
    initial_model(descriptors, centroids_out=centroids_out, model_out=model_out, head=head, cfg=cfg,
                  progress=run_cfg.progress, log=typer.echo)


if __name__ == "__main__":
    run(main)
