"""Triplet mining for weakly supervised NetVLAD training: best positive, hard negatives, the negative cache.

For a query with cached descriptor ``q`` (all distances are measured in the descriptor cache, i.e. with the
weights of the last cache refresh):

- the *positive* is the database image within the training radius (``train_positives``, 10 m) whose
  descriptor is nearest to ``q`` (ties: the geographically nearer one, the order of ``train_positives``);
- the *candidate negatives* are ``num_negatives_sampled`` database images drawn at random without
  replacement from those outside the positive radius (not in ``positives``, 25 m), plus the query's cached
  negatives from its previous visit;
- the ``num_negatives`` candidates nearest to ``q`` (the hardest) become the query's new negative cache,
  and those among them that violate the margin are the negatives of its triplets. A query with no
  violating negative is skipped.

Margin convention: ``margin`` is given in squared-distance units (MATLAB's m = 0.1). The ``squared`` loss
violates when ``‖q−n‖² < ‖q−p‖² + m``; the ``sqrt`` loss (the PyTorch port's) when ``‖q−n‖ < ‖q−p‖ + √m``.
The hardest ``num_negatives`` that violate are exactly the violating ones among the ``num_negatives``
hardest, because violation only depends on the distance being below a threshold.

All distances of a refresh block come from ONE batched computation (:func:`squared_distances`: the blocked
torch GEMMs of exact search, chunked over the database); nothing here fits a kNN structure per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import option
from .errors import NetVLADError
from .retrieval import squared_distance_blocks

LOSSES = ("squared", "sqrt")


@dataclass
class MiningConfig:
    """How triplets are chosen (see the module docstring for the margin convention)."""

    margin: float = option(0.1, "Triplet margin m in squared-distance units (the sqrt loss uses sqrt(m)).")
    loss: str = option("squared", "squared: sum max(0, |q-p|^2 + m - |q-n|^2) (MATLAB); sqrt: non-squared distances, "
                       "margin sqrt(m) (PyTorch port).")
    num_negatives: int = option(10, "Hardest negatives kept per query (those violating the margin train).")
    num_negatives_sampled: int = option(1000, "Random negatives (farther than the positive radius) drawn per query.")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise NetVLADError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.margin > 0:
            raise NetVLADError(f"margin must be > 0, got {self.margin}")
        if self.num_negatives < 1:
            raise NetVLADError(f"num-negatives must be >= 1, got {self.num_negatives}")
        if self.num_negatives_sampled < 1:
            raise NetVLADError(f"num-negatives-sampled must be >= 1, got {self.num_negatives_sampled}")


@dataclass
class Triplets:
    """One query's training tuple: database indices of its positive and of its violating negatives."""

    query: int
    positive: int
    negatives: np.ndarray  # int64, hardest first, every one violating the margin


@dataclass
class MiningStats:
    """Counts of one mining call."""

    queries: int = 0
    no_positive: int = 0  # queries without a database image within the training radius
    no_violation: int = 0  # queries skipped because no negative violates the margin
    violating: int = 0  # violating triplets kept
    candidates: int = 0  # triplets examined: queries with a positive × num_negatives

    @property
    def skipped(self) -> int:
        return self.no_positive + self.no_violation

    @property
    def violating_fraction(self) -> float:
        return self.violating / self.candidates if self.candidates else 0.0

    def add(self, other: "MiningStats") -> None:
        self.queries += other.queries
        self.no_positive += other.no_positive
        self.no_violation += other.no_violation
        self.violating += other.violating
        self.candidates += other.candidates


def empty_negative_cache(num_queries: int, num_negatives: int) -> np.ndarray:
    """The negative cache: ``(num_queries, num_negatives)`` int64 database indices, ``-1`` = empty slot."""
    return np.full((num_queries, num_negatives), -1, dtype=np.int64)


def squared_distances(queries, db, *, device: torch.device | str = "cpu", db_chunk: int = 1024) -> np.ndarray:
    """``(M, N)`` float32 squared L2 distances ``‖q‖² + ‖d‖² − 2 q·d`` between rows: the distance blocks of exact
    search (:func:`netvlad_core.retrieval.squared_distance_blocks`, one torch GEMM per ``db_chunk`` database rows,
    in float32 on ``device``; the inputs may be float16 or float32 numpy arrays, memmaps or h5py datasets). Besides
    the result, memory holds the queries in float32 and one chunk of database rows (a float16 cache is never
    converted whole)."""
    out = np.empty((int(queries.shape[0]), int(db.shape[0])), dtype=np.float32)
    for start, block in squared_distance_blocks(queries, db, device=device, block_rows=db_chunk):
        out[:, start:start + block.shape[1]] = block.cpu().numpy()
    return out


def sample_complement(rng: np.random.Generator, num_db: int, excluded_sorted: np.ndarray, size: int) -> np.ndarray:
    """``min(size, available)`` distinct indices drawn uniformly from ``range(num_db)`` minus ``excluded_sorted``
    (sorted, unique), without materialising the complement."""
    available = num_db - len(excluded_sorted)
    if available <= 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.sort(rng.choice(available, size=min(size, available), replace=False)).astype(np.int64)
    # rank r in the complement is index r + (#excluded ≤ that index); excluded[i] − i counts the gaps before it
    shifted = excluded_sorted - np.arange(len(excluded_sorted))
    return ranks + np.searchsorted(shifted, ranks, side="right")


