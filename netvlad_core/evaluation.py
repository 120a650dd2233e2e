"""Evaluate one features file against its split: recall@N, localisation error, and the files DVC tracks.

Inputs: a features HDF5 written by the features stage (datasets ``db`` (num_db × D) and ``query``
(num_queries × D), float16/32, rows in the split's order; attributes ``complete``, ``split``, ``model``,
``dim``) and a split folder (``manifest.load_split`` / ``load_ground_truth``).

Outputs, each written atomically and only after every computation succeeded:
- metrics JSON, numbers only (what ``dvc metrics show`` / ``dvc exp show`` list): ``recall@N`` (fractions),
  ``exact_recall@N`` when an approximate index was used, counts, ``median_error_m`` (``null`` when half the queries
  or more got no position), ``localised_within_<thr>m``;
- optionally a settings JSON (not a DVC metric): how the numbers were made — model name, dataset, split, index,
  whether database panoramas were collapsed and what decided it, localisation k/weighting, recall N requested
  and used;
- recall plot CSV ``model,n,recall`` (one row per N) for ``dvc plots``;
- per-query CSV: ranking, correctness and localisation error of every query;
- optionally ``retrievals.png``: example queries with their top-5 matches, framed green/red.

Numbers are written at full precision: JSON floats and the CSVs' float columns as Python ``repr`` (the shortest
text that reads back to the same float64, so a UTM northing of 4,477,000.123 m keeps its millimetres and the
CSV's ``localisation_error_m`` equals ``hypot`` of its own estimate minus position columns), the per-query
descriptor distances as the shortest text of their float32 value. Only the ``evaluate`` command's summary line
is rounded for humans.

Panoramas: a split whose ``split.json`` records ``extra.views_per_panorama`` (Tokyo 24/7: 12) is evaluated with
each ranking collapsed to one view per panorama by default (the papers' protocol); database rows
``v·p … v·p + v - 1`` form panorama ``p``, as in the authors' ``floor((id-1)/v)``. ``EvalConfig.collapse_panoramas``
``True``/``False`` overrides the split either way; ``True`` on a split without that record groups the views by
file name (:func:`netvlad_core.retrieval.panorama_ids_from_paths`).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .config import option
from .datasets.manifest import Split, load_ground_truth, load_split
from .errors import NetVLADError, NetVLADWarning
from .io import atomic_path, distinct_paths, open_h5_for_reading, require_file
from .retrieval import (
    WEIGHTINGS,
    NonFiniteDistances,
    collapse_panoramas,
    correct_matrix,
    estimate_positions,
    first_correct_rank,
    localisation_errors,
    panorama_ids_from_paths,
    recall_at_n,
    search,
)

NUM_SHOWN_MATCHES = 5  # matches per example query in retrievals.png


@dataclass
class EvalConfig:
    """How to evaluate; the names match the ``evaluate`` section of params.yaml."""

    recall_ns: tuple[int, ...] = option((1, 5, 10, 20, 50, 100), "N of recall@N; repeat the option for several. An N "
                                        "above the database size (after collapsing: the number of panoramas) is "
                                        "lowered to it, with a warning.", name="recall-n")
    localisation_k: int = option(1, "Top matches averaged into the position estimate.")
    localisation_weighting: str = option("uniform", "Weights of those matches: uniform, inverse_distance or softmax.")
    localisation_temperature: float = option(0.1, "Temperature of the softmax weighting (squared descriptor "
                                             "distance).")
    index_factory: str | None = option(None, "faiss index factory string for approximate search (e.g. "
                                       "'IVF1024,PQ64'); unset: exact search.")
    index_params: str | None = option(None, "faiss parameters for that index (e.g. 'nprobe=16').")
    collapse_panoramas: bool | None = option(None, "Count each database panorama once per ranking (Tokyo 24/7 "
                                             "protocol): auto (unset) does when the split records "
                                             "views_per_panorama (tokyo247: 12); yes or no decide regardless.")
    batch_size: int = option(1024, "Queries per search batch (bounds memory).")
    num_examples: int = option(8, "Example queries drawn in the retrievals PNG.")
    per_query_top: int = option(20, "Matches listed per query in the per-query CSV.")
    train_seed: int = option(0, "Seed of the approximate index's k-means training.", name="seed")

    def validate(self) -> None:
        """Raise :class:`NetVLADError` for values that cannot work."""
        if not self.recall_ns or any(int(n) < 1 for n in self.recall_ns):
            raise NetVLADError(f"recall N values must be positive integers, got {list(self.recall_ns)}")
        if self.localisation_k < 1:
            raise NetVLADError(f"localisation k must be at least 1, got {self.localisation_k}")
        if self.localisation_weighting not in WEIGHTINGS:
            raise NetVLADError(
                f"localisation weighting must be one of {', '.join(WEIGHTINGS)}, got {self.localisation_weighting!r}"
            )
        if not self.localisation_temperature > 0:
            raise NetVLADError(f"localisation temperature must be positive, got {self.localisation_temperature}")
        if self.batch_size < 1:
            raise NetVLADError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_examples < 0:
            raise NetVLADError(f"number of example queries must be 0 or more, got {self.num_examples}")
        if self.per_query_top < 1:
            raise NetVLADError(f"per-query top must be at least 1, got {self.per_query_top}")
        if self.collapse_panoramas not in (None, True, False):
            raise NetVLADError(f"collapse panoramas must be None (from the split), True or False, "
                               f"got {self.collapse_panoramas!r}")


# ---------------------------------------------------------------------------------------------- features file


def _check_finite(dataset, path: Path, name: str, batch_size: int) -> None:
    for start in range(0, dataset.shape[0], batch_size):
        rows = np.asarray(dataset[start:start + batch_size])
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise NetVLADError(f"{path}: {name} row {start + int(np.flatnonzero(bad)[0])} contains NaN or inf")


@contextlib.contextmanager
def open_features(path: str | Path, split: Split, *, batch_size: int = 1024) -> Iterator[tuple]:
    """Open a features HDF5, check it against ``split`` and yield its ``(db, query)`` h5py datasets.

    Checks: the file exists and is HDF5, has both datasets as 2-D float arrays, attribute ``complete`` is
    true, attributes ``dataset``/``split`` (when present) name this split, row counts equal the split's,
    db and query dims agree (and equal attribute ``dim`` if present), and every value is finite. Any
    failure raises :class:`NetVLADError` naming the file and the problem.
    """
    import h5py

    path = require_file(path, "features file")
    try:
        h5 = open_h5_for_reading(path)
    except OSError as e:
        raise NetVLADError(f"{path}: not a readable HDF5 file ({e})") from None
    with h5:
        for name in ("db", "query"):
            if not isinstance(h5.get(name), h5py.Dataset):
                raise NetVLADError(f"{path}: missing dataset {name!r}")
        db, query = h5["db"], h5["query"]
        if not bool(h5.attrs.get("complete", False)):
            raise NetVLADError(
                f"{path}: incomplete features file (attribute 'complete' is not true); rerun the features stage"
            )
        for name, ds in (("db", db), ("query", query)):
            if ds.ndim != 2 or ds.dtype.kind != "f":
                raise NetVLADError(
                    f"{path}: dataset {name!r} must be a 2-D float array, got shape {ds.shape} dtype {ds.dtype}"
                )
        for attr, expected in (("dataset", split.dataset), ("split", split.name)):
            if attr in h5.attrs and str(h5.attrs[attr]) != expected:
                raise NetVLADError(
                    f"{path}: features of {attr} {str(h5.attrs[attr])!r}, but the split folder is {attr} {expected!r}"
                )
        if db.shape[0] != split.num_db:
            raise NetVLADError(
                f"{path}: {db.shape[0]} database rows but split {split.name!r} has {split.num_db} database images"
            )
        if query.shape[0] != split.num_queries:
            raise NetVLADError(
                f"{path}: {query.shape[0]} query rows but split {split.name!r} has {split.num_queries} queries"
            )
        if db.shape[1] != query.shape[1]:
            raise NetVLADError(
                f"{path}: database descriptors are {db.shape[1]}-D but query descriptors are {query.shape[1]}-D"
            )
        if "dim" in h5.attrs and int(h5.attrs["dim"]) != db.shape[1]:
            raise NetVLADError(f"{path}: attribute dim={int(h5.attrs['dim'])} but the descriptors are {db.shape[1]}-D")
        if db.shape[1] == 0:
            raise NetVLADError(f"{path}: descriptors have 0 dimensions")
        _check_finite(db, path, "database", batch_size)
        _check_finite(query, path, "query", batch_size)
        yield db, query


# ---------------------------------------------------------------------------------------------- outputs


def example_queries(num_queries: int, num_examples: int) -> np.ndarray:
    """``num_examples`` query indices evenly spaced over the split (deterministic, first and last included)."""
    if num_examples <= 0 or num_queries == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, num_queries - 1, min(num_examples, num_queries)).round().astype(np.int64))


def _thumbnail(path: Path, size: tuple[int, int] = (240, 180)) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail(size)
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def draw_retrievals(
    split: Split,
    indices: np.ndarray,
    correct: np.ndarray,
    queries: np.ndarray,
    errors_m: np.ndarray | None = None,
    *,
    num_matches: int = NUM_SHOWN_MATCHES,
):
    """A matplotlib Figure: one row per query in ``queries`` with its top ``num_matches`` database images.

    ``indices`` and ``errors_m`` cover all queries; ``correct[row, rank]`` belongs to ``queries[row]``.
    Correct matches are framed green, wrong ones red, the query blue; images are read from
    ``split.image_root`` (a missing or unreadable file is drawn as a grey tile).
    """
    from matplotlib.figure import Figure

    if len(queries) == 0:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no example queries", ha="center", va="center")
        return fig
    cols = 1 + num_matches
    rows = len(queries)
    fig = Figure(figsize=(2.4 * cols, 2.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)

    def show(ax, path: Path, colour: str, title: str) -> None:
        img = _thumbnail(path)
        if img is None:
            ax.imshow(np.full((180, 240, 3), 200, dtype=np.uint8))
            ax.text(120, 90, "missing", ha="center", va="center", fontsize=8, color="0.3")
        else:
            ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        ax.set_title(title, fontsize=7)

    for row, q in enumerate(queries):
        err = "" if errors_m is None or not np.isfinite(errors_m[q]) else f", err {errors_m[q]:.0f} m"
        show(axes[row, 0], split.image_root / split.q_paths[q], "tab:blue", f"query {q}{err}")
        for rank in range(num_matches):
            ax = axes[row, rank + 1]
            db_index = int(indices[q, rank]) if rank < indices.shape[1] else -1
            if db_index < 0:
                ax.axis("off")
                continue
            dist_m = float(np.linalg.norm(split.db_utm[db_index] - split.q_utm[q]))
            ok = bool(correct[row, rank])
            show(
                ax,
                split.image_root / split.db_paths[db_index],
                "tab:green" if ok else "tab:red",
                f"#{rank + 1} db {db_index} ({dist_m:.0f} m)",
            )
    return fig


def save_figure_png(figure, path: str | Path, dpi: int = 80) -> None:
    """Write ``figure`` as a 256-colour PNG: a page of photo thumbnails is 4x smaller than matplotlib's RGBA PNG
    (≈ 0.4 MB instead of 1.6 MB for 8 queries), which matters for a file committed to git after every run."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as im:
        rgb = im.convert("RGB")
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, format="PNG",
                                                                                        optimize=True)


