"""PCA whitening of global descriptors (the NetVLAD paper's 4096-D "+PCA+whitening" model).

Fit on ``n`` descriptors ``x_i`` (rows of an ``(n, D)`` float32 array): ``μ`` their mean, ``C = XᵀX / (n − 1)`` the
covariance of the centred rows ``X``, ``U`` (D × d) its top ``d`` eigenvectors and ``λ`` their eigenvalues. The
whitening is ``y = diag(1/sqrt(λ + ε))·Uᵀ·(x − μ)``, ε = 1e-9, then L2-normalisation; it is one linear layer with
weight ``W = diag(1/sqrt(λ + ε))·Uᵀ`` (d × D) and bias ``−W·μ`` (see :meth:`PlaceModel.set_whitening`).

As in the authors' MATLAB code (``relja_PCA``), the eigenproblem is solved in the smaller space:
- primal (n ≥ D): eigen-decompose the D × D covariance;
- dual (n < D): eigen-decompose the n × n Gram matrix ``G = XXᵀ / (n − 1)`` (same non-zero eigenvalues) and map its
  eigenvectors ``v`` back with ``u = Xᵀv / sqrt((n − 1)·λ)``.
Both are accumulated in float64 from float32 input, ``chunk_size`` rows or columns at a time, so no float64 copy of
the whole ``(n, D)`` matrix is ever made. Centred data has rank ≤ n − 1, so at most ``min(n − 1, D)`` components are
meaningful; asking for more keeps that many, with a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..config import option
from ..errors import NetVLADError, NetVLADWarning

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..datasets.manifest import Split
    from ..distributed import DistContext
    from ..features import FeatureConfig
    from .build import ModelConfig, PlaceModel

WHITENING_EPS = 1e-9


@dataclass
class PCAConfig:
    """How to fit the whitening; the names match the ``pca`` group of params.yaml."""

    dim: int = option(4096, "Whitened descriptor size (kept principal components); fewer, with a warning, when the "
                      "sample is too small.")
    max_images: int = option(10_000, "Fit on at most this many randomly chosen database images.")
    seed: int = option(0, "Seed of the image choice.")
    eps: float = option(WHITENING_EPS, "Added to the eigenvalues before 1/sqrt.", cli=False)
    chunk_size: int = option(1024, "Rows/columns per float64 block while accumulating.", cli=False)

    def validate(self) -> None:
        """Raise :class:`NetVLADError` for values that cannot work."""
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise NetVLADError(f"dim must be an integer >= 1, got {self.dim!r}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 2:
            raise NetVLADError(f"max-images must be an integer >= 2 (PCA needs two samples), got {self.max_images!r}")
        if not self.eps >= 0:
            raise NetVLADError(f"whitening eps must be >= 0, got {self.eps!r}")
        if self.chunk_size < 1:
            raise NetVLADError(f"chunk size must be >= 1, got {self.chunk_size!r}")


@dataclass
class PCAWhitening:
    """A fitted PCA whitening: ``mean`` (D,), ``components`` (d, D) = Uᵀ with unit rows, ``eigenvalues`` (d,)
    descending, all float64; ``method`` is ``primal`` or ``dual``; ``num_samples`` the n it was fitted on."""

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    eps: float
    num_samples: int
    method: str

    @property
    def dim(self) -> int:
        """d, the number of kept components."""
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        """D, the length of the descriptors it whitens."""
        return int(self.components.shape[1])

    def weight(self) -> np.ndarray:
        """``W = diag(1/sqrt(λ + ε))·Uᵀ`` (d, D) float64."""
        return self.components / np.sqrt(self.eigenvalues + self.eps)[:, None]

    def bias(self) -> np.ndarray:
        """``−W·μ`` (d,) float64."""
        return -(self.weight() @ self.mean)

    def transform(self, descriptors: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Whiten ``descriptors`` (m, D) in float64: ``W·(x − μ)``, then L2-normalised unless ``normalize=False``."""
        x = np.asarray(descriptors, dtype=np.float64)
        y = (x - self.mean) @ self.weight().T
        if normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y


def valid_whitening_dim(num_samples: int, descriptor_dim: int, requested: int) -> int:
    """The number of components actually kept: ``min(requested, num_samples − 1, descriptor_dim)``, warning with
    ``warnings.warn`` when that is less than ``requested``. Raises when fewer than 2 samples are given."""
    if num_samples < 2:
        raise NetVLADError(f"PCA whitening needs at least 2 descriptors, got {num_samples}")
    largest = min(num_samples - 1, descriptor_dim)
    if requested > largest:
        why = (f"{num_samples} descriptors span at most {num_samples - 1} dimensions once centred"
               if num_samples - 1 < descriptor_dim else f"the descriptors are {descriptor_dim}-D")
        warnings.warn(f"PCA whitening: dim {requested} is too large ({why}); keeping {largest} components instead",
                      NetVLADWarning, stacklevel=3)
        return largest
    return requested


