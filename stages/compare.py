"""Command `compare` (not a dvc.yaml stage): every DVC experiment's changed params and recall@1/5 of each model on
each benchmark, in one table that fits the terminal (`make compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from netvlad_core.experiments import CompareConfig, compare
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(CompareConfig))
def main(
    repo: Optional[Path] = typer.Option(None, help="The DVC project's folder (default: the current folder)."),
    *, cfg: CompareConfig,
) -> None:
    """Show `dvc exp show` the other way round: a block per experiment (workspace, baseline commits, their
    experiments) with the params it changed against its baseline, a line per model, a column pair (recall@1, @5)
    per benchmark: the pipeline's test split and each of params.yaml `benchmarks`."""
    typer.echo(compare(repo if repo is not None else Path.cwd(), cfg=cfg), nl=False)


if __name__ == "__main__":
    run(main)
