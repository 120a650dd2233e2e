"""The trunk cache at a transformer block boundary: DINOv2 ViT-B/14 with blocks 8–11 trainable (SALAD's and
SuperPlace's setting), a cache refresh and a training step with the trunk cache against without it.

ViT-B/14 with random weights (only the timing matters; the pretrained weights need a download), NetVLAD-Linear head
(K = 64, 64 × 128 + 256 = 8448-D), at 224×224 and 322×322, on the CPU. Each measurement runs in a child process of
its own, one after the other in this run, and reports wall and CPU seconds:

* ``refresh``: what the training loop does at a cache refresh — encode the train database and a block of queries
  (JPEG files of the input size), then mine the block — on images (``off``: decode, the whole network) and on the
  trunk cache (``on``: the float16 tokens after block 7 read from the memmap, blocks 8–11 + norm + head); the
  median of ``--reps`` refreshes after a warm-up. ``build`` is the cache's one-off cost;
* ``step``: one optimisation step (SGD, triplet loss) on a batch of 1 query × (1 + 1 + 2) images — the whole model
  on images against the trainable part on their cached tokens — the median of ``--reps`` steps after a warm-up, and
  the step's peak memory: the peak resident set size during the timed steps above the resident size before them
  (the kernel's high-water mark, reset through ``/proc/self/clear_refs``), and the process's absolute peak.

Run: ``python -m bench vit_trunk_cache`` or ``python -m bench.vit_trunk_cache [--quick] [--reps N]``; ``--quick``
uses ViT-S/14 at 56² and 84² (a check that it runs, not figures).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench._data import timed

SIZES = (224, 322)
QUICK_SIZES = (56, 84)
IMAGES = {"db": 16, "queries": 8}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config(size: int, quick: bool):
    from netvlad_core.models import ModelConfig

    return ModelConfig(backbone="dinov2_vits14" if quick else "dinov2_vitb14", weights="none",
                       pooling="netvlad-linear", num_clusters=8 if quick else 64, trainable_blocks=4,
                       input_height=size, input_width=size)


def _refresh(size: int, mode: str, reps: int, quick: bool) -> dict:
    from bench._data import make_bench_split, measure_refreshes
    from netvlad_core.models import build_model

    cfg = _config(size, quick)
    num_db, num_q = (8, 4) if quick else (IMAGES["db"], IMAGES["queries"])
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = make_bench_split(Path(tmp) / "train", num_db, num_q, size, size, name="train", seed=0)
        val_dir = make_bench_split(Path(tmp) / "val", 4, 2, size, size, name="val", seed=1)
        result: dict = {"size": size, "mode": mode, "images": num_db + num_q}
        result.update(measure_refreshes(build_model(cfg).eval(), cfg, train_dir, val_dir, Path(tmp) / "ckpt",
                                        mode=mode, batch_size=8, workers=0, reps=reps))
        plan = result.pop("plan", None)
        if plan is not None:
            result.update(cached_images=len(plan.files), tokens=plan.shape[0],
                          bytes_per_image=plan.nbytes // len(plan.files))
        return result


def _step(size: int, mode: str, reps: int, quick: bool) -> dict:
    from netvlad_core.models import build_model
    from netvlad_core.training import TrainConfig
    from netvlad_core.training.optim import build_optimiser
    from netvlad_core.training.triplet import train_step

    device = torch.device("cpu")
    cfg = _config(size, quick)
    model = build_model(cfg).eval()
    counts = torch.tensor([2])  # 1 query × (1 + 1 + 2)
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tcfg = TrainConfig(lr=1e-4)
    optimizer, _ = build_optimiser(model, tcfg, 1)
    net, batch = model, images
    if mode == "on":
        trunk, part = model.split_trunk()
        with torch.inference_mode():
            tokens = trunk(images)
        net, batch = part, tokens.to(torch.float16).float()  # what the cache stores and a step reads back
    train_step(net, optimizer, None, batch, counts, device, tcfg)  # warm-up (optimiser state allocated)
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times = [timed(lambda: train_step(net, optimizer, None, batch, counts, device, tcfg)) for _ in range(reps)]
    peak = _status_kib("VmHWM")
    return {"size": size, "mode": mode, "batch_images": 4, "step_s": statistics.median(t[0] for t in times),
            "step_cpu_s": statistics.median(t[1] for t in times),
            "step_peak_mib": (peak - rss_before) / 1024 if reset else None,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(task: list) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.vit_trunk_cache", "--child", json.dumps(task)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"bench.vit_trunk_cache: {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, reps: int) -> dict:
    out: dict = {"backbone": "dinov2_vits14" if quick else "dinov2_vitb14", "refresh": {}, "step": {}}
    for size in QUICK_SIZES if quick else SIZES:
        out["refresh"][size] = {mode: _child(["refresh", size, mode, reps, quick]) for mode in ("off", "on")}
        out["step"][size] = {mode: _child(["step", size, mode, reps, quick]) for mode in ("off", "on")}
    return out


def report(r: dict) -> None:
    name = r["backbone"]
    for size, m in r["refresh"].items():
        off, on = m["off"], m["on"]
        print(f"refresh {name} {size}x{size}, blocks 8-11 trainable, {off['images']} images: without "
              f"{off['refresh_s']:6.2f} s ({off['refresh_cpu_s']:6.1f} CPU-s), with the trunk cache "
              f"{on['refresh_s']:6.2f} s ({on['refresh_cpu_s']:6.1f} CPU-s): {on['refresh_s'] / off['refresh_s']:.3f}x "
              f"wall, {on['refresh_cpu_s'] / off['refresh_cpu_s']:.3f}x CPU")
        print(f"  one-off build: {on['cached_images']} images in {on['build_s']:.1f} s ({on['build_cpu_s']:.1f} "
              f"CPU-s); {on['tokens']} tokens per image, {on['bytes_per_image'] / 2**20:.2f} MiB float16")
    for size, m in r["step"].items():
        off, on = m["off"], m["on"]
        mem = ""
        if off["step_peak_mib"] is not None and on["step_peak_mib"]:
            mem = (f"; step peak memory {off['step_peak_mib']:.0f} MiB without, {on['step_peak_mib']:.0f} MiB with "
                   f"({on['step_peak_mib'] / off['step_peak_mib']:.2f}x)")
        print(f"step {name} {size}x{size}, 1 query x (1+1+2) images: without {off['step_s']:.2f} s "
              f"({off['step_cpu_s']:.1f} CPU-s), with the trunk cache {on['step_s']:.2f} s ({on['step_cpu_s']:.1f} "
              f"CPU-s): {on['step_s'] / off['step_s']:.3f}x wall, {on['step_cpu_s'] / off['step_cpu_s']:.3f}x "
              f"CPU{mem}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vit_trunk_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/14 at 56 and 84 px (a check, not figures)")
    parser.add_argument("--reps", type=int, default=3, help="timed refreshes and steps per setting (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.child:
        task = json.loads(args.child)
        fn = _refresh if task[0] == "refresh" else _step
        print(json.dumps(fn(int(task[1]), task[2], int(task[3]), bool(task[4]))))
        return
    r = run(args.quick, args.reps)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
