"""Command `report` (not a dvc.yaml stage: it compares revisions): the working tree's params, metrics and recall@N
curves against a git revision, as a Markdown report and a PNG for review (`make report BASE=<rev>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from netvlad_core.report import ReportConfig, write_report
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(ReportConfig))
def main(
    out: Path = typer.Option(..., help="Output Markdown report (params and metrics tables, a verdict per model)."),
    plot: Path = typer.Option(..., help="Output PNG of the recall@N curves at BASE and in the working tree (the "
                              "report links it by its path relative to the report)."),
    repo: Optional[Path] = typer.Option(None, help="The DVC project's git working tree (default: the current "
                                        "folder)."),
    *, cfg: ReportConfig,
) -> None:
    """Compare the working tree with BASE: `dvc params diff` and `dvc metrics diff` as Markdown tables (4
    significant digits, signed change), the recall@N curves of both in one PNG, one recall@1 verdict per model.

    Needs no DVC remote: BASE's metrics and curves are committed (`cache: false`). Exit status: 0; 1 when
    --max-drop is given and a model's recall@1 dropped by more than that many points (the report is written all
    the same, and one line on stderr names the models); 2 on bad input (not a git repository, an unknown BASE, no
    metrics at BASE or in the working tree), with nothing written.
    """
    result = write_report(repo if repo is not None else Path.cwd(), out, plot, cfg=cfg)
    typer.echo(f"{out}, {plot}: against {result.base_name} ({result.base_sha[:7]})")
    for line in result.verdicts():
        typer.echo(f"  {line.replace('`', '')}")
    failure = result.failure_line()
    if failure:
        typer.echo(failure, err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    run(main)
