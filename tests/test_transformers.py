"""The vision-transformer backbones (DINOv2, DINOv3 through timm), NetVLAD-Linear, FT2 and the trunk cache at a block
boundary: against timm's own forward, a numpy NetVLAD-Linear, files written in the official torch.hub layout."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from netvlad_core.errors import NetVLADError
from netvlad_core.mining import MiningConfig
from netvlad_core.models import ModelConfig, NetVLADLinear, build_backbone, build_model, load_model, save_model
from netvlad_core.models.backbones import REGISTRY, TRANSFORMER_BACKBONES, default_trainable_blocks
from netvlad_core.models.vit import model_input_size
from tests.conftest import REPO, make_split
from tests.test_training import descriptors_and_grads

# name → (timm model, channels, patch, depth), as timm and the DINOv2/DINOv3 papers define them
EXPECTED = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 384, 14, 12),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 768, 14, 12),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 1024, 14, 24),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", 1536, 14, 40),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", 384, 14, 12),
    "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2", 768, 14, 12),
    "dinov2_vitl14_reg": ("vit_large_patch14_reg4_dinov2", 1024, 14, 24),
    "dinov2_vitg14_reg": ("vit_giant_patch14_reg4_dinov2", 1536, 14, 40),
    "dinov3_vits16": ("vit_small_patch16_dinov3", 384, 16, 12),
    "dinov3_vitb16": ("vit_base_patch16_dinov3", 768, 16, 12),
    "dinov3_vitl16": ("vit_large_patch16_dinov3", 1024, 16, 24),
}
CPU = torch.device("cpu")


def test_registry_lists_the_transformers():
    assert TRANSFORMER_BACKBONES == tuple(EXPECTED)
    for name, (model, channels, patch, _) in EXPECTED.items():
        spec = REGISTRY[name]
        assert (spec.channels, spec.stride, spec.default_trainable_blocks) == (channels, patch, 4), name
        assert spec.imagenet_weights.startswith(f"timm:{model}.") and timm.is_model(model), name
        assert default_trainable_blocks(name) == 4


def _timm_reference(backbone) -> torch.nn.Module:
    """A second timm instance of the backbone's network, holding the same weights (loaded by timm)."""
    ref = timm.create_model(backbone.body.pretrained_cfg["architecture"], pretrained=False, num_classes=0,
                            dynamic_img_size=True)
    ref.load_state_dict(backbone.body.state_dict())
    return ref.eval()


@pytest.mark.parametrize("name, sizes", [("dinov2_vits14", ((70, 98), (84, 42))),
                                         ("dinov3_vits16", ((64, 96), (80, 48)))])
