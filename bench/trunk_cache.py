"""The frozen-trunk activation cache: a cache refresh and one training epoch with it against without it.

Each measurement runs in a child process of its own (so that each has its own peak RSS, ``ru_maxrss``), one after
the other in this run, and reports wall seconds and CPU seconds (``getrusage`` of the process and its DataLoader
workers: robust against other load on the machine, which stretches wall time but not CPU time):

* ``refresh``: what the training loop does at a cache refresh — encode the train database and a block of queries
  (then mine the block) — on images (``off``) and on the trunk cache (``on``: only the trainable part runs, no image
  is decoded), for EfficientNet-Lite0 (ImageNet weights, the demo's freeze boundary: its last stage trains) and
  VGG16 (random weights: only the timing matters; conv5_1–conv5_3 train) at 320×240, NetVLAD K = 64; the median of
  ``--reps`` interleaved refreshes after a warm-up. ``build`` is the cache's one-off cost (every image through the
  trunk once);
* ``epoch``: :func:`netvlad_core.training.train` for one epoch at the demo settings (EfficientNet-Lite0,
  120 queries per epoch and per refresh, batch 4 × (1 + 1 + 10), validation) on a generated split of the built-in
  city's size (1,344 + 400 train, 380 + 150 val images), ``trunk-cache off`` against ``on``; the ``on`` epoch
  reuses a cache built by a first run (its build is reported apart: it is paid once per run, not per epoch).

Run: ``python -m bench trunk_cache`` or ``python -m bench.trunk_cache [--quick] [--only refresh|epoch]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench._data import timed

BACKBONES = {"efficientnet_lite0": {"weights": "imagenet", "db": 240, "queries": 60},
             "vgg16": {"weights": "none", "db": 64, "queries": 16}}
DEMO = {"train_db": 1344, "train_q": 400, "val_db": 380, "val_q": 150, "queries": 120}
QUICK = {"train_db": 48, "train_q": 16, "val_db": 24, "val_q": 8, "queries": 8}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _splits(root: Path, sizes: dict) -> tuple[Path, Path]:
    from bench._data import make_bench_split

    train = make_bench_split(root / "train", sizes["train_db"], sizes["train_q"], 320, 240, name="train", seed=0)
    val = make_bench_split(root / "val", sizes["val_db"], sizes["val_q"], 320, 240, name="val", seed=1)
    return train, val


def _refresh(backbone: str, mode: str, reps: int, quick: bool, workers: int) -> dict:
    """One child's measurement: refreshes of one backbone, on images or on the trunk cache."""
    from bench._data import measure_refreshes
    from netvlad_core.device import prepare_model
    from netvlad_core.models import ModelConfig, build_model

    spec = BACKBONES[backbone]
    num_db, num_q = (16, 8) if quick else (spec["db"], spec["queries"])
    cfg = ModelConfig(backbone=backbone, weights=spec["weights"], input_height=240, input_width=320)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir = _splits(Path(tmp), {"train_db": num_db, "train_q": num_q, "val_db": 4, "val_q": 2})
        model = prepare_model(build_model(cfg), torch.device("cpu")).eval()
        result = {"backbone": backbone, "mode": mode, "images": num_db + num_q}
        result.update(measure_refreshes(model, cfg, train_dir, val_dir, Path(tmp) / "ckpt", mode=mode, batch_size=16,
                                        workers=workers, reps=reps))
        plan = result.pop("plan", None)
        if plan is not None:
            result.update(build_img_s=len(plan.files) / result["build_s"], cache_mib=plan.nbytes / 2**20,
                          cached_images=len(plan.files))
        result["peak_rss_mib"] = _peak_rss_mib()
        return result


def _epoch(mode: str, quick: bool, workers: int, root: Path) -> dict:
    """One child's measurement: ``train`` for one demo epoch, on images (``off``) or on the trunk cache (``on``:
    a first run builds and keeps the cache, the timed second run reuses it)."""
    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.models import ModelConfig, build_model
    from netvlad_core.training import TrainConfig, train

    sizes = QUICK if quick else DEMO
    data = root / "data"
    if not data.exists():
        _splits(data, sizes)
    train_dir, val_dir = data / "train" / "split", data / "val" / "split"
    splits = (load_split(train_dir), load_ground_truth(train_dir), load_split(val_dir), load_ground_truth(val_dir))
    model_cfg = ModelConfig(backbone="efficientnet_lite0", input_height=240, input_width=320)
    cfg = TrainConfig(epochs=1, lr=0.01, cache_refresh_rate=sizes["queries"], max_queries_per_epoch=sizes["queries"],
                      workers=workers, trunk_cache=mode, keep_trunk_cache=True)
    result: dict = {"mode": mode, **sizes}

    def run(name: str) -> None:
        torch.manual_seed(0)
        model = build_model(model_cfg)
        train(model, model_cfg, *splits, out=root / name / "model.pt", live_dir=root / name / "live",
              checkpoint_dir=root / f"ckpt_{mode}", cfg=cfg, device=torch.device("cpu"), progress=False,
              log=lambda m: None)

    if mode == "on":
        wall, cpu = timed(lambda: run("build"))
        result.update(build_and_epoch_s=wall, build_and_epoch_cpu_s=cpu)
    wall, cpu = timed(lambda: run(f"epoch_{mode}"))
    result.update(epoch_s=wall, epoch_cpu_s=cpu, peak_rss_mib=_peak_rss_mib())
    return result


