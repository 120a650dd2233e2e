"""Stage `pca`: fit PCA whitening on train-database descriptors and write the final (whitened) model."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.features import FeatureConfig
from netvlad_core.models.whitening import PCAConfig, write_whitened_model
from stages._common import run
from stages._options import RUN, Group, stage


@stage(cfg=Group(PCAConfig, "pca"), encoding=Group(FeatureConfig, "pca", exclude=("float16",)), run_cfg=RUN)
def main(
    model: Path = typer.Option(..., help="Model file to whiten (written by `train`, or `kmeans` for the "
                               "off-the-shelf model)."),
    split_dir: Path = typer.Option(..., help="Split folder whose database images the PCA is fitted on "
                                   "(e.g. data/dataset/train)."),
    out: Path = typer.Option(..., help="Output model file: the input model followed by the whitening layer "
                             "(Linear + L2-normalisation)."),
    *, cfg: PCAConfig, encoding: FeatureConfig, run_cfg: RunConfig,
) -> None:
    """Fit PCA whitening (y = diag(1/sqrt(λ+1e-9))·Uᵀ·(x−μ), then L2-normalise) and append it to the model."""
    write_whitened_model(model, split_dir, out, cfg=cfg, feature_cfg=encoding, run=run_cfg, log=typer.echo)


if __name__ == "__main__":
    run(main)
