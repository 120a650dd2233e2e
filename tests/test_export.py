"""ONNX export of the final (whitened) model: onnxruntime reproduces PyTorch within 1e-4 at any batch size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from netvlad_core.errors import NetVLADError
from netvlad_core.export import CONFIG_METADATA_KEY, export_onnx
from netvlad_core.models import ModelConfig, build_model, load_model, save_model
from netvlad_core.models.whitening import apply_whitening, fit_pca_whitening
from stages.cli import app

SMALL = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)


@pytest.fixture(scope="module")
def final_model(tmp_path_factory):
    """A saved NetVLAD model with a 12-D whitening fitted on descriptors of random images."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    with torch.no_grad():
        pooled = model(torch.randn(20, 3, 48, 64)).numpy()
    apply_whitening(model, fit_pca_whitening(pooled, 12))
    save_model(tmp / "final.pt", model, SMALL)
    return tmp / "final.pt"


def test_cli_export_matches_pytorch(final_model, tmp_path):
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", "--format", "onnx", "--model", str(final_model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max |onnxruntime - pytorch| = " in result.stdout and "12-D" in result.stdout

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[CONFIG_METADATA_KEY])["whiten_dim"] == 12
    model, _ = load_model(final_model)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        images = torch.randn(batch, 3, 48, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == (batch, 12)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_failed_check_writes_nothing(final_model, tmp_path):
    model, cfg = load_model(final_model)
    with pytest.raises(NetVLADError, match="differs from PyTorch"):
        export_onnx(model, cfg, tmp_path / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_a_user_error(final_model, tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "tflite", "--model", str(final_model),
                                      "--out", str(tmp_path / "m.tflite")])
    assert result.exit_code == 2 and "unknown export format" in result.stderr
