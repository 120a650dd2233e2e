"""NetVLAD layer: the vectorised aggregation against the two forms the public ports use.

* ``vectorised``: ``netvlad_core.models.NetVLAD`` — ``V = A·Xᵀ − (ΣA)·C``, one batched matmul.
* ``per-cluster loop``: the old PyTorch port's loop over clusters, as the seed document writes it.
* ``broadcast``: the N×K×D×HW residual tensor of the original lyakaap/NetVLAD-pytorch layer.

Measured in one warmed-up process on the same weights and input (K=64, D=512, 30×40 map, batch 4): the median time
of several runs for forward (no grad) and forward+backward, and the bytes autograd keeps for backward (unique
storages of the tensors packed by ``torch.autograd.graph.saved_tensors_hooks``).

Run: ``python -m bench netvlad_layer`` or ``python -m bench.netvlad_layer [--reps 5] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from netvlad_core.models import NetVLAD

GOALS = {"saved": 20.0, "fwd_bwd": 5.0, "fwd": 3.0}  # vectorised must beat the loop (and broadcast, for saved) by


def loop_forward(layer: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """The per-cluster loop of the old PyTorch port (seed document), same parameters as ``layer``."""
    N, C = x.shape[:2]
    if layer.normalize_input:
        x = F.normalize(x, p=2, dim=1)
    soft_assign = layer.conv(x).view(N, layer.num_clusters, -1)
    soft_assign = F.softmax(soft_assign, dim=1)
    x_flatten = x.view(N, C, -1)
    vlad = torch.zeros([N, layer.num_clusters, C], dtype=x.dtype, layout=x.layout, device=x.device)
    for k in range(layer.num_clusters):
        residual = x_flatten.unsqueeze(0).permute(1, 0, 2, 3) - \
            layer.centroids[k:k + 1, :].expand(x_flatten.size(-1), -1, -1).permute(1, 2, 0).unsqueeze(0)
        residual *= soft_assign[:, k:k + 1, :].unsqueeze(2)
        vlad[:, k:k + 1, :] = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)
    vlad = vlad.view(x.size(0), -1)
    return F.normalize(vlad, p=2, dim=1)


def broadcast_forward(layer: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """The broadcast N×K×D×HW residual of the original NetVLAD-pytorch layer, same parameters as ``layer``."""
    N, C = x.shape[:2]
    if layer.normalize_input:
        x = F.normalize(x, p=2, dim=1)
    soft_assign = F.softmax(layer.conv(x).view(N, layer.num_clusters, -1), dim=1)
    x_flatten = x.view(N, C, -1)
    residual = x_flatten.expand(layer.num_clusters, -1, -1, -1).permute(1, 0, 2, 3) - \
        layer.centroids.expand(x_flatten.size(-1), -1, -1).permute(1, 2, 0).unsqueeze(0)
    residual *= soft_assign.unsqueeze(2)
    vlad = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)
    vlad = vlad.view(x.size(0), -1)
    return F.normalize(vlad, p=2, dim=1)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(reps: int = 5, device: str = "cpu", num_clusters: int = 64, dim: int = 512, height: int = 30,
        width: int = 40, batch: int = 4, seed: int = 0) -> dict[str, dict[str, float]]:
    """Measure the three variants; returns ``{variant: {"fwd_s", "fwd_bwd_s", "saved_bytes"}}`` and prints a table."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    layer = NetVLAD(num_clusters, dim)
    descriptors = F.normalize(torch.randn(20 * num_clusters, dim, generator=gen), dim=1)
    layer.init_params(descriptors[torch.randperm(len(descriptors), generator=gen)[:num_clusters]].numpy(),
                      descriptors.numpy())
    layer.to(dev)
    x = torch.randn(batch, dim, height, width, generator=gen).to(dev).requires_grad_(True)
    upstream = torch.randn(batch, num_clusters * dim, generator=gen).to(dev)
    variants = {"vectorised": layer.forward,
                "per-cluster loop": lambda t: loop_forward(layer, t),
                "broadcast": lambda t: broadcast_forward(layer, t)}

    with torch.no_grad():
        reference = layer(x)
        for name, fn in variants.items():
            diff = (fn(x) - reference).abs().max().item()
            if diff > 1e-4:
                raise AssertionError(f"{name} differs from the vectorised layer by {diff:.2e}")

    def fwd(fn):
        def go():
            with torch.no_grad():
                return fn(x)
        return go

    def fwd_bwd(fn):
        def go():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            (fn(x) * upstream).sum().backward()
        return go

    results: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        results[name] = {
            "fwd_s": median_seconds(fwd(fn), reps, dev),
            "fwd_bwd_s": median_seconds(fwd_bwd(fn), reps, dev),
            "saved_bytes": float(saved_bytes(lambda: fn(x))),
        }

    threads = torch.get_num_threads() if dev.type == "cpu" else None
    print(f"NetVLAD layer: K={num_clusters}, D={dim}, {height}×{width} map, batch {batch}, float32 on {dev}"
          + (f" ({threads} threads)" if threads else "") + f"; median of {reps} runs after a warm-up")
    print(f"{'variant':<18}{'forward ms':>12}{'fwd+bwd ms':>12}{'saved for backward MB':>24}")
    for name, r in results.items():
        print(f"{name:<18}{r['fwd_s'] * 1e3:>12.1f}{r['fwd_bwd_s'] * 1e3:>12.1f}{r['saved_bytes'] / 2**20:>24.1f}")
    vec = results["vectorised"]
    ok = True
    for name in ("per-cluster loop", "broadcast"):
        other = results[name]
        ratios = {"fwd": other["fwd_s"] / vec["fwd_s"], "fwd_bwd": other["fwd_bwd_s"] / vec["fwd_bwd_s"],
                  "saved": other["saved_bytes"] / vec["saved_bytes"]}
        print(f"{name} / vectorised: forward {ratios['fwd']:.1f}x slower, fwd+bwd {ratios['fwd_bwd']:.1f}x slower, "
              f"{ratios['saved']:.1f}x the saved bytes")
        ok &= ratios["saved"] >= GOALS["saved"]
        if name == "per-cluster loop":
            ok &= ratios["fwd"] >= GOALS["fwd"] and ratios["fwd_bwd"] >= GOALS["fwd_bwd"]
    print(f"goals (>= {GOALS['saved']:.0f}x fewer saved bytes than both; >= {GOALS['fwd_bwd']:.0f}x fwd+bwd and "
          f">= {GOALS['fwd']:.0f}x forward vs the loop): {'met' if ok else 'NOT met'}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args, _ = parser.parse_known_args()
    run(reps=args.reps, device=args.device)


if __name__ == "__main__":
    main()
