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


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    import resource

    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one call of ``fn``."""
    import time

    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def measure_refreshes(model, cfg, train_dir: Path, val_dir: Path, folder: Path, *, mode: str, batch_size: int,
                      workers: int, reps: int) -> dict:
    """Triplet-mining cache refreshes of the train split in ``train_dir`` (its whole database and every query), on
    images (``mode`` off) or on a float16 trunk cache built first into ``folder`` (on): the build's wall and CPU
    seconds and the cache's plan (on), then the median wall and CPU seconds of ``reps`` refreshes after a warm-up."""
    import statistics

    import torch

    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.mining import MiningConfig, empty_negative_cache, mine_triplets
    from netvlad_core.training import encode_into
    from netvlad_core.trunk_cache import build_trunk_cache, cache_identity, encode_cached, plan_trunk_cache

    device = torch.device("cpu")
    split, gt, val = load_split(train_dir), load_ground_truth(train_dir), load_split(val_dir)
    out_dim, block = int(model.out_dim), np.arange(split.num_queries)
    db_cache, mining, result = np.empty((split.num_db, out_dim), np.float32), MiningConfig(), {}
    if mode == "on":
        plan = plan_trunk_cache(model, cfg, split, val, mode="on", dtype="float16", folder=folder, device=device,
                                log=lambda m: None)
        key = cache_identity(plan, cfg, split, val, device=device, amp="bf16")
        holder = {}
        result["build_s"], result["build_cpu_s"] = timed(lambda: holder.update(cache=build_trunk_cache(
            plan, key, model_cfg=cfg, device=device, batch_size=batch_size, num_workers=workers, amp="bf16",
            log=lambda m: None)))
        cache, result["plan"] = holder["cache"], plan

        def encode() -> np.ndarray:
            args = dict(device=device, batch_size=batch_size, amp="bf16")
            encode_cached(plan.part, cache, cache.rows("train_db"), db_cache, **args)
            return encode_cached(plan.part, cache, cache.rows("train_q", block),
                                 np.empty((len(block), out_dim), np.float32), **args)
    else:
        def encode() -> np.ndarray:
            args = dict(model_cfg=cfg, device=device, batch_size=batch_size, num_workers=workers, amp="bf16")
            encode_into(model, split.db_files(), db_cache, **args)
            return encode_into(model, split.query_files(), np.empty((len(block), out_dim), np.float32), **args)

    def refresh() -> None:
        mine_triplets(block, encode(), db_cache, train_positives=gt.train_positives, positives=gt.positives,
                      negative_cache=empty_negative_cache(split.num_queries, mining.num_negatives),
                      rng=np.random.default_rng(0), cfg=mining, device=device)

    refresh()  # warm-up
    times = [timed(refresh) for _ in range(reps)]
    result.update(refresh_s=statistics.median(t[0] for t in times),
                  refresh_cpu_s=statistics.median(t[1] for t in times))
    return result
