"""Mapillary Street-Level Sequences (MSLS) read with the official protocol, into the normalised split form.

Layout (as the MSLS archives unpack): ``<root>/train_val/<city>/{query,database}/`` with ``images/<key>.jpg``,
``raw.csv`` (key, lon, lat, ca, captured_at, pano), ``postprocessed.csv`` (key, easting, northing, night,
view_direction, …), ``seq_info.csv`` (key, sequence_key, frame_number) and ``subtask_index.csv`` (boolean columns
all, s2w, w2s, o2n, n2o, d2n, n2d); every CSV is written by pandas with an unnamed integer index column. ``test/<city>``
has no GPS and cannot be evaluated here.

The rules are those of the official loader, mapillary_sls ``datasets/msls.py`` (class ``MSLS``, task im2im), with the
positive radius of its ``evaluate.py`` (``--threshold 25``):

- every row of ``postprocessed.csv`` is a frame; its index label ``i`` is a *position* in the other three CSVs: its
  image is ``images/<seq_info.key[i]>.jpg`` and its UTM position is the row's ``easting``/``northing``;
- ``val`` (cities cph and sf) and a single city evaluated on its own: a frame is kept when ``subtask_index[subtask][i]``
  is true (default subtask ``all``; ``s2w``, ``w2s``, ``o2n``, ``n2o``, ``d2n``, ``n2d`` on request), for queries and
  database alike; ``train`` (the 22 other cities of ``train_val``) applies no subtask filter;
- panoramas are excluded: a frame is kept only when ``raw.pano[i]`` is false (queries and database);
- positives are the database frames of the *same city* within the radius of the query (UTM distance); a query without
  any is dropped. The radius is 25 m for ``val`` and single cities (evaluation) and 10 m for ``train`` (the
  official training ``posDistThr``; images beyond 25 m are its negatives).

The written split keeps the cities in the order asked for (val: cph, then sf), queries and database rows in file
order, the positives computed per city (:attr:`Split.ground_truth`), and records in ``split.json`` ``extra``: the
protocol (source, task, subtask, panoramas, radius), the cities with their row ranges, and the number of queries
dropped for want of a positive (``dropped_queries``). The official val set with subtask ``all`` has 18,871 database
images and 740 queries; other counts give a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import NetVLADError, NetVLADWarning
from .manifest import GroundTruth, Split, radius_neighbours

#: The official city lists (mapillary_sls ``default_cities``).
TRAIN_CITIES = ("trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto", "saopaulo",
                "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa", "phoenix", "goa",
                "amman", "nairobi", "manila")
VAL_CITIES = ("cph", "sf")
TEST_CITIES = ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala")
ALL_CITIES = TRAIN_CITIES + VAL_CITIES + TEST_CITIES
SUBTASKS = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
ROLES = (("database", "database"), ("query", "query"))  # (role in the split, MSLS folder)

EVAL_RADIUS_M = 25.0      # evaluate.py --threshold (default 25): positives of val and single-city splits
TRAIN_RADIUS_M = 10.0     # MSLS(mode='train') posDistThr: a train query is kept with a database image within 10 m
NON_TRIV_POS_DIST_SQ_THR = TRAIN_RADIUS_M ** 2

#: The official val set (cph + sf, subtask all, no panoramas, queries with a positive within 25 m).
PUBLISHED_VAL = {"num_db": 18871, "num_queries": 740}
#: The VG folder conversion (VPR-datasets-downloader format_mapillary.py) keeps every non-panorama val query.
VG_CONVERSION_QUERIES = "about 11,000"

SOURCE = "mapillary_sls datasets/msls.py (MSLS class, task im2im) and evaluate.py (--threshold 25)"


def split_names(root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """``train``, ``val`` and every train/val city (a single city evaluated on its own)."""
    return ("train", "val") + TRAIN_CITIES + VAL_CITIES


def default_splits(root: str | os.PathLike) -> list[str]:
    """What ``download`` writes when no split is asked for: ``val``, and ``train`` when all 22 train cities are
    there."""
    base = Path(root) / "train_val"
    present = [c for c in TRAIN_CITIES if (base / c).is_dir()]
    return ["train", "val"] if len(present) == len(TRAIN_CITIES) else ["val"]


@dataclass
class CityFrames:
    """One city's kept database and query frames (image paths relative to the MSLS root, UTM) and what was
    filtered out."""

    city: str
    paths: dict[str, list[str]]
    utm: dict[str, np.ndarray]
    excluded_panoramas: dict[str, int]
    outside_subtask: dict[str, int]


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found (MSLS layout: train_val/<city>/{{query,database}}/*.csv)")
    try:
        frame = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise NetVLADError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise NetVLADError(f"{path}: missing column {', '.join(missing)} (found: {', '.join(map(str, frame.columns))})")
    return frame


def _booleans(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """A CSV column of True/False (or 1/0) as booleans; anything else is an error naming the file."""
    if values.dtype == bool:
        return values.to_numpy()
    if values.dtype.kind in "iu" and set(np.unique(values)) <= {0, 1}:
        return values.to_numpy().astype(bool)
    words = values.astype(str).str.strip().str.lower()
    if set(words) <= {"true", "false", "1", "0"}:
        return words.isin(("true", "1")).to_numpy()
    raise NetVLADError(f"{path}: column {column} must hold True/False, got {sorted(set(values.astype(str)))[:3]}")


def _frame_labels(post: pd.DataFrame, path: Path) -> np.ndarray:
    index = post.index
    if index.dtype.kind not in "iu":
        raise NetVLADError(f"{path}: the first (index) column must hold integer frame numbers")
    if index.has_duplicates:
        raise NetVLADError(f"{path}: frame number {int(index[index.duplicated()][0])} appears twice")
    return index.to_numpy().astype(np.int64)


def read_city(root: str | os.PathLike, city: str, *, subtask: str | None) -> CityFrames:
    """The frames of one ``train_val`` city that the official loader keeps: subtask filter (``subtask`` not None),
    then panoramas excluded; queries are *not* yet filtered by positives (see :func:`msls_split`)."""
    root = Path(root)
    if city in TEST_CITIES:
        raise NetVLADError(f"{city}: an MSLS test city has no GPS (test/{city}); evaluate on val or a train_val city")
    city_dir = root / "train_val" / city
    if not city_dir.is_dir():
        raise NetVLADError(f"{city_dir}: city folder not found (MSLS layout: <root>/train_val/<city>/)")
    paths, utm, panoramas, outside = {}, {}, {}, {}
    for role, folder_name in ROLES:
        folder = city_dir / folder_name
        post_path, raw_path, seq_path, sub_path = (folder / n for n in (
            "postprocessed.csv", "raw.csv", "seq_info.csv", "subtask_index.csv"))
        post = _read_csv(post_path, ("easting", "northing"))
        raw = _read_csv(raw_path, ("pano",))
        seq = _read_csv(seq_path, ("key",))
        labels = _frame_labels(post, post_path)
        keep = (labels >= 0) & (labels < len(seq))  # the official arange_as_seq skips frames beyond seq_info
        outside[role] = 0
        if subtask is not None:
            sub = _read_csv(sub_path, (subtask,))
            in_subtask = np.zeros(len(labels), dtype=bool)
            flags = _booleans(sub[subtask], sub_path, subtask)
            valid = (labels >= 0) & (labels < len(flags))
            in_subtask[valid] = flags[labels[valid]]
            outside[role] = int((keep & ~in_subtask).sum())
            keep &= in_subtask
        pano = np.ones(len(labels), dtype=bool)
        pano_flags = _booleans(raw["pano"], raw_path, "pano")
        valid = (labels >= 0) & (labels < len(pano_flags))
        pano[valid] = pano_flags[labels[valid]]
        panoramas[role] = int((keep & pano).sum())
        keep &= ~pano
        kept = labels[keep]
        keys = seq["key"].to_numpy()[kept]
        coords = post.loc[kept, ["easting", "northing"]].to_numpy(dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(coords).all():
            raise NetVLADError(f"{post_path}: easting/northing contain NaN or infinite values")
        paths[role] = [f"train_val/{city}/{folder_name}/images/{key}.jpg" for key in keys]
        utm[role] = coords
    return CityFrames(city, paths, utm, panoramas, outside)


def cities_of(split_name: str) -> tuple[str, ...]:
    if split_name == "train":
        return TRAIN_CITIES
    if split_name == "val":
        return VAL_CITIES
    if split_name in TRAIN_CITIES + VAL_CITIES:
        return (split_name,)
    raise NetVLADError(f"msls: unknown split {split_name!r} (valid: train, val or a train/val city)")


def msls_split(root: str | os.PathLike, split_name: str, *, subtask: str = "all") -> Split:
    """Split ``split_name`` (``val``, ``train`` or one train/val city) of the MSLS folder ``root`` under the official
    protocol (module docstring), with its positives computed per city."""
    if subtask not in SUBTASKS:
        raise NetVLADError(f"msls: unknown subtask {subtask!r} (valid: {', '.join(SUBTASKS)})")
    root = Path(root)
    training = split_name == "train"
    keep_radius = TRAIN_RADIUS_M if training else EVAL_RADIUS_M
    paths: dict[str, list[str]] = {"database": [], "query": []}
    utm: dict[str, list[np.ndarray]] = {"database": [], "query": []}
    positives: list[np.ndarray] = []
    train_positives: list[np.ndarray] = []
    per_city = []
    dropped_total = 0
    for city in cities_of(split_name):
        frames = read_city(root, city, subtask=None if training else subtask)
        db_utm, q_utm = frames.utm["database"], frames.utm["query"]
        within_keep = radius_neighbours(db_utm, q_utm, keep_radius)
        kept = np.array([i for i, p in enumerate(within_keep) if len(p)], dtype=np.int64)
        offset = len(paths["database"])
        for found, out in ((radius_neighbours(db_utm, q_utm[kept], EVAL_RADIUS_M), positives),
                           (radius_neighbours(db_utm, q_utm[kept], TRAIN_RADIUS_M), train_positives)):
            out.extend(p + offset for p in found)
        per_city.append({
            "city": city,
            "db_rows": [offset, offset + len(db_utm)],
            "query_rows": [len(paths["query"]), len(paths["query"]) + len(kept)],
            "dropped_queries": int(len(q_utm) - len(kept)),
            "excluded_panoramas": frames.excluded_panoramas,
            "outside_subtask": frames.outside_subtask,
        })
        dropped_total += int(len(q_utm) - len(kept))
        paths["database"].extend(frames.paths["database"])
        utm["database"].append(db_utm)
        paths["query"].extend(frames.paths["query"][i] for i in kept)
        utm["query"].append(q_utm[kept])
    protocol = {
        "name": "msls-official",
        "source": SOURCE,
        "task": "im2im",
        "subtask": None if training else subtask,
        "panoramas": "excluded",
        "positives": "database images of the same city within pos_dist_thr of the query (UTM)",
        "queries_kept": f"those with a database image within {keep_radius:g} m",
    }
    split = Split(
        dataset="msls",
        name=split_name,
        image_root=root.resolve(),
        db_paths=paths["database"],
        db_utm=np.concatenate(utm["database"]).reshape(-1, 2),
        q_paths=paths["query"],
        q_utm=np.concatenate(utm["query"]).reshape(-1, 2),
        pos_dist_thr=EVAL_RADIUS_M,
        non_triv_pos_dist_sq_thr=NON_TRIV_POS_DIST_SQ_THR,
        extra={"protocol": protocol, "dropped_queries": dropped_total, "cities": per_city},
        ground_truth=GroundTruth(positives=positives, train_positives=train_positives),
    )
    if split_name == "val" and subtask == "all":
        published = (PUBLISHED_VAL["num_db"], PUBLISHED_VAL["num_queries"])
        split.extra["published_counts"] = dict(PUBLISHED_VAL)
        if (split.num_db, split.num_queries) != published:
            warnings.warn(f"{root}: MSLS val has {split.num_db} database images and {split.num_queries} queries here; "
                          f"the official protocol gives {published[0]} and {published[1]} on the complete dataset "
                          f"(a partial or modified copy gives figures not comparable with papers)", NetVLADWarning)
    return split


def msls_splits(root: str | os.PathLike, splits: Sequence[str] | None, *, subtask: str = "all") -> list[Split]:
    """:func:`msls_split` of each of ``splits`` (none given: :func:`default_splits`)."""
    root = Path(root)
    if not (root / "train_val").is_dir():
        raise NetVLADError(f"{root}: no train_val folder (MSLS layout: <root>/train_val/<city>/{{query,database}})")
    return [msls_split(root, s, subtask=subtask) for s in (list(splits) if splits else default_splits(root))]