def _column_mean(x: np.ndarray, chunk: int) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[0], chunk):
        total += x[start:start + chunk].sum(axis=0, dtype=np.float64)
    return total / x.shape[0]


def _accumulate_outer(target: np.ndarray, block: np.ndarray, *, rows_are_samples: bool) -> None:
    """Add ``blockᵀ·block`` (``rows_are_samples``) or ``block·blockᵀ`` to the upper triangle of ``target``
    (float64, Fortran order) in place, with BLAS ``dsyrk`` (no temporary of ``target``'s size)."""
    from scipy.linalg.blas import dsyrk

    block_t = block.T  # Fortran-ordered view of the C-ordered block: no copy
    out = dsyrk(1.0, block_t, beta=1.0, c=target, trans=0 if rows_are_samples else 1, lower=0, overwrite_c=1)
    if out is not target:  # BLAS worked on a copy (target not Fortran-ordered float64)
        target[...] = out


def _top_eigenpairs(matrix: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``d`` eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a symmetric matrix."""
    from scipy.linalg import eigh

    m = matrix.shape[0]
    values, vectors = eigh(matrix, lower=False, subset_by_index=[m - d, m - 1], overwrite_a=True,
                           check_finite=False)
    return np.clip(values[::-1], 0.0, None), vectors[:, ::-1]


def fit_pca_whitening(descriptors: np.ndarray, dim: int, *, eps: float = WHITENING_EPS, method: str = "auto",
                      chunk_size: int = 1024) -> PCAWhitening:
    """Fit PCA whitening on ``descriptors`` (n, D), keeping ``dim`` components (fewer, with a warning, when
    n − 1 or D is smaller; see :func:`valid_whitening_dim`).

    ``method``: ``auto`` (primal when n ≥ D, dual otherwise), ``primal`` or ``dual``. Each component's sign is
    fixed so that its largest-magnitude entry is positive (the result does not depend on the eigen-solver's
    sign choice). Memory: the input as given plus one float64 D × D (primal) or n × n (dual) matrix, the
    float64 (d, D) components and ``chunk_size``-wide float64 blocks.
    """
    x = np.asarray(descriptors)
    if x.ndim != 2:
        raise NetVLADError(f"PCA whitening needs an (n, D) descriptor array, got shape {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    if method not in ("auto", "primal", "dual"):
        raise NetVLADError(f"PCA method must be auto, primal or dual, got {method!r}")
    if chunk_size < 1:
        raise NetVLADError(f"chunk size must be >= 1, got {chunk_size}")
    n, big_d = x.shape
    d = valid_whitening_dim(n, big_d, dim)
    for start in range(0, n, chunk_size):
        if not np.isfinite(x[start:start + chunk_size]).all():
            raise NetVLADError("PCA whitening: the descriptors contain NaN or infinite values")
    if method == "auto":
        method = "primal" if n >= big_d else "dual"
    mean = _column_mean(x, chunk_size)
    scale = 1.0 / (n - 1)

    if method == "primal":
        cov = np.zeros((big_d, big_d), dtype=np.float64, order="F")
        for start in range(0, n, chunk_size):
            block = x[start:start + chunk_size].astype(np.float64) - mean
            _accumulate_outer(cov, block, rows_are_samples=True)
        cov *= scale
        eigenvalues, vectors = _top_eigenpairs(cov, d)
        del cov
        components = np.ascontiguousarray(vectors.T)
    else:
        gram = np.zeros((n, n), dtype=np.float64, order="F")
        for start in range(0, big_d, chunk_size):
            block = x[:, start:start + chunk_size].astype(np.float64) - mean[start:start + chunk_size]
            _accumulate_outer(gram, block, rows_are_samples=False)
        gram *= scale
        eigenvalues, vectors = _top_eigenpairs(gram, d)
        del gram
        # u = Xᵀ v / sqrt((n − 1) λ); a zero-variance component (degenerate data) gets λ clipped to a tiny value
        # like MATLAB's max(λ, 1e-9) and is re-normalised below.
        vectors /= np.sqrt((n - 1) * np.maximum(eigenvalues, 1e-12))[None, :]
        components = np.empty((d, big_d), dtype=np.float64)
        for start in range(0, big_d, chunk_size):
            block = x[:, start:start + chunk_size].astype(np.float64) - mean[start:start + chunk_size]
            components[:, start:start + chunk_size] = vectors.T @ block
        del vectors
        norms = np.linalg.norm(components, axis=1, keepdims=True)
        components /= np.where(norms > 0, norms, 1.0)

    flat = np.abs(components).argmax(axis=1)
    signs = np.sign(components[np.arange(d), flat])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    degenerate = int(np.count_nonzero(eigenvalues <= eigenvalues[0] * 1e-12)) if eigenvalues[0] > 0 else d
    if degenerate:
        warnings.warn(f"PCA whitening: {degenerate} of the {d} kept components have (numerically) zero variance; "
                      f"the sample may contain duplicate descriptors", NetVLADWarning, stacklevel=2)
    return PCAWhitening(mean=mean, components=components, eigenvalues=eigenvalues, eps=float(eps), num_samples=n,
                        method=method)


def apply_whitening(model: "PlaceModel", whitening: PCAWhitening) -> None:
    """Append ``whitening`` to ``model`` as its Linear + L2-normalisation layer (weight W, bias −W·μ)."""
    pooled = int(model.pool.out_dim)
    if whitening.input_dim != pooled:
        raise NetVLADError(f"whitening was fitted on {whitening.input_dim}-D descriptors but the model pools "
                           f"{pooled}-D ones")
    scale = 1.0 / np.sqrt(whitening.eigenvalues + whitening.eps)
    bias = -scale * (whitening.components @ whitening.mean)  # −W·μ in float64
    weight = torch.empty(whitening.components.shape, dtype=torch.float32)  # W, filled a block of rows at a time
    rows = max(1, (1 << 24) // max(pooled, 1))
    for start in range(0, whitening.dim, rows):
        block = whitening.components[start:start + rows] * scale[start:start + rows, None]
        weight[start:start + rows] = torch.from_numpy(block)
    model.set_whitening(weight, torch.from_numpy(bias))


def fit_model_whitening(model: "PlaceModel", model_cfg: "ModelConfig", split: "Split", *, device: torch.device,
                        cfg: PCAConfig, feature_cfg: "FeatureConfig", progress: bool = True,
                        dist: "DistContext | None" = None) -> PCAWhitening | None:
    """Encode at most ``cfg.max_images`` database images of ``split`` (chosen with ``cfg.seed``) with ``model``'s
    pooled (un-whitened) output, fit PCA whitening on them and append it to ``model``; returns the fit.

    A whitening layer already in ``model`` is replaced (the descriptors are taken before it).

    Under torchrun (``dist`` with several processes) the descriptor pass is sharded over the ranks and the
    descriptors are gathered on rank 0 only, which fits and returns the whitening; the other ranks return
    ``None`` with ``model`` unchanged (only rank 0 writes the model).
    """
    from ..clustering import choose_images
    from ..device import prepare_model
    from ..features import encode_images

    cfg.validate()
    feature_cfg.validate()
    if split.num_db < 2:
        raise NetVLADError(f"split {split.name!r} has {split.num_db} database image(s); PCA whitening needs at least 2")
    chosen = choose_images(split.num_db, cfg.max_images, cfg.seed)
    db_files = split.db_files()
    files = [db_files[i] for i in chosen]
    previous = model.whitening
    model.whitening = None
    try:
        model = prepare_model(model, device)
        descriptors = encode_images(model, files, height=model_cfg.input_height, width=model_cfg.input_width,
                                    mean=model_cfg.mean, std=model_cfg.std, device=device,
                                    cfg=replace(feature_cfg, float16=False), progress=progress, desc="pca encode",
                                    dist=dist, result_on="main")
        if descriptors is None:  # a rank other than 0 under torchrun: its part is done
            model.whitening = previous
            return None
        whitening = fit_pca_whitening(descriptors, cfg.dim, eps=cfg.eps, chunk_size=cfg.chunk_size)
    except BaseException:
        model.whitening = previous
        raise
    del descriptors
    apply_whitening(model, whitening)
    return whitening


def write_whitened_model(model_file: str | os.PathLike, split_dir: str | os.PathLike, out: str | os.PathLike, *,
                         cfg: PCAConfig, feature_cfg: "FeatureConfig", run: "RunConfig",
                         log: Callable[[str], None] = print) -> Path:
    """The ``pca`` stage: the model in ``model_file`` followed by PCA whitening fitted on the database images of
    the split in ``split_dir`` (:func:`fit_model_whitening`; under torchrun the descriptor pass is sharded and rank 0
    fits and writes), saved to ``out``; logs one summary line."""
    from ..datasets.manifest import load_split
    from ..distributed import distributed_session
    from ..io import distinct_paths
    from .build import load_model, save_model

    distinct_paths({"--model": model_file}, {"--out": out})
    cfg.validate()
    feature_cfg.validate()
    split = load_split(split_dir)
    net, model_cfg = load_model(model_file)
    replaced = net.whitening is not None
    with distributed_session(run.device, run.dist_timeout) as dist:
        whitening = fit_model_whitening(net, model_cfg, split, device=dist.device, cfg=cfg, feature_cfg=feature_cfg,
                                        progress=run.progress, dist=dist)
    if whitening is not None:  # rank 0
        save_model(out, net, model_cfg)
        note = " (replaced the model's previous whitening)" if replaced else ""
        log(f"pca: {whitening.input_dim}-D -> {whitening.dim}-D whitening fitted on {whitening.num_samples} database "
            f"images ({whitening.method} form){note} -> {out}")
    return Path(out)
