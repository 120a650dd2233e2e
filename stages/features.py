"""Stage `features`: global descriptors of a split's database and query images, cached in HDF5."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.features import FeatureConfig, write_split_features
from stages._common import run
from stages._options import RUN, Group, stage


@stage(cfg=Group(FeatureConfig, "features"), run_cfg=RUN)
def main(
    model: Path = typer.Option(..., help="Model file (written by `kmeans`, `train` or `pca`)."),
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (e.g. data/dataset/test)."),
    out: Path = typer.Option(..., help="Output HDF5 with datasets `db` and `query`."),
    *, cfg: FeatureConfig, run_cfg: RunConfig,
) -> None:
    """Encode every database and query image of a split. An interrupted run resumes where it stopped, if the model,
    the split (manifest rows, image root, image files' sizes and times) and the options are the same; otherwise it
    starts over. Under torchrun the images are shared out among the processes and rank 0 writes the file."""
    write_split_features(model, split_dir, out, cfg=cfg, run=run_cfg, log=typer.echo)


if __name__ == "__main__":
    run(main)
