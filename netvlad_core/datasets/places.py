"""Places for the places recipe: groups of images that show the same place, from any split.

A split folder's images (its database rows, then its queries: image ``i`` of a split is database row ``i`` for
``i < num_db``, else query ``i - num_db``) become places in one of two ways (:func:`load_places`):

- the split has a ``places.csv`` (``path``, ``place``; written by the GSV-Cities reader,
  :mod:`netvlad_core.datasets.gsv_cities`): its places as listed;
- otherwise the *places view* of its UTM positions, as SuperPlace turns Pittsburgh, MSLS and SF-XL into places: the
  plane is cut into square cells of ``cell_size_m`` (cell ``(floor(east / s), floor(north / s))``), and where the
  split knows which way an image looks (:func:`view_headings`) each cell is cut again into ``heading_sectors``
  sectors of ``360 / N`` degrees from north (``[0, 360/N)``, ``[360/N, 720/N)``, …): images of one cell that face
  different ways do not show the same place. Images whose heading is unknown form a sector of their own.

Either way a place needs at least ``min_images`` images (the recipe's K); smaller ones are dropped and counted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import NetVLADError
from ..io import require_file
from .manifest import MANIFEST, Split

PLACES_CSV = "places.csv"
HEADING_COLUMN = "heading_deg"
PITTSBURGH_YAW = re.compile(r"_yaw(\d+)\.[A-Za-z]+$")  # 000/000829_pitch1_yaw1.jpg: yaws 1..12, 30 degrees apart


@dataclass
class Places:
    """The places of a split: ``labels[i]`` is image ``i``'s place (0 .. num_places - 1; -1: in no place)."""

    split: Split
    labels: np.ndarray
    source: str
    dropped_places: int = 0
    dropped_images: int = 0

    @property
    def num_places(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    def members(self) -> list[np.ndarray]:
        """The image indices of every place, ascending."""
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels[self.labels >= 0], minlength=self.num_places)
        kept = order[len(self.labels) - int(counts.sum()):]
        return np.split(kept, np.cumsum(counts)[:-1]) if self.num_places else []

    def files(self) -> list[Path]:
        return self.split.db_files() + self.split.query_files()

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()).hexdigest()

    def describe(self) -> str:
        used = int((self.labels >= 0).sum())
        return (f"{self.num_places} places of {self.split.dataset} {self.split.name} ({self.source}): {used} of "
                f"{len(self.labels)} images; {self.dropped_places} places with fewer images dropped "
                f"({self.dropped_images} images)")


def keep_places(keys: np.ndarray, min_images: int) -> tuple[np.ndarray, int, int]:
    """Labels 0..P-1 for the groups of equal ``keys`` (rows of an integer array; in the order of their sorted keys)
    with at least ``min_images`` members, -1 for the rest; and the number of groups and images dropped."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), 0, 0
    _, group, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    kept = counts >= min_images
    relabel = np.where(kept, np.cumsum(kept) - 1, -1)
    return relabel[group].astype(np.int64), int((~kept).sum()), int(counts[~kept].sum())


def cell_keys(utm: np.ndarray, headings: np.ndarray | None, cell_size_m: float, heading_sectors: int) -> np.ndarray:
    """Per image ``(cell east, cell north, sector)``: the UTM cell of side ``cell_size_m`` and the heading sector
    (``floor((heading mod 360) / (360 / heading_sectors))``; -1 where the heading is unknown or not used)."""
    cells = np.floor(np.asarray(utm, dtype=np.float64) / cell_size_m).astype(np.int64)
    sector = np.full(len(cells), -1, dtype=np.int64)
    if headings is not None and heading_sectors > 1:
        h = np.asarray(headings, dtype=np.float64)
        known = np.isfinite(h)
        sector[known] = np.floor(np.mod(h[known], 360.0) / (360.0 / heading_sectors)).astype(np.int64)
        sector = np.minimum(sector, heading_sectors - 1)
    return np.column_stack([cells, sector])


def view_headings(split: Split, split_dir: Path | None = None) -> np.ndarray | None:
    """Which way each image (database, then queries) looks, in degrees, NaN where unknown; ``None`` when the split
    knows no heading at all. From, in this order: a ``heading_deg`` column of the split's manifest; the built-in
    city's poses (``poses_<split>.csv`` beside its images, ``yaw_deg``); a VG file name's heading field
    (``@east@north@zone@letter@lat@lon@pano@tile@heading@…``); Pittsburgh's ``_yaw<k>`` (k = 1..12: 30·(k-1))."""
    n = split.num_db + split.num_queries
    paths = list(split.db_paths) + list(split.q_paths)
    for source in (_manifest_headings, _city_headings):
        h = source(split, split_dir)
        if h is not None:
            return h
    h = np.full(n, np.nan)
    for i, p in enumerate(paths):
        h[i] = _name_heading(split.dataset, p)
    return h if np.isfinite(h).any() else None


