"""Stage `bench-table`: every model's recall on every benchmark in one table (Markdown and JSON)."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.bench_table import BenchTableConfig, write_table
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(BenchTableConfig))
def main(
    metrics_dir: Path = typer.Option(..., help="Folder of the benchmark metrics, <model>/<benchmark>.json "
                                     "(metrics/bench)."),
    markdown: Path = typer.Option(..., help="Output Markdown table: a row per model, a column per benchmark."),
    json_out: Path = typer.Option(..., "--json", help="Output JSON of the same table (fractions, full precision)."),
    *, cfg: BenchTableConfig,
) -> None:
    """Gather metrics/bench/<model>/<benchmark>.json into one table of recall@1/5/10 (`make report` includes it)."""
    data = write_table(metrics_dir, markdown, json_out, cfg=cfg)
    typer.echo(f"bench-table: {len(data['models'])} models × {len(data['benchmarks'])} benchmarks → {markdown}, "
               f"{json_out}")


if __name__ == "__main__":
    run(main)
