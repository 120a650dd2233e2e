"""Exact search at the Pitts30k-test geometry: ``retrieval.exact_search`` on float16 storage against a plain
numpy float32 matmul of the same shape.

Default shape: 10,000 database × 6,816 queries × 32,768-D (Pitts30k test, VGG16 + NetVLAD K=64), k = 100 (what
``evaluate`` asks for with recall@100). Each variant runs in its own child process, which generates the same
L2-normalised random descriptors (rounded to float16) block by block, so that neither the other variant's arrays
nor any generation temporary count against its peak RSS (``VmHWM`` of the child):

* ``exact_search (f16 in RAM)``: float16 ``db`` and ``queries`` in memory (655 MB + 447 MB at full scale), searched by
  :func:`netvlad_core.retrieval.exact_search` on ``--device`` (blocks upcast to float32; top-k merged per block);
* ``exact_search (f16 HDF5)``: the same, reading both from an HDF5 file in a temporary folder, as ``evaluate``
  does (only blocks are ever in memory);
* ``numpy float32 matmul``: the same values stored as float32, the time of ``q32 @ db32.T`` alone (no norms, no
  top-k, no conversion) — the speed of a plain float32 GEMM of this size on this machine;
* with ``--faiss``, also the previous exact path, a faiss ``IndexFlatL2`` holding the database as float32, fed
  float32 query batches of 1024 (the time includes building the index from the float16 rows).

Times are the median of ``--reps`` runs inside each child (after one untimed warm-up run at ``--scale`` < 1);
``--rounds`` runs every variant's child that many times in turn, so that the ratios of one round are measured
side by side on a loaded machine. "Before search" is the peak RSS once the imports (torch: about 0.6 GB) and the
inputs are in, "search adds" the rest of the peak; the
top-1 matches of the first 256 queries of every variant are compared with the numpy ones. Goals (issue 15):
exact_search within 1.5× the numpy matmul time, its peak RSS under 2 GB.

Run: ``python -m bench search`` (full scale, a few minutes on 2 cores) or ``python -m bench search --scale 0.1``
(both counts × 0.1, same dimension: a quick check); ``python -m bench.search --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_DB, NUM_Q, DIM, K = 10_000, 6_816, 32_768, 100
GOALS = {"time_ratio": 1.5, "peak_rss_gb": 2.0}
CHECKED_QUERIES = 256


def row_chunks(n: int, dim: int, seed: int, chunk: int = 64):
    """``(start, rows)``: ``n`` L2-normalised Gaussian rows rounded to float16, ``chunk`` at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        rows = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield start, rows.astype(np.float16)


