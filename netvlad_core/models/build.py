"""Model configuration → ``PlaceModel`` (backbone + pooling + optional whitening); one-file save and load."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import option
from ..errors import NetVLADError
from ..io import load_state, save_state
from .backbones import MATCONVNET, build_backbone, first_mismatch, is_transformer, parse_backbone_name, seeded_init
from .netvlad import NetVLAD
from .pooling import POOLINGS, build_pooling
from .weights import MODEL_FILE_FORMAT, is_model_file

#: The ModelConfig fields of the cropped backbone and its input (``sample`` chooses them; params.yaml ``model.trunk``)
TRUNK_FIELDS = ("backbone", "weights", "input_height", "input_width")
#: What a trunk taken from a model file brings along (:func:`resolve_trunk`): its layers, input normalisation, origin
FILE_TRUNK_FIELDS = ("layers", "mean", "std", "source")
#: The ModelConfig fields of the pooling layer (``kmeans`` chooses them; params.yaml ``model.head``)
HEAD_FIELDS = ("pooling", "num_clusters", "vladv2", "projection_dim", "cls_dim")

MODEL_FILE_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (the weights live in the state dict next to it). The defaults are the
    paper's: VGG16 cropped at conv5_3, Pittsburgh's native 640×480, NetVLAD with K = 64.

    ``trainable_blocks=None`` means the backbone's default (vgg16: conv5_1..conv5_3; see ``backbones``).
    ``mean``/``std`` are the input normalisation the data loader applies; ``whiten_dim`` is the output size of the
    PCA-whitening layer (``None``: no whitening, the output is the pooling's). ``init_seed`` seeds the random
    initialisation when ``weights`` is ``none`` (the backbone and the pooling layer), so the same config gives the
    same model; model files without it load with the default 0.

    ``mean``/``std`` apply to pixels scaled to 0–1: ``(x / 255 − mean) / std``. The MatConvNet models' input, RGB
    0–255 minus the average colour ``a`` with no std, is ``mean = a / 255``, ``std = 1 / 255`` (what ``netvlad
    import`` writes). ``layers`` is the layer list of the ``matconvnet`` backbone (see ``models.matconvnet``) and
    ``source`` where an imported model came from (``{"format", "name", "sha256"}``); both are written by
    ``netvlad import`` and carried along by every stage that starts from such a model.
    """

    backbone: str = option("vgg16", "Backbone: vgg16, alexnet, resnet18/50[_layer3|_layer4], "
                           "efficientnet_lite0, timm:<name>, or a vision transformer: dinov2_vit{s,b,l,g}14[_reg], "
                           "dinov3_vit{s,b,l}16 (any input size: sides that are not multiples of the patch size "
                           "are resized to the nearest multiples).")
    weights: str = option("imagenet", "Backbone weights: imagenet (the published pretrained weights; DINOv2/v3: "
                          "their self-supervised LVD weights, timm tags .lvd142m/.lvd1689m), none (random, drawn "
                          "from init_seed), or a local state-dict file (.pth/.safetensors; the transformers also "
                          "take the official torch.hub checkpoints).")
    trainable_blocks: int | None = option(None, "Freeze boundary: trainable backbone units counted from the end "
                                          "(-1 all, 0 none); unset: the backbone's default (vgg16: conv5_1-conv5_3 "
                                          "as in the paper, the transformers their last 4 blocks, the others their "
                                          "last stage).")
    pooling: str = option("netvlad", "Pooling: netvlad, netvlad-linear (NetVLAD + a per-cluster linear projection "
                          "and the projected CLS token; transformers only), max, avg or gem (only the netvlad "
                          "poolings use the k-means centroids).")
    num_clusters: int = option(64, "K, the number of NetVLAD clusters (k-means centroids).")
    vladv2: bool = option(False, "Use the vladv2 initialisation (conv bias from squared distances).")
    projection_dim: int = option(128, "netvlad-linear: each cluster's residual is projected to this size (one Linear "
                                 "D -> d shared by the clusters).")
    cls_dim: int = option(256, "netvlad-linear: the CLS token is projected to this size.")
    gem_p: float = option(3.0, "GeM pooling exponent p.", cli=False)
    gem_learnable: bool = option(True, "Learn GeM's p.", cli=False)
    input_height: int = option(480, "Images are resized to this height (pixels).")
    input_width: int = option(640, "Images are resized to this width (pixels).")
    mean: tuple[float, float, float] = option((0.485, 0.456, 0.406), "Input normalisation mean (RGB, 0-1 scale).",
                                              cli=False)
    std: tuple[float, float, float] = option((0.229, 0.224, 0.225), "Input normalisation std (RGB).", cli=False)
    whiten_dim: int | None = option(None, "Output size of the PCA-whitening layer (set by `pca`).", cli=False)
    init_seed: int = option(0, "Seed of the random initialisation with weights none (set from `sample --seed`).",
                            cli=False)
    layers: list | None = option(None, "The matconvnet backbone's layer list (written by `netvlad import`).",
                                 cli=False)
    source: dict | None = option(None, "Where an imported model came from: format, name, sha256 (written by "
                                 "`netvlad import`).", cli=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error. Validates."""
        if not isinstance(data, Mapping):
            raise NetVLADError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NetVLADError(f"unknown model config key(s) {', '.join(map(repr, unknown))}; valid: "
                               f"{', '.join(sorted(known))}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values and isinstance(values[key], (list, tuple)):
                values[key] = tuple(values[key])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``NetVLADError`` naming the first bad value."""
        parse_backbone_name(self.backbone)
        if not isinstance(self.weights, str) or not self.weights:
            raise NetVLADError(f"weights must be 'imagenet', 'none' or a file path, got {self.weights!r}")
        if self.trainable_blocks is not None and (not _is_int(self.trainable_blocks) or self.trainable_blocks < -1):
            raise NetVLADError(f"trainable_blocks must be None, -1 (all) or an integer >= 0, got "
                               f"{self.trainable_blocks!r}")
        if not isinstance(self.pooling, str) or self.pooling.lower() not in POOLINGS:
            raise NetVLADError(f"unknown pooling {self.pooling!r}; valid: {', '.join(POOLINGS)}")
        if not _is_int(self.num_clusters) or self.num_clusters < 2:
            raise NetVLADError(f"num_clusters must be an integer >= 2, got {self.num_clusters!r}")
        for key in ("projection_dim", "cls_dim"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise NetVLADError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.vladv2, bool):
            raise NetVLADError(f"vladv2 must be true or false, got {self.vladv2!r}")
        if not _is_number(self.gem_p) or not self.gem_p > 0:
            raise NetVLADError(f"gem_p must be a finite number > 0, got {self.gem_p!r}")
        if not isinstance(self.gem_learnable, bool):
            raise NetVLADError(f"gem_learnable must be true or false, got {self.gem_learnable!r}")
        for key in ("input_height", "input_width"):
            value = getattr(self, key)
            if not _is_int(value) or value < 16:
                raise NetVLADError(f"{key} must be an integer >= 16 (pixels), got {value!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(_is_number(v) for v in value):
                raise NetVLADError(f"{key} must be 3 finite numbers (R, G, B), got {value!r}")
        if not all(s > 0 for s in self.std):
            raise NetVLADError(f"std values must be > 0, got {self.std!r}")
        if self.whiten_dim is not None and (not _is_int(self.whiten_dim) or self.whiten_dim < 1):
            raise NetVLADError(f"whiten_dim must be None or an integer >= 1, got {self.whiten_dim!r}")
        if not _is_int(self.init_seed) or not 0 <= self.init_seed < 2**63:
            raise NetVLADError(f"init_seed must be an integer between 0 and 2**63 - 1, got {self.init_seed!r}")
        if self.backbone == MATCONVNET:
            if self.layers is None and self.weights in ("imagenet", "none"):
                raise NetVLADError("backbone matconvnet takes its layers from a model file written by `netvlad "
                                   "import`: give that file as weights")
            if self.layers is not None:
                from .matconvnet import check_geometry, check_layers

                # the spatial size through the layers for this input size, before any memory is asked for
                check_geometry(check_layers(self.layers), self.input_height, self.input_width)
        elif self.layers is not None:
            raise NetVLADError(f"layers are for backbone matconvnet only, not {self.backbone!r}")
        if self.source is not None and (not isinstance(self.source, Mapping)
                                        or not all(isinstance(k, str) for k in self.source)):
            raise NetVLADError(f"source must be a mapping (format, name, sha256), got {self.source!r:.80}")


def _derived_seed(seed: int, what: str) -> int:
    """A seed for one part of the model, drawn from ``(seed, what)`` (independent of the backbone's stream)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), *what.encode()]).generate_state(1, np.uint64)[0] >> 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PlaceModel(nn.Module):
    """Images (N, 3, H, W), normalised with the config's mean/std → (N, out_dim) L2-normalised global descriptors.

    ``backbone`` gives (N, feature_dim, h, w) local features, ``pool`` aggregates them, and the optional
    ``whitening`` (a Linear layer set by :meth:`set_whitening`) projects the pooled vector, followed by
    L2-normalisation.
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, feature_dim: int, stride: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.register_module("whitening", None)
        self.feature_dim = int(feature_dim)
        self.stride = stride

    @property
    def out_dim(self) -> int:
        """Length of the global descriptor (the whitening's output size when there is one)."""
        return self.whitening.out_features if self.whitening is not None else int(self.pool.out_dim)

    def set_whitening(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Append ``y = normalize(weight·x + bias)`` after pooling: ``weight`` (d, D), ``bias`` (d,), D = pool.out_dim.

        For PCA whitening: weight = diag(1/sqrt(λ + ε))·Uᵀ, bias = −weight·μ.
        """
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        pooled = int(self.pool.out_dim)
        if weight.ndim != 2 or weight.shape[1] != pooled:
            raise NetVLADError(f"whitening weight must have shape (d, {pooled}), got {tuple(weight.shape)}")
        if bias.shape != (weight.shape[0],):
            raise NetVLADError(f"whitening bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if weight.shape[0] < 1:
            raise NetVLADError("whitening must keep at least 1 dimension")
        reference = next(self.pool.parameters(), None)
        if reference is None:
            reference = next(self.backbone.parameters())
        layer = nn.Linear(pooled, weight.shape[0], device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        self.whitening = layer

    def local_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim, h, w) backbone features, L2-normalised along the channel axis as NetVLAD sees them."""
        return F.normalize(self.backbone(images), p=2, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = pool_features(self.pool, self.backbone, images)
        if self.whitening is None:
            return pooled
        return F.normalize(self.whitening(pooled), p=2, dim=1)

    def train_only_projections(self) -> list[nn.Parameter]:
        """SuperPlace's second fine-tuning stage (FT2): freeze everything — every backbone block, the NetVLAD layer,
        the whitening — but the NetVLAD-Linear head's projections, and return those. A ``NetVLADError`` for any other
        head."""
        projections = getattr(self.pool, "projection_parameters", None)
        if projections is None:
            raise NetVLADError(f"only-projections trains the projections of a netvlad-linear head; this model's "
                               f"pooling is {type(self.pool).__name__}")
        self.backbone.set_trainable_blocks(0)
        for param in self.parameters():
            param.requires_grad_(False)
        params = projections()
        for param in params:
            param.requires_grad_(True)
        return params

    def split_trunk(self) -> tuple[nn.Sequential, "TrainablePart"] | None:
        """``(frozen trunk, trainable part)`` at the backbone's freeze boundary, sharing this model's modules (an
        update of the trainable part is an update of the model): ``part(trunk(images)) == self(images)``. The
        trunk is the backbone units before the first trainable one; the part is the remaining units, the pooling
        and the whitening. ``None`` when the backbone has no frozen unit or cannot be cut there
        (:meth:`~netvlad_core.models.backbones.Backbone.split_at_freeze_boundary`)."""
        cut = getattr(self.backbone, "split_at_freeze_boundary", lambda: None)()
        if cut is None:
            return None
        trunk, rest = cut
        return trunk, TrainablePart(rest, self.pool, self.whitening, out_dim=self.out_dim)


def pool_features(pool: nn.Module, features: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(features(x))``; for a head that uses the CLS token (``pool.uses_cls``: NetVLAD-Linear)
    ``pool(dense, cls)`` from ``features.forward_with_cls(x)``."""
    if getattr(pool, "uses_cls", False):
        return pool(*features.forward_with_cls(x))
    return pool(features(x))


class TrainablePart(nn.Module):
    """The layers of a :class:`PlaceModel` after its freeze boundary: frozen-trunk activations (N, C, h, w) →
    (N, out_dim) descriptors, the same as the whole model's forward of the images they came from."""

    def __init__(self, rest: nn.Module, pool: nn.Module, whitening: nn.Module | None, *, out_dim: int):
        super().__init__()
        self.rest = rest
        self.pool = pool
        self.register_module("whitening", whitening)
        self.out_dim = int(out_dim)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        pooled = pool_features(self.pool, self.rest, activations)
        if self.whitening is None:
            return pooled
        return F.normalize(self.whitening(pooled), p=2, dim=1)


def build_model(cfg: ModelConfig, *, load_weights: bool = True, allow_download: bool = True) -> PlaceModel:
    """Build the model ``cfg`` describes; backbone weights per ``cfg.weights`` unless ``load_weights`` is False.

    The NetVLAD layer starts random (initialise it with ``model.pool.init_params(centroids, descriptors)``). When
    the backbone is randomly initialised (``weights="none"``, or ``load_weights=False``), backbone and pooling are
    drawn from ``cfg.init_seed`` (two builds of one config are bitwise equal) and the global RNG state is left
    untouched. With ``cfg.whiten_dim`` set, the whitening layer is created with zero weights, to be filled by
    ``load_model``'s
    state dict or :meth:`PlaceModel.set_whitening`.
    """
    cfg.validate()
    if cfg.pooling.lower() == "netvlad-linear" and not is_transformer(cfg.backbone):
        raise NetVLADError(f"pooling netvlad-linear needs a backbone with a CLS token (dinov2_*, dinov3_*), not "
                           f"{cfg.backbone!r}")
    weights = cfg.weights if load_weights else "none"
    backbone, channels, stride = build_backbone(cfg.backbone, weights, cfg.trainable_blocks,
                                                allow_download=allow_download, init_seed=cfg.init_seed,
                                                layers=cfg.layers, input_size=(cfg.input_height, cfg.input_width))
    # With random backbone weights the pooling layer's start is seeded too (a seed of its own, derived from
    # init_seed), so the whole model is a function of the config; otherwise it draws from the global RNG as before.
    with seeded_init(_derived_seed(cfg.init_seed, "pool")) if weights == "none" else contextlib.nullcontext():
        pool = build_pooling(cfg.pooling, channels, cfg.num_clusters, cfg.vladv2, gem_p=cfg.gem_p,
                             gem_learnable=cfg.gem_learnable, projection_dim=cfg.projection_dim,
                             cls_dim=cfg.cls_dim)
    model = PlaceModel(backbone, pool, channels, stride)
    if cfg.whiten_dim is not None:
        if cfg.whiten_dim > pool.out_dim:
            raise NetVLADError(f"whiten_dim {cfg.whiten_dim} exceeds the {pool.out_dim}-D pooled descriptor")
        model.set_whitening(torch.zeros(cfg.whiten_dim, pool.out_dim), torch.zeros(cfg.whiten_dim))
    return model


def resolve_trunk(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with its trunk completed from its weights file when that is a model file of this project (one written
    by ``netvlad import`` of a MatConvNet ImageNet trunk, say): the file's layer list, input normalisation and
    origin (:data:`FILE_TRUNK_FIELDS`) come with its weights, so ``sample`` can start from it. The file's backbone
    must be ``cfg.backbone``. Any other ``cfg`` is returned as it is."""
    if cfg.weights in ("imagenet", "none") or not Path(cfg.weights).expanduser().is_file():
        return cfg
    payload = load_state(Path(cfg.weights).expanduser())
    if not is_model_file(payload):
        return cfg
    try:
        file_cfg = ModelConfig.from_dict(json.loads(payload["config"]))
    except (json.JSONDecodeError, TypeError, NetVLADError) as e:
        raise NetVLADError(f"{cfg.weights}: model config is not readable ({e})") from None
    if file_cfg.backbone != cfg.backbone:
        raise NetVLADError(f"{cfg.weights}: a model file with backbone {file_cfg.backbone!r}, but the backbone is "
                           f"{cfg.backbone!r}: set the backbone to {file_cfg.backbone!r} to start from it")
    resolved = replace(cfg, **{k: getattr(file_cfg, k) for k in FILE_TRUNK_FIELDS})
    resolved.validate()
    return resolved


def save_model(path: str | os.PathLike, model: PlaceModel, cfg: ModelConfig) -> Path:
    """Write ``model`` and ``cfg`` to ONE file, atomically: ``{"config": JSON string, "state_dict": tensors}``.

    ``cfg.whiten_dim`` is set from the model's whitening layer. The file loads with ``weights_only=True``.
    """
    whiten_dim = model.whitening.out_features if model.whitening is not None else None
    cfg = replace(cfg, whiten_dim=whiten_dim)
    cfg.validate()
    backbone_name = getattr(model.backbone, "name", cfg.backbone)
    if backbone_name != cfg.backbone:
        raise NetVLADError(f"model has backbone {backbone_name!r} but its config says {cfg.backbone!r}")
    payload: dict[str, Any] = {
        "format": MODEL_FILE_FORMAT,
        "version": MODEL_FILE_VERSION,
        "config": json.dumps(cfg.to_dict()),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if isinstance(model.pool, NetVLAD):
        payload["netvlad_alpha"] = float(model.pool.alpha)
    return save_state(path, payload)


def load_model(path: str | os.PathLike, *, map_location: Any = "cpu") -> tuple[PlaceModel, ModelConfig]:
    """Read a file written by :func:`save_model`: rebuild the model from its config (without downloading or
    loading ImageNet weights), load its state dict and return ``(model in eval mode, config)``."""
    path = Path(path)
    payload = load_state(path, map_location=map_location)
    if not isinstance(payload, Mapping) or not isinstance(payload.get("config"), str) \
            or not isinstance(payload.get("state_dict"), Mapping):
        raise NetVLADError(f"{path}: not a model file written by save_model (needs 'config' and 'state_dict')")
    try:
        cfg = ModelConfig.from_dict(json.loads(payload["config"]))
    except json.JSONDecodeError as e:
        raise NetVLADError(f"{path}: model config is not valid JSON ({e.msg})") from None
    except NetVLADError as e:
        raise NetVLADError(f"{path}: {e}") from None
    model = build_model(cfg, load_weights=False, allow_download=False)
    state = payload["state_dict"]
    expected = model.state_dict()
    problem = first_mismatch(expected, state)
    unexpected = [k for k in state if k not in expected]
    if problem is None and unexpected:
        problem = f"unexpected key {unexpected[0]!r}"
    if problem is not None:
        raise NetVLADError(f"{path}: state dict does not fit its config ({cfg.backbone}, {cfg.pooling}): {problem}")
    model.load_state_dict(state, strict=True)
    if isinstance(model.pool, NetVLAD) and "netvlad_alpha" in payload:
        model.pool.alpha = float(payload["netvlad_alpha"])
    return model.eval(), cfg