def mine_triplets(
    query_ids: Sequence[int],
    query_desc,
    db_desc,
    *,
    train_positives: Sequence[np.ndarray],
    positives: Sequence[np.ndarray],
    negative_cache: np.ndarray,
    rng: np.random.Generator,
    cfg: MiningConfig,
    device: torch.device | str = "cpu",
) -> tuple[list[Triplets | None], MiningStats]:
    """Mine the triplets of a block of queries from their cached descriptors.

    ``query_ids``: split query indices (into ``train_positives``/``positives``/``negative_cache``);
    ``query_desc``: their descriptors, one row per entry of ``query_ids``; ``db_desc``: every database
    descriptor. ``negative_cache`` is updated in place with each query's ``num_negatives`` hardest candidates.
    Returns one :class:`Triplets` per query (``None`` when skipped) and the block's counts. Random negatives
    are drawn from ``rng`` query by query, in the order of ``query_ids``.
    """
    cfg.validate()
    if len(query_ids) != len(query_desc):
        raise ValueError(f"{len(query_ids)} query ids but {len(query_desc)} query descriptors")
    num_db = int(db_desc.shape[0])
    stats = MiningStats(queries=len(query_ids))
    out: list[Triplets | None] = []
    if not len(query_ids):
        return out, stats
    dist = squared_distances(query_desc, db_desc, device=device)
    for row, q in enumerate(query_ids):
        q = int(q)
        cand_pos = np.asarray(train_positives[q], dtype=np.int64)
        if len(cand_pos) == 0:
            stats.no_positive += 1
            out.append(None)
            continue
        d = dist[row]
        positive = int(cand_pos[np.argmin(d[cand_pos])])
        d_pos = float(d[positive])
        excluded = np.unique(np.asarray(positives[q], dtype=np.int64))
        sampled = sample_complement(rng, num_db, excluded, cfg.num_negatives_sampled)
        cached = negative_cache[q]
        candidates = np.unique(np.concatenate([sampled, cached[cached >= 0]]))
        if len(candidates) == 0:
            stats.no_violation += 1
            out.append(None)
            continue
        d_cand = d[candidates]
        order = np.argsort(d_cand, kind="stable")[: cfg.num_negatives]
        hardest, d_hard = candidates[order], d_cand[order]
        negative_cache[q] = -1
        negative_cache[q, : len(hardest)] = hardest
        if cfg.loss == "squared":
            violating = d_hard < d_pos + cfg.margin
        else:
            violating = np.sqrt(d_hard) < np.sqrt(d_pos) + np.sqrt(cfg.margin)
        stats.candidates += cfg.num_negatives
        negatives = hardest[violating]
        if len(negatives) == 0:
            stats.no_violation += 1
            out.append(None)
            continue
        stats.violating += len(negatives)
        out.append(Triplets(query=q, positive=positive, negatives=negatives))
    return out, stats


def triplet_loss(q: torch.Tensor, p: torch.Tensor, negatives: torch.Tensor, *, margin: float,
                 loss: str) -> torch.Tensor:
    """Sum over the negatives of one query's triplet losses (not normalised).

    ``q``, ``p``: ``(D,)``; ``negatives``: ``(K, D)``. ``squared``: Σ_j max(0, ‖q−p‖² + m − ‖q−n_j‖²);
    ``sqrt``: Σ_j max(0, ‖q−p‖ + √m − ‖q−n_j‖) (torch's TripletMarginLoss with margin √m, p = 2,
    without its eps).
    """
    if loss == "squared":
        d_pos = ((q - p) ** 2).sum()
        d_neg = ((q[None, :] - negatives) ** 2).sum(1)
        return torch.clamp(d_pos + margin - d_neg, min=0).sum()
    if loss == "sqrt":
        d_pos = torch.linalg.vector_norm(q - p)
        d_neg = torch.linalg.vector_norm(q[None, :] - negatives, dim=1)
        return torch.clamp(d_pos + margin ** 0.5 - d_neg, min=0).sum()
    raise NetVLADError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def batch_loss_sum(descriptors: torch.Tensor, counts: Sequence[int], *, margin: float,
                   loss: str) -> torch.Tensor:
    """Sum of the triplet losses of a batch laid out query by query as ``[q, p, n_1..n_k]`` rows of
    ``descriptors``; ``counts[i]`` is the number of negatives of query ``i``."""
    total = descriptors.new_zeros(())
    start = 0
    for k in counts:
        q, p, negs = descriptors[start], descriptors[start + 1], descriptors[start + 2:start + 2 + k]
        total = total + triplet_loss(q, p, negs, margin=margin, loss=loss)
        start += 2 + k
    return total


def batch_loss(descriptors: torch.Tensor, counts: Sequence[int], *, margin: float,
               loss: str) -> tuple[torch.Tensor, int]:
    """Mean triplet loss of a batch (layout as in :func:`batch_loss_sum`): the sum over all triplets divided by the
    number of triplets in the batch (so the gradient scale does not depend on how many negatives violated).
    Returns ``(loss, num_triplets)``."""
    num_triplets = int(sum(counts))
    return batch_loss_sum(descriptors, counts, margin=margin, loss=loss) / max(num_triplets, 1), num_triplets
