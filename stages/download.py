"""Stage `download`: the dataset spec (.mat files or VG folders) → normalised split folders with ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.datasets.official import DownloadConfig, write_dataset
from netvlad_core.datasets.synthetic import SyntheticConfig
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(DownloadConfig, "download"), city=Group(SyntheticConfig, "download"),
       run_cfg=Group(RunConfig, only=("progress",)))
def main(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder: one sub-folder per split "
                             "(manifest.csv, split.json, ground_truth.h5); replaced as a whole, and left untouched "
                             "on any error."),
    *, cfg: DownloadConfig, city: SyntheticConfig, run_cfg: RunConfig,
) -> None:
    """Download or read a dataset's spec and write its splits with ground-truth positives (25 m / 10 m)."""
    write_dataset(out, cfg=cfg, city=city, progress=run_cfg.progress, log=typer.echo,
                  notice=lambda message: typer.echo(message, err=True))


if __name__ == "__main__":
    run(main)
