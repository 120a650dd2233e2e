"""Ranking one folder of photos against another, without positions or split files (``netvlad retrieve``).

Both folders are searched recursively for ``.jpg``/``.jpeg``/``.png`` files (sorted by path). They become one
unlabelled :class:`~netvlad_core.datasets.manifest.Split` (database = ``--database``, queries = ``--queries``, paths
relative to the folders' common parent, no positions) whose descriptors go through the ``features`` stage's batched,
resumable extraction (:func:`netvlad_core.features.extract_split_features`: an interrupted run resumes its
``.<features>.partial`` file) into a features file beside the output, and every query's top ``--top`` database
images come from the exact search every other command uses (:func:`netvlad_core.retrieval.exact_search`: squared
L2, equal distances ranked by the lower database index).

Outputs, each written atomically: ``matches.csv`` (``query,rank,database,squared_distance``: one row per query and
rank, image paths as given under the two folders, distances at full float32 precision) and optionally an HTML page
showing each query beside its matches (the images linked by paths relative to the page, so keep them together).
"""

from __future__ import annotations

import html
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import RunConfig, option
from .errors import NetVLADError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class RetrieveConfig:
    """How many matches ``retrieve`` lists and shows."""

    top: int = option(10, "Database images listed per query, best first.")
    page_matches: int = option(5, "Matches shown per query on the HTML page (at most --top).")
    query_rows: int = option(1024, "Queries per block of the exact search (bounds memory).")

    def validate(self) -> None:
        if self.top < 1:
            raise NetVLADError(f"--top must be at least 1, got {self.top}")
        if self.page_matches < 1:
            raise NetVLADError(f"--page-matches must be at least 1, got {self.page_matches}")
        if self.query_rows < 1:
            raise NetVLADError(f"--query-rows must be at least 1, got {self.query_rows}")


def list_images(folder: str | os.PathLike, option_name: str) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted by relative path); an error when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NetVLADError(f"{folder}: {option_name} folder not found")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    if not found:
        raise NetVLADError(f"{folder}: no .jpg/.jpeg/.png images ({option_name})")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def unlabelled_split(database_dir: str | os.PathLike, queries_dir: str | os.PathLike):
    """The two folders as one :class:`Split` without positions (UTM 0), paths relative to their common parent."""
    from .datasets.manifest import Split

    db_files = list_images(database_dir, "--database")
    q_files = list_images(queries_dir, "--queries")
    root = Path(os.path.commonpath([str(Path(database_dir).resolve()), str(Path(queries_dir).resolve())]))
    rel = [[p.resolve().relative_to(root).as_posix() for p in files] for files in (db_files, q_files)]
    return Split(dataset="unlabelled", name="retrieve", image_root=root, db_paths=rel[0],
                 db_utm=np.zeros((len(db_files), 2)), q_paths=rel[1], q_utm=np.zeros((len(q_files), 2)),
                 extra={"database": str(Path(database_dir)), "queries": str(Path(queries_dir))})


def default_features_path(out_csv: str | os.PathLike) -> Path:
    """Where the descriptors go when no ``--features`` is given: ``<out stem>.features.h5`` beside the CSV."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + ".features.h5")


def _shown_path(split, role: str, i: int, folders: dict[str, Path]) -> str:
    """An image as the user named it: relative to its folder (``--database``/``--queries``)."""
    rel = split.db_paths[i] if role == "database" else split.q_paths[i]
    return (split.image_root / rel).relative_to(folders[role]).as_posix()


def write_page(path: Path, split, indices: np.ndarray, distances: np.ndarray, folders: dict[str, Path],
               num_matches: int) -> str:
    """The HTML page: one row per query, the query (blue frame) then its matches (rank, d², file name)."""
    def src(rel: str) -> str:
        target = os.path.relpath(split.image_root / rel, path.parent.resolve())
        return urllib.parse.quote(Path(target).as_posix())

    def figure(rel: str, caption: str, css: str) -> str:
        return (f'<figure class="{css}"><img src="{src(rel)}" alt="{html.escape(rel)}" loading="lazy">'
                f"<figcaption>{caption}</figcaption></figure>")

    rows = []
    for q in range(split.num_queries):
        cells = [figure(split.q_paths[q], f"query<br>{html.escape(_shown_path(split, 'query', q, folders))}", "query")]
        for rank in range(min(num_matches, indices.shape[1])):
            j = int(indices[q, rank])
            caption = (f"#{rank + 1} d²={float(distances[q, rank]):.4f}<br>"
                       f"{html.escape(_shown_path(split, 'database', j, folders))}")
            cells.append(figure(split.db_paths[j], caption, "match"))
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>netvlad retrieve: {split.num_queries} queries</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.row {{ display: flex; gap: 8px; margin-bottom: 12px; align-items: flex-start; }}
figure {{ margin: 0; width: 200px; font-size: 11px; word-break: break-all; }}
img {{ width: 200px; height: 150px; object-fit: cover; display: block; border: 4px solid #ccc; }}
.query img {{ border-color: #1f77b4; }}
</style></head><body>
<h1>netvlad retrieve</h1>
<p>{split.num_queries} queries from <code>{html.escape(str(folders['query']))}</code> against {split.num_db} database
images from <code>{html.escape(str(folders['database']))}</code>; the top {min(num_matches, indices.shape[1])} of each,
nearest first (squared L2 distance d² of the global descriptors).</p>
{chr(10).join(rows)}
</body></html>
"""


