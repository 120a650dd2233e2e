"""Nearest-neighbour search and the place-recognition measures computed from its rankings.

Pure functions on arrays (plus faiss): ``search`` ranks the database for every query, ``recall_at_n`` and
``first_correct_rank`` score the rankings against the ground-truth positives, ``estimate_positions`` turns the top
matches into a position estimate, and ``collapse_panoramas`` applies the Tokyo 24/7 convention of counting
each database panorama once per ranking.

Rankings are ``(M, k)`` arrays of database indices, best first; ``-1`` marks an empty slot (an approximate
index that found fewer than ``k`` candidates, or a collapsed ranking with fewer than ``k`` panoramas) and
its distance is ``inf``. Distances are squared L2, as faiss returns them.

Exact search (:func:`exact_search`, what ``search`` runs without an index factory) is blocked matrix products in
torch: a block of queries and a block of database rows are upcast to float32 into reused buffers (a float16
database is never converted whole), their squared distances ``‖q‖² + ‖d‖² − 2 q·d`` are one GEMM, and each
block's top ``k`` is merged into the running top ``k``, so memory is bounded by the block sizes, not by database ×
queries. The same distance blocks serve triplet mining (:func:`squared_distance_blocks`). Equal distances are
ranked by the lower database index. What the search computes is checked, not only what is stored: a row whose
float32 value or squared norm is not finite (float64 features near 1e300, float32 near 1e20), or a distance that
overflows, raises :class:`NonFiniteDistances` naming the first such row, instead of a ranking by database order.
"""

from __future__ import annotations

import re
import warnings
from pathlib import PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import NetVLADError

WEIGHTINGS = ("uniform", "inverse_distance", "softmax")


class NonFiniteDistances(NetVLADError):
    """A descriptor whose distances cannot be computed in float32: a value that is not finite once upcast, a squared
    norm that overflows, or a distance that does. ``role`` is ``"database"`` or ``"query"``, ``row`` the first such
    row (0-based); callers add where the descriptors came from (:meth:`in_file`)."""

    def __init__(self, role: str, row: int, detail: str):
        self.role, self.row, self.detail = role, int(row), detail
        super().__init__(f"{role} row {row}: {detail}; its distances are not finite numbers, so it cannot be ranked")

    def located(self, where: str) -> NetVLADError:
        """The same error as one line that starts with ``where`` (a file, or the images the rows came from)."""
        return NetVLADError(f"{where}: {self}")


def _check_rows(sq_norms: torch.Tensor, start: int, role: str) -> None:
    """Raise :class:`NonFiniteDistances` for the first row whose float32 squared norm is not finite."""
    bad = ~torch.isfinite(sq_norms)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise NonFiniteDistances(role, start + row, f"squared norm {float(sq_norms[row]):g} in float32 (a value "
                                 f"that is not finite, or too large to square: |x| ≥ about 1.8e19)")


def _check_distances(dist: torch.Tensor, q_start: int, db_start: int) -> None:
    bad = ~torch.isfinite(dist)
    if bool(bad.any()):
        i, j = (int(v) for v in torch.nonzero(bad)[0])
        raise NonFiniteDistances("database", db_start + j, f"its squared distance to query row {q_start + i} "
                                 f"overflows float32")


