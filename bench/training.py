"""Triplet training: throughput, peak memory, and the cost of a cache refresh against a plain extraction pass.

On a small generated split (random smooth 320×240 JPEGs, database on a line every 5 m, queries near it) with the
demo's model (EfficientNet-Lite0 to stride 16, NetVLAD K=64, default freeze boundary) and the paper's batch shape
(4 queries × [query, positive, 10 negatives]), in one warmed-up process:

* ``plain pass``: :func:`netvlad_core.features.encode_images` over the database + the queries of one block;
* ``cache refresh``: what the training loop does at each refresh (encode the database and the block's queries
  into the cache, then mine the whole block with one batched distance computation);
* ``training``: optimisation steps (forward + backward + SGD) at the given batch shape; queries/s and the peak
  memory (``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS from ``ru_maxrss`` on CPU);
* the descriptor cache's bytes against the float64 cache of the old ports.

Run: ``python -m bench training`` or ``python -m bench.training [--db 120 --queries 32 --steps 3 --device cpu]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._data import make_bench_split


def _make_split(root: Path, num_db: int, num_q: int, width: int, height: int, seed: int = 0) -> Path:
    return make_bench_split(root, num_db, num_q, width, height, name="train", seed=seed)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _median_time(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(num_db: int, num_queries: int, steps: int, device_name: str, reps: int, workers: int) -> dict:
    from torch.utils.data import DataLoader

    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.device import prepare_model, select_device
    from netvlad_core.features import FeatureConfig, encode_images
    from netvlad_core.mining import MiningConfig, empty_negative_cache, mine_triplets
    from netvlad_core.models import ModelConfig, build_model
    from netvlad_core.training import TrainConfig, encode_into
    from netvlad_core.training.triplet import TripletBatches, allocate_cache, cache_dtype, train_step

    device = select_device(device_name)
    model_cfg = ModelConfig(backbone="efficientnet_lite0", input_height=240, input_width=320)  # the demo's, K=64
    cfg = TrainConfig(encode_batch_size=16, workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = _make_split(Path(tmp), num_db, num_queries, model_cfg.input_width, model_cfg.input_height)
        split, gt = load_split(split_dir), load_ground_truth(split_dir)
        model = prepare_model(build_model(model_cfg), device).eval()
        files = split.db_files() + split.query_files()
        block = np.arange(split.num_queries)
        out_dim = model.out_dim
        feat_cfg = FeatureConfig(batch_size=cfg.encode_batch_size, num_workers=workers,
                                 float16=device.type == "cuda")

        def plain() -> None:
            encode_images(model, files, height=model_cfg.input_height, width=model_cfg.input_width,
                          mean=model_cfg.mean, std=model_cfg.std, device=device, cfg=feat_cfg, progress=False)

        db_cache = allocate_cache(split.num_db, out_dim, cache_dtype(device), None)
        neg_cache = empty_negative_cache(split.num_queries, cfg.mining.num_negatives)
        # a margin every negative violates: each query trains with the full 10 negatives (the worst case)
        mining = MiningConfig(margin=4.0, num_negatives=cfg.mining.num_negatives,
                              num_negatives_sampled=cfg.mining.num_negatives_sampled)
        mined_holder: dict = {}
        mine_seconds: list[float] = []

        def refresh() -> None:
            encode_into(model, split.db_files(), db_cache, model_cfg=model_cfg, device=device,
                        batch_size=cfg.encode_batch_size, num_workers=workers, amp=cfg.amp)
            q_cache = encode_into(model, split.query_files(), np.empty((len(block), out_dim), cache_dtype(device)),
                                  model_cfg=model_cfg, device=device, batch_size=cfg.encode_batch_size,
                                  num_workers=workers, amp=cfg.amp)
            t = time.perf_counter()
            mined_holder["mined"], _ = mine_triplets(block, q_cache, db_cache, train_positives=gt.train_positives,
                                                     positives=gt.positives, negative_cache=neg_cache,
                                                     rng=np.random.default_rng(0), cfg=mining, device=device)
            mine_seconds.append(time.perf_counter() - t)

        plain()  # warm-up (allocator, thread pools, file cache)
        plain_times, refresh_times = [], []
        for _ in range(reps):  # interleaved, so a change in machine load hits both alike
            plain_times.append(_median_time(plain, 1, device))
            refresh_times.append(_median_time(refresh, 1, device))
        t_plain, t_refresh = statistics.median(plain_times), statistics.median(refresh_times)

        mined = [t for t in mined_holder["mined"] if t is not None]
        batches = [mined[i:i + cfg.batch_size] for i in range(0, len(mined), cfg.batch_size)][: steps + 1]
        batches = [b for b in batches if len(b) == cfg.batch_size]
        if len(batches) < 2:
            raise SystemExit("bench.training: too few full batches; raise --queries")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        loader = list(DataLoader(TripletBatches(batches, split, model_cfg), batch_size=None, num_workers=0))
        train_step(model, optimizer, None, *loader[0], device, cfg)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        rss_before = _peak_rss_mib()
        t = time.perf_counter()
        for images, counts in loader[1:]:
            train_step(model, optimizer, None, images, counts, device, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t
        trained_queries = sum(len(b) for b in batches[1:])
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib())
        images_per_step = int(loader[1][0].shape[0])
        # decoding the step's images (a DataLoader worker's job in the loop) is timed apart from the step
        t_decode = _median_time(lambda: TripletBatches(batches[:1], split, model_cfg)[0], reps, device)
        return {
            "device": str(device), "num_db": num_db, "num_queries": num_queries, "dim": out_dim,
            "plain_s": t_plain, "plain_img_s": len(files) / t_plain, "refresh_s": t_refresh,
            "mine_s": statistics.median(mine_seconds), "train_q_s": trained_queries / t_train,
            "step_s": t_train / len(loader[1:]), "images_per_step": images_per_step, "decode_step_s": t_decode,
            "peak_mib": peak, "rss_before_train_mib": rss_before,
            "cache_mib": (db_cache.nbytes + num_queries * out_dim * db_cache.itemsize) / 2**20,
            "cache_f64_mib": (num_db + num_queries) * out_dim * 8 / 2**20,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=int, default=120, help="database images of the generated split")
    parser.add_argument("--queries", type=int, default=32, help="queries (one refresh block)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the timed passes (median)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the encoding passes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args([] if argv is None else argv)
    r = run(args.db, args.queries, args.steps, args.device, args.reps, args.workers)
    mem = "peak GPU memory allocated" if r["device"].startswith("cuda") else "peak RSS"
    print(f"device {r['device']}, split {r['num_db']} db + {r['num_queries']} queries at 320x240, "
          f"EfficientNet-Lite0 + NetVLAD ({r['dim']}-D)")
    print(f"plain extraction pass      {r['plain_s']:8.2f} s   ({r['plain_img_s']:.1f} img/s)")
    print(f"cache refresh (encode+mine) {r['refresh_s']:7.2f} s   "
          f"ratio to plain pass {r['refresh_s'] / r['plain_s']:.2f}x "
          f"(mining {r['mine_s'] * 1000:.0f} ms = {100 * r['mine_s'] / r['refresh_s']:.1f}% of it)")
    print(f"training                   {r['train_q_s']:8.2f} queries/s ({r['step_s']:.2f} s per step of "
          f"{r['images_per_step']} images; decoding them {r['decode_step_s']:.2f} s, overlapped by loader workers)")
    print(f"training step / forward of the same images: "
          f"{r['step_s'] / (r['images_per_step'] / r['plain_img_s']):.2f}x")
    print(f"{mem}: {r['peak_mib']:.0f} MiB (RSS before the steps {r['rss_before_train_mib']:.0f} MiB)")
    print(f"descriptor cache {r['cache_mib']:.1f} MiB vs {r['cache_f64_mib']:.1f} MiB as float64 "
          f"({r['cache_f64_mib'] / r['cache_mib']:.1f}x smaller)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
