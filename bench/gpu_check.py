"""The one-shot GPU check's parts (``bench/gpu_check.sh`` runs each under a timeout, then ``--merge``).

Parts, each writing ``<out>/part_<name>.json``:

* ``train``: CUDA bf16-autocast training steps at the paper's settings — VGG16 (random weights: timing only; ImageNet
  weights need a download) cropped at conv5_3, conv5_1–conv5_3 trainable, NetVLAD K = 64, 640×480, a batch of
  4 queries × (1 + 1 + 10) images — on images (the whole model) and on the trunk cache (the trainable part on the
  frozen trunk's float16 activations), steps/s and peak GPU memory of each; and the trunk's throughput (the cache
  build) against the whole model's (a refresh without the cache);
* ``vit``: the same for the trunk cache at a transformer block boundary — DINOv2 ViT-B/14 (random weights), blocks
  8–11 trainable, NetVLAD-Linear (K = 64, 8448-D), at 224×224 and 322×322, a batch of 4 queries × (1 + 1 + 10)
  images, bf16 autocast: a training step on images (the whole model) and on the cached float16 tokens (blocks
  8–11, the norm and the head), steps/s and peak GPU memory of each, and a refresh's forward (the whole model
  against the trainable part on tokens) with its ratio;
* ``features``: the place model's forward throughput (images/s, bf16, batch 16) against the bare backbone's, on
  tensors already on the GPU; and the ``features`` pipeline (decoding JPEGs with loader workers) on a generated split;
* ``search``: exact search at Pitts30k-test scale — 10,000 database × 6,816 queries × 32,768 dimensions, float16
  on the GPU — as blocked matrix products + top-k (torch), in float16 and float32 per block, with the agreement of
  their top-1 and the peak GPU memory. It calls :func:`_gpu_exact_search`, defined here (``netvlad_core.retrieval``
  has no GPU search function at the time of writing; point it at the library's once there is one);
* ``torchrun``: a 1-GPU ``torchrun --standalone --nproc-per-node 1 -m stages.cli train`` of a tiny model on a
  generated split with ``--trunk-cache on``: exit status, wall time, its summary line.

``--device cpu --tiny`` runs every part on the CPU at toy sizes: a check that the script works, not figures.
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
import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "vit", "features", "search", "torchrun")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _timed(fn, reps: int, device: torch.device) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def _vgg(device: torch.device, tiny: bool):
    from netvlad_core.device import prepare_model
    from netvlad_core.models import ModelConfig, build_model

    h, w = (96, 128) if tiny else (480, 640)
    cfg = ModelConfig(backbone="vgg16", weights="none", input_height=h, input_width=w, num_clusters=8 if tiny else 64)
    return prepare_model(build_model(cfg), device).eval(), cfg


def part_train(device: torch.device, tiny: bool, amp: str) -> dict:
    from netvlad_core.device import to_device
    from netvlad_core.training import TrainConfig
    from netvlad_core.training.triplet import train_step

    model, cfg = _vgg(device, tiny)
    trunk, part = model.split_trunk()
    queries, negatives = (1, 2) if tiny else (4, 10)
    counts = torch.tensor([negatives] * queries)
    n = queries * (2 + negatives)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, cfg.input_height, cfg.input_width, generator=g)
    tcfg = TrainConfig(amp=amp)
    params = [p for p in model.parameters() if p.requires_grad]
    reps = 1 if tiny else 5
    out = {"backbone": "vgg16 (random weights)", "input": [cfg.input_width, cfg.input_height],
           "batch": f"{queries} queries x (1+1+{negatives}) = {n} images", "amp": amp}
    from netvlad_core.device import autocast

    with torch.inference_mode(), autocast(device, amp):
        acts = torch.cat([trunk(to_device(images[i:i + 16], device)) for i in range(0, n, 16)])
    cached = acts.to(torch.float16).float().cpu()  # what the cache stores (float16) and a step reads back
    out["activation_shape"] = list(cached.shape[1:])
    for name, net, x in (("images", model, images), ("trunk_cache", part, cached)):
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-3)
        _reset_peak(device)
        step = _timed(lambda: train_step(net, optimizer, None, x, counts, device, tcfg), reps, device)
        out[name] = {"step_s": step, "steps_per_s": 1 / step, "images_per_s": n / step,
                     "peak_gpu_mib": _peak_mib(device)}
    out["step_speedup"] = out["images"]["step_s"] / out["trunk_cache"]["step_s"]
    # a refresh: the whole model's forward (no cache) against the trainable part's (cache); the build: the trunk's
    batch = images[:16].to(device)

    @torch.inference_mode()
    def fwd(m, x):
        with autocast(device, amp):
            m(to_device(x, device))

    act_batch = cached[:16].to(device)
    t_model = _timed(lambda: fwd(model, batch), reps, device)
    t_part = _timed(lambda: fwd(part, act_batch), reps, device)
    t_trunk = _timed(lambda: fwd(trunk, batch), reps, device)
    out["refresh_images_per_s"] = {"whole_model": len(batch) / t_model, "trainable_part_on_cache": len(batch) / t_part,
                                   "trunk_cache_build": len(batch) / t_trunk}
    out["refresh_ratio_with_cache"] = t_part / t_model
    out["cache_bytes_per_image_float16"] = int(np.prod(cached.shape[1:])) * 2
    return out


def part_vit(device: torch.device, tiny: bool, amp: str) -> dict:
    from netvlad_core.device import autocast, prepare_model, to_device
    from netvlad_core.models import ModelConfig, build_model
    from netvlad_core.training import TrainConfig
    from netvlad_core.training.triplet import train_step

    name = "dinov2_vits14" if tiny else "dinov2_vitb14"
    queries, negatives = (1, 1) if tiny else (4, 10)
    n = queries * (2 + negatives)
    counts = torch.tensor([negatives] * queries)
    reps = 1 if tiny else 5
    tcfg = TrainConfig(amp=amp)
    out: dict = {"backbone": f"{name} (random weights), blocks 8-11 trainable, netvlad-linear K={8 if tiny else 64}",
                 "amp": amp,
                 "batch": f"{queries} queries x (1+1+{negatives}) = {n} images"}
    for size in (56, 84) if tiny else (224, 322):
        cfg = ModelConfig(backbone=name, weights="none", pooling="netvlad-linear", num_clusters=8 if tiny else 64,
                          trainable_blocks=4, input_height=size, input_width=size)
        model = prepare_model(build_model(cfg), device).eval()
        trunk, part = model.split_trunk()
        images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), autocast(device, amp):
            tokens = torch.cat([trunk(to_device(images[i:i + 16], device)) for i in range(0, n, 16)])
        cached = tokens.to(torch.float16).float().cpu()  # what the cache stores and a step reads back
        res: dict = {"tokens_per_image": int(cached.shape[1]), "cache_bytes_per_image_float16":
                     int(np.prod(cached.shape[1:])) * 2}
        params = [p for p in model.parameters() if p.requires_grad]
        for label, net, x in (("images", model, images), ("trunk_cache", part, cached)):
            optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-3)
            _reset_peak(device)
            step = _timed(lambda: train_step(net, optimizer, None, x, counts, device, tcfg), reps, device)
            res[label] = {"step_s": step, "images_per_s": n / step, "peak_gpu_mib": _peak_mib(device)}
        res["step_ratio_with_cache"] = res["trunk_cache"]["step_s"] / res["images"]["step_s"]
        if res["images"]["peak_gpu_mib"]:
            res["step_peak_memory_ratio"] = res["trunk_cache"]["peak_gpu_mib"] / res["images"]["peak_gpu_mib"]

        @torch.inference_mode()
        def fwd(m, x):
            with autocast(device, amp):
                m(to_device(x, device))

        batch, token_batch = images[:16].to(device), cached[:16].to(device)
        t_model, t_part = _timed(lambda: fwd(model, batch), reps, device), _timed(lambda: fwd(part, token_batch),
                                                                                   reps, device)
        res["refresh_images_per_s"] = {"whole_model": len(batch) / t_model,
                                       "trainable_part_on_cache": len(batch) / t_part}
        res["refresh_ratio_with_cache"] = t_part / t_model
        out[f"{size}x{size}"] = res
    return out


def part_features(device: torch.device, tiny: bool, amp: str) -> dict:
    from bench._data import make_bench_split
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.device import autocast, to_device
    from netvlad_core.features import FeatureConfig, extract_split_features

    model, cfg = _vgg(device, tiny)
    batch = torch.randn(4 if tiny else 16, 3, cfg.input_height, cfg.input_width).to(device)
    reps = 1 if tiny else 10

    @torch.inference_mode()
    def fwd(m):
        with autocast(device, amp):
            m(to_device(batch, device))

    t_model, t_backbone = _timed(lambda: fwd(model), reps, device), _timed(lambda: fwd(model.backbone), reps, device)
    out = {"model_images_per_s": len(batch) / t_model, "backbone_images_per_s": len(batch) / t_backbone,
           "model_over_backbone_time": t_model / t_backbone}
    with tempfile.TemporaryDirectory() as tmp:
        num = 8 if tiny else 256
        split_dir = make_bench_split(Path(tmp), num, num // 4, cfg.input_width, cfg.input_height)
        split = load_split(split_dir)
        fcfg = FeatureConfig(batch_size=16, num_workers=2 if tiny else min(8, os.cpu_count() or 1), float16=True,
                             amp=amp)
        t = time.perf_counter()
        extract_split_features(model, cfg, split, Path(tmp) / "f.h5", device=device, cfg=fcfg, progress=False)
        _sync(device)
        out["pipeline_images_per_s"] = (split.num_db + split.num_queries) / (time.perf_counter() - t)
        out["pipeline_workers"] = fcfg.num_workers
    return out


def _gpu_exact_search(db: torch.Tensor, q: torch.Tensor, k: int, *, block: int, dtype: torch.dtype,
                      db_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` by squared L2 of float16 rows on the GPU: per block of ``block`` queries, matrix products in
    ``dtype`` against chunks of ``db_chunk`` database rows (converted one chunk at a time, never the whole database),
    ``‖q‖² + ‖d‖² − 2 q·d`` ranked with ``topk``. Returns (squared distances float32, indices int64) on the device."""
    db_sq = torch.cat([db[i:i + db_chunk].float().pow(2).sum(1) for i in range(0, len(db), db_chunk)])
    dists, idx = [], []
    for lo in range(0, len(q), block):
        qb = q[lo:lo + block].to(dtype)
        sims = torch.cat([(qb @ db[i:i + db_chunk].to(dtype).T).float() for i in range(0, len(db), db_chunk)], 1)
        top = torch.topk(db_sq[None, :] - 2 * sims, k, dim=1, largest=False)
        dists.append(top.values + qb.float().pow(2).sum(1, keepdim=True))
        idx.append(top.indices)
    return torch.cat(dists), torch.cat(idx)


