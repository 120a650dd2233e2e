"""Backbones (crops, freezing, offline weights), the model config, and the one-file model save/load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netvlad_core.errors import NetVLADError
from netvlad_core.models import ModelConfig, NetVLAD, PlaceModel, build_backbone, build_model, load_model, save_model
from netvlad_core.models.backbones import (
    EFFICIENTNET_LITE0_TENSORS,
    FIXED_BACKBONES,
    REGISTRY,
    TRANSFORMER_BACKBONES,
    default_trainable_blocks,
    efficientnet_lite0_classifier,
    efficientnet_lite0_package_file,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def trainable_params(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------- crops


def test_vgg16_crop_and_default_freeze():
    torch.manual_seed(0)
    backbone, channels, stride = build_backbone("vgg16", "none")
    assert (channels, stride) == (512, 16)
    layers = list(backbone.body.features)
    assert len(layers) == 29 and isinstance(layers[-1], nn.Conv2d)  # conv5_3, no ReLU, no max-pool
    out = backbone(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 512, 2, 3)
    assert (out < 0).any()  # no ReLU after conv5_3
    # only conv5_1..conv5_3 (features 24, 26, 28) learn
    assert trainable_params(backbone) == {f"body.features.{i}.{t}" for i in (24, 26, 28) for t in ("weight", "bias")}
    backbone.set_trainable_blocks(0)
    assert trainable_params(backbone) == set()
    backbone.set_trainable_blocks(-1)
    assert len(trainable_params(backbone)) == 26
    with pytest.raises(NetVLADError, match="between 0 and 13"):
        backbone.set_trainable_blocks(14)


def test_alexnet_crop():
    backbone, channels, stride = build_backbone("alexnet", "none")
    assert (channels, stride) == (256, 16)
    assert isinstance(list(backbone.body.features)[-1], nn.Conv2d) and len(backbone.body.features) == 11
    assert backbone(torch.randn(1, 3, 96, 128)).shape[1] == 256
    assert trainable_params(backbone) == {"body.features.10.weight", "body.features.10.bias"}


@pytest.mark.parametrize("name, channels, stride", [("resnet18_layer3", 256, 16), ("resnet18_layer4", 512, 32),
                                                    ("resnet50_layer3", 1024, 16)])
def test_resnet_crops(name, channels, stride):
    backbone, got_channels, got_stride = build_backbone(name, "none")
    assert (got_channels, got_stride) == (channels, stride)
    assert backbone(torch.randn(1, 3, 64, 96)).shape == (1, channels, 64 // stride, 96 // stride)
    last = name.split("_")[1]
    assert trainable_params(backbone) == {n for n, _ in backbone.named_parameters() if n.startswith(f"body.{last}.")}


def test_frozen_batch_norm_stays_in_eval_mode():
    backbone, _, _ = build_backbone("resnet18_layer3", "none", trainable_blocks=1)
    backbone.train()
    assert not backbone.body.bn1.training and not backbone.body.layer2[0].bn1.training
    assert backbone.body.layer3[0].bn1.training
    stats = backbone.body.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(backbone.body.bn1.running_mean, stats)


def test_timm_backbone_by_name():
    backbone, channels, stride = build_backbone("timm:resnet18", "none")
    assert (channels, stride) == (256, 16)  # the last stride-16 output: layer3
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    assert trainable_params(backbone) and all(".layer3_" in n or ".layer3." in n for n in trainable_params(backbone))
    _, channels, stride = build_backbone("timm:resnet18:4", "none")
    assert (channels, stride) == (512, 32)


def test_bad_backbone_names():
    with pytest.raises(NetVLADError, match=r"'vgg19'.*valid: vgg16, alexnet"):
        build_backbone("vgg19", "none")
    with pytest.raises(NetVLADError, match="resnet18_layer3"):
        build_backbone("resnet18", "none")
    with pytest.raises(NetVLADError, match="no model named 'not_a_model'"):
        build_backbone("timm:not_a_model", "none")
    with pytest.raises(NetVLADError, match="out of range"):
        build_backbone("timm:resnet18:9", "none")
    with pytest.raises(NetVLADError, match="trainable_blocks"):
        build_backbone("alexnet", "none", trainable_blocks=9)


# name → (channels, stride, freezable units, default trainable units), from the papers and the networks' layouts:
# VGG16 has 13 conv layers and the paper trains conv5_1..conv5_3; AlexNet 5 conv layers; a ResNet crop after layerN
# has the stem + N stages; EfficientNet-Lite0 up to blocks[4] the stem + 5 stages.
EXPECTED_BACKBONES = {
    "vgg16": (512, 16, 13, 3), "alexnet": (256, 16, 5, 1),
    "resnet18_layer3": (256, 16, 4, 1), "resnet18_layer4": (512, 32, 5, 1),
    "resnet50_layer3": (1024, 16, 4, 1), "resnet50_layer4": (2048, 32, 5, 1),
    "efficientnet_lite0": (112, 16, 6, 1),
}


def test_registry_describes_the_built_backbones():
    # the CNNs first, then the vision transformers (tests/test_transformers.py checks those)
    assert tuple(REGISTRY) == FIXED_BACKBONES == tuple(EXPECTED_BACKBONES) + TRANSFORMER_BACKBONES
    for name, (channels, stride, units, default) in EXPECTED_BACKBONES.items():
        spec = REGISTRY[name]
        assert (spec.channels, spec.stride, spec.default_trainable_blocks) == (channels, stride, default), name
        assert default_trainable_blocks(name) == default
        backbone, got_channels, got_stride = build_backbone(name, "none")
        assert (got_channels, got_stride, backbone.num_units, backbone.trainable_blocks) == \
            (channels, stride, units, default), name
        with torch.no_grad():
            assert backbone.eval()(torch.zeros(1, 3, 64, 64)).shape[1] == channels, name
        # the default boundary: exactly the last `default` units learn
        learning = [any(p.requires_grad for n, p in backbone.body.named_parameters()
                        if any(n == u or n.startswith(u + ".") for u in unit)) for unit in backbone.units]
        assert learning == [False] * (units - default) + [True] * default, name
    assert default_trainable_blocks("timm:resnet18") == 1 == build_backbone("timm:resnet18", "none")[0].trainable_blocks
    with pytest.raises(NetVLADError, match=r"'vgg19'.*valid: vgg16, alexnet"):
        default_trainable_blocks("vgg19")
    with pytest.raises(NetVLADError, match="ResNets need a crop"):
        default_trainable_blocks("resnet50")


def test_random_backbones_initialise_like_torchvision():
    from torchvision import models as tvm

    for name, ctor, crop in (("alexnet", tvm.alexnet, lambda m: {f"features.{k}": v for k, v in
                                                                  m.features[:11].state_dict().items()}),
                             ("resnet18_layer3", tvm.resnet18, lambda m: {k: v for k, v in m.state_dict().items()
                                                                          if not k.startswith(("layer4", "fc"))})):
        backbone, _, _ = build_backbone(name, "none", init_seed=5)
        torch.manual_seed(5)
        expected = crop(ctor(weights=None))
        got = backbone.body.state_dict()
        assert list(got) == list(expected), name
        assert all(torch.equal(got[k], expected[k]) for k in got), name


# ------------------------------------------------------------------------------------------------- weights


def test_imagenet_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(NetVLADError, match=r"vgg16-397923af\.pth.*weights=/path/to/vgg16-397923af\.pth"):
        build_backbone("vgg16", "imagenet", allow_download=False)
    # a file placed in the torch hub cache is what "imagenet" loads (no network involved)
    torch.manual_seed(4)
    cached_state = build_backbone("alexnet", "none")[0].body.state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached_state, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    backbone, _, _ = build_backbone("alexnet", "imagenet", allow_download=False)
    torch.testing.assert_close(backbone.body.features[10].weight, cached_state["features.10.weight"])


def test_local_weights_file(tmp_path):
    torch.manual_seed(1)
    source, _, _ = build_backbone("alexnet", "none")
    path = tmp_path / "alexnet.pth"
    state = source.body.state_dict()
    state["classifier.6.weight"] = torch.zeros(365, 4096)  # a classifier the crop drops is ignored
    torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    loaded, _, _ = build_backbone("alexnet", str(path))
    for key, value in source.body.state_dict().items():
        torch.testing.assert_close(loaded.body.state_dict()[key], value)

    with pytest.raises(NetVLADError, match=r"alexnet\.pth.*'features\.0\.weight' has shape \(64, 3, 11, 11\), "
                                           r"expected \(64, 3, 3, 3\)"):
        build_backbone("vgg16", str(path))
    resnet = tmp_path / "resnet.pth"
    torch.save(build_backbone("resnet18_layer3", "none")[0].body.state_dict(), resnet)
    with pytest.raises(NetVLADError, match=r"resnet\.pth.*missing key 'features\.0\.weight'"):
        build_backbone("vgg16", str(resnet))
    with pytest.raises(NetVLADError, match="missing.pth"):
        build_backbone("vgg16", str(tmp_path / "missing.pth"))


def test_timm_local_weights_file(tmp_path):
    import timm

    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_timm.pth"
    torch.save(full.state_dict(), path)
    backbone, _, _ = build_backbone("timm:resnet18", str(path))
    torch.testing.assert_close(backbone.body.layer3[1].conv2.weight, full.layer3[1].conv2.weight)
    with pytest.raises(NetVLADError, match=r"resnet18_timm\.pth.*not a timm resnet50 state dict"):
        build_backbone("timm:resnet50", str(path))


def load_rgb(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def test_efficientnet_lite0_packaged_weights_classify_imagenet_images():
    from skimage import data

    classifier = efficientnet_lite0_classifier("imagenet").eval()
    with torch.no_grad():
        logits = classifier(torch.cat([load_rgb(data.chelsea()), load_rgb(data.coffee())]))
    assert logits.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso

    backbone, channels, stride = build_backbone("efficientnet_lite0", "imagenet")
    assert (channels, stride) == (112, 16)
    full_state = classifier.state_dict()
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    assert backbone.eval()(torch.zeros(1, 3, 240, 320)).shape == (1, 112, 15, 20)
    assert trainable_params(backbone) == {n for n, _ in backbone.named_parameters() if n.startswith("body.blocks.4.")}


def test_efficientnet_lite0_positional_loader_checks_every_tensor(tmp_path):
    state = torch.load(efficientnet_lite0_package_file(), weights_only=True)
    assert len(state) == EFFICIENTNET_LITE0_TENSORS
    keys = list(state)

    wrong_shape = dict(state)
    wrong_shape[keys[150]] = torch.zeros(3)
    path = tmp_path / "wrong_shape.pth"
    torch.save(wrong_shape, path)
    with pytest.raises(NetVLADError, match=rf"wrong_shape\.pth.*{keys[150]}"):
        build_backbone("efficientnet_lite0", str(path))

    short = {k: v for k, v in state.items() if k != keys[-1]}
    path = tmp_path / "short.pth"
    torch.save(short, path)
    with pytest.raises(NetVLADError, match=r"short\.pth: has 295 tensors"):
        build_backbone("efficientnet_lite0", str(path))


# ----------------------------------------------------------------------------------------- config and model


def test_model_config_round_trip_and_validation():
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", pooling="gem", trainable_blocks=2, whiten_dim=32)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.mean, tuple)
    assert ModelConfig.from_dict({}) == ModelConfig()
    ModelConfig().validate()
    ModelConfig(backbone="timm:convnext_tiny:2").validate()

    bad = {
        "num_clusters": (1, "num_clusters.*got 1"),
        "pooling": ("sum", "pooling 'sum'.*netvlad, netvlad-linear, max, avg, gem"),
        "projection_dim": (0, "projection_dim.*got 0"),
        "cls_dim": (-1, "cls_dim.*got -1"),
        "backbone": ("vgg19", "backbone 'vgg19'"),
        "input_height": (0, "input_height.*got 0"),
        "std": ((0.2, 0.0, 0.2), "std"),
        "mean": ((0.5, 0.5), "mean"),
        "whiten_dim": (0, "whiten_dim.*got 0"),
        "trainable_blocks": (-2, "trainable_blocks.*got -2"),
        "gem_p": (0.0, "gem_p"),
        "vladv2": ("yes", "vladv2"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(NetVLADError, match=message):
            replace(ModelConfig(), **{key: value}).validate()
    with pytest.raises(NetVLADError, match="unknown model config key.*'clusters'"):
        ModelConfig.from_dict({"clusters": 4})


def test_demo_model_shapes():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", input_height=240, input_width=320))
    assert model.feature_dim == 112 and model.out_dim == 64 * 112 and isinstance(model.pool, NetVLAD)
    local = model.eval().local_descriptors(torch.zeros(1, 3, 240, 320))
    assert local.shape == (1, 112, 15, 20)


def small_model(tmp_path: Path) -> tuple[PlaceModel, ModelConfig]:
    torch.manual_seed(3)
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=64, input_width=64)
    model = build_model(cfg).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        local = model.local_descriptors(images)
    desc = local.permute(0, 2, 3, 1).reshape(-1, model.feature_dim).numpy()
    model.pool.init_params(desc[:4], desc)
    return model, cfg


def test_place_model_forward_and_local_descriptors(tmp_path):
    model, _ = small_model(tmp_path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(images)
        local = model.local_descriptors(images)
        torch.testing.assert_close(local, F.normalize(feats, dim=1))
        torch.testing.assert_close(local.norm(dim=1), torch.ones(2, 4, 4))
        torch.testing.assert_close(model(images), model.pool(feats))
        assert model.out_dim == 4 * 256
        weight, bias = torch.randn(16, 4 * 256), torch.randn(16)
        model.set_whitening(weight, bias)
        out = model(images)
        assert model.out_dim == 16 and out.shape == (2, 16)
        torch.testing.assert_close(out, F.normalize(model.pool(feats) @ weight.T + bias, dim=1))
    with pytest.raises(NetVLADError, match=r"\(d, 1024\)"):
        model.set_whitening(torch.zeros(16, 10), torch.zeros(16))


def test_save_load_round_trip(tmp_path):
    model, cfg = small_model(tmp_path)
    model.set_whitening(torch.randn(8, model.out_dim), torch.randn(8))
    path = save_model(tmp_path / "model.pt", model, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # written in one go, no temp left

    payload = torch.load(path, weights_only=True)
    assert json.loads(payload["config"])["whiten_dim"] == 8

    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == replace(cfg, whiten_dim=8)
    assert loaded.pool.alpha == model.pool.alpha
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        assert torch.equal(loaded.local_descriptors(images), model.local_descriptors(images))
    assert not loaded.training


def test_the_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    """DVC hashes model files: equal weights must give an equal file, whatever temporary name it was written under."""
    model, cfg = small_model(tmp_path)
    first = save_model(tmp_path / "a" / "model.pt", model, cfg).read_bytes()
    again = save_model(tmp_path / "b" / "other_name.pt", model, cfg).read_bytes()
    assert first == again
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert save_model(tmp_path / "c" / "model.pt", model, cfg).read_bytes() != first


def test_load_model_rejects_foreign_files(tmp_path):
    model, cfg = small_model(tmp_path)
    path = save_model(tmp_path / "model.pt", model, cfg)
    payload = torch.load(path, weights_only=True)
    payload["config"] = json.dumps({**json.loads(payload["config"]), "num_clusters": 5})
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(NetVLADError, match=r"mismatch\.pt: state dict does not fit.*"
                                           r"'pool\.centroids' has shape \(4, 256\), expected \(5, 256\)"):
        load_model(tmp_path / "mismatch.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(NetVLADError, match=r"other\.pt: not a model file"):
        load_model(tmp_path / "other.pt")
    payload["config"] = json.dumps({**json.loads(payload["config"]), "pooling": "sum"})
    torch.save(payload, tmp_path / "badcfg.pt")
    with pytest.raises(NetVLADError, match=r"badcfg\.pt: unknown pooling 'sum'"):
        load_model(tmp_path / "badcfg.pt")


# ------------------------------------------------------------------------------------------ seeded random init


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backbone", ["resnet18_layer3", "efficientnet_lite0"])
def test_random_weights_are_drawn_from_the_config_seed(backbone):
    cfg = ModelConfig(backbone=backbone, weights="none", num_clusters=4, init_seed=11)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = _state(build_model(cfg))
    assert torch.equal(torch.get_rng_state(), before), "the global RNG state is left as it was"
    torch.manual_seed(456)  # another global state: no influence on the model
    again = _state(build_model(cfg))
    assert _bitwise_equal(first, again)
    other = _state(build_model(replace(cfg, init_seed=12)))
    assert not torch.equal(other["backbone.body.conv_stem.weight" if backbone == "efficientnet_lite0"
                                 else "backbone.body.conv1.weight"],
                           first["backbone.body.conv_stem.weight" if backbone == "efficientnet_lite0"
                                 else "backbone.body.conv1.weight"])
    assert not torch.equal(other["pool.centroids"], first["pool.centroids"])
    alone, _, _ = build_backbone(backbone, "none", init_seed=11)
    assert _bitwise_equal({f"backbone.{k}": v for k, v in alone.state_dict().items()},
                          {k: v for k, v in first.items() if k.startswith("backbone.")})


def test_init_seed_is_saved_and_old_model_files_load(tmp_path):
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, init_seed=5)
    model = build_model(cfg)
    path = save_model(tmp_path / "model.pt", model, cfg)
    payload = torch.load(path, weights_only=True)
    assert json.loads(payload["config"])["init_seed"] == 5
    assert load_model(path)[1].init_seed == 5
    old = {k: v for k, v in json.loads(payload["config"]).items() if k != "init_seed"}  # a file from before the key
    torch.save({**payload, "config": json.dumps(old)}, tmp_path / "old.pt")
    loaded, loaded_cfg = load_model(tmp_path / "old.pt")
    assert loaded_cfg.init_seed == 0 and _bitwise_equal(_state(loaded), _state(model))
    with pytest.raises(NetVLADError, match="init_seed.*got -1"):
        replace(cfg, init_seed=-1).validate()


def test_sample_stage_seed_gives_the_same_random_backbone_and_records_it(tmp_path):
    import h5py
    from typer.testing import CliRunner

    from netvlad_core.clustering import read_descriptors
    from stages.cli import app
    from tests.conftest import make_split

    split_dir = make_split(tmp_path, num_db=6, num_q=1)

    def sample(name: str, seed: int) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"{name}.h5"
        result = CliRunner().invoke(app, ["sample", "--split-dir", str(split_dir), "--out", str(out), "--backbone",
                                          "resnet18_layer3", "--weights", "none", "--input-height", "48",
                                          "--input-width", "64", "--num-descriptors", "40", "--per-image", "10",
                                          "--seed", str(seed), "--workers", "0", "--device", "cpu",
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
        with h5py.File(out, "r") as f:
            assert "image_indices" in f
        return read_descriptors(out)

    first, config = sample("a", 3)
    again, _ = sample("b", 3)
    other, other_config = sample("c", 4)
    assert config.init_seed == 3 and other_config.init_seed == 4
    assert np.array_equal(first, again), "same params, same random backbone, same descriptors"
    assert not np.array_equal(first, other)
    # kmeans rebuilds the model from the recorded config (with its own pooling): its backbone must be the one
    # that made the sample, i.e. every sampled row is one of the rebuilt model's local descriptors of its image
    from netvlad_core.datasets.images import load_image
    from netvlad_core.datasets.manifest import load_split

    rebuilt_cfg = replace(config, num_clusters=4)
    rebuilt = build_model(rebuilt_cfg).eval()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        images = f["image_indices"][()]
    files = load_split(split_dir).db_files()
    with torch.no_grad():
        for row, i in zip(first, images):
            x = load_image(files[i], 48, 64, rebuilt_cfg.mean, rebuilt_cfg.std)[None]
            local = rebuilt.local_descriptors(x)[0].flatten(1).T.numpy()
            assert np.abs(local - row).max(axis=1).min() < 1e-5
