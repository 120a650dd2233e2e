"""Command `export`: the final model as an ONNX file (images → descriptors, dynamic batch), verified with
onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.export import ExportConfig, export_model_file
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(ExportConfig))
def main(
    model: Path = typer.Option(..., help="Model file to export (the final model written by `pca`, or any model "
                               "file)."),
    out: Path = typer.Option(..., help="Output ONNX file."),
    *, cfg: ExportConfig,
) -> None:
    """Export the model to ONNX and check onnxruntime against PyTorch on the same random input."""
    export_model_file(model, out, cfg=cfg, log=typer.echo)


if __name__ == "__main__":
    run(main)
