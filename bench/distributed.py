"""Feature extraction with 1 and 2 CPU processes (torchrun, gloo): images/s on the same images, and the ratio.

On a generated split (random smooth 320×240 JPEGs) with the demo's model (EfficientNet-Lite0 to stride 16,
NetVLAD K=64, ImageNet weights), ``torchrun --standalone --nproc-per-node N`` runs
:func:`netvlad_core.features.extract_split_features` (the `features` stage's library call, HDF5 written by rank 0)
for N = 1 and 2. Each run is timed inside the processes, between two barriers around the extraction, after one
warm-up batch, so the interpreter and torchrun start-up are not counted (they are printed separately).

torchrun gives each of N > 1 processes one OpenMP thread (``OMP_NUM_THREADS=1``); the single process keeps torch's
default (one thread per core), and a third run, 1 process with 1 thread, separates "more processes" from "fewer
threads". All use ``--workers`` DataLoader processes per rank. On a machine whose cores are
shared with other jobs the figures fluctuate; the ratio is the number to read.

Run: ``python -m bench distributed`` or ``python -m bench.distributed [--images 160 --batch-size 16 --workers 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._data import make_bench_split

REPO = Path(__file__).resolve().parents[1]


def _make_split(root: Path, num_db: int, num_q: int, width: int, height: int, seed: int = 0) -> Path:
    return make_bench_split(root, num_db, num_q, width, height, name="test", seed=seed)


def worker(args: argparse.Namespace) -> None:
    """One rank: warm up, then time ``extract_split_features`` between barriers; rank 0 prints a JSON line."""
    import torch

    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.distributed import barrier, distributed_session
    from netvlad_core.features import FeatureConfig, extract_split_features
    from netvlad_core.models import load_model

    started = float(os.environ.get("BENCH_LAUNCHED_AT", "nan"))
    ready = time.time() - started
    split = load_split(args.split)
    model, model_cfg = load_model(args.model)
    cfg = FeatureConfig(batch_size=args.batch_size, num_workers=args.workers)
    with distributed_session("cpu", timeout_s=600) as dist:
        model = model.eval()
        with torch.inference_mode():  # warm-up: one batch through the model on every rank
            model(torch.zeros(args.batch_size, 3, model_cfg.input_height, model_cfg.input_width))
        barrier(dist)
        t0 = time.perf_counter()
        extract_split_features(model, model_cfg, split, args.out, device=dist.device, cfg=cfg,
                               progress=False, dist=dist)
        barrier(dist)
        seconds = time.perf_counter() - t0
        if dist.is_main:
            n = split.num_db + split.num_queries
            print(json.dumps({"processes": dist.world_size, "images": n, "seconds": seconds,
                              "images_per_s": n / seconds, "threads": torch.get_num_threads(),
                              "startup_s": ready}), flush=True)


def measure(nproc: int, split: Path, model: Path, out: Path, batch_size: int, workers: int,
            threads: int | None = None) -> dict:
    """Launch ``torchrun`` with ``nproc`` CPU processes on the split (``threads``: OMP_NUM_THREADS per process,
    default torchrun's choice); the rank-0 figures."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), BENCH_LAUNCHED_AT=repr(time.time()))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bench.distributed", "--worker", "--split", str(split), "--model", str(model), "--out", str(out),
           "--batch-size", str(batch_size), "--workers", str(workers)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun --nproc-per-node {nproc} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def run(images: int = 160, queries: int = 32, batch_size: int = 16, workers: int = 1, width: int = 320,
        height: int = 240) -> dict[str, dict]:
    """Measure 1 process (torch's default threads), 2 processes (1 thread each) and, for reference, 1 process with
    1 thread, on the same split and model; prints a table and the ratio 2 / 1."""
    import torch

    from netvlad_core.features import read_features
    from netvlad_core.models import ModelConfig, build_model, save_model

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        root = Path(tmp)
        split = _make_split(root, images, queries, width, height)
        cfg = ModelConfig(backbone="efficientnet_lite0", input_height=height, input_width=width)  # the demo's, K=64
        torch.manual_seed(0)
        save_model(root / "model.pt", build_model(cfg), cfg)
        runs = {"1 process": (1, None), "2 processes": (2, None), "1 process, 1 thread": (1, 1)}
        for name, (nproc, threads) in runs.items():
            results[name] = measure(nproc, split, root / "model.pt", root / f"features_{len(results)}.h5",
                                    batch_size, workers, threads)
        db1, q1, _ = read_features(root / "features_0.h5")
        db2, q2, _ = read_features(root / "features_1.h5")
        diff = max(float(np.abs(db1 - db2).max()), float(np.abs(q1 - q2).max()))
    cores = os.cpu_count()
    print(f"feature extraction, {images}+{queries} images {width}x{height}, efficientnet_lite0+NetVLAD K=64, "
          f"batch {batch_size}, {workers} loader worker(s) per process, {cores} CPU cores:")
    for name, r in results.items():
        print(f"  {name:<20} ({r['threads']} thread(s) per process): {r['images_per_s']:7.2f} images/s "
              f"({r['seconds']:.1f} s; interpreter + torchrun start-up {r['startup_s']:.1f} s)")
    ratio = results["2 processes"]["images_per_s"] / results["1 process"]["images_per_s"]
    per_thread = results["2 processes"]["images_per_s"] / results["1 process, 1 thread"]["images_per_s"]
    print(f"2 processes / 1 process: {ratio:.2f}x images/s (against 1 process with 1 thread: {per_thread:.2f}x); "
          f"max |2-process - 1-process features| {diff:.1e}")
    results["ratio"] = {"2/1": ratio, "2/1-thread": per_thread}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160, help="database images")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--split", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        worker(args)
    else:
        run(images=args.images, queries=args.queries, batch_size=args.batch_size, workers=args.workers)


if __name__ == "__main__":
    main()
