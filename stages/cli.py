"""The ``netvlad`` console script: one Typer app, one subcommand per stage."""

from __future__ import annotations

import importlib

import typer

from stages import launch
from stages._common import CommandGroup

app = typer.Typer(
    cls=CommandGroup,
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="NetVLAD visual place recognition: the pipeline's stages as commands (see dvc.yaml for how they chain).",
)


@app.callback()
def _root() -> None:
    """NetVLAD visual place recognition: the pipeline's stages as commands."""


# (subcommand, module under stages/) in pipeline order.
STAGES = [
    ("download", "download"),
    ("import", "imports"),
    ("sample", "sample"),
    ("kmeans", "kmeans"),
    ("train", "train"),
    ("features", "features"),
    ("evaluate", "evaluate"),
    ("pca", "pca"),
    ("bench-split", "bench_split"),
    ("bench-table", "bench_table"),
    ("localize", "localize"),
    ("export", "export"),
    ("report", "report"),  # not in dvc.yaml: it compares the working tree with another revision
    ("compare", "compare"),  # not in dvc.yaml: every experiment's changed params and recall, one screen
    ("retrieve", "retrieve"),  # not in dvc.yaml: ranks a folder of photos against another (no labels)
]

for _name, _module in STAGES:
    _fn = importlib.import_module(f"stages.{_module}").main
    app.command(_name, help=_fn.__doc__)(_fn)

# `launch` runs the other commands through this app (it finds it in its click context: no import cycle)
app.command("launch", help=launch.main.__doc__, context_settings=launch.CONTEXT_SETTINGS)(launch.main)


if __name__ == "__main__":
    app()
