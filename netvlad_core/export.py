"""Export the final model (images → global descriptors) to ONNX and verify it against PyTorch.

The ONNX graph takes ``images`` (float32, ``(batch, 3, H, W)``, already normalised with the config's mean/std,
batch dynamic; H × W fixed: the config's input size — for a vision transformer the position embedding is resampled
for that size before tracing) and returns ``descriptors`` (float32, ``(batch, out_dim)``, L2-normalised). The model
config is stored as JSON in the file's metadata (key ``netvlad_model_config``) so a consumer knows the input size and
normalisation. The file is written atomically and only after onnxruntime reproduced PyTorch's outputs.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import option
from .errors import NetVLADError
from .io import atomic_path
from .models.build import ModelConfig

INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"
CONFIG_METADATA_KEY = "netvlad_model_config"


@dataclass
class ExportConfig:
    """How ``export`` writes a model."""

    export_format: str = option("onnx", "Export format (only onnx).", name="format")
    opset: int = option(17, "ONNX opset version.")
    tolerance: float = option(1e-4, "Largest allowed |ONNX - PyTorch| on a random input; above it nothing is "
                              "written.")

    def validate(self) -> None:
        if self.export_format.lower() != "onnx":
            raise NetVLADError(f"unknown export format {self.export_format!r}; valid: onnx")


@dataclass
class ExportReport:
    """What was written: the path, opset, output size and the largest |ONNX − PyTorch| on the check input."""

    path: Path
    opset: int
    out_dim: int
    max_abs_diff: float
    check_batch: int


def _export_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter (TracerWarning, deprecation notes of the old exporter)
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def export_onnx(model: torch.nn.Module, model_cfg: ModelConfig, out: str | os.PathLike, *, opset: int = 17,
                tolerance: float = 1e-4, check_batch: int = 3, seed: int = 0) -> ExportReport:
    """Export ``model`` (CPU, float32, eval mode) to ``out`` and check it with onnxruntime.

    The graph is traced with a batch of 2 and checked on a different batch size (``check_batch``, random
    normal input seeded with ``seed``) so the dynamic batch axis is exercised; a max abs difference above
    ``tolerance`` raises :class:`NetVLADError` and leaves ``out`` untouched.
    """
    import onnx
    import onnxruntime as ort

    if opset < 9:
        raise NetVLADError(f"opset must be at least 9, got {opset}")
    if check_batch < 1:
        raise NetVLADError(f"check batch must be at least 1, got {check_batch}")
    height, width = int(model_cfg.input_height), int(model_cfg.input_width)
    model = model.to("cpu", torch.float32).eval()
    traced = model
    if hasattr(model.backbone, "fix_input_size"):  # a transformer: its position embedding resampled for this size
        traced = copy.deepcopy(model)
        traced.backbone.fix_input_size(height, width)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, height, width, generator=generator)
    check = torch.randn(check_batch, 3, height, width, generator=generator)
    try:
        data = _export_bytes(traced, example, opset)
    except Exception as e:  # the exporter raises many types for unsupported ops / opsets
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetVLADError(f"ONNX export (opset {opset}) failed: {first}") from None
    proto = onnx.load_from_string(data)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_METADATA_KEY, json.dumps(model_cfg.to_dict(), sort_keys=True)
    data = proto.SerializeToString()
    del proto

    with torch.inference_mode():
        expected = model(check).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]
    if got.shape != expected.shape:
        raise NetVLADError(f"ONNX model gives shape {got.shape} for a batch of {check_batch}, PyTorch {expected.shape}")
    max_abs_diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not max_abs_diff <= tolerance:
        raise NetVLADError(f"ONNX output differs from PyTorch by {max_abs_diff:.3g} (> {tolerance:g}); "
                           f"nothing written to {out}")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return ExportReport(path=out, opset=opset, out_dim=int(expected.shape[1]), max_abs_diff=max_abs_diff,
                        check_batch=check_batch)


def export_model_file(model_file: str | os.PathLike, out: str | os.PathLike, *, cfg: ExportConfig,
                      log=print) -> ExportReport:
    """The ``export`` command: the model in ``model_file`` as ONNX in ``out`` (:func:`export_onnx`, checked against
    PyTorch with onnxruntime); logs one summary line."""
    from .io import distinct_paths
    from .models import load_model

    distinct_paths({"--model": model_file}, {"--out": out})
    cfg.validate()
    net, model_cfg = load_model(model_file)
    report = export_onnx(net, model_cfg, out, opset=cfg.opset, tolerance=cfg.tolerance)
    log(f"export: {model_cfg.input_width}x{model_cfg.input_height} images -> {report.out_dim}-D descriptors, "
        f"opset {report.opset}, max |onnxruntime - pytorch| = {report.max_abs_diff:.2e} -> {report.path}")
    return report
