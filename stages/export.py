"""Command `export`: the final model as an ONNX file (images → descriptors, dynamic batch), verified with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    model: Path = typer.Option(..., help="Model file to export (the final model written by `pca`, or any model file)."),
    out: Path = typer.Option(..., help="Output ONNX file."),
    export_format: str = typer.Option("onnx", "--format", help="Export format (only onnx)."),
    opset: int = typer.Option(17, help="ONNX opset version."),
    tolerance: float = typer.Option(1e-4, help="Largest allowed |ONNX - PyTorch| on a random input; above it nothing is written."),
) -> None:
    """Export the model to ONNX and check onnxruntime against PyTorch on the same random input."""
    from netvlad_core.errors import NetVLADError
    from netvlad_core.export import export_onnx
    from netvlad_core.io import distinct_paths
    from netvlad_core.models import load_model

    distinct_paths({"--model": model}, {"--out": out})
    if export_format.lower() != "onnx":
        raise NetVLADError(f"unknown export format {export_format!r}; valid: onnx")
    net, model_cfg = load_model(model)
    report = export_onnx(net, model_cfg.to_dict(), out, opset=opset, tolerance=tolerance)
    typer.echo(f"export: {model_cfg.input_width}x{model_cfg.input_height} images -> {report.out_dim}-D descriptors, "
               f"opset {report.opset}, max |onnxruntime - pytorch| = {report.max_abs_diff:.2e} -> {report.path}")


if __name__ == "__main__":
    run(main)