def _format_row(values: np.ndarray, fmt: str) -> str:
    return " ".join(fmt % v for v in values)


def _per_query_frame(
    split: Split,
    indices: np.ndarray,
    distances: np.ndarray,
    positives: list[np.ndarray],
    ranks: np.ndarray,
    estimates: np.ndarray,
    errors_m: np.ndarray,
    top: int,
) -> pd.DataFrame:
    top_idx, top_dist = indices[:, :top], distances[:, :top]
    valid = top_idx >= 0
    return pd.DataFrame(
        {
            "query_index": np.arange(split.num_queries),
            "query_path": split.q_paths,
            "utm_east": split.q_utm[:, 0],
            "utm_north": split.q_utm[:, 1],
            "num_positives": [len(p) for p in positives],
            "correct@1": (ranks == 1).astype(int),
            "first_correct_rank": pd.Series(ranks).where(ranks > 0).astype("Int64"),  # empty: none retrieved
            "top_indices": [_format_row(i[v], "%d") for i, v in zip(top_idx, valid)],
            # shortest text of each float32 squared distance that reads back to the same float32
            "top_distances": [_format_row(d[v].astype(np.float32), "%s") for d, v in zip(top_dist, valid)],
            "estimate_east": estimates[:, 0],
            "estimate_north": estimates[:, 1],
            "localisation_error_m": errors_m,
        }
    )


