"""The places recipe against the paper's triplet recipe: CPU time to reach the triplet recipe's val recall@5 on the
built-in city, same backbone, same initial model, same trunk cache.

Both runs start from the demo's off-the-shelf model (``artifacts/model_offtheshelf.pt``: EfficientNet-Lite0 at
320×240, NetVLAD K = 64) and train on the demo's city (``data/dataset/{train,val}``) with the float16 trunk cache, each
in a child process of its own, one after the other in this run. The triplet run uses params.yaml's demo settings
(SGD lr 0.005, batch 4 × (1 + 1 + 10), 240 queries per epoch, a refresh every 120, 3 epochs); its best val recall@5
is the target. The places run (AdamW, P × K place batches of the split's UTM cells × heading sectors, the
multi-similarity loss and miner) trains until it reaches the target or runs out of epochs. CPU time
(``getrusage`` of the process and its loader workers: robust against other load on the shared machine) is read at
the end of every epoch, after its validation; both include the trunk cache's one-off build.

Needs ``make demo`` first (or ``--dataset`` and ``--init-model``). Run: ``python -m bench places``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIPLET = {"recipe": "triplet", "epochs": 3, "lr": 0.005, "cache_refresh_rate": 120, "max_queries_per_epoch": 240}
PLACES = {"recipe": "places", "epochs": 6, "optimizer": "adamw", "lr": 0.002, "weight_decay": 1e-4,
          "schedule": "linear", "warmup_steps": 10, "final_lr_factor": 0.2,
          "places": {"places_per_batch": 16, "images_per_place": 4, "cell_size_m": 16.0, "heading_sectors": 4}}


def _cpu_s() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def _child(recipe: dict, dataset: Path, init_model: Path, workdir: Path) -> dict:
    """One run: ``train`` with ``recipe``; the CPU seconds and val recall@5 at the end of each epoch."""
    import torch

    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.datasets.places import load_places
    from netvlad_core.models import load_model
    from netvlad_core.training import PlacesConfig, TrainConfig, train
    from netvlad_core.training.stage import apply_trainable_blocks

    places_cfg = PlacesConfig(**recipe.get("places", {}))
    cfg = TrainConfig(**{k: v for k, v in recipe.items() if k != "places"}, places=places_cfg, workers=2,
                      trunk_cache="on", patience=0)
    train_dir, val_dir = dataset / "train", dataset / "val"
    split = load_split(train_dir)
    places = load_places(train_dir, split, cell_size_m=places_cfg.cell_size_m, min_images=places_cfg.images_per_place,
                         heading_sectors=places_cfg.heading_sectors) if cfg.recipe == "places" else None
    model, model_cfg = load_model(init_model)
    model_cfg = apply_trainable_blocks(model, model_cfg, None)
    start, epochs = _cpu_s(), []

    def log(message: str) -> None:
        if message.startswith("train: epoch"):
            epochs.append({"cpu_s": _cpu_s() - start, "recall@5": float(message.split(" = ")[1].split("/")[1][:6])})

    wall = time.perf_counter()
    train(model, model_cfg, split, None if places else load_ground_truth(train_dir), load_split(val_dir),
          load_ground_truth(val_dir), out=workdir / "model.pt", live_dir=workdir / "live",
          checkpoint_dir=workdir / "ckpt", cfg=cfg, device=torch.device("cpu"), progress=False,
          log=log, places=places)
    return {"epochs": epochs, "wall_s": time.perf_counter() - wall,
            "places": places.describe() if places else ""}


def _run_child(recipe: dict, dataset: Path, init_model: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "bench.places", "--child", json.dumps(recipe), str(dataset),
                               str(init_model), tmp], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench.places: the {recipe['recipe']} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(triplet: dict, places: dict) -> None:
    target = max(e["recall@5"] for e in triplet["epochs"])
    t_cpu = next(e["cpu_s"] for e in triplet["epochs"] if e["recall@5"] >= target)
    reached = next((e for e in places["epochs"] if e["recall@5"] >= target), None)
    for name, r in (("triplet", triplet), ("places", places)):
        curve = ", ".join(f"{e['recall@5']:.3f} @ {e['cpu_s']:.0f} CPU-s" for e in r["epochs"])
        print(f"{name:8s} val recall@5 per epoch: {curve} (wall {r['wall_s']:.0f} s)")
    print(f"places: {places['places']}")
    print(f"target (the triplet recipe's best val recall@5): {target:.3f}, reached by triplet after {t_cpu:.0f} CPU-s")
    if reached is None:
        print(f"places did not reach it in {len(places['epochs'])} epochs ({places['epochs'][-1]['cpu_s']:.0f} CPU-s)")
    else:
        print(f"places reached it after {reached['cpu_s']:.0f} CPU-s: {t_cpu / reached['cpu_s']:.2f}x less CPU time "
              f"than triplet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.places", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=REPO / "data" / "dataset")
    parser.add_argument("--init-model", type=Path, default=REPO / "artifacts" / "model_offtheshelf.pt")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.child:
        recipe, dataset, init_model, workdir = args.child
        print(json.dumps(_child(json.loads(recipe), Path(dataset), Path(init_model), Path(workdir))))
        return
    if not (args.dataset / "train").is_dir() or not args.init_model.is_file():
        print(f"bench.places: skipped: needs the city ({args.dataset}) and the off-the-shelf model "
              f"({args.init_model}): run `make demo` first")
        return
    report(_run_child(TRIPLET, args.dataset, args.init_model), _run_child(PLACES, args.dataset, args.init_model))


if __name__ == "__main__":
    main(sys.argv[1:])
