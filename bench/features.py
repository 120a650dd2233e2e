"""Feature extraction throughput: the `features` stage's path against the bare backbone forward.

Both on the same real JPEG files (320×240) with the demo's model (EfficientNet-Lite0 + NetVLAD, K=64), in one process:

* ``bare backbone``: images decoded beforehand, batches pushed through ``model.backbone`` only (inference mode,
  channels-last like the stage);
* ``extract_split_features``: the stage's whole path — DataLoader decoding, backbone + NetVLAD, HDF5 writes.

Run: ``python -m bench features`` or ``python -m bench.features [--images 192]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._data import make_bench_split
from netvlad_core.datasets.images import load_image
from netvlad_core.datasets.manifest import load_split
from netvlad_core.device import prepare_model
from netvlad_core.features import FeatureConfig, extract_split_features
from netvlad_core.models import ModelConfig, build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv or [])
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", weights="imagenet", num_clusters=64)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    model.pool.init_params(rng.normal(size=(64, model.feature_dim)).astype(np.float32),
                           rng.normal(size=(2000, model.feature_dim)).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = make_bench_split(Path(tmp), args.images, 0, cfg.input_width, cfg.input_height)
        split = load_split(split_dir)
        images = torch.stack([load_image(f, cfg.input_height, cfg.input_width, cfg.mean, cfg.std)
                              for f in split.db_files()]).contiguous(memory_format=torch.channels_last)
        model = prepare_model(model, torch.device("cpu"))
        with torch.inference_mode():  # warm-up
            model.backbone(images[: args.batch_size])
            t0 = time.perf_counter()
            for i in range(0, len(images), args.batch_size):
                model.backbone(images[i:i + args.batch_size])
            bare = len(images) / (time.perf_counter() - t0)
        fcfg = FeatureConfig(batch_size=args.batch_size, num_workers=args.workers)
        t0 = time.perf_counter()
        extract_split_features(model, cfg, split, Path(tmp) / "f.h5", device=torch.device("cpu"),
                               cfg=fcfg, progress=False)
        full = len(images) / (time.perf_counter() - t0)
    print(f"{args.images} images 320x240, batch {args.batch_size}, {args.workers} decode workers, "
          f"{torch.get_num_threads()} torch threads")
    print(f"bare backbone forward (pre-decoded): {bare:7.1f} images/s")
    print(f"extract_split_features (whole path):  {full:7.1f} images/s")
    print(f"extraction / bare backbone: {full / bare:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
