"""Local-descriptor sampling and faiss k-means: the inputs of the NetVLAD layer's initialisation."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import option
from .datasets.manifest import Split
from .device import autocast, prepare_model, to_device
from .distributed import DistContext, barrier, gather_batch, num_rounds, pad_rounds, shard_indices
from .errors import NetVLADError, NetVLADWarning
from .io import atomic_h5, atomic_path, open_h5_for_reading, require_file
from .models.build import ModelConfig


@dataclass
class SampleConfig:
    """Which local descriptors ``sample`` draws for k-means."""

    num_descriptors: int = option(50_000, "Total number of local descriptors to sample.")
    per_image: int = option(100, "Descriptors sampled per image (at most the feature-map locations).")
    seed: int = option(0, "Seed for choosing images and locations, and of the backbone's random initialisation "
                       "with weights none (recorded in the model config as init_seed).")
    batch_size: int = option(16, "Images per forward pass.")
    num_workers: int = option(2, "DataLoader worker processes for decoding images.", name="workers")

    def validate(self) -> None:
        if self.num_descriptors < 1:
            raise NetVLADError(f"num-descriptors must be >= 1, got {self.num_descriptors}")
        if self.per_image < 1:
            raise NetVLADError(f"per-image must be >= 1, got {self.per_image}")
        if self.batch_size < 1:
            raise NetVLADError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise NetVLADError(f"workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2**63:
            raise NetVLADError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed}")


@dataclass
class KMeansConfig:
    """How ``kmeans`` clusters the sample (K itself is the model's ``num_clusters``)."""

    iterations: int = option(100, "k-means iterations.")
    seed: int = option(0, "k-means seed.")

    def validate(self) -> None:
        if self.iterations < 1:
            raise NetVLADError(f"iterations must be >= 1, got {self.iterations}")


def choose_images(num_db: int, num_images: int, seed: int) -> np.ndarray:
    """``num_images`` distinct database indices drawn with ``seed``, sorted (for sequential reads)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_db, size=min(num_images, num_db), replace=False))


def plan_locations(num_images: int, per_image: int, total: int, locations: int, seed: int
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which feature-map locations each chosen image contributes: ``(offsets, picks)`` where image ``j``'s
    ``len(picks[j])`` descriptors go to rows ``offsets[j]…`` of the sample. Drawn with ``seed`` image by image in
    order (``per_image`` each, the last image fewer so the sample has ``total`` rows), so every rank of a
    distributed run computes the same plan whatever images it encodes."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros(num_images, dtype=np.int64)
    picks: list[np.ndarray] = []
    filled = 0
    for j in range(num_images):
        take = min(per_image, total - filled)
        offsets[j] = filled
        picks.append(rng.choice(locations, size=take, replace=False) if take > 0 else np.zeros(0, np.int64))
        filled += max(take, 0)
    return offsets, picks


@torch.no_grad()
def sample_descriptors(model, model_cfg: ModelConfig, split: Split, out_h5: str | os.PathLike, *,
                       device: torch.device, cfg: SampleConfig, progress: bool = True,
                       dist: DistContext | None = None) -> Path:
    """Sample ``cfg.num_descriptors`` local descriptors, ``cfg.per_image`` per image, from randomly chosen
    database images of ``split``; descriptors are L2-normalised as the NetVLAD layer sees them.

    Writes ``descriptors`` (float32, M × D) and ``image_indices`` (M,) to ``out_h5`` with the config recorded.
    Under torchrun (``dist`` with several processes) each rank encodes its blocks of the chosen images, the
    sampled rows are gathered, and rank 0 alone writes the same file a single process would.
    """
    from tqdm import tqdm

    from .features import image_loader
    from .io import distinct_paths

    cfg.validate()
    distinct_paths({}, {"--out": out_h5})
    h, w = model_cfg.input_height, model_cfg.input_width
    model = prepare_model(model, device).eval()
    with torch.inference_mode():
        probe = model.local_descriptors(torch.zeros(1, 3, h, w, device=device))
    dim, locations = int(probe.shape[1]), int(probe.shape[2] * probe.shape[3])
    per_image = cfg.per_image
    if per_image > locations:
        warnings.warn(f"per-image {per_image} exceeds the {probe.shape[2]}×{probe.shape[3]} = {locations} feature-map "
                      f"locations at {w}×{h}; sampling {locations} per image and more images instead",
                      NetVLADWarning)
        per_image = locations
    wanted_images = math.ceil(cfg.num_descriptors / per_image)
    if split.num_db == 0:
        raise NetVLADError(f"split {split.name!r} has no database images to sample from")
    chosen = choose_images(split.num_db, wanted_images, cfg.seed)
    total = min(cfg.num_descriptors, len(chosen) * per_image)
    if total < cfg.num_descriptors:
        warnings.warn(f"only {len(chosen)} database images: sampling {total} descriptors instead of "
                      f"{cfg.num_descriptors}", NetVLADWarning)
    files = [split.db_files()[i] for i in chosen]
    offsets, picks = plan_locations(len(files), per_image, total, locations, cfg.seed + 1)
    distributed = dist is not None and dist.enabled
    mine = shard_indices(len(files), dist.rank, dist.world_size, block=cfg.batch_size) if distributed else None
    loader = image_loader(files, height=h, width=w, mean=model_cfg.mean, std=model_cfg.std,
                          batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                          indices=mine, min_side=int(getattr(model, "stride", None) or 1))
    is_main = dist is None or dist.is_main
    descriptors = np.empty((total, dim), dtype=np.float32) if is_main else None
    image_indices = np.empty(total, dtype=np.int64) if is_main else None

    def local_batches():
        for images, idx in (loader if mine is None or len(mine) else ()):
            with autocast(device):
                local = model.local_descriptors(to_device(images, device)).float()
            local = local.flatten(2).transpose(1, 2).cpu().numpy()  # N × HW × D
            idx = idx.numpy()
            rows = np.concatenate([local[j, picks[i]] for j, i in enumerate(idx)])
            slots = np.concatenate([offsets[i] + np.arange(len(picks[i])) for i in idx])
            yield idx, rows, slots

    batches = local_batches()
    if distributed:
        batches = pad_rounds(batches, num_rounds(len(files), cfg.batch_size, dist.world_size))
    with torch.inference_mode(), tqdm(total=len(files), desc="sample", unit="img",
                                      disable=not (progress and is_main)) as bar:
        for item in batches:
            if distributed:  # every rank receives the round's sampled rows (slots = their rows in the sample)
                idx, rows, slots = item if item is not None else (None, None, None)
                slots, rows = gather_batch(rows, slots, ctx=dist, capacity=cfg.batch_size * per_image, dim=dim,
                                           what="gathering sampled descriptors")
                done = len(np.unique(np.searchsorted(offsets, slots, side="right")))
            else:
                _, rows, slots = item
                done = len(item[0])
            if descriptors is not None:
                descriptors[slots] = rows
                image_indices[slots] = chosen[np.searchsorted(offsets, slots, side="right") - 1]
            bar.update(done)
    if is_main:
        out_h5 = Path(out_h5)
        with atomic_h5(out_h5) as f:
            f.create_dataset("descriptors", data=descriptors)
            f.create_dataset("image_indices", data=image_indices)
            f.attrs["model"] = json.dumps(model_cfg.to_dict(), sort_keys=True)
            f.attrs["sample_config"] = json.dumps(asdict(cfg), sort_keys=True)
            f.attrs["split"] = split.name
            f.attrs["dataset"] = split.dataset
            f.attrs["per_image"] = per_image
    if dist is not None:
        barrier(dist, "waiting for rank 0 to write the descriptor sample")
    return Path(out_h5)


def read_descriptors(path: str | os.PathLike) -> tuple[np.ndarray, ModelConfig]:
    """``(descriptors float32, the model config that sampled them)`` from a file written by
    :func:`sample_descriptors`."""

    path = require_file(path)
    try:
        with open_h5_for_reading(path) as f:
            if "descriptors" not in f or "model" not in f.attrs:
                raise NetVLADError(f"{path}: not a descriptor sample (no 'descriptors' dataset or 'model' attribute)")
            descriptors = f["descriptors"][()].astype(np.float32, copy=False)
            recorded = json.loads(f.attrs["model"])
    except OSError as e:
        raise NetVLADError(f"{path}: not a readable HDF5 file ({e})") from None
    if descriptors.ndim != 2 or descriptors.shape[0] == 0 or descriptors.shape[1] == 0:
        raise NetVLADError(f"{path}: 'descriptors' must be a non-empty 2-D array, got shape {descriptors.shape}")
    bad = ~np.isfinite(descriptors).all(axis=1)
    if bad.any():
        raise NetVLADError(f"{path}: {int(bad.sum())} descriptor rows contain NaN or inf (first: row "
                           f"{int(np.flatnonzero(bad)[0])}); rerun `sample`")
    try:
        model_cfg = ModelConfig.from_dict(recorded)
    except NetVLADError as e:
        raise NetVLADError(f"{path}: {e}") from None
    return descriptors, model_cfg


def kmeans(descriptors: np.ndarray, num_clusters: int, cfg: KMeansConfig, *, progress: bool = True) -> np.ndarray:
    """faiss k-means into ``num_clusters`` on every sample (``max_points_per_centroid`` raised): (K, D) float32
    centroids."""
    import faiss

    n, d = descriptors.shape
    if num_clusters < 2:
        raise NetVLADError(f"num-clusters must be >= 2, got {num_clusters}")
    if num_clusters > n:
        raise NetVLADError(f"num-clusters {num_clusters} exceeds the {n} sampled descriptors")
    cfg.validate()
    km = faiss.Kmeans(d, num_clusters, niter=cfg.iterations, seed=cfg.seed, verbose=progress,
                      max_points_per_centroid=math.ceil(n / num_clusters) + 1, spherical=False)
    km.train(np.ascontiguousarray(descriptors, dtype=np.float32))
    return km.centroids.astype(np.float32)


def write_centroids(path: str | os.PathLike, centroids: np.ndarray, *, model_cfg: ModelConfig,
                    cfg: KMeansConfig) -> Path:
    path = Path(path)
    with atomic_h5(path) as f:
        f.create_dataset("centroids", data=centroids.astype(np.float32))
        f.attrs["model"] = json.dumps(model_cfg.to_dict(), sort_keys=True)
        f.attrs["kmeans_config"] = json.dumps(asdict(cfg), sort_keys=True)
    return path


def initial_model(descriptors_h5: str | os.PathLike, *, centroids_out: str | os.PathLike,
                  model_out: str | os.PathLike, head, cfg: KMeansConfig, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[np.ndarray, Path]:
    """The ``kmeans`` stage, the off-the-shelf model: the sampled backbone (the sample's recorded model config) with
    the pooling layer of ``head`` (a ``ModelConfig`` whose ``HEAD_FIELDS`` — pooling, K, vladv2, the NetVLAD-Linear
    sizes — are used), its NetVLAD layer (also NetVLAD-Linear's) initialised by k-means on the descriptor sample.

    Writes the centroids (HDF5) and the model file together: both or neither (a failure while writing the second,
    a full disk say, leaves neither). Returns ``(centroids, model_out)``; logs one summary line.
    """
    import contextlib

    from .io import distinct_paths
    from .models import NetVLAD, build_model, save_model
    from .models.build import HEAD_FIELDS

    centroids_out, model_out = Path(centroids_out), Path(model_out)
    distinct_paths({"--descriptors": descriptors_h5}, {"--centroids-out": centroids_out, "--model-out": model_out})
    cfg.validate()
    desc, sampled_cfg = read_descriptors(descriptors_h5)
    model_cfg = replace(sampled_cfg, **{k: getattr(head, k) for k in HEAD_FIELDS})
    model_cfg.validate()
    if model_cfg.pooling in ("netvlad", "netvlad-linear") and not 2 <= model_cfg.num_clusters <= len(desc):
        raise NetVLADError(f"num-clusters must be between 2 and the {len(desc)} sampled descriptors, got "
                           f"{model_cfg.num_clusters}")
    model = build_model(model_cfg)
    if isinstance(model.pool, NetVLAD):  # netvlad and netvlad-linear
        centroids = kmeans(desc, model_cfg.num_clusters, cfg, progress=progress)
        model.pool.init_params(centroids, desc)
    else:
        centroids = desc[:0]
    with contextlib.ExitStack() as stack:  # both written to temporary names first, renamed only if both succeed
        tmp_centroids = stack.enter_context(atomic_path(centroids_out))
        tmp_model = stack.enter_context(atomic_path(model_out))
        write_centroids(tmp_centroids, centroids, model_cfg=model_cfg, cfg=cfg)
        save_model(tmp_model, model, model_cfg)
    if log is not None:
        log(f"kmeans: {centroids.shape[0]} centroids -> {centroids_out}; model -> {model_out}")
    return centroids, model_out


def write_descriptor_sample(split_dir: str | os.PathLike, out_h5: str | os.PathLike, *, trunk, cfg: SampleConfig,
                            run, log: Callable[[str], None] = print) -> Path:
    """The ``sample`` stage: build the backbone ``trunk`` describes (a ``ModelConfig``; its random initialisation,
    with weights none, drawn from ``cfg.seed``), sample local descriptors from the split in ``split_dir``
    (:func:`sample_descriptors`; under torchrun sharded) into ``out_h5``; logs one summary line."""
    from .datasets.manifest import load_split
    from .distributed import broadcast_module, distributed_session, local_main_first
    from .models import build_model
    from .models.build import resolve_trunk

    cfg.validate()
    model_cfg = replace(resolve_trunk(trunk), init_seed=cfg.seed)  # a trunk model file brings its layers and input
    model_cfg.validate()
    split = load_split(split_dir)
    with distributed_session(run.device, run.dist_timeout) as dist:
        with local_main_first(dist):  # one process per node fills the weights cache, the others then read it
            model = build_model(model_cfg)
        broadcast_module(model, dist)  # the same weights on every rank (weights none: random initialisation)
        sample_descriptors(model, model_cfg, split, out_h5, device=dist.device, cfg=cfg,
                           progress=run.progress, dist=dist)
        if dist.is_main:
            log(f"sample: {out_h5} ({cfg.num_descriptors} descriptors requested from {split.name}, backbone "
                f"{model_cfg.backbone})")
    return Path(out_h5)
