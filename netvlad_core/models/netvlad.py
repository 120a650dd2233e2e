"""The NetVLAD layer (Arandjelović et al., CVPR 2016), vectorised.

Aggregation ``V_k = Σ_i a_k(x_i)·(x_i − c_k)`` is computed as ``A·Xᵀ − (Σ_i A)·C``: one batched matrix product
and a rank-one correction. Neither the forward nor the backward pass materialises the N×K×D×HW residual tensor
that the public ports build (by broadcasting or one cluster at a time), so autograd keeps only the input, its
normalised copy and the soft-assignment (see ``bench/netvlad_layer.py`` for the measured figures).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetVLADError

# alpha = −log(0.01) / gap: the initial soft-assignment gives the nearest centroid 100× the weight of the second
# nearest for a descriptor with the average gap (as in the authors' MATLAB code).
_ASSIGNMENT_RATIO = 0.01


def _as_float64_matrix(value, what: str, dim: int | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64)
    else:
        arr = torch.from_numpy(np.asarray(value, dtype=np.float64))
    if arr.ndim != 2:
        raise NetVLADError(f"{what} must be a 2-D array (rows × {dim or 'D'}), got shape {tuple(arr.shape)}")
    if dim is not None and arr.shape[1] != dim:
        raise NetVLADError(f"{what} have dimension {arr.shape[1]}, the NetVLAD layer expects {dim}")
    if not torch.isfinite(arr).all():
        raise NetVLADError(f"{what} contain NaN or infinite values")
    return arr


def vladv1_alpha(centroids: np.ndarray | torch.Tensor, descriptors: np.ndarray | torch.Tensor, *,
                 chunk_size: int = 65536) -> float:
    """``−log(0.01) / mean_i(largest − second largest of ĉ_k·x_i)`` with ĉ_k the L2-normalised centroids.

    Computed in float64, ``chunk_size`` descriptors at a time.
    """
    c = _as_float64_matrix(centroids, "centroids")
    x = _as_float64_matrix(descriptors, "descriptors", c.shape[1])
    if c.shape[0] < 2:
        raise NetVLADError(f"vladv1 initialisation needs at least 2 centroids, got {c.shape[0]}")
    if x.shape[0] < 1:
        raise NetVLADError("vladv1 initialisation needs at least 1 descriptor, got 0")
    c_hat = F.normalize(c, p=2, dim=1)
    gap_sum = 0.0
    for start in range(0, x.shape[0], chunk_size):
        dots = x[start:start + chunk_size] @ c_hat.T  # (m, K)
        top2 = dots.topk(2, dim=1).values
        gap_sum += float((top2[:, 0] - top2[:, 1]).sum())
    mean_gap = gap_sum / x.shape[0]
    if not mean_gap > 0:
        raise NetVLADError("cannot initialise vladv1 alpha: every descriptor is equally close to its two nearest "
                           "centroids (duplicate centroids?)")
    return -math.log(_ASSIGNMENT_RATIO) / mean_gap


def nearest_two_squared_distances(centroids: np.ndarray | torch.Tensor, descriptors: np.ndarray | torch.Tensor, *,
                                  chunk_size: int = 65536) -> torch.Tensor:
    """(K, 2) float64: squared Euclidean distances from each centroid to its nearest and second-nearest descriptor.

    Brute force in float64, ``chunk_size`` descriptors at a time (no sklearn, no K×M matrix for large M).
    """
    c = _as_float64_matrix(centroids, "centroids")
    x = _as_float64_matrix(descriptors, "descriptors", c.shape[1])
    if x.shape[0] < 2:
        raise NetVLADError(f"vladv2 initialisation needs at least 2 descriptors, got {x.shape[0]}")
    c_sq = (c * c).sum(1, keepdim=True)  # (K, 1)
    best = torch.full((c.shape[0], 2), math.inf, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start:start + chunk_size]
        d2 = (c_sq + (chunk * chunk).sum(1)[None, :] - 2.0 * (c @ chunk.T)).clamp_min_(0.0)  # (K, m)
        best = torch.cat([best, d2], dim=1).topk(2, dim=1, largest=False, sorted=True).values
    return best


def vladv2_alpha(centroids: np.ndarray | torch.Tensor, descriptors: np.ndarray | torch.Tensor, *,
                 chunk_size: int = 65536) -> float:
    """``−log(0.01) / mean_k(d²_2nd − d²_1st)``, d² the squared distances from centroid k to its two nearest
    descriptors (the distances, not the neighbour indices the widely copied PyTorch port squares)."""
    d2 = nearest_two_squared_distances(centroids, descriptors, chunk_size=chunk_size)
    mean_gap = float((d2[:, 1] - d2[:, 0]).mean())
    if not mean_gap > 0:
        raise NetVLADError("cannot initialise vladv2 alpha: every centroid is equally far from its two nearest "
                           "descriptors (duplicate descriptors?)")
    return -math.log(_ASSIGNMENT_RATIO) / mean_gap


class NetVLAD(nn.Module):
    """NetVLAD pooling: (N, D, H, W) local features → (N, K·D) L2-normalised global descriptors.

    Steps: L2-normalise each local descriptor (``normalize_input``), soft-assign with a 1×1 conv and a softmax over
    the K clusters, aggregate residuals to the centroids ``V = A·Xᵀ − (ΣA)·C`` (one batched matmul),
    intra-normalise each cluster's row, flatten cluster-major (element ``k·D + d``), L2-normalise.

    ``alpha`` (a python float) is the sharpness chosen by :meth:`init_params`; it is folded into the conv weights and
    is not needed afterwards (it is not part of the state dict).
    """

    def __init__(self, num_clusters: int = 64, dim: int = 128, vladv2: bool = False, normalize_input: bool = True):
        super().__init__()
        if int(num_clusters) < 1:
            raise NetVLADError(f"num_clusters must be >= 1, got {num_clusters}")
        if int(dim) < 1:
            raise NetVLADError(f"NetVLAD descriptor dimension must be >= 1, got {dim}")
        self.num_clusters = int(num_clusters)
        self.dim = int(dim)
        self.vladv2 = bool(vladv2)
        self.normalize_input = bool(normalize_input)
        self.alpha: float = 0.0
        self.conv = nn.Conv2d(self.dim, self.num_clusters, kernel_size=1, bias=self.vladv2)
        self.centroids = nn.Parameter(torch.rand(self.num_clusters, self.dim))

    @property
    def out_dim(self) -> int:
        """Length of the global descriptor, K·D."""
        return self.num_clusters * self.dim

    def extra_repr(self) -> str:
        return (f"num_clusters={self.num_clusters}, dim={self.dim}, vladv2={self.vladv2}, "
                f"normalize_input={self.normalize_input}, alpha={self.alpha:.4g}")

    @torch.no_grad()
    def init_params(self, centroids: np.ndarray, descriptors: np.ndarray) -> None:
        """Initialise centroids and the soft-assignment conv from k-means ``centroids`` (K, D) and the sampled
        ``descriptors`` (M, D) that produced them (L2-normalised local descriptors, as the layer sees them).

        vladv1 (the paper's experiments): conv weight ``alpha·ĉ_k``, no bias, alpha from the descriptor-to-centroid
        dot-product gap. vladv2: conv weight ``2·alpha·c_k``, bias ``−alpha·‖c_k‖²``, alpha from the squared
        distances of each centroid to its two nearest descriptors.
        """
        c = _as_float64_matrix(centroids, "centroids", self.dim)
        if c.shape[0] != self.num_clusters:
            raise NetVLADError(f"got {c.shape[0]} centroids, the NetVLAD layer has {self.num_clusters} clusters")
        if self.vladv2:
            alpha = vladv2_alpha(c, descriptors)
            weight = 2.0 * alpha * c
            bias = -alpha * (c * c).sum(1)
            self.conv.bias.copy_(bias.to(self.conv.bias))
        else:
            alpha = vladv1_alpha(c, descriptors)
            weight = alpha * F.normalize(c, p=2, dim=1)
        self.alpha = float(alpha)
        self.centroids.copy_(c.to(self.centroids))
        self.conv.weight.copy_(weight[:, :, None, None].to(self.conv.weight))

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) local features → (N, K, D) intra-normalised residual sums (before flattening)."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"NetVLAD expects (N, {self.dim}, H, W) features, got {tuple(x.shape)}")
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        assign = F.softmax(self.conv(x).flatten(2), dim=1)  # (N, K, HW)
        feats = x.flatten(2)  # (N, D, HW), a view
        vlad = torch.bmm(assign, feats.transpose(1, 2))  # (N, K, D) = A·Xᵀ
        vlad = vlad - assign.sum(2, keepdim=True) * self.centroids  # − (ΣA)·C
        return F.normalize(vlad, p=2, dim=2)  # intra-normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vlad = self.aggregate(x)
        return F.normalize(vlad.reshape(x.shape[0], -1), p=2, dim=1)


class NetVLADLinear(NetVLAD):
    """NetVLAD-Linear (SuperPlace, arXiv 2506.13073): the NetVLAD layer's intra-normalised cluster rows (N, K, D),
    each projected by one learned ``Linear(D, d)`` (shared by the clusters, as SuperPlace's ``feat_proj``), flattened
    cluster-major and L2-normalised; the backbone's CLS token projected by ``Linear(D, c)`` and L2-normalised;
    ``[cls part, cluster part]`` concatenated (SuperPlace's order) and L2-normalised: (N, c + K·d), 256 + 64·128 =
    8448-D by default. ``forward(dense, cls)`` takes the dense map and the CLS token (``uses_cls``).

    k-means initialises the clusters as for NetVLAD (:meth:`NetVLAD.init_params`); the projections start from
    ``nn.Linear``'s initialisation. :meth:`projection_parameters` are what SuperPlace's second fine-tuning trains.
    """

    uses_cls = True

    def __init__(self, num_clusters: int = 64, dim: int = 128, vladv2: bool = False, normalize_input: bool = True,
                 projection_dim: int = 128, cls_dim: int = 256):
        super().__init__(num_clusters=num_clusters, dim=dim, vladv2=vladv2, normalize_input=normalize_input)
        if int(projection_dim) < 1 or int(cls_dim) < 1:
            raise NetVLADError(f"projection_dim and cls_dim must be >= 1, got {projection_dim} and {cls_dim}")
        self.projection_dim, self.cls_dim = int(projection_dim), int(cls_dim)
        self.projection = nn.Linear(self.dim, self.projection_dim)
        self.cls_projection = nn.Linear(self.dim, self.cls_dim)

    @property
    def out_dim(self) -> int:
        """Length of the global descriptor, c + K·d."""
        return self.cls_dim + self.num_clusters * self.projection_dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projection_dim={self.projection_dim}, cls_dim={self.cls_dim}"

    def projection_parameters(self) -> list[nn.Parameter]:
        """The projections' weights and biases (cluster projection, then CLS projection)."""
        return [*self.projection.parameters(), *self.cls_projection.parameters()]

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        if cls is None or cls.ndim != 2 or cls.shape != (x.shape[0], self.dim):
            raise ValueError(f"NetVLAD-Linear expects the CLS token (N, {self.dim}) with the features, got "
                             f"{None if cls is None else tuple(cls.shape)}")
        local = F.normalize(self.projection(self.aggregate(x)).reshape(x.shape[0], -1), p=2, dim=1)
        glob = F.normalize(self.cls_projection(cls), p=2, dim=1)
        return F.normalize(torch.cat([glob, local], dim=1), p=2, dim=1)