def test_dense_features_equal_timms_forward_intermediates(name, sizes):
    """Last block's patch tokens after the final norm as C × H/p × W/p, and the CLS token, for two non-square sizes,
    equal timm's forward_intermediates on the same weights."""
    backbone, channels, patch = build_backbone(name, "none", init_seed=3)
    backbone.eval()
    ref = _timm_reference(backbone)
    depth = len(ref.blocks)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            dense, cls = backbone.forward_with_cls(x)
            (want, prefix), = ref.forward_intermediates(x, indices=[depth - 1], norm=True, output_fmt="NCHW",
                                                        return_prefix_tokens=True, intermediates_only=True)
        assert dense.shape == (2, channels, h // patch, w // patch)
        assert float((dense - want).abs().max()) <= 1e-5
        assert float((cls - prefix[:, 0]).abs().max()) <= 1e-5


def test_sizes_that_are_not_multiples_of_the_patch_are_resized_to_the_nearest_multiples():
    backbone, _, _ = build_backbone("dinov2_vits14", "none")
    backbone.eval()
    assert model_input_size(480, 640, 14) == (476, 644) and model_input_size(480, 640, 16) == (480, 640)
    assert model_input_size(224, 224, 14) == (224, 224) and model_input_size(5, 21, 14) == (14, 28)
    x = torch.randn(1, 3, 60, 90, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(56, 84), mode="bilinear", align_corners=False)  # 60 → 56, 90 → 84
    with torch.no_grad():
        got = backbone(x)
        (want,) = _timm_reference(backbone).forward_intermediates(resized, indices=[11], norm=True,
                                                                  intermediates_only=True)
        assert float((got - want).abs().max()) <= 1e-5
        for h, w in ((224, 224), (322, 322), (480, 640)):
            hh, ww = model_input_size(h, w, 14)
            assert backbone(torch.zeros(1, 3, h, w)).shape == (1, 384, hh // 14, ww // 14)


def _model(name: str, pooling: str = "netvlad-linear", h: int = 56, w: int = 84, **kw) -> torch.nn.Module:
    cfg = ModelConfig(backbone=name, weights="none", pooling=pooling, num_clusters=4, projection_dim=8, cls_dim=6,
                      input_height=h, input_width=w, init_seed=1, **kw)
    return build_model(cfg).eval(), cfg


@pytest.mark.parametrize("name, pooling, blocks, whiten", [("dinov2_vits14", "netvlad-linear", 4, False),
                                                           ("dinov2_vits14_reg", "netvlad", 0, True),
                                                           ("dinov3_vits16", "netvlad-linear", 2, True)])
def test_trunk_cached_part_forward_and_gradients_equal_the_full_models(name, pooling, blocks, whiten):
    model, cfg = _model(name, pooling, h=64, w=80, trainable_blocks=blocks)
    if whiten:
        g = torch.Generator().manual_seed(1)
        model.set_whitening(torch.randn(5, model.pool.out_dim, generator=g), torch.randn(5, generator=g))
    images = torch.randn(7, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    counts = [2, 3]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(fn, x):
        return descriptors_and_grads(fn, x, trainable, counts)

    want_desc, want_grads = grads(model, images)
    trunk, part = model.split_trunk()
    assert not any(p.requires_grad for p in trunk.parameters()), "the trunk is frozen"
    assert {id(p) for p in part.parameters() if p.requires_grad} == {id(p) for p in trainable}
    backbone = model.backbone
    with torch.no_grad():
        tokens = trunk(images)
        gh, gw = backbone.grid(64, 80)
        assert tokens.shape == (7, backbone.num_prefix_tokens + gh * gw, backbone.out_channels)
    got_desc, got_grads = grads(part, tokens.clone())
    torch.testing.assert_close(got_desc, want_desc, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------- NetVLAD-Linear


def numpy_netvlad_linear(x, cls, conv_w, centroids, proj_w, proj_b, cls_w, cls_b):
    """NetVLAD-Linear written out in float64 numpy, one image and one cluster at a time."""
    out = []
    for i in range(x.shape[0]):
        feats = x[i].reshape(x.shape[1], -1).T
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        logits = feats @ conv_w.T
        assign = np.exp(logits - logits.max(1, keepdims=True))
        assign /= assign.sum(1, keepdims=True)
        rows = []
        for k in range(centroids.shape[0]):
            v = (assign[:, k:k + 1] * (feats - centroids[k])).sum(0)
            rows.append(proj_w @ (v / np.linalg.norm(v)) + proj_b)
        local = np.concatenate(rows)
        local /= np.linalg.norm(local)
        glob = cls_w @ cls[i] + cls_b
        glob /= np.linalg.norm(glob)
        vec = np.concatenate([glob, local])
        out.append(vec / np.linalg.norm(vec))
    return np.stack(out)


def test_netvlad_linear_equals_a_numpy_computation():
    rng = np.random.default_rng(0)
    k, d, p, c = 5, 12, 4, 3
    layer = NetVLADLinear(num_clusters=k, dim=d, projection_dim=p, cls_dim=c)
    desc = rng.normal(size=(200, d))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    layer.init_params(desc[:k] + 0.05 * rng.normal(size=(k, d)), desc)
    with torch.no_grad():
        for param in layer.projection_parameters():
            param.copy_(torch.from_numpy(rng.normal(size=tuple(param.shape))))
    x, cls = rng.normal(size=(3, d, 4, 5)), rng.normal(size=(3, d))
    got = layer(torch.from_numpy(x).float(), torch.from_numpy(cls).float()).detach().numpy()
    want = numpy_netvlad_linear(x, cls, layer.conv.weight.detach().double().numpy()[:, :, 0, 0],
                                layer.centroids.detach().double().numpy(),
                                *(q.detach().double().numpy() for q in layer.projection_parameters()))
    assert got.shape == (3, c + k * p) == (3, layer.out_dim)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_netvlad_linear_is_8448_d_on_vit_b_and_needs_a_cls_token():
    assert NetVLADLinear(num_clusters=64, dim=768).out_dim == 64 * 128 + 256 == 8448
    with pytest.raises(NetVLADError, match="netvlad-linear needs a backbone with a CLS token"):
        build_model(ModelConfig(backbone="resnet18_layer3", weights="none", pooling="netvlad-linear"))


def test_ft2_trains_only_the_projections():
    from netvlad_core.training import TrainConfig
    from netvlad_core.training.optim import build_optimiser
    from netvlad_core.training.triplet import train_step

    model, _ = _model("dinov2_vits14", h=42, w=56)
    projections = model.train_only_projections()
    optimizer, _ = build_optimiser(model, TrainConfig(lr=0.1), 1)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in projections]
    assert len(projections) == 4 and model.backbone.trainable_blocks == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(7, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    loss, _ = train_step(model, optimizer, None, images, torch.tensor([2, 3]), CPU,
                          TrainConfig(lr=0.1, mining=MiningConfig(margin=10.0)))
    assert loss > 0
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"pool.projection.weight", "pool.projection.bias", "pool.cls_projection.weight",
                     "pool.cls_projection.bias"}, moved
    cnn = build_model(ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4))
    with pytest.raises(NetVLADError, match="only-projections"):
        cnn.train_only_projections()


def test_a_model_file_round_trips_and_exports_to_onnx_at_its_input_size(tmp_path):
    from netvlad_core.export import export_onnx

    model, cfg = _model("dinov2_vits14_reg", h=60, w=90)
    save_model(tmp_path / "m.pt", model, cfg)
    back, back_cfg = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 60, 90)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    report = export_onnx(back, back_cfg, tmp_path / "m.onnx")
    assert report.out_dim == 6 + 4 * 8 and report.max_abs_diff <= 1e-4


# ------------------------------------------------------------------------------------------------- weight files

D = 384  # ViT-S


def official_dinov2_vits14(registers: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the layout of the official torch.hub checkpoints (dinov2_vits14_pretrain.pth,
    dinov2_vits14_reg4_pretrain.pth), from the published key names, random weights, a 518-px (37×37 + CLS)
    position embedding, the mask token, and for reg4 the register tokens."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + 37 * 37, D), "mask_token": r(1, D),
             "patch_embed.proj.weight": r(D, 3, 14, 14), "patch_embed.proj.bias": r(D)}
    if registers:
        state["register_tokens"] = r(1, 4, D)
    for i in range(12):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
            b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D), b + "ls1.gamma": r(D),
            b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D), b + "ls2.gamma": r(D)})
    state.update({"norm.weight": 1 + r(D), "norm.bias": r(D)})
    return state