def _manifest_headings(split: Split, split_dir: Path | None) -> np.ndarray | None:
    if split_dir is None or not (Path(split_dir) / MANIFEST).is_file():
        return None
    frame = pd.read_csv(Path(split_dir) / MANIFEST, nrows=0)
    if HEADING_COLUMN not in frame.columns:
        return None
    column = pd.read_csv(Path(split_dir) / MANIFEST, usecols=["role", HEADING_COLUMN])
    db, q = column[column["role"] == "database"], column[column["role"] == "query"]
    return np.concatenate([db[HEADING_COLUMN].to_numpy(np.float64), q[HEADING_COLUMN].to_numpy(np.float64)])


def _city_headings(split: Split, split_dir: Path | None) -> np.ndarray | None:
    """The built-in city's yaws, from the poses file its renderer writes beside the images."""
    poses = Path(split.image_root).parent / f"poses_{split.name}.csv"
    if split.dataset != "synthetic" or not poses.is_file():
        return None
    frame = pd.read_csv(poses, dtype={"path": str, "role": str})
    yaw = {(r, p): y for r, p, y in zip(frame["role"], frame["path"], frame["yaw_deg"])}
    db = [yaw.get(("database", p), np.nan) for p in split.db_paths]
    q = [yaw.get(("query", p.removeprefix("queries_real/")), np.nan) for p in split.q_paths]
    return np.asarray(db + q, dtype=np.float64)


def _name_heading(dataset: str, path: str) -> float:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("@"):
        fields = name.split("@")
        try:
            return float(fields[9]) if len(fields) > 10 and fields[9] else np.nan
        except ValueError:
            return np.nan
    match = PITTSBURGH_YAW.search(name) if dataset.startswith("pitts") else None
    return 30.0 * (int(match.group(1)) - 1) if match else np.nan


def places_from_csv(split_dir: Path, split: Split, min_images: int) -> Places:
    """The places listed in ``<split_dir>/places.csv`` (``path``, ``place``); every image of the split must be
    listed once; places with fewer than ``min_images`` images dropped and counted."""
    path = require_file(Path(split_dir) / PLACES_CSV)
    try:
        frame = pd.read_csv(path, dtype={"path": str})
        listed = dict(zip(frame["path"], frame["place"].astype(np.int64)))
    except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise NetVLADError(f"{path}: not a places table with columns path, place ({e})") from None
    paths = list(split.db_paths) + list(split.q_paths)
    missing = [p for p in paths if p not in listed]
    if missing or len(listed) != len(frame):
        raise NetVLADError(f"{path}: {len(missing)} images of the split are not listed (first: "
                           f"{missing[0] if missing else '-'}) or a path is listed twice")
    labels, dropped, dropped_images = keep_places(np.array([[listed[p]] for p in paths], np.int64), min_images)
    return Places(split, labels, PLACES_CSV, dropped, dropped_images)


def load_places(split_dir: str | Path | None, split: Split, *, cell_size_m: float, heading_sectors: int,
                min_images: int) -> Places:
    """The places of ``split``, read from its folder ``split_dir`` (``None``: no folder, the places view of its
    UTM); see the module docstring. A one-line error when there are fewer than 2 places."""
    split_dir = Path(split_dir) if split_dir is not None else None
    if split_dir is not None and (split_dir / PLACES_CSV).exists():
        places = places_from_csv(split_dir, split, min_images)
    else:
        headings = view_headings(split, split_dir)
        utm = np.vstack([split.db_utm, split.q_utm])
        keys = cell_keys(utm, headings, cell_size_m, heading_sectors if headings is not None else 1)
        labels, dropped, dropped_images = keep_places(keys, min_images)
        source = f"UTM cells of {cell_size_m:g} m" + (f" x {heading_sectors} heading sectors"
                                                      if headings is not None and heading_sectors > 1 else "")
        places = Places(split, labels, source, dropped, dropped_images)
    if places.num_places < 2:
        raise NetVLADError(f"{split_dir or split.name}: {places.describe()}: a place batch needs at least 2 "
                           f"places (larger cells or fewer images per place?)")
    return places