def part_search(device: torch.device, tiny: bool, amp: str) -> dict:
    n_db, n_q, dim = (300, 120, 256) if tiny else (10_000, 6_816, 32_768)
    g = torch.Generator(device=device).manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(n_db, dim, device=device, generator=g), dim=1).half()
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, device=device, generator=g), dim=1).half()
    out = {"shape": [n_db, n_q, dim], "storage": "float16", "k": 100}
    results = {}
    for name, dtype, block in (("float16_gemm", torch.float16, 2048), ("float32_gemm", torch.float32, 1024)):
        _reset_peak(device)
        holder = {}

        def go(dtype=dtype, block=block, holder=holder):
            holder["r"] = _gpu_exact_search(db, q, 100, block=block, dtype=dtype)

        seconds = _timed(go, 1 if tiny else 3, device)
        results[name] = holder["r"][1][:, 0].cpu()
        out[name] = {"seconds": seconds, "block": block, "peak_gpu_mib": _peak_mib(device)}
    agree = results["float16_gemm"] == results["float32_gemm"]
    out["top1_agreement_float16_vs_float32"] = float(agree.float().mean())
    # the reference: float64 on the CPU for the first queries
    sub = 32
    ref = torch.cdist(q[:sub].double().cpu(), db.double().cpu()).argmin(1)
    out["top1_matches_float64_first_32"] = float((results["float32_gemm"][:sub] == ref).float().mean())
    out["function"] = "bench.gpu_check._gpu_exact_search (local; netvlad_core.retrieval offers no GPU search yet)"
    return out


