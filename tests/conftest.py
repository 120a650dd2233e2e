"""Shared fixtures: tiny real datasets (JPEG files + split folders) and a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.manifest import Split, write_split
from netvlad_core.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def make_jpegs(root: Path, names: list[str], size=(64, 48), seed: int = 0) -> None:
    """Write real JPEG files with random smooth content under ``root``."""
    rng = np.random.default_rng(seed)
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(p, quality=90)


def make_split(tmp: Path, *, num_db: int = 12, num_q: int = 5, size=(64, 48), seed: int = 0,
               name: str = "test") -> Path:
    """A split folder over real JPEGs: database on a line every 5 m, queries near some of them."""
    rng = np.random.default_rng(seed)
    root = tmp / "images"
    db = [f"db/{i:04d}.jpg" for i in range(num_db)]
    q = [f"queries_real/q{i:04d}.jpg" for i in range(num_q)]
    make_jpegs(root, db + q, size=size, seed=seed)
    db_utm = np.stack([np.arange(num_db) * 5.0, np.zeros(num_db)], 1) + [500000.0, 4000000.0]
    q_utm = db_utm[rng.choice(num_db, num_q)] + rng.normal(0, 2, (num_q, 2))
    split = Split(dataset="tiny", name=name, image_root=root, db_paths=db, db_utm=db_utm, q_paths=q, q_utm=q_utm)
    return write_split(split, tmp / "splits" / name)


class TinyModel(torch.nn.Module):
    """A small conv net with the PlaceModel surface: ``forward`` → L2-normalised descriptors."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 3, stride=4, padding=1)
        self.out_dim = dim
        self.calls = 0
        self.fail_after: int | None = None

    def local_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.conv(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return torch.nn.functional.normalize(self.local_descriptors(x).mean((2, 3)), dim=1)


@pytest.fixture
def tiny_split(tmp_path: Path) -> Path:
    return make_split(tmp_path)


# The input size and normalisation of TinyModel (the rest of the config is not used by it)
TINY_MODEL_CONFIG = ModelConfig(backbone="resnet18_layer3", weights="none", input_height=48, input_width=64)
