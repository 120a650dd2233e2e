"""Encoding images with the model being trained (batched, sharded under torchrun) and the per-epoch validation
recall@N; a non-finite descriptor is named by its image."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..datasets.manifest import GroundTruth, Split
from ..distributed import DistContext, broadcast_object
from ..errors import NetVLADError
from ..features import encode_rounds
from ..models.build import ModelConfig
from ..retrieval import NonFiniteDistances
from .config import RECALL_NS


def encode_into(model: torch.nn.Module, files: Sequence[Path], out: np.ndarray | None, *, model_cfg: ModelConfig,
                device: torch.device, batch_size: int, num_workers: int, amp: str, progress: bool = False,
                desc: str = "cache", dist: DistContext | None = None) -> np.ndarray | None:
    """Encode ``files`` into the rows of ``out`` (an array or memmap of the cache dtype) with the batched encoder.

    Under torchrun (``dist`` with several processes) the files are shared out among the ranks
    (:func:`netvlad_core.features.encode_rounds`) and the rows gathered in order; a rank may pass ``out=None``
    to take part without keeping them (rank 0 keeps the cache, the others only encode)."""
    from tqdm import tqdm

    show = progress and (dist is None or dist.is_main)
    with tqdm(total=len(files), desc=desc, unit="img", leave=False, disable=not show) as bar:
        for idx, batch in encode_rounds(model, files, height=model_cfg.input_height, width=model_cfg.input_width,
                                        mean=model_cfg.mean, std=model_cfg.std, device=device, batch_size=batch_size,
                                        num_workers=num_workers, amp=amp, dist=dist):
            if out is not None:
                out[idx] = batch.astype(out.dtype, copy=False)
            bar.update(len(idx))
    return out


def validate_recall(model: torch.nn.Module, split: Split, gt: GroundTruth, *, device: torch.device, batch_size: int,
                    num_workers: int, amp: str, model_cfg: ModelConfig, progress: bool = False,
                    dist: DistContext | None = None, cached: tuple | None = None) -> dict[int, float]:
    """recall@1/5/10 of ``model`` on ``split`` (exact search on ``device`` over freshly encoded descriptors). Under
    torchrun the encoding is sharded, rank 0 searches and every rank returns rank 0's figures. ``cached``:
    ``(trainable part, trunk cache)`` — encode the split's rows ``val_db``/``val_q`` of the trunk cache with the
    model's trainable part instead of its images."""
    from ..retrieval import exact_search, recall_at_n

    keep = dist is None or dist.is_main
    out_db = np.empty((split.num_db, model.out_dim), np.float32) if keep else None
    out_q = np.empty((split.num_queries, model.out_dim), np.float32) if keep else None
    if cached is not None:
        from ..trunk_cache import encode_cached

        part, cache = cached
        db, q = (encode_cached(part, cache, cache.rows(name), out, device=device, batch_size=batch_size, amp=amp,
                               progress=progress, desc=desc, dist=dist)
                 for name, out, desc in (("val_db", out_db, "val db"), ("val_q", out_q, "val queries")))
    else:
        db = encode_into(model, split.db_files(), out_db, model_cfg=model_cfg, device=device, batch_size=batch_size,
                         num_workers=num_workers, amp=amp, progress=progress, desc="val db", dist=dist)
        q = encode_into(model, split.query_files(), out_q, model_cfg=model_cfg, device=device, batch_size=batch_size,
                        num_workers=num_workers, amp=amp, progress=progress, desc="val queries", dist=dist)
    recall = None
    if keep:
        try:
            _, idx = exact_search(db, q, max(RECALL_NS), device=device)
        except NonFiniteDistances as e:
            raise descriptor_error(e, split) from None
        recall = recall_at_n(idx, gt.positives, RECALL_NS)
    if dist is not None:
        recall = broadcast_object(recall, dist, what="sharing the validation recall")
    return recall


def descriptor_error(e, split: Split, query_ids: Sequence[int] | None = None) -> NetVLADError:
    """A :class:`~netvlad_core.retrieval.NonFiniteDistances` of freshly encoded descriptors as one line naming the
    image whose descriptor it is (``query_ids``: the split's query index of each query row searched)."""
    paths = split.db_paths if e.role == "database" else split.q_paths
    row = e.row if e.role == "database" or query_ids is None else int(query_ids[e.row])
    return e.located(f"{split.image_root / paths[row]} ({e.role} image {row} of the split, the model's descriptor)")
