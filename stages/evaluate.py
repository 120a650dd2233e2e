"""Stage `evaluate`: recall@N and localisation error of one features file, plus DVC metrics/plots files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from netvlad_core.config import RunConfig
from netvlad_core.evaluation import EvalConfig, evaluate
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(EvalConfig, "evaluate"), run_cfg=Group(RunConfig, only=("progress",)))
def main(
    features: Path = typer.Option(..., help="Features HDF5 written by `features` (datasets `db` and `query`)."),
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (manifest + ground truth)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON, numbers only (recall@N, counts, median error)."),
    plot: Path = typer.Option(..., help="Output CSV `model,n,recall` for `dvc plots` (x=n, y=recall)."),
    per_query: Path = typer.Option(..., help="Output CSV: every query's top matches, correctness, position "
                                   "estimate and error (full precision)."),
    retrievals: Optional[Path] = typer.Option(None, help="Output PNG of example queries and their top-5 matches."),
    settings: Optional[Path] = typer.Option(None, help="Output JSON of how the metrics were made (model, split, "
                                            "index, panorama collapsing, localisation, recall N used)."),
    model_name: str = typer.Option(..., help="Name of the model in the plot CSV and settings (e.g. offtheshelf)."),
    *, cfg: EvalConfig, run_cfg: RunConfig,
) -> None:
    """Search the split's database for every query and report recall@N and localisation error.

    Every number in the output files is written at full precision; only the summary line printed here is rounded.
    Giving one file for two outputs (or the features file as an output) is an error, before any work.
    """
    result = evaluate(features, split_dir, metrics_json=metrics, plot_csv=plot, per_query_csv=per_query,
                      retrievals_png=retrievals, settings_json=settings, model_name=model_name, cfg=cfg,
                      progress=run_cfg.progress)
    typer.echo(result.summary(model_name, metrics))


if __name__ == "__main__":
    run(main)
