"""The small benchmark split every bench module uses: real JPEGs on a line, queries near database images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_bench_split(root: Path, num_db: int, num_q: int, width: int, height: int, *, name: str = "test",
                     seed: int = 0) -> Path:
    """Write ``num_db`` database and ``num_q`` query JPEGs (smooth random content) and their split folder."""
    from PIL import Image

    from netvlad_core.datasets.manifest import Split, write_split

    rng = np.random.default_rng(seed)
    images = root / "images"
    (images / "db").mkdir(parents=True)
    (images / "q").mkdir(parents=True)
    db = [f"db/{i:05d}.jpg" for i in range(num_db)]
    q = [f"q/{i:05d}.jpg" for i in range(num_q)]
    for rel in db + q:
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(images / rel, quality=90)
    db_xy = np.stack([np.arange(num_db) * 5.0, np.zeros(num_db)], 1)
    q_xy = db_xy[rng.choice(np.arange(num_db), num_q)] + rng.normal(0, 2.0, (num_q, 2)) if num_q else np.zeros((0, 2))
    split = Split(dataset="bench", name=name, image_root=images, db_paths=db, db_utm=db_xy, q_paths=q, q_utm=q_xy)
    return write_split(split, root / "split")