def part_torchrun(device: torch.device, tiny: bool, amp: str) -> dict:
    from bench._data import make_bench_split
    from netvlad_core.models import ModelConfig, build_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = make_bench_split(tmp / "train", 24, 8, 64, 48, name="train", seed=0)
        val = make_bench_split(tmp / "val", 12, 4, 64, 48, name="val", seed=1)
        cfg = ModelConfig(backbone="resnet18_layer3", weights="none", trainable_blocks=1, num_clusters=4,
                          input_height=48, input_width=64)
        save_model(tmp / "init.pt", build_model(cfg), cfg)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "stages.cli", "train", "--init-model", str(tmp / "init.pt"), "--train-split", str(train),
               "--val-split", str(val), "--out", str(tmp / "model.pt"), "--live-dir", str(tmp / "live"),
               "--checkpoint-dir", str(tmp / "ckpt"), "--device", device.type, "--no-progress", "--epochs", "1",
               "--batch-size", "2", "--cache-refresh-rate", "4", "--num-negatives", "3",
               "--num-negatives-sampled", "8", "--margin", "3.0", "--encode-batch-size", "4", "--workers", "0",
               "--trunk-cache", "on", "--dist-timeout", "60"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        return {"returncode": proc.returncode, "seconds": time.perf_counter() - t,
                "stdout_tail": proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [],
                "stderr_tail": proc.stderr.strip().splitlines()[-3:], "model_written": (tmp / "model.pt").exists()}


def merge(out: Path, device: str, tiny: bool) -> Path:
    figures = {"device": device, "tiny": tiny}
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name(0)
    figures["torch"] = torch.__version__
    for name in PARTS:
        p = out / f"part_{name}.json"
        figures[name] = json.loads(p.read_text()) if p.is_file() else {"error": "no result (timed out or failed)"}
    target = out / "gpu_check.json"
    target.write_text(json.dumps(figures, indent=1))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--merge", action="store_true", help="merge the parts' JSON into <out>/gpu_check.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a dry run, e.g. with --device cpu)")
    parser.add_argument("--amp", default="bf16")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        print(merge(args.out, args.device, args.tiny))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check: CUDA is not available (use --device cpu --tiny for a dry run)")
    t = time.perf_counter()
    result = globals()[f"part_{args.part}"](device, args.tiny, args.amp)
    result["part_seconds"] = time.perf_counter() - t
    (args.out / f"part_{args.part}.json").write_text(json.dumps(result, indent=1))
    print(f"gpu_check {args.part}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
