"""The authors' ``dbStruct`` .mat files (Pittsburgh, Tokyo 24/7, TokyoTM), read and written exactly.

Field layouts (by position, see NETVLAD_FACTS.md):

- Pittsburgh / Tokyo 24/7: 0 whichSet, 1 dbImageFns, 2 utmDb (2×N), 3 qImageFns, 4 utmQ (2×M),
  5 numImages, 6 numQueries, 7 posDistThr, 8 posDistSqThr, 9 nonTrivPosDistSqThr.
- TokyoTM: 0 whichSet, 1 dbImageFns, 2 utmDb, 3 dbTimeStamp, 4 qImageFns, 5 utmQ, 6 qTimeStamp,
  7 numImages, 8 numQueries, 9 posDistThr, 10 posDistSqThr, 11 nonTrivPosDistSqThr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NetVLADError
from ..io import require_file

PITTS_FIELDS = (
    "whichSet", "dbImageFns", "utmDb", "qImageFns", "utmQ",
    "numImages", "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr",
)
TOKYOTM_FIELDS = (
    "whichSet", "dbImageFns", "utmDb", "dbTimeStamp", "qImageFns", "utmQ", "qTimeStamp",
    "numImages", "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr",
)


@dataclass
class DBStruct:
    """One split as the authors' spec describes it. Coordinates are (N, 2) arrays of UTM east, north."""

    which_set: str
    db_image_fns: list[str]
    utm_db: np.ndarray
    q_image_fns: list[str]
    utm_q: np.ndarray
    pos_dist_thr: float = 25.0
    pos_dist_sq_thr: float = 625.0
    non_triv_pos_dist_sq_thr: float = 100.0
    db_timestamps: np.ndarray | None = None
    q_timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.utm_db = np.asarray(self.utm_db, dtype=np.float64).reshape(-1, 2)
        self.utm_q = np.asarray(self.utm_q, dtype=np.float64).reshape(-1, 2)

    @property
    def num_images(self) -> int:
        return len(self.db_image_fns)

    @property
    def num_queries(self) -> int:
        return len(self.q_image_fns)


def _cell_strings(value: np.ndarray, path: Path, field: str) -> list[str]:
    """A MATLAB cell array of char arrays (as scipy loads it) → list of str."""
    arr = np.asarray(value, dtype=object).ravel()
    out: list[str] = []
    for item in arr:
        while isinstance(item, np.ndarray) and item.dtype == object:
            if item.size != 1:
                raise NetVLADError(f"{path}: dbStruct.{field} is not a cell array of file names")
            item = item.ravel()[0]
        if isinstance(item, np.ndarray):
            if item.size == 0:
                item = ""
            elif item.dtype.kind in "US":
                item = "".join(str(x) for x in item.ravel())
            else:
                raise NetVLADError(f"{path}: dbStruct.{field} is not a cell array of file names")
        out.append(str(item))
    return out


