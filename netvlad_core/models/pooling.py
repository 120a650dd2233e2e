"""Global pooling layers: NetVLAD, NetVLAD-Linear and the ablation baselines (max, average, GeM), all L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetVLADError
from .netvlad import NetVLAD, NetVLADLinear

POOLINGS = ("netvlad", "netvlad-linear", "max", "avg", "gem")


class MaxPool(nn.Module):
    """Global max pooling over H×W, then L2-normalisation: (N, D, H, W) → (N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.amax(dim=(2, 3)), p=2, dim=1)


class AvgPool(nn.Module):
    """Global average pooling over H×W, then L2-normalisation: (N, D, H, W) → (N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.mean(dim=(2, 3)), p=2, dim=1)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): ``(mean_i max(x_i, eps)^p)^(1/p)`` per channel, then
    L2-normalisation. p = 1 is average pooling, p → ∞ max pooling; ``learnable`` makes p a parameter.

    Negative activations are clamped to ``eps`` (GeM assumes non-negative features, e.g. after a ReLU).
    """

    def __init__(self, dim: int, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        if not p > 0:
            raise NetVLADError(f"gem_p must be > 0, got {p}")
        self.dim = int(dim)
        self.eps = float(eps)
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    @property
    def out_dim(self) -> int:
        return self.dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, p={float(self.p):.4g}, learnable={isinstance(self.p, nn.Parameter)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(torch.float32)
        pooled = x.float().clamp_min(self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return F.normalize(pooled, p=2, dim=1)


def build_pooling(name: str, dim: int, num_clusters: int = 64, vladv2: bool = False, *, gem_p: float = 3.0,
                  gem_learnable: bool = True, normalize_input: bool = True, projection_dim: int = 128,
                  cls_dim: int = 256) -> nn.Module:
    """The global pooling layer ``name`` (netvlad | netvlad-linear | max | avg | gem) over ``dim``-channel features.

    Every returned module has an ``out_dim`` attribute (K·D for netvlad, c + K·d for netvlad-linear, D otherwise).
    netvlad-linear's ``forward`` also takes the backbone's CLS token (``uses_cls``).
    """
    key = str(name).lower()
    if key in ("netvlad", "netvlad-linear"):
        if int(num_clusters) < 2:
            raise NetVLADError(f"num_clusters must be >= 2 for NetVLAD pooling, got {num_clusters}")
        if key == "netvlad-linear":
            return NetVLADLinear(num_clusters=num_clusters, dim=dim, vladv2=vladv2, normalize_input=normalize_input,
                                 projection_dim=projection_dim, cls_dim=cls_dim)
        return NetVLAD(num_clusters=num_clusters, dim=dim, vladv2=vladv2, normalize_input=normalize_input)
    if key == "max":
        return MaxPool(dim)
    if key == "avg":
        return AvgPool(dim)
    if key == "gem":
        return GeM(dim, p=gem_p, learnable=gem_learnable)
    raise NetVLADError(f"unknown pooling {name!r}; valid: {', '.join(POOLINGS)}")
