"""Deterministic randomness for the renderer: seeded generators, integer hashes and fixed noise textures."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

_NOISE64 = np.random.default_rng(20240517).random((64, 64), dtype=np.float32)  # a fixed texture
_NOISE_FLAT = _NOISE64.ravel()
# Gaussian quantiles at 256 levels: sensor noise from random bytes with one table lookup.
_GAUSS256 = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)


def _grid(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """The fixed 64×64 random texture at integer coordinates (wrapping): a cheap per-cell random value."""
    return np.take(_NOISE_FLAT, (iy.astype(np.int64) & 63) * 64 + (ix.astype(np.int64) & 63))


def _hash01(*keys: Any) -> np.ndarray:
    """A deterministic hash of integer arrays (broadcast together) to floats in [0, 1)."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    h = np.full(shape, 2166136261, dtype=np.uint32)
    for k in keys:
        k = (np.asarray(k).astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
        h = (h ^ k) * np.uint32(16777619)
        h ^= h >> np.uint32(15)
    h ^= h >> np.uint32(16)
    h = h * np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h = h * np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _fade(footprint: np.ndarray, period: float | np.ndarray) -> np.ndarray:
    """1 where a pattern of ``period`` metres is resolved by pixels of ``footprint`` metres, 0 where not."""
    return np.clip(2.0 - 4.0 * footprint / period, 0.0, 1.0).astype(np.float32)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _tile_noise(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup in a periodic 2-D grid of values."""
    n0, n1 = grid.shape
    iu = np.floor(u)
    iv = np.floor(v)
    fu = (u - iu).astype(np.float32)
    fv = (v - iv).astype(np.float32)
    iu = iu.astype(np.int64) % n1
    iv = iv.astype(np.int64) % n0
    ju = (iu + 1) % n1
    jv = (iv + 1) % n0
    a = grid[iv, iu] + (grid[iv, ju] - grid[iv, iu]) * fu
    b = grid[jv, iu] + (grid[jv, ju] - grid[jv, iu]) * fu
    return a + (b - a) * fv
