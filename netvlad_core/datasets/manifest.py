"""The normalised form every stage after ``download`` reads: one folder per split.

``<dataset_dir>/<split>/`` holds
- ``manifest.csv``: one row per image, database rows first then queries, in the spec's order; columns
  ``path`` (relative to the image root), ``role`` (``database``/``query``), ``utm_east``, ``utm_north``,
  ``timestamp`` (empty when unknown);
- ``split.json``: dataset, split name, image root, thresholds, counts;
- ``ground_truth.h5``: per query, the database indices within ``pos_dist_thr`` (``positives``, for
  evaluation) and within ``sqrt(non_triv_pos_dist_sq_thr)`` (``train_positives``), as CSR arrays
  ``<name>/indptr`` and ``<name>/indices``, computed once with a KD-tree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import NetVLADError
from ..io import (
    atomic_h5,
    atomic_path,
    note_reads_under,
    open_h5_for_reading,
    read_json,
    require_file,
    write_json,
)
from .specs import check_thresholds

MANIFEST = "manifest.csv"
SPLIT_JSON = "split.json"
GROUND_TRUTH = "ground_truth.h5"
COLUMNS = ["path", "role", "utm_east", "utm_north", "timestamp"]


@dataclass
class GroundTruth:
    """Per-query database indices, sorted by distance: ``positives`` (eval) and ``train_positives``."""

    positives: list[np.ndarray]
    train_positives: list[np.ndarray]


@dataclass
class Split:
    """One split: database and query images with positions, thresholds and where the images lie."""

    dataset: str
    name: str
    image_root: Path
    db_paths: list[str]
    db_utm: np.ndarray
    q_paths: list[str]
    q_utm: np.ndarray
    pos_dist_thr: float = 25.0
    non_triv_pos_dist_sq_thr: float = 100.0
    db_timestamps: np.ndarray | None = None
    q_timestamps: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    #: positives computed by the reader (MSLS: per city, as the official loader does), written by
    #: :func:`write_split` instead of the radius search over the whole split; None (the usual case): computed there.
    ground_truth: GroundTruth | None = None

    @property
    def num_db(self) -> int:
        return len(self.db_paths)

    @property
    def num_queries(self) -> int:
        return len(self.q_paths)

    @property
    def train_pos_dist_thr(self) -> float:
        return float(np.sqrt(self.non_triv_pos_dist_sq_thr))

    def db_files(self) -> list[Path]:
        return [self.image_root / p for p in self.db_paths]

    def query_files(self) -> list[Path]:
        return [self.image_root / p for p in self.q_paths]

    def frame(self) -> pd.DataFrame:
        def ts(v: np.ndarray | None, n: int) -> np.ndarray:
            return np.full(n, np.nan) if v is None else np.asarray(v, dtype=np.float64)

        return pd.DataFrame(
            {
                "path": list(self.db_paths) + list(self.q_paths),
                "role": ["database"] * self.num_db + ["query"] * self.num_queries,
                "utm_east": np.concatenate([self.db_utm[:, 0], self.q_utm[:, 0]]),
                "utm_north": np.concatenate([self.db_utm[:, 1], self.q_utm[:, 1]]),
                "timestamp": np.concatenate([ts(self.db_timestamps, self.num_db),
                                             ts(self.q_timestamps, self.num_queries)]),
            },
            columns=COLUMNS,
        )


def split_fingerprint(split: Split, *, files: bool = True) -> str:
    """sha256 identifying a split's content: what a resumable artifact (a features partial, a train checkpoint)
    must have been made from to be resumed.

    It covers the dataset and split names, the thresholds, the image root (absolute), and every manifest row in
    order: role (database rows, then queries), path, UTM easting/northing and timestamp (bit patterns of the
    float64 values; an unknown timestamp is NaN). With ``files`` (the default) it also covers each image file's
    size and modification time in nanoseconds (one ``os.stat`` per file, so replacing or rewriting an image
    changes it; a missing file counts as size and time -1). Contents are not hashed."""
    def column(values: np.ndarray | None, n: int) -> np.ndarray:
        v = np.full(n, np.nan) if values is None else np.asarray(values, dtype=np.float64).reshape(n)
        return np.ascontiguousarray(np.where(np.isnan(v), np.nan, v), dtype=np.float64)  # one NaN bit pattern

    h = hashlib.sha256()
    root = os.path.abspath(os.fspath(split.image_root))
    h.update(json.dumps(["split-fingerprint-v1", split.dataset, split.name, float(split.pos_dist_thr),
                         float(split.non_triv_pos_dist_sq_thr), root, split.num_db, split.num_queries]).encode())
    for role, paths, utm, stamps in (("database", split.db_paths, split.db_utm, split.db_timestamps),
                                     ("query", split.q_paths, split.q_utm, split.q_timestamps)):
        n = len(paths)
        h.update(f"\0{role}\0{n}\0".encode())
        h.update(json.dumps(list(paths)).encode())  # unambiguous for any character in a path
        h.update(np.ascontiguousarray(np.asarray(utm, dtype=np.float64).reshape(n, 2)).tobytes())
        h.update(column(stamps, n).tobytes())
        if files:
            stats = np.empty((n, 2), dtype=np.int64)
            for i, rel in enumerate(paths):
                try:
                    st = os.stat(os.path.join(root, rel))
                    stats[i] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stats[i] = (-1, -1)
            h.update(stats.tobytes())
    return h.hexdigest()


def radius_neighbours(db_utm: np.ndarray, q_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    """For each query, the database indices within ``radius`` metres, nearest first (KD-tree)."""
    from scipy.spatial import cKDTree

    if len(db_utm) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(q_utm))]
    tree = cKDTree(db_utm)
    out = []
    for q, idx in zip(q_utm, tree.query_ball_point(q_utm, r=radius)):
        idx = np.asarray(idx, dtype=np.int64)
        d = np.linalg.norm(db_utm[idx] - q, axis=1)
        out.append(idx[np.lexsort((idx, d))])
    return out


def compute_ground_truth(split: Split) -> GroundTruth:
    return GroundTruth(
        positives=radius_neighbours(split.db_utm, split.q_utm, split.pos_dist_thr),
        train_positives=radius_neighbours(split.db_utm, split.q_utm, split.train_pos_dist_thr),
    )


def _to_csr(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, dtype=np.int64)
    return indptr, indices


def _from_csr(indptr: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    return [indices[indptr[i]:indptr[i + 1]] for i in range(len(indptr) - 1)]


def _relative_root(image_root: Path, split_dir: Path) -> str:
    root = image_root.resolve()
    try:
        inside = root.is_relative_to(split_dir.resolve().parent)
        return os.path.relpath(root, split_dir.resolve()) if inside else str(root)
    except ValueError:
        return str(root)


def write_split(split: Split, split_dir: str | Path) -> Path:
    """Write manifest, split.json and ground truth into ``split_dir`` atomically (all or nothing)."""
    split_dir = Path(split_dir)
    gt = compute_ground_truth(split) if split.ground_truth is None else split.ground_truth
    if len(gt.positives) != split.num_queries or len(gt.train_positives) != split.num_queries:
        raise ValueError(f"{split.dataset} {split.name}: ground truth for {len(gt.positives)} queries, split has "
                         f"{split.num_queries}")
    with atomic_path(split_dir, is_dir=True) as tmp:
        split.frame().to_csv(tmp / MANIFEST, index=False, float_format="%.17g")
        write_json(
            tmp / SPLIT_JSON,
            {
                "dataset": split.dataset,
                "split": split.name,
                "image_root": _relative_root(split.image_root, split_dir),
                "num_db": split.num_db,
                "num_queries": split.num_queries,
                "pos_dist_thr": split.pos_dist_thr,
                "non_triv_pos_dist_sq_thr": split.non_triv_pos_dist_sq_thr,
                **({"extra": split.extra} if split.extra else {}),
            },
        )
        with atomic_h5(tmp / GROUND_TRUTH) as h5:
            for name, lists in (("positives", gt.positives), ("train_positives", gt.train_positives)):
                indptr, indices = _to_csr(lists)
                g = h5.create_group(name)
                g.create_dataset("indptr", data=indptr)
                g.create_dataset("indices", data=indices)
            h5.attrs["pos_dist_thr"] = split.pos_dist_thr
            h5.attrs["train_pos_dist_thr"] = split.train_pos_dist_thr
    return split_dir


def load_split(split_dir: str | Path) -> Split:
    """Read a split folder written by :func:`write_split`."""
    split_dir = Path(split_dir)
    meta = read_json(split_dir / SPLIT_JSON)
    manifest = split_dir / MANIFEST
    require_file(manifest)
    try:
        df = pd.read_csv(manifest, dtype={"path": str, "role": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise NetVLADError(f"{manifest}: not a readable manifest ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise NetVLADError(f"{manifest}: missing columns {', '.join(missing)}")
    db = df[df["role"] == "database"]
    q = df[df["role"] == "query"]
    if len(db) + len(q) != len(df):
        raise NetVLADError(f"{manifest}: role must be 'database' or 'query'")
    if len(db) != meta.get("num_db") or len(q) != meta.get("num_queries"):
        raise NetVLADError(f"{manifest}: row counts do not match {split_dir / SPLIT_JSON}")
    root = Path(meta["image_root"])
    if not root.is_absolute():
        root = (split_dir / root).resolve()

    def ts(frame: pd.DataFrame) -> np.ndarray | None:
        v = frame["timestamp"].to_numpy(dtype=np.float64)
        return None if np.isnan(v).all() else v

    check_thresholds(split_dir / SPLIT_JSON, pos_dist_thr=meta.get("pos_dist_thr"),
                     non_triv_pos_dist_sq_thr=meta.get("non_triv_pos_dist_sq_thr"),
                     names=("pos_dist_thr", "pos_dist_sq_thr", "non_triv_pos_dist_sq_thr"))
    # the images are read by loader processes, whose opens the command's ledger does not see: declared here
    note_reads_under(root, df["path"].tolist(), f"an image of {split_dir}")
    return Split(
        dataset=meta["dataset"],
        name=meta["split"],
        image_root=root,
        db_paths=db["path"].tolist(),
        db_utm=db[["utm_east", "utm_north"]].to_numpy(dtype=np.float64),
        q_paths=q["path"].tolist(),
        q_utm=q[["utm_east", "utm_north"]].to_numpy(dtype=np.float64),
        pos_dist_thr=float(meta["pos_dist_thr"]),
        non_triv_pos_dist_sq_thr=float(meta["non_triv_pos_dist_sq_thr"]),
        db_timestamps=ts(db),
        q_timestamps=ts(q),
        extra=meta.get("extra", {}),
    )


def load_ground_truth(split_dir: str | Path) -> GroundTruth:

    path = require_file(Path(split_dir) / GROUND_TRUTH)
    with open_h5_for_reading(path) as h5:
        return GroundTruth(
            positives=_from_csr(h5["positives/indptr"][()], h5["positives/indices"][()]),
            train_positives=_from_csr(h5["train_positives/indptr"][()], h5["train_positives/indices"][()]),
        )