def _child(task: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.trunk_cache", "--child", json.dumps(task)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"bench.trunk_cache: {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, reps: int, workers: int, only: str | None) -> dict:
    out: dict = {"refresh": {}, "epoch": {}}
    if only in (None, "refresh"):
        for backbone in BACKBONES:
            out["refresh"][backbone] = {mode: _child(["refresh", backbone, mode, str(reps), str(int(quick)),
                                                      str(workers)]) for mode in ("off", "on")}
    if only in (None, "epoch"):
        with tempfile.TemporaryDirectory() as tmp:
            out["epoch"] = {mode: _child(["epoch", mode, str(int(quick)), str(workers), tmp]) for mode in ("off", "on")}
    return out


def report(r: dict) -> None:
    for backbone, m in r["refresh"].items():
        off, on = m["off"], m["on"]
        print(f"refresh {backbone:18s} {off['images']} images at 320x240: without {off['refresh_s']:6.2f} s "
              f"({off['refresh_cpu_s']:6.1f} CPU-s, peak RSS {off['peak_rss_mib']:.0f} MiB), with the trunk cache "
              f"{on['refresh_s']:6.2f} s ({on['refresh_cpu_s']:6.1f} CPU-s, peak RSS {on['peak_rss_mib']:.0f} MiB): "
              f"{on['refresh_s'] / off['refresh_s']:.3f}x wall, {on['refresh_cpu_s'] / off['refresh_cpu_s']:.3f}x CPU")
        print(f"  one-off build of its cache: {on['cached_images']} images in {on['build_s']:.1f} s "
              f"({on['build_img_s']:.1f} img/s, {on['build_cpu_s']:.1f} CPU-s), {on['cache_mib']:.1f} MiB float16")
    if r["epoch"]:
        off, on = r["epoch"]["off"], r["epoch"]["on"]
        print(f"one demo epoch (EfficientNet-Lite0, {off['queries']} queries, {off['train_db']}+{off['train_q']} "
              f"train / {off['val_db']}+{off['val_q']} val images): without {off['epoch_s']:.1f} s "
              f"({off['epoch_cpu_s']:.1f} CPU-s, peak RSS {off['peak_rss_mib']:.0f} MiB), with the trunk cache "
              f"{on['epoch_s']:.1f} s ({on['epoch_cpu_s']:.1f} CPU-s, peak RSS {on['peak_rss_mib']:.0f} MiB): "
              f"{off['epoch_s'] / on['epoch_s']:.2f}x faster wall, {off['epoch_cpu_s'] / on['epoch_cpu_s']:.2f}x CPU")
        build = on["build_and_epoch_s"] - on["epoch_s"]
        build_cpu = on["build_and_epoch_cpu_s"] - on["epoch_cpu_s"]
        print(f"  the cache's one-off build: {build:.1f} s ({build_cpu:.1f} CPU-s); build + first epoch "
              f"{on['build_and_epoch_s']:.1f} s = {off['epoch_s'] / on['build_and_epoch_s']:.2f}x faster than one "
              f"epoch without")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trunk_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny splits (a check that it runs, not figures)")
    parser.add_argument("--reps", type=int, default=2, help="timed refreshes per setting (median)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (as the demo)")
    parser.add_argument("--only", choices=("refresh", "epoch"), help="run one of the two measurements")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.child:
        task = json.loads(args.child)
        if task[0] == "refresh":
            result = _refresh(task[1], task[2], int(task[3]), bool(int(task[4])), int(task[5]))
        else:
            result = _epoch(task[1], bool(int(task[2])), int(task[3]), Path(task[4]))
        print(json.dumps(result))
        return
    r = run(args.quick, args.reps, args.workers, args.only)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