# ---------------------------------------------------------------------------------------------- evaluate


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class PanoramaGrouping:
    """Whether rankings are collapsed to one view per database panorama, and why.

    ``ids``: panorama id per database row (None when not collapsing); ``decided_by``: ``"split"`` (its
    ``extra.views_per_panorama``, or its absence) or ``"option"`` (``EvalConfig.collapse_panoramas``);
    ``views_per_panorama``: the split's record (None when it has none); ``grouped_by``: how views were grouped
    into panoramas (``"views_per_panorama"``: consecutive database rows, ``"file_names"``), None when not
    collapsing."""

    ids: np.ndarray | None
    decided_by: str
    views_per_panorama: int | None
    grouped_by: str | None

    @property
    def collapse(self) -> bool:
        return self.ids is not None

    @property
    def num_panoramas(self) -> int | None:
        return None if self.ids is None else int(self.ids.max()) + 1 if len(self.ids) else 0


def panorama_grouping(split: Split, collapse: bool | None, *, where: str | Path = "split.json") -> PanoramaGrouping:
    """Decide the panorama collapsing of ``split`` (see the module docstring).

    ``collapse=None`` collapses exactly when the split records ``extra.views_per_panorama`` > 1; ``True`` or
    ``False`` decide regardless. Views are grouped as the split records them (``views_per_panorama`` consecutive
    database rows per panorama; the database size must be a multiple of it) or, on a split without that record,
    by file name. A record that is not a positive integer raises :class:`NetVLADError` naming ``where``.
    """
    views = split.extra.get("views_per_panorama") if isinstance(split.extra, dict) else None
    if views is not None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise NetVLADError(f"{where}: extra.views_per_panorama must be a positive integer, got {views!r}")
        if split.num_db % views:
            raise NetVLADError(f"{where}: extra.views_per_panorama is {views} but the database has {split.num_db} "
                               f"images, not a multiple of {views}")
    decided_by = "split" if collapse is None else "option"
    if collapse is None:
        collapse = views is not None and views > 1
    if not collapse:
        return PanoramaGrouping(None, decided_by, views, None)
    if views is not None:
        return PanoramaGrouping(np.arange(split.num_db, dtype=np.int64) // views, decided_by, views,
                                "views_per_panorama")
    return PanoramaGrouping(panorama_ids_from_paths(split.db_paths), decided_by, views, "file_names")


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: ``metrics`` (numbers only, the metrics JSON) and ``settings`` (the settings
    JSON: names, switches and the recall N used)."""

    metrics: dict
    settings: dict

    def summary(self, model_name: str, metrics_json: str | Path) -> str:
        """One line: recall@1/5/10, the median error, the counts, the panorama collapsing and the metrics file."""
        numbers, used = self.metrics, self.settings
        shown = " ".join(f"R@{n} {100 * numbers[f'recall@{n}']:.1f}" for n in (1, 5, 10) if f"recall@{n}" in numbers)
        median = numbers["median_error_m"]
        median_text = "n/a" if median is None else f"{median:.1f} m"
        panoramas = (f", {used['num_panoramas']} panoramas (collapsed, from the "
                     f"{used['collapse_panoramas_decided_by']})" if used["collapse_panoramas"] else "")
        return (f"evaluate {model_name}: {shown}, median error {median_text} ({numbers['num_queries']} queries, "
                f"{numbers['num_db']} db{panoramas}) -> {metrics_json}")


def evaluate(
    features_h5: str | Path,
    split_dir: str | Path,
    *,
    metrics_json: str | Path,
    plot_csv: str | Path,
    per_query_csv: str | Path,
    retrievals_png: str | Path | None = None,
    settings_json: str | Path | None = None,
    model_name: str,
    cfg: EvalConfig | None = None,
    progress: bool = False,
) -> EvalResult:
    """Rank the split's database for every query, score the rankings and write the outputs; return what was
    written.

    The search is exact (:func:`netvlad_core.retrieval.exact_search`: blocked float32 GEMMs on the CPU over the
    features file's rows, ``cfg.batch_size`` queries per block) unless ``cfg.index_factory`` is set, in which case
    the exact search also runs and its recall is reported as ``exact_recall@N``. Rankings keep only the best view of
    every database panorama (Tokyo 24/7 protocol) when the split records ``views_per_panorama`` or
    ``cfg.collapse_panoramas`` is True (:func:`panorama_grouping`). An N of recall@N larger than the database
    (after collapsing: than the number of panoramas) is lowered to it with a :class:`NetVLADWarning`; the
    settings record both. Bad inputs, and two outputs (or an output and the features file) naming the same
    file, raise :class:`NetVLADError` before any work and leave every output path untouched.
    """
    cfg = cfg or EvalConfig()
    cfg.validate()
    distinct_paths({"--features": features_h5},
                   {"--metrics": metrics_json, "--plot": plot_csv, "--per-query": per_query_csv,
                    "--retrievals": retrievals_png, "--settings": settings_json})
    features_h5, split_dir = Path(features_h5), Path(split_dir)
    split, positives = _evaluation_split(split_dir)
    plan = _plan_rankings(split, split_dir, cfg, with_examples=retrievals_png is not None)
    distances, indices, exact_recalls = _rank(features_h5, split, positives, plan, cfg, progress=progress)

    recalls = recall_at_n(indices, positives, plan.ns)
    ranks = first_correct_rank(indices, positives)
    estimates = estimate_positions(indices, distances, split.db_utm, cfg.localisation_k, cfg.localisation_weighting,
                                   temperature=cfg.localisation_temperature)
    errors_m = localisation_errors(estimates, split.q_utm)
    metrics = _metrics(split, positives, plan.ns, recalls, exact_recalls, errors_m)
    settings = _settings(model_name, features_h5, split, split_dir, plan, cfg)

    plot_frame = pd.DataFrame({"model": model_name, "n": plan.ns, "recall": [recalls[n] for n in plan.ns]})
    per_query = _per_query_frame(split, indices, distances, positives, ranks, estimates, errors_m, cfg.per_query_top)
    figure = None
    if retrievals_png is not None:
        examples = plan.examples
        correct = correct_matrix(indices[examples, :NUM_SHOWN_MATCHES], [positives[q] for q in examples])
        figure = draw_retrievals(split, indices, correct, examples, errors_m)
    _write_outputs(metrics_json=metrics_json, metrics=metrics, plot_csv=plot_csv, plot_frame=plot_frame,
                   per_query_csv=per_query_csv, per_query=per_query, retrievals_png=retrievals_png, figure=figure,
                   settings_json=settings_json, settings=settings)
    return EvalResult(metrics=metrics, settings=settings)


def _evaluation_split(split_dir: Path) -> tuple[Split, list[np.ndarray]]:
    """The split and its queries' positives, checked: as many positive lists as queries, at least one database
    image and one query; a warning for the VG conversion of MSLS."""
    split = load_split(split_dir)
    positives = load_ground_truth(split_dir).positives
    if len(positives) != split.num_queries:
        raise NetVLADError(
            f"{split_dir}: ground truth has {len(positives)} queries but the manifest has {split.num_queries}"
        )
    if split.num_queries == 0 or split.num_db == 0:
        raise NetVLADError(f"{split_dir}: split needs at least one database image and one query")
    if split.extra.get("msls_vg_conversion"):
        warnings.warn(f"{split_dir}: the VG folder conversion of MSLS ({split.num_queries} queries), not the official "
                      f"MSLS protocol (740 val queries, `download --dataset msls`): recall not comparable with papers' "
                      f"MSLS-val figures", NetVLADWarning)
    return split, positives


@dataclass
class _RankingPlan:
    """What the rankings must hold: the panorama grouping, the recall@N asked for and those reported (capped at the
    number of ranked items), the example queries drawn, and the length of every ranking."""

    split_dir: Path
    grouping: PanoramaGrouping
    requested_ns: list[int]
    ns: list[int]
    too_large: list[int]
    ranked_items: int
    examples: np.ndarray
    needed: int


def _plan_rankings(split: Split, split_dir: Path, cfg: EvalConfig, *, with_examples: bool) -> _RankingPlan:
    grouping = panorama_grouping(split, cfg.collapse_panoramas, where=split_dir / "split.json")
    ranked_items = grouping.num_panoramas if grouping.collapse else split.num_db
    requested_ns = sorted({int(n) for n in cfg.recall_ns})
    ns = sorted({min(n, ranked_items) for n in requested_ns})
    examples = example_queries(split.num_queries, cfg.num_examples if with_examples else 0)
    needed = max(ns[-1], cfg.localisation_k, cfg.per_query_top, NUM_SHOWN_MATCHES if len(examples) else 1)
    return _RankingPlan(split_dir=split_dir, grouping=grouping, requested_ns=requested_ns, ns=ns,
                        too_large=[n for n in requested_ns if n > ranked_items], ranked_items=ranked_items,
                        examples=examples, needed=needed)


def _rank(features_h5: Path, split: Split, positives, plan: _RankingPlan, cfg: EvalConfig, *, progress: bool
          ) -> tuple[np.ndarray, np.ndarray, dict[int, float] | None]:
    """``(distances, indices, exact recall@N or None)``: every query's ranking (panoramas collapsed when the plan
    says so) with ``cfg``'s index, and the exact search's recall when that index is approximate."""
    panoramas = plan.grouping.ids
    with open_features(features_h5, split, batch_size=cfg.batch_size) as (db, query):
        if plan.too_large:  # warned once every input has been checked
            items = "panoramas" if plan.grouping.collapse else "images"
            warnings.warn(f"{plan.split_dir}: recall@{', recall@'.join(map(str, plan.too_large))} asked for, but the "
                          f"database has only {plan.ranked_items} {items}; reporting recall@{plan.ranked_items} "
                          f"instead", NetVLADWarning)

        def ranked(index_factory: str | None, index_params: str | None) -> tuple[np.ndarray, np.ndarray]:
            if panoramas is None:
                return search(db, query, plan.needed, index_factory=index_factory, index_params=index_params,
                              batch_size=cfg.batch_size, train_seed=cfg.train_seed, progress=progress)
            views = int(np.bincount(panoramas).max())
            k = min(plan.needed, int(panoramas.max()) + 1)
            dist, idx = search(db, query, k * views, index_factory=index_factory, index_params=index_params,
                               batch_size=cfg.batch_size, train_seed=cfg.train_seed, progress=progress)
            idx, dist = collapse_panoramas(idx, dist, panoramas, k)
            return dist, idx

        try:
            distances, indices = ranked(cfg.index_factory, cfg.index_params)
            exact = recall_at_n(ranked(None, None)[1], positives, plan.ns) if cfg.index_factory else None
        except NonFiniteDistances as e:  # finite as stored, but not once upcast or squared
            raise e.located(str(features_h5)) from None
    return distances, indices, exact


#: What each key of the metrics file (``metrics/test_<model>.json``, ``metrics/bench/<model>/<name>.json``) means;
#: ``N`` stands for a recall N, ``<T>`` for the split's positive radius in metres. The documentation's metrics
#: reference is generated from it.
METRIC_KEYS = {
    "recall@N": "fraction of the queries with a positive among the first N ranked database items (panoramas when "
                "they are collapsed); N above the database size is lowered to it, with a warning",
    "exact_recall@N": "recall@N of the exact search, reported beside an approximate `index-factory` search",
    "num_queries": "queries evaluated (every query of the split)",
    "num_db": "database images of the split",
    "num_queries_without_positives": "queries with no database image within the split's positive radius (they "
                                     "count as misses)",
    "median_error_m": "median distance in metres between a query's position and the one estimated from its top "
                      "`localisation-k` matches; null when half the queries or more got no position",
    "localised_within_<T>m": "fraction of the queries whose estimated position is within the positive radius",
}

#: What each key of the settings file (``metrics/eval_<model>.json``, not a DVC metric) records.
SETTINGS_KEYS = {
    "model": "the model's name (`--model-name`)",
    "features": "the features file evaluated",
    "dataset": "the split's dataset (`split.json`)",
    "split": "the split's name",
    "split_dir": "the split folder",
    "index": "`Flat` for the exact search, else the faiss index factory string",
    "index_params": "faiss search parameters of the approximate index (`index-params`), or null",
    "collapse_panoramas": "whether each panorama's views counted once per ranking",
    "collapse_panoramas_decided_by": "`split` (its `views_per_panorama`) or `option` (`collapse-panoramas` yes/no)",
    "views_per_panorama": "views per database panorama recorded by the split (Tokyo 24/7: 12), or null",
    "panoramas_grouped_by": "how views were grouped into panoramas, or null",
    "num_panoramas": "database panoramas after grouping, or null",
    "localisation_k": "matches whose positions estimate a query's position",
    "localisation_weighting": "how those matches are weighted: `uniform`, `inverse_distance` or `softmax`",
    "localisation_temperature": "softmax temperature of the weighting",
    "recall_n_requested": "the N of recall@N asked for",
    "recall_n": "the N reported (those above the database size lowered to it)",
    "recall_n_capped_at": "the database size the N were lowered to, or null",
}


def _metrics(split: Split, positives, ns: list[int], recalls: dict[int, float],
             exact_recalls: dict[int, float] | None, errors_m: np.ndarray) -> dict:
    """The metrics file's content. Numbers only: `dvc metrics show` / `dvc exp show` list every key as a metric."""
    errors_or_inf = np.where(np.isnan(errors_m), np.inf, errors_m)
    metrics: dict = {f"recall@{n}": recalls[n] for n in ns}
    if exact_recalls is not None:
        metrics.update({f"exact_recall@{n}": exact_recalls[n] for n in ns})
    metrics.update(
        {
            "num_queries": split.num_queries,
            "num_db": split.num_db,
            "num_queries_without_positives": int(sum(len(p) == 0 for p in positives)),
            "median_error_m": _finite_or_none(float(np.median(errors_or_inf))),
            f"localised_within_{split.pos_dist_thr:g}m": float(np.mean(errors_or_inf <= split.pos_dist_thr)),
        }
    )
    return metrics