def retrieve(model_file: str | os.PathLike, database_dir: str | os.PathLike, queries_dir: str | os.PathLike,
             out_csv: str | os.PathLike, *, features_h5: str | os.PathLike | None = None,
             html_page: str | os.PathLike | None = None, cfg: RetrieveConfig, features_cfg, run: RunConfig,
             log: Callable[[str], None] = print) -> Path:
    """The ``retrieve`` command: encode both folders with the model in ``model_file`` (resumable features file
    ``features_h5``, default :func:`default_features_path`), rank the database for every query exactly, and write
    ``out_csv`` (and ``html_page`` when given). Returns the CSV's path."""
    import pandas as pd

    from .distributed import distributed_session
    from .features import extract_split_features
    from .io import atomic_path, distinct_paths, open_h5_for_reading
    from .models import load_model
    from .retrieval import NonFiniteDistances, exact_search

    cfg.validate()
    features_cfg.validate()
    out_csv = Path(out_csv)
    features_h5 = Path(features_h5) if features_h5 is not None else default_features_path(out_csv)
    # the features file is written, then read by this command (and resumed by the next): an input, not an output
    if Path(features_h5).resolve() == Path(model_file).resolve():
        raise NetVLADError(f"{features_h5}: given as --features and as the input --model")
    distinct_paths({"--model": model_file, "--features": features_h5}, {"--out": out_csv, "--html": html_page})
    split = unlabelled_split(database_dir, queries_dir)
    folders = {"database": Path(database_dir).resolve(), "query": Path(queries_dir).resolve()}
    for option_name, path in (("--out", out_csv), ("--features", features_h5), ("--html", html_page)):
        if path is not None and Path(path).suffix.lower() in IMAGE_SUFFIXES and any(
                Path(path).resolve().is_relative_to(f) for f in folders.values()):
            raise NetVLADError(f"{path}: the output {option_name} would be read as an image of the next run")
    net, model_cfg = load_model(model_file)
    with distributed_session(run.device, run.dist_timeout) as dist:
        if dist.enabled:
            raise NetVLADError("retrieve runs in one process; start it without torchrun")
        extract_split_features(net, model_cfg, split, features_h5, device=dist.device, cfg=features_cfg,
                               progress=run.progress)
    with open_h5_for_reading(features_h5) as h5:
        try:
            distances, indices = exact_search(h5["db"], h5["query"], cfg.top, query_rows=cfg.query_rows,
                                              progress=run.progress)
        except NonFiniteDistances as e:
            raise e.located(str(features_h5)) from None
    k = indices.shape[1]
    frame = pd.DataFrame({
        "query": np.repeat([_shown_path(split, "query", q, folders) for q in range(split.num_queries)], k),
        "rank": np.tile(np.arange(1, k + 1), split.num_queries),
        "database": [_shown_path(split, "database", int(j), folders) for j in indices.reshape(-1)],
        "squared_distance": [str(d) for d in distances.reshape(-1).astype(np.float32)],  # shortest float32 text
    })
    page = None
    if html_page is not None:
        page = write_page(Path(html_page).resolve(), split, indices, distances, folders, min(cfg.page_matches, k))
    with atomic_path(out_csv) as tmp_csv:
        frame.to_csv(tmp_csv, index=False)
        if page is not None:
            with atomic_path(html_page) as tmp_html:
                tmp_html.write_text(page, encoding="utf-8")
    log(f"retrieve: {split.num_queries} queries × top {k} of {split.num_db} database images → {out_csv}"
        + (f", {html_page}" if html_page is not None else "") + f" (descriptors: {features_h5})")
    return out_csv
