"""Command `report` (not a dvc.yaml stage: it compares revisions): the working tree's params, metrics and recall@N
curves against a git revision, as a Markdown report and a PNG for review (`make report BASE=<rev>`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from netvlad_core.report import ReportConfig, parse_max_drop, write_report
from stages._common import run
from stages._options import Group, stage

# --max-drop is read as text here, not through the generic unset words of stages/_options.py: `none` or an empty
# value (`make report MAX_DROP=`) must not turn the gate off without a word. Its help is the config field's.
_MAX_DROP = next(f for f in dataclasses.fields(ReportConfig) if f.name == "max_drop")


@stage(cfg=Group(ReportConfig, exclude=("max_drop",)))
def main(
    out: Path = typer.Option(..., help="Output Markdown report (params and metrics tables, a verdict per model)."),
    plot: Path = typer.Option(..., help="Output PNG of the recall@N curves at BASE and in the working tree (the "
                              "report links it by its path relative to the report)."),
    repo: Optional[Path] = typer.Option(None, help="The DVC project's git working tree (default: the current "
                                        "folder)."),
    max_drop: Optional[str] = typer.Option(None, help=_MAX_DROP.metadata["help"] + " A number of "
                                           "points >= 0: none or an empty value is refused.", show_default=False,
                                           metavar="POINTS"),
    *, cfg: ReportConfig,
) -> None:
    """Compare the working tree with BASE: `dvc params diff` and `dvc metrics diff` as Markdown tables (4
    significant digits, signed change), the recall@N curves of both in one PNG, one recall@1 verdict per model.

    Needs no DVC remote: BASE's metrics and curves are committed (`cache: false`).

    Exit status 0: the report is written and, with --max-drop, the gate passes.

    Exit status 1 (the gate fails; only with --max-drop): a model's recall@1 dropped by more than that many points,
    or the working tree has no usable recall@1 for a model (null, a boolean, text, NaN or infinite; or a number at
    BASE whose metrics file or key is now gone). The report is written all the same; one line on stderr names the
    models.

    Exit status 2 (bad input; one error line, nothing written): not a git repository, an unknown BASE, no metrics
    at BASE or in the working tree, a metrics or params file that cannot be read at BASE or in the working tree
    (not valid JSON: merge-conflict markers, a truncated write), a recall@N curve value that is not a finite
    number, a --max-drop that is not a number (none or empty included), an --out/--plot that is a file the report
    reads (a metrics or params file, a curve, dvc.yaml).
    """
    cfg = dataclasses.replace(cfg, max_drop=parse_max_drop(max_drop))
    cfg.validate()
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