@pytest.mark.parametrize("name, timm_name, registers", [("dinov2_vits14", "vit_small_patch14_dinov2", False),
                                                        ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", True)])
def test_an_official_torch_hub_file_loads_and_equals_timm_loading_it(tmp_path, name, timm_name, registers):
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(official_dinov2_vits14(registers), path)
    model = build_model(ModelConfig(backbone=name, weights=str(path), pooling="gem", input_height=70,
                                    input_width=98)).eval()
    ref = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
                            dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model.backbone(x)
        (want,) = ref.forward_intermediates(x, indices=[11], norm=True, intermediates_only=True)
    assert float((dense - want).abs().max()) <= 1e-5
    assert float(dense.abs().max()) > 0.1, "the weights came from the file"
    # the same weights as a timm safetensors file
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    again, _, _ = build_backbone(name, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert float((again.eval()(x) - want).abs().max()) <= 1e-5


def test_pretrained_weights_come_from_the_torch_hub_cache_offline(tmp_path, monkeypatch):
    """``weights: imagenet`` = timm's ``.lvd142m`` tag: the official file in the torch hub cache is loaded (through
    timm's checkpoint filter); with no cached file and downloads off, one line says what to fetch."""
    from netvlad_core.models.weights import timm_cached_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if timm_cached_file("vit_small_patch14_reg4_dinov2.lvd142m")[0] is not None:
        pytest.skip("this machine's Hugging Face cache holds the real weights")
    with pytest.raises(NetVLADError, match=r"^dinov2_vits14_reg pretrained weights \(vit_small_patch14_reg4_dinov2"
                                           r"\.lvd142m\) are not in the local cache and downloading is disabled; "
                                           r"download https://huggingface\.co/timm/"):
        build_backbone("dinov2_vits14_reg", "imagenet", allow_download=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    official = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_dinov2_vits14(registers=True, seed=5), official)
    cached, _, _ = build_backbone("dinov2_vits14_reg", "imagenet", allow_download=False)
    from_file, _, _ = build_backbone("dinov2_vits14_reg", str(official))
    assert all(torch.equal(v, from_file.state_dict()[k]) for k, v in cached.state_dict().items())


def _sample(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.sample", *args], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"})


def test_a_file_with_a_missing_or_misshapen_key_is_one_line_exit_2(tmp_path):
    state = official_dinov2_vits14(registers=True)
    missing = dict(state)
    del missing["blocks.7.attn.proj.bias"]
    small_pos = dict(state, pos_embed=torch.zeros(1, 1 + 16 * 16, D))  # a 224-px embedding: refused, not resampled
    for label, bad, key in (("missing", missing, "blocks.7.attn.proj.bias"), ("pos", small_pos, "pos_embed")):
        torch.save(bad, tmp_path / f"{label}.pth")
        with pytest.raises(NetVLADError, match=rf"^{tmp_path / label}\.pth: not a timm vit_small_patch14_reg4_dinov2 "
                                               rf"state dict: .*'{key}'"):
            build_backbone("dinov2_vits14_reg", str(tmp_path / f"{label}.pth"))
    # the command line: one line, exit status 2, no output
    split = make_split(tmp_path, num_db=4, num_q=1)
    torch.save(dict(state, **{"blocks.3.mlp.fc1.weight": torch.zeros(1000, D)}), tmp_path / "misshapen.pth")
    proc = _sample(["--split-dir", str(split), "--out", str(tmp_path / "out.h5"), "--backbone", "dinov2_vits14_reg",
                    "--weights", str(tmp_path / "misshapen.pth"), "--no-progress", "--device", "cpu"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {tmp_path / 'misshapen.pth'}: not a timm vit_small_patch14_reg4_dinov2 "
                                   f"state dict: key 'blocks.3.mlp.fc1.weight' has shape (1000, 384), expected "
                                   f"(1536, 384)"), proc.stderr
    assert not (tmp_path / "out.h5").exists()


# ------------------------------------------------------------------------------------------------- trunk cache


def test_the_trunk_cache_of_a_transformer_holds_tokens_and_auto_reports_its_size(tmp_path):
    from netvlad_core.datasets.images import load_image
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.trunk_cache import build_trunk_cache, cache_identity, encode_cached, plan_trunk_cache

    model, cfg = _model("dinov2_vits14", h=48, w=64)  # → 42×70: 3×5 patches + CLS = 16 tokens
    train = load_split(make_split(tmp_path / "t", num_db=5, num_q=2, name="train", seed=0))
    val = load_split(make_split(tmp_path / "v", num_db=3, num_q=2, name="val", seed=1))
    said = []
    plan = plan_trunk_cache(model, cfg, train, val, mode="auto", dtype="float32", folder=tmp_path / "ckpt",
                            device=CPU, log=said.append)
    assert plan.shape == (16, 384)
    assert said == [f"train: trunk cache on: 12 images × 16 tokens × 384 float32 activations at the freeze boundary "
                    f"(24.0 KiB per image) = 288.0 KiB in {tmp_path / 'ckpt' / 'trunk_cache.npy'}"]
    key = cache_identity(plan, cfg, train, val, device=CPU, amp="bf16")
    cache = build_trunk_cache(plan, key, model_cfg=cfg, device=CPU, batch_size=4, num_workers=0, amp="bf16",
                              log=lambda m: None)
    images = torch.stack([load_image(f, 48, 64, cfg.mean, cfg.std) for f in val.query_files()])
    with torch.no_grad():
        np.testing.assert_allclose(cache.array[cache.rows("val_q")], plan.trunk(images).numpy(), rtol=1e-5,
                                   atol=1e-5)
        want = model(images).numpy()
    got = encode_cached(plan.part, cache, cache.rows("val_q"), np.empty((2, model.out_dim), np.float32), device=CPU,
                        batch_size=4, amp="bf16")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in plan.trunk.parameters())
    assert sum(p.numel() for p in plan.trunk.parameters()) + sum(p.numel() for p in plan.part.parameters()) == \
        sum(p.numel() for p in model.parameters())