def _first_line(e: BaseException) -> str:
    """The useful part of a faiss error: its last non-empty line, without the C++ location prefix."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return re.sub(r"^Error in .*? at .*?:\d+: ", "", text)


def _as_f32(rows) -> np.ndarray:
    with np.errstate(over="ignore"):  # a float64 value beyond float32 becomes inf, which the search then refuses
        return np.ascontiguousarray(np.asarray(rows, dtype=np.float32))


def _configure_training(index, seed: int) -> None:
    """Seed the k-means of the IVF coarse quantiser and of the product quantiser, where present, and skip
    polysemous training (it only serves Hamming-threshold filtering, which search never uses, and takes
    minutes for large PQ codes)."""
    import faiss

    candidates = [index]
    try:
        candidates.append(faiss.downcast_index(faiss.extract_index_ivf(index)))
    except RuntimeError:
        pass
    inner = index
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
        candidates.append(inner)
    for candidate in candidates:
        if hasattr(candidate, "do_polysemous_training"):
            candidate.do_polysemous_training = False
        for owner in (candidate, getattr(candidate, "pq", None)):
            cp = getattr(owner, "cp", None)
            if cp is not None:
                cp.seed = int(seed)
                cp.min_points_per_centroid = 1  # only silences faiss' per-call stderr warning


def build_index(
    db,
    *,
    index_factory: str | None = None,
    index_params: str | None = None,
    batch_size: int = 1024,
    train_seed: int = 0,
):
    """A faiss L2 index holding ``db`` (an ``(N, D)`` array or h5py dataset, read ``batch_size`` rows at a time).

    ``index_factory=None`` gives the exact ``IndexFlatL2``; otherwise the faiss factory string (e.g.
    ``'IVF1024,PQ64'``, ``'PCA256,Flat'``) is built and trained on all of ``db`` with k-means seed
    ``train_seed`` (polysemous PQ training is skipped), and ``index_params`` (a faiss ParameterSpace string
    such as ``'nprobe=16'``) is applied.
    """
    import faiss

    num_db, dim = int(db.shape[0]), int(db.shape[1])
    if num_db == 0:
        raise NetVLADError("cannot search an empty database (0 database vectors)")
    if index_factory is None:
        if index_params:
            raise NetVLADError(
                f"index parameters {index_params!r} need an index factory string (the exact index has none)"
            )
        index = faiss.IndexFlatL2(dim)
    else:
        try:
            index = faiss.index_factory(dim, index_factory, faiss.METRIC_L2)
        except RuntimeError as e:
            raise NetVLADError(
                f"index factory string {index_factory!r} is not valid for {dim}-D vectors: {_first_line(e)}"
            ) from None
        _configure_training(index, train_seed)
        if not index.is_trained:
            try:
                index.train(_as_f32(db[:]))
            except RuntimeError as e:
                raise NetVLADError(
                    f"index {index_factory!r} cannot be trained on {num_db} database vectors: {_first_line(e)}"
                ) from None
        if index_params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, index_params)
            except RuntimeError as e:
                raise NetVLADError(
                    f"index parameters {index_params!r} do not apply to {index_factory!r}: {_first_line(e)}"
                ) from None
    for start in range(0, num_db, batch_size):
        rows = _as_f32(db[start:start + batch_size])
        _check_rows(_row_sq_norms(torch.from_numpy(rows), torch.empty(len(rows))), start, "database")
        index.add(rows)
    return index


def _check_search_inputs(db, queries, k: int, **block_sizes: int) -> None:
    if k < 1:
        raise NetVLADError(f"k must be at least 1, got {k}")
    for name, size in block_sizes.items():
        if size < 1:
            raise NetVLADError(f"{name.replace('_', ' ')} must be at least 1, got {size}")
    if len(db.shape) != 2 or len(queries.shape) != 2 or db.shape[1] != queries.shape[1]:
        raise NetVLADError(f"database shape {tuple(db.shape)} and query shape {tuple(queries.shape)} do not match")
    if int(db.shape[0]) == 0:
        raise NetVLADError("cannot search an empty database (0 database vectors)")


def _row_sq_norms(x: torch.Tensor, out: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``(x * x).sum(1)`` into ``out``, ``chunk`` rows at a time (no temporary the size of ``x``)."""
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        out[start:start + chunk] = (rows * rows).sum(1)
    return out


def _staging(src, rows: int) -> np.ndarray | None:
    """A reusable buffer for :func:`_rows_into` to read an h5py dataset's rows into (None for arrays)."""
    if not hasattr(src, "read_direct"):
        return None
    return np.empty((rows, int(src.shape[1])), dtype=src.dtype)