def _settings(model_name: str, features_h5: Path, split: Split, split_dir: Path, plan: _RankingPlan,
              cfg: EvalConfig) -> dict:
    """How the metrics were made (the settings file)."""
    grouping = plan.grouping
    return {
        "model": model_name,
        "features": str(features_h5),
        "dataset": split.dataset,
        "split": split.name,
        "split_dir": str(split_dir),
        "index": cfg.index_factory or "Flat",
        "index_params": cfg.index_params,
        "collapse_panoramas": grouping.collapse,
        "collapse_panoramas_decided_by": grouping.decided_by,
        "views_per_panorama": grouping.views_per_panorama,
        "panoramas_grouped_by": grouping.grouped_by,
        "num_panoramas": grouping.num_panoramas,
        "localisation_k": cfg.localisation_k,
        "localisation_weighting": cfg.localisation_weighting,
        "localisation_temperature": cfg.localisation_temperature,
        "recall_n_requested": plan.requested_ns,
        "recall_n": plan.ns,
        "recall_n_capped_at": plan.ranked_items if plan.too_large else None,
    }


def _write_outputs(*, metrics_json, metrics: dict, plot_csv, plot_frame: pd.DataFrame, per_query_csv,
                   per_query: pd.DataFrame, retrievals_png, figure, settings_json, settings: dict) -> None:
    """Every output, all or none: each temporary file is written before any is renamed into place."""
    metrics_text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"  # strict JSON (NaN became null above)
    settings_text = json.dumps(settings, indent=2, allow_nan=False) + "\n"
    with contextlib.ExitStack() as stack:
        tmp_metrics = stack.enter_context(atomic_path(metrics_json))
        tmp_plot = stack.enter_context(atomic_path(plot_csv))
        tmp_per_query = stack.enter_context(atomic_path(per_query_csv))
        if figure is not None:
            save_figure_png(figure, stack.enter_context(atomic_path(retrievals_png)))
        if settings_json is not None:
            stack.enter_context(atomic_path(settings_json)).write_text(settings_text)
        # No float_format: pandas writes floats as repr, at full float64 precision (see the module docstring).
        per_query.to_csv(tmp_per_query, index=False)
        plot_frame.to_csv(tmp_plot, index=False)
        tmp_metrics.write_text(metrics_text)

