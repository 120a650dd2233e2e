"""Trunks built from a MatConvNet SimpleNN layer list (the authors' released NetVLAD models, the ImageNet VGG16,
AlexNet/caffe and Places trunks), layer by layer in the file's order.

The list lives in the model config (``ModelConfig.layers``, written by ``netvlad import``), one JSON object per
layer, so a model file rebuilds without the .mat file:

- ``{"type": "conv", "index", "name", "in", "out", "kernel": [h, w], "stride": [y, x], "pad": [top, bottom, left,
  right], "dilate": [y, x], "groups"}`` — MatConvNet's ``vl_nnconv``: a correlation (no flipped filters), zero
  padding that may be asymmetric; ``in`` is the input channels per group;
- ``{"type": "relu", "leak"}``;
- ``{"type": "pool", "method": "max" | "avg", "pool": [h, w], "stride", "pad"}`` — ``vl_nnpool``: padded cells
  never win a max (−inf padding); average pooling is supported without padding only;
- ``{"type": "lrn", "param": [N, kappa, alpha, beta]}`` — ``vl_nnnormalize``:
  ``y_c = x_c / (kappa + alpha · Σ_{t ∈ G(c)} x_t²)^beta`` with the window ``G(c) = [c − ⌊(N−1)/2⌋,
  c + ⌈(N−1)/2⌉]`` (alpha is *not* divided by N, unlike ``torch.nn.LocalResponseNorm``).

Parameters are named ``features.<index>.weight`` / ``.bias`` after the layer's 0-based position in the file, so
the authors' VGG16 files line up with torchvision's ``vgg16().features`` indices. One trainable unit per conv
layer; by default the convs after the trunk's last pooling layer learn (VGG16: conv5_1–conv5_3, as in the paper).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetVLADError

LAYER_TYPES = ("conv", "relu", "pool", "lrn")


class MatConvNetConv(nn.Conv2d):
    """``vl_nnconv``: a Conv2d whose zero padding ``[top, bottom, left, right]`` may be asymmetric."""

    def __init__(self, spec: dict):
        top, bottom, left, right = spec["pad"]
        symmetric = top == bottom and left == right
        super().__init__(spec["in"] * spec["groups"], spec["out"], tuple(spec["kernel"]), stride=tuple(spec["stride"]),
                         padding=(top, left) if symmetric else 0, dilation=tuple(spec["dilate"]),
                         groups=spec["groups"], bias=True)
        self.asymmetric_pad = None if symmetric else (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad is not None:
            x = F.pad(x, self.asymmetric_pad)
        return super().forward(x)


class MatConvNetPool(nn.Module):
    """``vl_nnpool``: max pooling (padding never wins) or average pooling (no padding)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.method = spec["method"]
        self.kernel = tuple(spec["pool"])
        self.stride = tuple(spec["stride"])
        top, bottom, left, right = spec["pad"]
        self.pad = (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "max":
            if any(self.pad):
                x = F.pad(x, self.pad, value=float("-inf"))
            return F.max_pool2d(x, self.kernel, self.stride)
        return F.avg_pool2d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"method={self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}"


class MatConvNetLRN(nn.Module):
    """``vl_nnnormalize`` across channels (see the module docstring for the formula)."""

    def __init__(self, spec: dict):
        super().__init__()
        n, kappa, alpha, beta = (float(v) for v in spec["param"])
        self.size, self.kappa, self.alpha, self.beta = int(n), kappa, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = (self.size - 1) // 2, self.size - 1 - (self.size - 1) // 2
        squares = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, before, after))  # (N, 1, C + N − 1, H, W)
        window_sum = F.avg_pool3d(squares, (self.size, 1, 1), stride=1).squeeze(1) * self.size
        return x / (self.kappa + self.alpha * window_sum).pow(self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, kappa={self.kappa:g}, alpha={self.alpha:g}, beta={self.beta:g}"


def _pair(value: Any, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise NetVLADError(f"{what} must be 1 or 2 positive integers, got {value!r}")
    return values


def _pad4(value: Any, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 4
    values = values * 4 if len(values) == 1 else values
    if len(values) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise NetVLADError(f"{what} must be 1 or 4 integers >= 0 (top, bottom, left, right), got {value!r}")
    return values


def check_layers(layers: Any) -> list[dict]:
    """Validate a layer list (see the module docstring): types, shapes, channels chaining from 3 (RGB) input;
    returns it with every field in its full form. Raises ``NetVLADError`` naming the first bad layer."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise NetVLADError(f"layers must be a non-empty list of layer objects, got {layers!r:.80}")
    channels, out, seen = 3, [], set()
    for position, spec in enumerate(layers):
        if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
            raise NetVLADError(f"layer {position}: expected an object with type one of {', '.join(LAYER_TYPES)}, "
                               f"got {spec!r:.80}")
        index = spec.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or index in seen:
            raise NetVLADError(f"layer {position}: index must be a distinct integer >= 0, got {index!r}")
        seen.add(index)
        where = f"layer {index} ({spec.get('name', spec['type'])})"
        full = {"type": spec["type"], "index": index, "name": str(spec.get("name", f"{spec['type']}{index}"))}
        if spec["type"] == "conv":
            for key in ("in", "out", "groups"):
                value = spec.get(key, 1 if key == "groups" else None)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise NetVLADError(f"{where}: {key} must be an integer >= 1, got {value!r}")
                full[key] = value
            if full["in"] * full["groups"] != channels:
                raise NetVLADError(f"{where}: filters take {full['in']}×{full['groups']} input channels, the layer "
                                   f"before gives {channels}")
            if full["out"] % full["groups"]:
                raise NetVLADError(f"{where}: {full['out']} filters do not split into {full['groups']} groups")
            full["kernel"] = _pair(spec.get("kernel"), f"{where}: kernel")
            full["stride"] = _pair(spec.get("stride", 1), f"{where}: stride")
            full["pad"] = _pad4(spec.get("pad", 0), f"{where}: pad")
            full["dilate"] = _pair(spec.get("dilate", 1), f"{where}: dilate")
            channels = full["out"]
        elif spec["type"] == "relu":
            leak = spec.get("leak", 0.0)
            if not isinstance(leak, (int, float)) or isinstance(leak, bool) or not math.isfinite(leak):
                raise NetVLADError(f"{where}: leak must be a finite number, got {leak!r}")
            full["leak"] = float(leak)
        elif spec["type"] == "pool":
            if spec.get("method", "max") not in ("max", "avg"):
                raise NetVLADError(f"{where}: pooling method must be max or avg, got {spec.get('method')!r}")
            full["method"] = spec.get("method", "max")
            full["pool"] = _pair(spec.get("pool"), f"{where}: pool")
            full["stride"] = _pair(spec.get("stride", 1), f"{where}: stride")
            full["pad"] = _pad4(spec.get("pad", 0), f"{where}: pad")
            if full["method"] == "avg" and any(full["pad"]):
                raise NetVLADError(f"{where}: average pooling with padding is not supported")
        else:
            param = spec.get("param")
            if not isinstance(param, (list, tuple)) or len(param) != 4 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in param) \
                    or param[0] < 1 or param[1] < 0 or param[2] < 0:
                raise NetVLADError(f"{where}: param must be 4 finite numbers [N >= 1, kappa >= 0, alpha >= 0, beta], "
                                   f"got {param!r}")
            full["param"] = [float(v) for v in param]
        out.append(full)
    if not any(spec["type"] == "conv" for spec in out):
        raise NetVLADError("layers hold no conv layer")
    return out


def check_geometry(layers: Sequence[dict], height: int, width: int) -> list[tuple[int, int]]:
    """The spatial size ``(h, w)`` after each layer of a checked layer list for a ``height`` × ``width`` input, as
    ``vl_nnconv`` / ``vl_nnpool`` compute it (``floor((H + top + bottom − extent) / stride) + 1``). A
    :class:`NetVLADError` names the first layer whose output would be empty (the input is too small for it), more
    than twice the input's height or width (a padding or window size no real network has, which would ask for
    terabytes), or whose max-pooling padding is not smaller than its window (a window of padding only gives −inf)."""
    h, w = height, width
    sizes = []
    for spec in layers:
        if spec["type"] in ("conv", "pool"):
            where = f"layer {spec['index']} ({spec['name']})"
            if spec["type"] == "conv":
                (kh, kw), (dy, dx) = spec["kernel"], spec["dilate"]
                kh, kw = (kh - 1) * dy + 1, (kw - 1) * dx + 1
            else:
                kh, kw = spec["pool"]
            top, bottom, left, right = spec["pad"]
            padding_only = max(top, bottom) >= kh or max(left, right) >= kw
            if spec["type"] == "pool" and spec["method"] == "max" and padding_only:
                raise NetVLADError(f"{where}: padding {spec['pad']} is not smaller than the {kh}×{kw} pooling window "
                                   f"(a window of padding only has no maximum)")
            sy, sx = spec["stride"]
            out_h, out_w = (h + top + bottom - kh) // sy + 1, (w + left + right - kw) // sx + 1
            if out_h < 1 or out_w < 1:
                raise NetVLADError(f"{where}: a {width}×{height} input is {w}×{h} here, smaller than the layer's "
                                   f"{kw}×{kh} window with padding {spec['pad']}: no output (a larger --input-width/"
                                   f"--input-height?)")
            if out_h > 2 * height or out_w > 2 * width:
                raise NetVLADError(f"{where}: a {width}×{height} input gives {out_w}×{out_h} here, more than twice its "
                                   f"size (window {kw}×{kh}, stride {spec['stride']}, padding {spec['pad']}): absurd "
                                   f"geometry")
            h, w = out_h, out_w
        sizes.append((h, w))
    return sizes


def layers_channels_and_stride(layers: Sequence[dict]) -> tuple[int, int]:
    """(output channels, total stride) of a checked layer list (the larger of the two axes' strides)."""
    channels, sy, sx = 3, 1, 1
    for spec in layers:
        if spec["type"] == "conv":
            channels = spec["out"]
        if spec["type"] in ("conv", "pool"):
            sy, sx = sy * spec["stride"][0], sx * spec["stride"][1]
    return channels, max(sy, sx)


def default_trainable_convs(layers: Sequence[dict]) -> int:
    """The default freeze boundary of a layer list: the conv layers after its last pooling layer (VGG16 cropped at
    conv5_3: conv5_1..conv5_3, the paper's choice); all of them when there is no pooling layer."""
    last_pool = max((i for i, spec in enumerate(layers) if spec["type"] == "pool"), default=-1)
    return sum(1 for spec in layers[last_pool + 1:] if spec["type"] == "conv")


def build_layers(layers: Sequence[dict]) -> tuple[nn.Module, list[list[str]], int, int]:
    """``(body, units, channels, stride)`` of a layer list: ``body.features.<index>`` in the file's order, one unit
    per conv layer. Parameters start random (torch's default initialisation), to be loaded."""
    layers = check_layers(list(layers))
    modules: "OrderedDict[str, nn.Module]" = OrderedDict()
    for spec in layers:
        if spec["type"] == "conv":
            module: nn.Module = MatConvNetConv(spec)
        elif spec["type"] == "relu":
            module = nn.ReLU() if spec["leak"] == 0 else nn.LeakyReLU(spec["leak"])
        elif spec["type"] == "pool":
            module = MatConvNetPool(spec)
        else:
            module = MatConvNetLRN(spec)
        modules[str(spec["index"])] = module
    body = nn.Sequential(OrderedDict(features=nn.Sequential(modules)))
    units = [[f"features.{spec['index']}"] for spec in layers if spec["type"] == "conv"]
    channels, stride = layers_channels_and_stride(layers)
    return body, units, channels, stride
