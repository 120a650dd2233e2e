"""The benchmark suite: one split per benchmark, every model evaluated on each, and one table of the results.

params.yaml ``benchmarks:`` maps a name to the options of ``download`` (dataset, image root, split, …). dvc.yaml
turns each into ``data/bench/<name>/`` (:func:`write_benchmark_split`: the split folder ``split/``, plus the rendered
images for the built-in city), extracts features of it with every model and evaluates them into
``metrics/bench/<model>/<name>.json`` (with ``<name>/`` beside it holding the recall curve, per-query CSV and
settings). :mod:`netvlad_core.bench_table` gathers those metrics files into one models × benchmarks table.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Callable

from .errors import NetVLADError, NetVLADWarning
from .io import atomic_path, read_json

#: The split folder inside a benchmark's folder (``data/bench/<name>/split``).
SPLIT_FOLDER = "split"
MSLS_WORDS = ("msls", "mapillary")


def write_benchmark_split(out_dir: str | os.PathLike, *, cfg, city, progress: bool = True,
                          log: Callable[[str], None] = print, notice: Callable[[str], None] | None = None) -> Path:
    """Benchmark ``out_dir.name``: the one split of dataset ``cfg`` (a ``DownloadConfig``; ``cfg.split`` names it,
    else the dataset's benchmark split: test, msls val) written as ``out_dir/split/`` (manifest, split.json, ground
    truth), all or nothing. The built-in city (``cfg.dataset`` synthetic, sized by ``city``) keeps its rendered
    images in ``out_dir/raw/``; downloads are kept in ``cfg.cache_dir`` (default: ``.netvlad_cache`` beside
    ``out_dir``). A benchmark named after MSLS that is not read with the official protocol (``--dataset msls``) is
    warned about. Returns the split folder."""
    from .datasets.official import default_cache_dir, get_dataset, write_dataset

    out_dir = Path(out_dir)
    info = get_dataset(cfg.dataset)
    if len(cfg.split) > 1:
        raise NetVLADError(f"benchmark {out_dir.name}: one split per benchmark, got {', '.join(cfg.split)}")
    split_name = cfg.split[0] if cfg.split else info.benchmark_split
    if split_name not in info.split_names:
        raise NetVLADError(f"benchmark {out_dir.name}: dataset {info.name} has no split {split_name!r} (valid: "
                           f"{', '.join(info.split_names)})")
    if any(w in out_dir.name.lower() for w in MSLS_WORDS) and info.name != "msls":
        warnings.warn(f"benchmark {out_dir.name}: read as dataset {info.name}, not with MSLS's official protocol "
                      f"(--dataset msls: val = cph + sf, 740 queries); its recall is not comparable with papers' "
                      f"MSLS-val figures", NetVLADWarning)
    cache = cfg.cache_dir or str(default_cache_dir(out_dir))
    one = dataclasses.replace(cfg, split=[split_name], cache_dir=cache)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_dataset(tmp, cfg=one, city=city, progress=progress, log=lambda line: None, notice=notice)
        os.replace(tmp / split_name, tmp / SPLIT_FOLDER)  # a sibling: an image root relative to it stays valid
    split_dir = out_dir / SPLIT_FOLDER
    meta = read_json(split_dir / "split.json")
    log(f"bench-split {out_dir.name}: {meta['dataset']} {meta['split']}, {meta['num_db']} database images, "
        f"{meta['num_queries']} queries → {split_dir}")
    return split_dir
