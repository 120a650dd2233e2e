"""`netvlad import`: each released layout, written by the test from the facts with random weights, gives the
descriptor an independent forward pass of the original code's semantics gives (≤ 1e-5), and bad files fail in one
line with nothing written."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from netvlad_core.datasets.images import load_image
from netvlad_core.errors import NetVLADError
from netvlad_core.importing import ImportConfig, import_model
from netvlad_core.models import load_model
from stages.cli import app
from tests import released_files as rf

TOL = 1e-5


def images(tmp_path: Path, size=(40, 32), count=2, seed=0) -> list[Path]:
    """Real PNG files (lossless, so both passes read the same pixels) at the model's input size."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(small).resize(size, Image.BILINEAR).save(p)
        paths.append(p)
    return paths


def ours(model_file: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(final descriptors, pooled VLAD, trunk output) of this project's model on ``files``, as `features` reads
    them (the one decoder, the config's normalisation)."""
    model, cfg = load_model(model_file)
    x = torch.stack([load_image(f, cfg.input_height, cfg.input_width, cfg.mean, cfg.std) for f in files])
    with torch.no_grad():
        trunk = model.backbone(x)
        pooled = model.pool(trunk)
        final = model(x)
    return final.numpy(), pooled.numpy(), trunk.numpy()


def run_cli(*args: str):
    return CliRunner().invoke(app, ["import", *args, "--no-progress"])


# ------------------------------------------------------------------------------------------------- MatConvNet


@pytest.mark.parametrize("v2, pca_dim", [(False, 12), (True, None)])
def test_matconvnet_struct_matches_a_numpy_walk_of_its_layers(tmp_path, v2, pca_dim):
    rng = np.random.default_rng(1)
    k, d = 5, 8
    layers = rf.vgg_like_trunk(rng, widths=(4, 6, d)) + rf.vlad_head(rng, d, k, pca_dim, v2=v2)
    src = rf.write_matconvnet(tmp_path / "vd_struct.mat", layers)
    files = images(tmp_path, size=(40, 32))
    out = tmp_path / "model.pt"
    report = import_model(str(src), out, cfg=ImportConfig(input_height=32, input_width=40), progress=False,
                          log=lambda _: None)
    final, pooled, trunk = ours(out, files)
    model, cfg = load_model(out)
    assert cfg.backbone == "matconvnet" and cfg.num_clusters == k and cfg.vladv2 is v2
    assert cfg.source == {"format": "matconvnet", "name": "vd_struct.mat", "sha256": report.sha256}
    for i, f in enumerate(files):
        ref = rf.matconvnet_forward(layers, np.asarray(Image.open(f).convert("RGB")))
        np.testing.assert_allclose(trunk[i].transpose(1, 2, 0), ref["trunk"], atol=TOL * 10, rtol=1e-5)
        # the 32k-D VLAD vector, up to the documented permutation: ours k·D + d is MATLAB's d·K + k
        matlab = ref["vlad"].reshape(d, k)  # [d, k]
        assert np.abs(pooled[i].reshape(k, d) - matlab.T).max() <= TOL
        if pca_dim is not None:
            assert final.shape == (2, pca_dim)
            assert np.abs(final[i] - ref["final"]).max() <= TOL
        else:
            assert np.abs(final[i].reshape(k, d) - matlab.T).max() <= TOL


def test_alexnet_like_trunk_only_file_saved_with_struct_fields_as_variables(tmp_path):
    """Not a hard-coded VGG16: a caffe-style trunk (stride-4 conv, asymmetric padding, grouped conv, LRN, overlapping
    pools) saved as `save -struct` does, with fc layers and a softmax after it: cropped at the last conv before the
    last pool, as the paper crops conv5."""
    rng = np.random.default_rng(2)
    layers = [rf.conv_layer("conv1", 5, 5, 3, 6, rng, pad=(1, 2, 2, 1), stride=(2, 2)),
              rf.relu("relu1"), rf.normalize("norm1", [5, 1, 0.0001 * 50, 0.75]),
              rf.pool("pool1", size=3, stride=2, pad=(0, 1, 0, 1)),
              rf.conv_layer("conv2", 3, 3, 3, 8, rng, pad=(1, 1, 1, 1)),  # 2 groups of 3 input channels
              rf.relu("relu2"), {"name": "drop", "type": "dropout", "rate": 0.5},
              rf.conv_layer("conv3", 3, 3, 8, 10, rng), rf.relu("relu3"), rf.pool("pool5", size=2, stride=2),
              rf.conv_layer("fc6", 2, 2, 10, 7, rng, pad=0), rf.relu("relu6"),
              {"name": "prob", "type": "softmax"}]
    src = rf.write_matconvnet(tmp_path / "imagenet-caffe-tiny.mat", layers, top_level=True, average=(120, 110, 100))
    out = tmp_path / "trunk.pt"
    result = run_cli(str(src), "--out", str(out), "--input-height", "32", "--input-width", "40")
    assert result.exit_code == 0, result.output
    assert "trunk only" in result.output
    model, cfg = load_model(out)
    assert [s["name"] for s in cfg.layers] == ["conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "conv3"]
    assert model.backbone.stride == 4 and model.backbone.out_channels == 10
    assert model.backbone.trainable_blocks == 2  # by default the convs after the last pool (conv2, conv3) learn
    files = images(tmp_path, size=(40, 32))
    _, _, trunk = ours(out, files)
    for i, f in enumerate(files):
        ref = rf.matconvnet_forward(layers, np.asarray(Image.open(f).convert("RGB")), average=(120, 110, 100),
                                    stop=8)  # up to conv3
        np.testing.assert_allclose(trunk[i].transpose(1, 2, 0), ref["trunk"], atol=1e-4, rtol=1e-5)


def test_imported_model_exports_to_onnx_fine_tunes_and_seeds_sample(tmp_path):
    """The imported file is an ordinary model file: ONNX export (checked against PyTorch by onnxruntime), a freeze
    boundary for `train --init-model`, and a trunk model that `sample` starts from."""
    from netvlad_core.export import export_onnx
    from netvlad_core.models import build_model
    from netvlad_core.models.build import ModelConfig, resolve_trunk
    from netvlad_core.training import apply_trainable_blocks

    rng = np.random.default_rng(3)
    layers = [rf.conv_layer("conv1", 3, 3, 3, 4, rng, pad=(0, 1, 1, 0)), rf.relu("relu1"),
              rf.normalize("norm1", [3, 2, 1e-3, 0.75]), rf.pool("pool1", pad=(0, 1, 0, 1)),
              rf.conv_layer("conv2", 3, 3, 4, 6, rng)] + rf.vlad_head(rng, 6, 3, 5)
    src = rf.write_matconvnet(tmp_path / "net.mat", layers)
    out = tmp_path / "model.pt"
    import_model(str(src), out, cfg=ImportConfig(input_height=24, input_width=32), progress=False, log=lambda _: None)
    model, cfg = load_model(out)
    report = export_onnx(model, cfg, tmp_path / "model.onnx")
    assert report.out_dim == 5 and report.max_abs_diff <= 1e-5
    tuned = apply_trainable_blocks(model, cfg, None)
    assert tuned.trainable_blocks == 1  # conv2, after the last pool
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")] == [
        "backbone.body.features.4.weight", "backbone.body.features.4.bias"]

    trunk = ModelConfig(backbone="matconvnet", weights=str(out), input_height=24, input_width=32)
    resolved = resolve_trunk(trunk)
    assert resolved.layers == cfg.layers and resolved.mean == cfg.mean and resolved.source == cfg.source
    rebuilt = build_model(resolved)
    for key, value in rebuilt.backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key
    with pytest.raises(NetVLADError, match="set the backbone to 'matconvnet'"):
        resolve_trunk(ModelConfig(backbone="vgg16", weights=str(out)))


# --------------------------------------------------------------------------------------------- PyTorch ports


@functools.lru_cache(maxsize=1)
def vgg16_encoder() -> dict:
    """A random VGG16 ``features[:29]`` state dict (keys ``<i>.weight``), as the ports' encoders hold."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    return {k: v.clone() for k, v in torch.nn.Sequential(*list(vgg16(weights=None).features.children())[:-2])
            .state_dict().items()}


def netvlad_tensors(k: int, d: int = 512, seed: int = 0, bias: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    centroids = torch.rand(k, d, generator=g)
    out = {"centroids": centroids, "conv.weight": (F_normalize(centroids) * 20)[:, :, None, None]}
    if bias:
        out["conv.bias"] = torch.randn(k, generator=g)
    return out


def F_normalize(x):
    return torch.nn.functional.normalize(x, dim=1)


def pixels(files: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float64))
                        .permute(2, 0, 1) for f in files])


def legacy_save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def test_pytorch_netvlad_checkpoint_with_numpy_scalars_flags_and_dataparallel_infix(tmp_path):
    k = 6
    encoder, pool = vgg16_encoder(), netvlad_tensors(k)
    state = {f"encoder.module.{key}": v for key, v in encoder.items()} | {f"pool.module.{key}": v
                                                                          for key, v in pool.items()}
    run_dir = tmp_path / "runs" / "Nov01_12-00-00_vgg16_netvlad"
    legacy_save({"epoch": 3, "state_dict": state, "recalls": {1: np.float64(0.85), 5: np.float64(0.94)},
                 "best_score": np.float64(0.94), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                 "parallel": True}, run_dir / "checkpoints" / "model_best.pth.tar")
    (run_dir / "flags.json").write_text(json.dumps({"num_clusters": k, "arch": "vgg16", "pooling": "netvlad",
                                                    "vladv2": False}))
    out = tmp_path / "model.pt"
    result = run_cli(str(run_dir), "--out", str(out), "--input-height", "48", "--input-width", "64")
    assert result.exit_code == 0, result.output
    assert "pytorch-netvlad" in result.output and "ImageNet mean/std" in result.output
    files = images(tmp_path, size=(64, 48))
    final, _, _ = ours(out, files)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).double(), torch.tensor([0.229, 0.224, 0.225]).double()
    x = (pixels(files) / 255 - mean[:, None, None]) / std[:, None, None]  # ToTensor + Normalize
    ref, _ = rf.netvlad_port_forward(encoder, pool["centroids"], pool["conv.weight"], x)
    assert final.shape == (2, k * 512)
    assert np.abs(final - ref.numpy()).max() <= TOL
    _, cfg = load_model(out)
    assert cfg.source["format"] == "pytorch-netvlad" and cfg.source["name"] == "model_best.pth.tar"


def test_patchnetvlad_wpca_checkpoint_float64_noncontiguous(tmp_path):
    k, p = 4, 16
    encoder, pool = vgg16_encoder(), netvlad_tensors(k, seed=1)
    g = torch.Generator().manual_seed(2)
    wpca = torch.randn(k * 512, p, generator=g, dtype=torch.float64).T[:, :, None, None] / 45  # non-contiguous
    assert not wpca.is_contiguous()
    state = {f"encoder.{key}": v for key, v in encoder.items()} | {f"pool.{key}": v for key, v in pool.items()} | {
        "WPCA.0.weight": wpca, "WPCA.0.bias": torch.randn(p, generator=g, dtype=torch.float64) * 0.01}
    src = tmp_path / "pittsburgh_WPCA16.pth.tar"
    torch.save({"num_pcs": p, "state_dict": state}, src)
    out = tmp_path / "model.pt"
    import_model(str(src), out, cfg=ImportConfig(input_height=48, input_width=64), progress=False,
                 log=lambda _: None)
    files = images(tmp_path, size=(64, 48), seed=4)
    final, pooled, _ = ours(out, files)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).double(), torch.tensor([0.229, 0.224, 0.225]).double()
    x = (pixels(files) / 255 - mean[:, None, None]) / std[:, None, None]
    vlad, ref = rf.netvlad_port_forward(encoder, pool["centroids"], pool["conv.weight"], x,
                                        pca=(state["WPCA.0.weight"], state["WPCA.0.bias"]))
    assert np.abs(pooled - vlad.numpy()).max() <= TOL
    assert final.shape == (2, p) and np.abs(final - ref.numpy()).max() <= TOL


def test_openibl_state_dict_with_module_prefix_and_0_255_input(tmp_path):
    k, p = 4, 8
    encoder, pool = vgg16_encoder(), netvlad_tensors(k, seed=3)
    g = torch.Generator().manual_seed(5)
    pca = torch.randn(p, k * 512, 1, 1, generator=g) / 45, torch.randn(p, generator=g) * 0.01
    state = {f"module.base_model.base.{key}": v for key, v in encoder.items()} | {
        f"module.net_vlad.{key}": v for key, v in pool.items()} | {"module.pca_layer.weight": pca[0],
                                                                    "module.pca_layer.bias": pca[1]}
    src = tmp_path / "vgg16_netvlad.pth"
    torch.save(state, src)
    out = tmp_path / "model.pt"
    result = run_cli(str(src), "--out", str(out), "--input-height", "48", "--input-width", "64")
    assert result.exit_code == 0, result.output
    assert "openibl" in result.output and "RGB 0-255 minus (123.68, 116.78, 103.94)" in result.output
    files = images(tmp_path, size=(64, 48), seed=5)
    final, _, _ = ours(out, files)
    vgg_mean = torch.tensor([0.48501960784313836, 0.4579568627450961, 0.4076039215686255]).double() * 255
    x = pixels(files) - vgg_mean[:, None, None]  # 0-255 RGB minus the VGG mean
    _, ref = rf.netvlad_port_forward(encoder, pool["centroids"], pool["conv.weight"], x, pca=pca)
    assert np.abs(final - ref.numpy()).max() <= TOL


def test_source_from_a_loopback_url_is_downloaded_and_checked(server, tmp_path):
    from netvlad_core.download import sha256_file

    rng = np.random.default_rng(6)
    src = rf.write_matconvnet(tmp_path / "Pitts30K_struct.mat", rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4))
    server.files["/Pitts30K_struct.mat"] = src.read_bytes()
    url = server.url + "/Pitts30K_struct.mat"
    bad = run_cli(url, "--out", str(tmp_path / "bad.pt"), "--sha256", "0" * 64, "--download-dir", str(tmp_path / "dl"))
    assert bad.exit_code == 2 and "sha256 mismatch" in bad.output and not (tmp_path / "bad.pt").exists()
    good = run_cli(url, "--out", str(tmp_path / "m.pt"), "--sha256", sha256_file(src),
                   "--download-dir", str(tmp_path / "dl"))
    assert good.exit_code == 0, good.output
    _, cfg = load_model(tmp_path / "m.pt")
    assert cfg.source == {"format": "matconvnet", "name": url, "sha256": sha256_file(src)}


# ------------------------------------------------------------------------------------------------- bad input


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned-by-import",)


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(7)
    good = rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4)
    out: dict[str, tuple[Path, str]] = {}
    torch.save({"weights": torch.zeros(3)}, tmp / "unknown.pth")
    out["unknown layout"] = (tmp / "unknown.pth", "unknown layout")
    full = rf.write_matconvnet(tmp / "full.mat", good)
    (tmp / "truncated.mat").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out["truncated mat"] = (tmp / "truncated.mat", "not a readable MAT file")
    torch.save({"num_pcs": 4, "state_dict": {"encoder.0.weight": torch.zeros(64, 3, 3, 3)}}, tmp / "ok.pth.tar")
    (tmp / "truncated.pth.tar").write_bytes((tmp / "ok.pth.tar").read_bytes()[:300])
    out["truncated checkpoint"] = (tmp / "truncated.pth.tar", "not a readable PyTorch checkpoint")
    missing = [layer for layer in good if layer["name"] != "vlad:intranorm"]
    out["missing layer"] = (rf.write_matconvnet(tmp / "missing.mat", missing), "expected the intranorm")
    misshapen = [dict(layer) for layer in good]
    wpca = next(layer for layer in misshapen if layer["name"] == "WPCA")
    wpca["weights"] = rf.cell([np.zeros((1, 1, 20, 4), np.float32), np.zeros(4, np.float32)])
    out["misshapen layer"] = (rf.write_matconvnet(tmp / "misshapen.mat", misshapen), "expected 1×1×24×P")
    run_dir = tmp / "run"
    pool = netvlad_tensors(5, d=512)
    legacy_save({"state_dict": {f"encoder.{k}": v for k, v in vgg16_encoder().items()}
                 | {f"pool.{k}": v for k, v in pool.items()}}, run_dir / "checkpoints" / "checkpoint.pth.tar")
    (run_dir / "flags.json").write_text(json.dumps({"num_clusters": 64, "arch": "vgg16", "pooling": "netvlad"}))
    out["K contradicts flags"] = (run_dir / "checkpoints" / "checkpoint.pth.tar", "num_clusters 64")
    torch.save({"num_pcs": 8, "state_dict": {f"encoder.{k}": v for k, v in vgg16_encoder().items()}
                | {f"pool.{k}": v for k, v in pool.items()}
                | {"WPCA.0.weight": torch.zeros(4, 5 * 512, 1, 1), "WPCA.0.bias": torch.zeros(4)}},
               tmp / "pcs.pth.tar")
    out["num_pcs contradicts WPCA"] = (tmp / "pcs.pth.tar", "num_pcs is 8")
    legacy_save({"state_dict": _Evil()}, tmp / "evil.pth.tar")
    out["pickle that runs code"] = (tmp / "evil.pth.tar", "refused: its pickle calls posix.system")
    return out


def test_bad_files_fail_in_one_line_with_exit_2_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for what, (path, message) in _bad_files(tmp_path).items():
        out = tmp_path / "out" / "model.pt"
        result = run_cli(str(path), "--out", str(out))
        assert result.exit_code == 2, (what, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.output)
        assert message in lines[0], (what, lines[0])
        assert not out.exists(), what
    assert not (tmp_path / "pwned-by-import").exists()


def test_mat_v73_file_reads_like_its_v7_twin_and_class_objects_get_one_line(tmp_path):
    rng = np.random.default_rng(8)
    layers = rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4)
    v7 = rf.write_matconvnet(tmp_path / "v7.mat", layers)
    v73 = rf.write_matconvnet_v73(tmp_path / "v73.mat", layers)
    for src in (v7, v73):
        import_model(str(src), tmp_path / f"{src.stem}.pt", cfg=ImportConfig(input_height=32, input_width=40),
                     progress=False, log=lambda _: None)
    files = images(tmp_path, size=(40, 32), seed=9)
    assert np.array_equal(ours(tmp_path / "v7.pt", files)[0], ours(tmp_path / "v73.pt", files)[0])

    core = next(i for i, layer in enumerate(layers) if layer["name"] == "vlad:core")
    original = rf.write_matconvnet_v73(tmp_path / "original.mat", layers, class_objects={
        core: "layerVLAD", core + 2: "layerWholeL2Normalize", core + 4: "layerWholeL2Normalize"})
    result = run_cli(str(original), "--out", str(tmp_path / "original.pt"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"layers {core + 1}, {core + 3}, {core + 5} (1-based) are a MATLAB layerVLAD object" in result.output
    assert "net_class2struct" in result.output and not (tmp_path / "original.pt").exists()


def test_sample_and_kmeans_start_from_an_imported_imagenet_trunk(tmp_path):
    """The paper's starting point: `sample --backbone matconvnet --weights <imported trunk>` samples with the
    file's layers, weights and 0-255 input; `kmeans` puts a NetVLAD layer on it."""
    import h5py

    from tests.conftest import make_split

    rng = np.random.default_rng(10)
    layers = rf.vgg_like_trunk(rng, widths=(4, 8), swap_relu_pool=False) + [rf.relu("relu_last"), rf.pool("pool_last"),
                                                                            {"name": "prob", "type": "softmax"}]
    src = rf.write_matconvnet(tmp_path / "imagenet-tiny.mat", layers, top_level=True)
    trunk = tmp_path / "trunk.pt"
    assert run_cli(str(src), "--out", str(trunk)).exit_code == 0
    split = make_split(tmp_path, num_db=6, num_q=2)
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--split-dir", str(split), "--out", str(tmp_path / "d.h5"), "--backbone",
                                 "matconvnet", "--weights", str(trunk), "--input-height", "48", "--input-width", "64",
                                 "--num-descriptors", "60", "--per-image", "10", "--workers", "0", "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "d.h5") as f:
        sampled = json.loads(f.attrs["model"])
    _, trunk_cfg = load_model(trunk)
    assert sampled["layers"] == trunk_cfg.layers and sampled["mean"] == list(trunk_cfg.mean)
    result = runner.invoke(app, ["kmeans", "--descriptors", str(tmp_path / "d.h5"), "--centroids-out",
                                 str(tmp_path / "c.h5"), "--model-out", str(tmp_path / "m.pt"), "--num-clusters", "3",
                                 "--iterations", "5"])
    assert result.exit_code == 0, result.output
    model, cfg = load_model(tmp_path / "m.pt")
    assert cfg.backbone == "matconvnet" and cfg.pooling == "netvlad" and cfg.source == trunk_cfg.source
    trunk_model, _ = load_model(trunk)
    for key, value in trunk_model.backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key