def _rows_into(src, start: int, stop: int, buf: torch.Tensor, stage: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of ``src`` (numpy array, memmap or h5py dataset, any float dtype) written as float32 into
    the first rows of ``buf`` (on any device); returns that view. Only the block is read and converted; an h5py
    dataset is read into ``stage`` (from :func:`_staging`) when given, so no block allocates fresh pages."""
    if stage is not None:
        rows = stage[:stop - start]
        src.read_direct(rows, np.s_[start:stop])
    else:
        rows = np.ascontiguousarray(src[start:stop])
    out = buf[:stop - start]
    with warnings.catch_warnings():  # a read-only memmap: torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        out.copy_(torch.from_numpy(rows))
    return out


class _DistanceBlocks:
    """Squared L2 distances of a float32 query block to successive database blocks, in reused buffers; the database
    rows' squared norms are computed on the first pass and kept (``num_db`` floats)."""

    def __init__(self, db, num_queries: int, *, device: torch.device, block_rows: int):
        self.db, self.block_rows, self.num_db = db, int(block_rows), int(db.shape[0])
        rows = min(self.block_rows, self.num_db)
        self.rows = torch.empty((rows, int(db.shape[1])), dtype=torch.float32, device=device)
        self.prod = torch.empty((num_queries, rows), dtype=torch.float32, device=device)
        self.dist = torch.empty((num_queries, rows), dtype=torch.float32, device=device)
        self.d_sq = torch.empty(self.num_db, dtype=torch.float32, device=device)
        self.stage = _staging(db, rows)
        self.have_d_sq = False

    def __call__(self, q: torch.Tensor, q_sq: torch.Tensor, q_start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, (len(q), rows) float32 distances ≥ 0)`` per database block; each view is overwritten by
        the next block. The arithmetic of ``(q_sq + ‖d‖²) − 2 (q @ dᵀ)`` clamped at 0. A database row whose squared
        norm, or a distance, is not finite raises :class:`NonFiniteDistances` (``q_start``: the queries' first row,
        for the message); ``q_sq`` is the caller's to check."""
        m = q.shape[0]
        for start in range(0, self.num_db, self.block_rows):
            stop = min(start + self.block_rows, self.num_db)
            d = _rows_into(self.db, start, stop, self.rows, self.stage)
            if not self.have_d_sq:
                _check_rows(_row_sq_norms(d, self.d_sq[start:stop]), start, "database")
            prod = torch.matmul(q, d.T, out=self.prod[:m, :stop - start])
            dist = torch.add(q_sq, self.d_sq[None, start:stop], out=self.dist[:m, :stop - start])
            dist.sub_(prod, alpha=2.0)  # 2·prod is exact: round(a − 2·prod), as the unbuffered expression
            _check_distances(dist, q_start, start)  # NaN would pass the clamp and rank as database order
            yield start, dist.clamp_min_(0.0)
        self.have_d_sq = True


def squared_distance_blocks(queries, db, *, device: torch.device | str = "cpu",
                            block_rows: int = 1024) -> Iterator[tuple[int, torch.Tensor]]:
    """Squared L2 distances of all ``queries`` (upcast to float32 on ``device`` at once) to ``db``, one GEMM per
    ``block_rows`` database rows read from ``db`` (array, memmap or h5py dataset, float16 or float32): yields
    ``(start, (M, rows) float32 tensor)``, each tensor overwritten by the next block."""
    device = torch.device(device)
    q = torch.empty((int(queries.shape[0]), int(queries.shape[1])), dtype=torch.float32, device=device)
    _rows_into(queries, 0, int(queries.shape[0]), q)
    q_sq = _row_sq_norms(q, torch.empty(q.shape[0], dtype=torch.float32, device=device))
    _check_rows(q_sq, 0, "query")
    yield from _DistanceBlocks(db, q.shape[0], device=device, block_rows=block_rows)(q, q_sq[:, None])


_LOW32 = 0xFFFFFFFF


def _keys(dist: torch.Tensor, start: int, columns: torch.Tensor) -> torch.Tensor:
    """int64 sort keys ``(float32 bits of dist) << 32 | database index``: for distances ≥ +0 their order is the order
    of (distance, index), so a top-k on them is exact and ranks equal distances by the lower index."""
    keys = dist.view(torch.int32).to(torch.int64)
    keys.bitwise_and_(0x7FFFFFFF)  # -0.0 → +0.0 (a clamp may leave the sign bit)
    keys.bitwise_left_shift_(32)
    keys.add_(columns[:dist.shape[1]] + start)
    return keys


def exact_search(
    db,
    queries,
    k: int,
    *,
    device: torch.device | str = "cpu",
    block_rows: int = 512,
    query_rows: int = 1024,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of every query by squared L2: ``(distances (M, k') float32, indices (M, k')
    int64)``, ``k' = min(k, num_db)``, nearest first; equal distances are ranked by the lower database index.

    Blocked matrix products in torch on ``device`` (float32 arithmetic): ``query_rows`` queries and ``block_rows``
    database rows at a time are read from ``queries``/``db`` (numpy arrays, memmaps or h5py datasets, float16 or
    float32) and upcast into reused float32 buffers; each block's top ``k'`` is merged exactly into the running top
    ``k'``. Working memory is about ``4·D·(query_rows + block_rows) + 20·query_rows·block_rows`` bytes, whatever
    the sizes of ``db`` and ``queries``. Distances are ``‖q‖² + ‖d‖² − 2 q·d`` in float32, clamped at 0 (what
    faiss' ``IndexFlatL2`` computes, up to float rounding). A row or distance that is not finite in float32 raises
    :class:`NonFiniteDistances` (the first such row).
    """
    _check_search_inputs(db, queries, k, block_rows=block_rows, query_rows=query_rows)
    device = torch.device(device)
    num_db, num_queries, dim = int(db.shape[0]), int(queries.shape[0]), int(db.shape[1])
    if num_db > _LOW32:
        raise NetVLADError(f"exact search handles at most {_LOW32} database vectors, got {num_db}")
    k = min(int(k), num_db)
    distances = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    if num_queries == 0:
        return distances, indices
    q_rows = min(int(query_rows), num_queries)
    q_buf = torch.empty((q_rows, dim), dtype=torch.float32, device=device)
    q_sq_buf = torch.empty(q_rows, dtype=torch.float32, device=device)
    q_stage = _staging(queries, q_rows)
    blocks = _DistanceBlocks(db, q_rows, device=device, block_rows=block_rows)
    columns = torch.arange(min(int(block_rows), num_db), dtype=torch.int64, device=device)
    for q_start in tqdm(range(0, num_queries, q_rows), desc="search", unit="batch", disable=not progress):
        q = _rows_into(queries, q_start, min(q_start + q_rows, num_queries), q_buf, q_stage)
        q_sq = _row_sq_norms(q, q_sq_buf[:q.shape[0]])
        _check_rows(q_sq, q_start, "query")
        best = None
        for start, dist in blocks(q, q_sq[:, None], q_start):
            keys = _keys(dist, start, columns)
            if best is not None:
                keys = torch.cat([best, keys], 1)
            # the k smallest keys (= nearest, lower index first among equal distances) of the block and the best so far
            best = torch.topk(keys, k, dim=1, largest=False, sorted=False).values if keys.shape[1] > k else keys
        best = torch.sort(best, dim=1).values.cpu()
        stop = q_start + q.shape[0]
        distances[q_start:stop] = (best >> 32).to(torch.int32).view(torch.float32).numpy()
        indices[q_start:stop] = (best & _LOW32).numpy()
    return distances, indices


def search(
    db,
    queries,
    k: int,
    *,
    index_factory: str | None = None,
    index_params: str | None = None,
    batch_size: int = 1024,
    train_seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of every query: ``(distances (M, k') float32, indices (M, k') int64)``.

    Exact squared-L2 search (:func:`exact_search` on ``device``, ``batch_size`` queries per block) unless
    ``index_factory`` names an approximate faiss index (see :func:`build_index`; faiss on the CPU).
    ``k' = min(k, num_db)``. ``db`` and ``queries`` may be numpy arrays or h5py datasets (any float dtype);
    queries are searched ``batch_size`` at a time, so memory stays bounded.
    """
    if batch_size < 1:
        raise NetVLADError(f"batch size must be at least 1, got {batch_size}")
    _check_search_inputs(db, queries, k)
    if index_factory is None and not index_params:
        return exact_search(db, queries, k, device=device, query_rows=batch_size, progress=progress)
    index = build_index(db, index_factory=index_factory, index_params=index_params, batch_size=batch_size,
                        train_seed=train_seed)
    k = min(int(k), int(db.shape[0]))
    num_queries = int(queries.shape[0])
    distances = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    for start in tqdm(range(0, num_queries, batch_size), desc="search", unit="batch", disable=not progress):
        stop = min(start + batch_size, num_queries)
        rows = _as_f32(queries[start:stop])
        _check_rows(_row_sq_norms(torch.from_numpy(rows), torch.empty(len(rows))), start, "query")
        distances[start:stop], indices[start:stop] = index.search(rows, k)
        found = indices[start:stop] >= 0
        if not np.isfinite(distances[start:stop][found]).all():
            i, j = (int(v) for v in np.argwhere(found & ~np.isfinite(distances[start:stop]))[0])
            raise NonFiniteDistances("database", int(indices[start + i, j]), f"its squared distance to query row "
                                     f"{start + i} overflows float32")
    distances[indices < 0] = np.inf
    return distances, indices


def correct_matrix(indices: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """``(M, k)`` booleans: is the database image at each rank a true positive of its query."""
    indices = np.asarray(indices)
    if len(positives) != len(indices):
        raise ValueError(f"{len(indices)} rankings but {len(positives)} positive lists")
    out = np.zeros(indices.shape, dtype=bool)
    for row, (ranking, pos) in enumerate(zip(indices, positives)):
        out[row] = np.isin(ranking, pos) & (ranking >= 0)
    return out


def first_correct_rank(indices: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """Per query the 1-based rank of the first true positive in its ranking; 0 when there is none."""
    correct = correct_matrix(indices, positives)
    return np.where(correct.any(axis=1), correct.argmax(axis=1) + 1, 0).astype(np.int64)


def recall_at_n(indices: np.ndarray, positives: Sequence[np.ndarray], ns: Iterable[int]) -> dict[int, float]:
    """Fraction of queries with at least one true positive among their top ``n``, for each ``n`` in ``ns``.

    Queries without any positive count as failures (the denominator is every query). A ranking shorter than
    ``n`` is taken whole, which is exact when it already holds the whole database (``k = num_db``).
    """
    ranks = first_correct_rank(indices, positives)
    total = max(len(ranks), 1)
    return {int(n): float(np.count_nonzero((ranks >= 1) & (ranks <= n)) / total) for n in ns}


def estimate_positions(
    indices: np.ndarray,
    distances: np.ndarray,
    db_utm: np.ndarray,
    k: int = 1,
    weighting: str = "uniform",
    *,
    temperature: float = 0.1,
) -> np.ndarray:
    """``(M, 2)`` position estimates: a weighted mean of the positions of each query's top ``k`` matches.

    ``weighting``: ``uniform`` (plain mean; ``k=1`` is the top match's position), ``inverse_distance``
    (weights ``1 / (descriptor distance + 1e-6)``, distance = sqrt of the squared L2 in ``distances``) or
    ``softmax`` (weights ``exp(-(d² - min d²) / temperature)`` on the squared distances). Empty slots
    (index ``-1``) get no weight; a query with no match at all gets ``NaN``.
    """
    if weighting not in WEIGHTINGS:
        raise NetVLADError(f"localisation weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if k < 1:
        raise NetVLADError(f"localisation k must be at least 1, got {k}")
    if weighting == "softmax" and not temperature > 0:
        raise NetVLADError(f"softmax temperature must be positive, got {temperature}")
    idx = np.asarray(indices)[:, :k]
    dist = np.asarray(distances, dtype=np.float64)[:, :k]
    valid = idx >= 0
    if weighting == "uniform":
        weights = np.ones(idx.shape)
    elif weighting == "inverse_distance":
        weights = 1.0 / (np.sqrt(np.clip(dist, 0.0, None)) + 1e-6)
    else:
        best = np.min(np.where(valid, dist, np.inf), axis=1, keepdims=True)
        weights = np.exp(-(np.where(valid, dist, np.inf) - np.where(np.isfinite(best), best, 0.0)) / temperature)
    weights = np.where(valid, weights, 0.0)
    positions = np.asarray(db_utm, dtype=np.float64)[np.where(valid, idx, 0)]  # (M, k, 2)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimates = (weights[:, :, None] * positions).sum(axis=1) / total[:, None]
    estimates[total == 0] = np.nan
    return estimates


def localisation_errors(estimates: np.ndarray, q_utm: np.ndarray) -> np.ndarray:
    """Euclidean distance in metres between each estimate and the query's true position (NaN stays NaN)."""
    return np.linalg.norm(np.asarray(estimates, dtype=np.float64) - np.asarray(q_utm, dtype=np.float64), axis=1)


_VIEW_SUFFIX = re.compile(r"(_pitch\d+_yaw\d+|_\d+_\d+)$")


def panorama_id_from_path(path: str) -> str:
    """The panorama a database image was cut from, derived from its relative path.

    Rules, first match wins:
    - deep-visual-geo-localization names ``@utm_e@utm_n@zone@letter@lat@lon@pano_id@tile@...@.jpg`` with a
      non-empty ``pano_id`` field: that field;
    - Pittsburgh ``000/000829_pitch1_yaw1.jpg``: strip the ``_pitch<i>_yaw<j>`` suffix → ``000/000829``;
    - Tokyo 24/7 ``03814/<22-char panorama id>_012_030.png`` (pitch, yaw in degrees): strip the last two
      numeric ``_<n>`` fields → ``03814/<22-char panorama id>``;
    - otherwise the path without its extension (every image is its own panorama).
    """
    name = PurePosixPath(str(path).replace("\\", "/"))
    fields = name.name.split("@")
    if len(fields) >= 9 and fields[7]:
        return fields[7]
    stem = str(name.with_suffix("")) if name.suffix else str(name)
    return _VIEW_SUFFIX.sub("", stem)


def panorama_ids_from_paths(paths: Sequence[str]) -> np.ndarray:
    """Integer panorama id per database path (see :func:`panorama_id_from_path`), numbered in first-seen order.

    Evaluation uses it only for a split that does not record ``extra.views_per_panorama``; with that record (Tokyo
    24/7) the panoramas are consecutive database rows, which these names agree with (12 yaws per panorama id)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(panorama_id_from_path(p), len(ids)) for p in paths], dtype=np.int64)


def collapse_panoramas(
    indices: np.ndarray, distances: np.ndarray, panorama_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the best-ranked view of each panorama in every ranking, then its first ``k`` entries.

    Returns ``(indices (M, k) int64, distances (M, k) float32)``, in the order of the arguments.

    The Tokyo 24/7 protocol (Torii et al. 2015; NetVLAD ``nnSearchPostprocess``): duplicates of a panorama
    are suppressed before recall is counted. Rankings with fewer than ``k`` distinct panoramas are padded
    with index ``-1`` and distance ``inf``. To guarantee ``k`` panoramas, search ``k × (views per
    panorama)`` neighbours first.
    """
    indices = np.asarray(indices)
    distances = np.asarray(distances)
    panorama_ids = np.asarray(panorama_ids)
    out_idx = np.full((len(indices), k), -1, dtype=np.int64)
    out_dist = np.full((len(indices), k), np.inf, dtype=np.float32)
    for row, (ranking, dist) in enumerate(zip(indices, distances)):
        valid = np.flatnonzero(ranking >= 0)
        _, first = np.unique(panorama_ids[ranking[valid]], return_index=True)
        keep = valid[np.sort(first)][:k]
        out_idx[row, :len(keep)] = ranking[keep]
        out_dist[row, :len(keep)] = dist[keep]
    return out_idx, out_dist