def make_rows(n: int, dim: int, dtype, seed: int, out=None):
    """The rows of :func:`row_chunks` stored as ``dtype`` in a new array, or written into ``out`` (e.g. an h5py
    dataset); the only large allocation is the result."""
    out = np.empty((n, dim), dtype=dtype) if out is None else out
    for start, rows in row_chunks(n, dim, seed):
        out[start:start + len(rows)] = rows.astype(dtype)
    return out


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process (``VmHWM`` in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _timed(fn, reps: int, warmup: bool) -> tuple[float, object]:
    if warmup:
        fn()
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def child(variant: str, num_db: int, num_q: int, dim: int, k: int, reps: int, device: str, block_rows: int,
          query_rows: int) -> dict:
    """Run one variant in this (child) process; returns its figures."""
    dtype = np.float32 if variant == "numpy" else np.float16
    if variant == "exact_search_h5":
        import tempfile

        import h5py

        tmp = tempfile.TemporaryDirectory(prefix="bench_search_")
        with h5py.File(Path(tmp.name) / "features.h5", "w") as h5:
            make_rows(num_db, dim, dtype, seed=1, out=h5.create_dataset("db", (num_db, dim), dtype=dtype))
            make_rows(num_q, dim, dtype, seed=2, out=h5.create_dataset("query", (num_q, dim), dtype=dtype))
        h5 = h5py.File(Path(tmp.name) / "features.h5", "r")
        db, q = h5["db"], h5["query"]
    else:
        db = make_rows(num_db, dim, dtype, seed=1)
        q = make_rows(num_q, dim, dtype, seed=2)
    data_rss = vm_hwm_bytes()
    warmup = num_db * num_q < NUM_DB * NUM_Q / 4  # a full-scale run is long enough to need none
    if variant == "numpy":
        seconds, product = _timed(lambda: q @ db.T, reps, warmup)
        checked = product[:CHECKED_QUERIES]
        top1 = np.argmin(np.einsum("ij,ij->i", db, db)[None, :] - 2.0 * checked, axis=1)
    elif variant in ("exact_search", "exact_search_h5"):
        from netvlad_core.retrieval import exact_search

        seconds, (_, idx) = _timed(lambda: exact_search(db, q, k, device=device, block_rows=block_rows,
                                                        query_rows=query_rows), reps, warmup)
        top1 = idx[:CHECKED_QUERIES, 0]
    elif variant == "faiss":
        import faiss

        def run():
            index = faiss.IndexFlatL2(dim)
            for start in range(0, num_db, 1024):
                index.add(db[start:start + 1024].astype(np.float32))
            return np.concatenate([index.search(q[s:s + 1024].astype(np.float32), k)[1]
                                   for s in range(0, num_q, 1024)])
        seconds, idx = _timed(run, reps, warmup)
        top1 = idx[:CHECKED_QUERIES, 0]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    import torch

    return {"seconds": seconds, "peak_rss": vm_hwm_bytes(), "data_rss": data_rss, "top1": top1.tolist(),
            "threads": torch.get_num_threads()}


def _run_child(variant: str, args: argparse.Namespace, shape: tuple[int, int, int]) -> dict:
    cmd = [sys.executable, "-m", "bench.search", "--child", variant, "--num-db", str(shape[0]), "--num-q",
           str(shape[1]), "--dim", str(shape[2]), "--k", str(args.k), "--reps", str(args.reps), "--device",
           args.device, "--block-rows", str(args.block_rows), "--query-rows", str(args.query_rows)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.search child {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    shape = (max(1, round(NUM_DB * args.scale)), max(1, round(NUM_Q * args.scale)), args.dim)
    gflop = 2.0 * shape[0] * shape[1] * shape[2] / 1e9
    print(f"exact search: {shape[0]} db × {shape[1]} queries × {shape[2]}-D, k={args.k}, float16 storage, "
          f"device {args.device}, blocks of {args.block_rows} db rows × {args.query_rows} queries; median of "
          f"{args.reps} run(s) per child process, {args.rounds} round(s) of the variants in turn; load average "
          f"before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    variants = ["exact_search", "exact_search_h5", "numpy"] + (["faiss"] if args.faiss else [])
    names = {"exact_search": "exact_search (f16 in RAM)", "exact_search_h5": "exact_search (f16 HDF5)",
             "numpy": "numpy float32 matmul", "faiss": "faiss IndexFlatL2 (before)"}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"{'round':<6}{'variant':<28}{'seconds':>9}{'GFLOP/s':>9}{'peak RSS GB':>13}{'before search GB':>18}"
          f"{'search adds GB':>16}{'top-1 agree':>13}", flush=True)
    for round_ in range(args.rounds):
        for v in variants:
            results[v].append(_run_child(v, args, shape))
        reference = np.asarray(results["numpy"][-1]["top1"])
        for v in variants:
            r = results[v][-1]
            agree = float(np.mean(np.asarray(r["top1"]) == reference))
            print(f"{round_ + 1:<6}{names[v]:<28}{r['seconds']:>9.2f}{gflop / r['seconds']:>9.0f}"
                  f"{r['peak_rss'] / 1e9:>13.2f}{r['data_rss'] / 1e9:>18.2f}"
                  f"{(r['peak_rss'] - r['data_rss']) / 1e9:>16.2f}{agree:>13.3f}", flush=True)

    def ratios(v: str) -> list[float]:
        return [a["seconds"] / b["seconds"] for a, b in zip(results[v], results["numpy"])]

    ram, h5 = ratios("exact_search"), ratios("exact_search_h5")
    rss = {v: max(r["peak_rss"] for r in results[v]) / 1e9 for v in variants}
    print(f"exact_search / numpy float32 matmul, per round: in RAM {', '.join(f'{x:.2f}' for x in ram)}×, "
          f"from HDF5 {', '.join(f'{x:.2f}' for x in h5)}× (torch threads {results['exact_search'][0]['threads']})")
    print(f"peak RSS: exact_search {rss['exact_search']:.2f} GB in RAM, {rss['exact_search_h5']:.2f} GB from HDF5; "
          f"numpy float32 matmul {rss['numpy']:.2f} GB")
    if args.faiss:
        faiss_ratio = statistics.median(a["seconds"] / b["seconds"]
                                        for a, b in zip(results["faiss"], results["exact_search"]))
        print(f"faiss IndexFlatL2 / exact_search (in RAM): {faiss_ratio:.2f}× the time, "
              f"{rss['faiss'] / rss['exact_search']:.2f}× the peak RSS")
    worst = max(statistics.median(ram), statistics.median(h5))
    ok = worst <= GOALS["time_ratio"] and max(rss["exact_search"], rss["exact_search_h5"]) < GOALS["peak_rss_gb"]
    print(f"goals (median ratio <= {GOALS['time_ratio']}× the numpy matmul time, peak RSS < "
          f"{GOALS['peak_rss_gb']:.0f} GB{'' if args.scale == 1 else '; set for --scale 1'}): "
          f"{'met' if ok else 'NOT met'}")
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the database and query counts (not D)")
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--reps", type=int, default=1, help="timed runs per child process (median)")
    ap.add_argument("--rounds", type=int, default=1, help="child processes per variant, the variants in turn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-rows", type=int, default=512, help="database rows per block")
    ap.add_argument("--query-rows", type=int, default=1024, help="queries per block (evaluate's batch-size)")
    ap.add_argument("--faiss", action="store_true", help="also time the previous path (faiss IndexFlatL2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--num-db", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--num-q", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv or [])
    if args.child:
        print(json.dumps(child(args.child, args.num_db, args.num_q, args.dim, args.k, args.reps, args.device,
                               args.block_rows, args.query_rows)))
    else:
        run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
