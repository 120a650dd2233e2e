"""Stage `bench-split`: one benchmark of params.yaml `benchmarks:` as a split folder, data/bench/<name>/split."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.benchmarks import write_benchmark_split
from netvlad_core.config import RunConfig
from netvlad_core.datasets.official import DownloadConfig
from netvlad_core.datasets.synthetic import SyntheticConfig
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(DownloadConfig, "benchmarks.<name>"), city=Group(SyntheticConfig, "benchmarks.<name>"),
       run_cfg=Group(RunConfig, only=("progress",)))
def main(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="The benchmark's folder, named after it "
                             "(data/bench/<name>): the split goes to DIR/split/ (manifest.csv, split.json, "
                             "ground_truth.h5); replaced as a whole, and left untouched on any error."),
    *, cfg: DownloadConfig, city: SyntheticConfig, run_cfg: RunConfig,
) -> None:
    """Read one split of a dataset (the options of `download`; --split names it, else test, msls: val) as a
    benchmark's split folder, checked like `download` checks it (published counts, conventions)."""
    write_benchmark_split(out, cfg=cfg, city=city, progress=run_cfg.progress, log=typer.echo,
                          notice=lambda message: typer.echo(message, err=True))


if __name__ == "__main__":
    run(main)