def _scalar(value: np.ndarray, path: Path, field: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        raise NetVLADError(f"{path}: dbStruct.{field} must be a number, got {arr.dtype} of shape {arr.shape}")
    return float(arr.ravel()[0])


THRESHOLD_REL_TOL = 1e-9  # posDistSqThr must equal posDistThr² to this relative tolerance


def check_thresholds(
    where: str | Path,
    *,
    pos_dist_thr: float,
    non_triv_pos_dist_sq_thr: float,
    pos_dist_sq_thr: float | None = None,
    names: tuple[str, str, str] = ("dbStruct.posDistThr", "dbStruct.posDistSqThr", "dbStruct.nonTrivPosDistSqThr"),
) -> None:
    """Refuse distance thresholds that cannot be right, with one :class:`NetVLADError` naming ``where`` and the field.

    Every threshold must be a finite number > 0; ``pos_dist_sq_thr`` (when given) must equal ``pos_dist_thr²`` to a
    relative 1e-9; and ``non_triv_pos_dist_sq_thr`` (the training positives' radius², 100 m² in every official
    file) may not exceed ``pos_dist_thr²`` (625 m²): images beyond ``pos_dist_thr`` are negatives, so a larger
    training radius would make some images positives and negatives at once. ``names`` are the field names used in
    the messages (posDistThr, posDistSqThr, nonTrivPosDistSqThr); for a ``split.json`` pass its keys.
    """
    thr_name, sq_name, non_triv_name = names
    values = [(thr_name, pos_dist_thr), (non_triv_name, non_triv_pos_dist_sq_thr)]
    if pos_dist_sq_thr is not None:
        values.insert(1, (sq_name, pos_dist_sq_thr))
    for name, value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise NetVLADError(f"{where}: {name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise NetVLADError(f"{where}: {name} must be a finite distance above 0, got {float(value)!r}")
    squared = float(pos_dist_thr) ** 2
    if pos_dist_sq_thr is not None and not math.isclose(float(pos_dist_sq_thr), squared, rel_tol=THRESHOLD_REL_TOL,
                                                        abs_tol=0.0):
        raise NetVLADError(f"{where}: {sq_name} is {float(pos_dist_sq_thr)!r} but {thr_name}² is {squared!r} "
                           f"({thr_name} = {float(pos_dist_thr)!r})")
    if float(non_triv_pos_dist_sq_thr) > squared * (1 + THRESHOLD_REL_TOL):
        raise NetVLADError(f"{where}: {non_triv_name} is {float(non_triv_pos_dist_sq_thr)!r} (training positives "
                           f"within {math.sqrt(non_triv_pos_dist_sq_thr):g} m), more than {thr_name}² = {squared!r}: "
                           f"images beyond {float(pos_dist_thr):g} m are negatives")


def _coords(value: np.ndarray, n: int, path: Path, field: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if n == 0:
        return np.zeros((0, 2))
    if arr.shape == (2, n):
        return arr.T.copy()
    if arr.shape == (n, 2):
        return arr.copy()
    raise NetVLADError(f"{path}: dbStruct.{field} has shape {arr.shape}, expected (2, {n})")


def read_dbstruct(path: str | Path) -> DBStruct:
    """Read a ``dbStruct`` .mat file (Pittsburgh or TokyoTM layout), checking every field (the thresholds with
    :func:`check_thresholds`)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = require_file(path)
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, OSError, TypeError) as e:
        raise NetVLADError(f"{path}: not a readable MATLAB .mat file ({e})") from None
    if "dbStruct" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise NetVLADError(f"{path}: no 'dbStruct' variable (found: {found})")
    raw = mat["dbStruct"]
    try:
        fields = raw.item()
    except (ValueError, AttributeError):
        raise NetVLADError(f"{path}: dbStruct is not a 1×1 struct") from None
    if not isinstance(fields, tuple):
        raise NetVLADError(f"{path}: dbStruct is not a struct")
    names = raw.dtype.names or ()
    if len(fields) == len(TOKYOTM_FIELDS):
        layout = TOKYOTM_FIELDS
    elif len(fields) == len(PITTS_FIELDS):
        layout = PITTS_FIELDS
    else:
        raise NetVLADError(
            f"{path}: dbStruct has {len(fields)} fields, expected {len(PITTS_FIELDS)} (Pittsburgh/Tokyo 24/7) "
            f"or {len(TOKYOTM_FIELDS)} (TokyoTM)"
        )
    f = dict(zip(layout, fields))
    # Names are informative only (the authors' files are read by position), but a struct whose names
    # contradict the layout is a different file.
    if names and set(names) == set(layout) and tuple(names) != layout:
        f = {name: fields[names.index(name)] for name in layout}

    which = _cell_strings(f["whichSet"], path, "whichSet")
    db_fns = _cell_strings(f["dbImageFns"], path, "dbImageFns")
    q_fns = _cell_strings(f["qImageFns"], path, "qImageFns")
    num_images = int(round(_scalar(f["numImages"], path, "numImages")))
    num_queries = int(round(_scalar(f["numQueries"], path, "numQueries")))
    if num_images != len(db_fns):
        raise NetVLADError(f"{path}: numImages is {num_images} but dbImageFns lists {len(db_fns)} files")
    if num_queries != len(q_fns):
        raise NetVLADError(f"{path}: numQueries is {num_queries} but qImageFns lists {len(q_fns)} files")
    out = DBStruct(
        which_set=which[0] if which else "",
        db_image_fns=db_fns,
        utm_db=_coords(f["utmDb"], num_images, path, "utmDb"),
        q_image_fns=q_fns,
        utm_q=_coords(f["utmQ"], num_queries, path, "utmQ"),
        pos_dist_thr=_scalar(f["posDistThr"], path, "posDistThr"),
        pos_dist_sq_thr=_scalar(f["posDistSqThr"], path, "posDistSqThr"),
        non_triv_pos_dist_sq_thr=_scalar(f["nonTrivPosDistSqThr"], path, "nonTrivPosDistSqThr"),
    )
    check_thresholds(path, pos_dist_thr=out.pos_dist_thr, pos_dist_sq_thr=out.pos_dist_sq_thr,
                     non_triv_pos_dist_sq_thr=out.non_triv_pos_dist_sq_thr)
    if layout is TOKYOTM_FIELDS:
        out.db_timestamps = np.asarray(f["dbTimeStamp"], dtype=np.float64).ravel()
        out.q_timestamps = np.asarray(f["qTimeStamp"], dtype=np.float64).ravel()
        if out.db_timestamps.size != num_images or out.q_timestamps.size != num_queries:
            raise NetVLADError(f"{path}: dbTimeStamp/qTimeStamp do not match the image counts")
    if not np.isfinite(out.utm_db).all() or not np.isfinite(out.utm_q).all():
        raise NetVLADError(f"{path}: utmDb/utmQ contain NaN or infinite coordinates")
    return out


def write_dbstruct(path: str | Path, spec: DBStruct) -> Path:
    """Write ``spec`` as MATLAB writes a 1×1 struct: cell arrays of names, 2×N coordinates, integer counts.

    TokyoTM layout when ``spec`` has timestamps, Pittsburgh layout otherwise. Written atomically.
    """
    from scipy.io import savemat

    from ..io import atomic_path

    def cell(names: list[str]) -> np.ndarray:
        c = np.empty((len(names), 1), dtype=object)
        for i, n in enumerate(names):
            c[i, 0] = n
        return c

    tokyo_tm = spec.db_timestamps is not None or spec.q_timestamps is not None
    layout = TOKYOTM_FIELDS if tokyo_tm else PITTS_FIELDS
    values = {
        "whichSet": spec.which_set,
        "dbImageFns": cell(spec.db_image_fns),
        "utmDb": spec.utm_db.T.astype(np.float64),
        "qImageFns": cell(spec.q_image_fns),
        "utmQ": spec.utm_q.T.astype(np.float64),
        "numImages": np.int64(spec.num_images),
        "numQueries": np.int64(spec.num_queries),
        "posDistThr": float(spec.pos_dist_thr),
        "posDistSqThr": float(spec.pos_dist_sq_thr),
        "nonTrivPosDistSqThr": float(spec.non_triv_pos_dist_sq_thr),
    }
    if tokyo_tm:
        values["dbTimeStamp"] = np.asarray(spec.db_timestamps, dtype=np.float64).reshape(1, -1)
        values["qTimeStamp"] = np.asarray(spec.q_timestamps, dtype=np.float64).reshape(1, -1)
    struct = np.empty((1, 1), dtype=[(name, object) for name in layout])
    for name in layout:
        struct[0, 0][name] = values[name]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            savemat(fh, {"dbStruct": struct}, do_compression=False)
    return path
