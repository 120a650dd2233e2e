"""The standard VPR test sets in the deep visual geo-localization benchmark's folder format, each with its convention.

Every set here is read by :func:`netvlad_core.datasets.official.vg_split` (``images/<split>/{database,queries}/``, UTM
east/north in the file names, positives within 25 m, training positives within 10 m) and then checked against what
its published version holds:

- **counts**: the database and query counts of the published split (papers and the benchmark report recall on
  exactly these); a folder with other counts still converts, with one warning, since its recall is not comparable;
- **conventions** that the file names encode: Nordland's positives are neighbouring *frames*, not metres. The VG
  benchmark (VPR-datasets-downloader ``download_nordland.py``, the Patch-NetVLAD split: summer database, winter
  queries, 27,592 frames each after ``cleanImageNames.txt``) gives every image the dummy position UTM east 0, north
  ``frame × 25 / 10.5`` m (2.381 m per frame, written truncated to 0.1 m), so the usual 25 m radius makes exactly
  the frames within ±10 of the query its positives (10 frames: ≤ 23.9 m; 11 frames: ≥ 26.1 m). The reader checks
  that every image follows that grid and warns otherwise.

``msls-vg`` is the VG conversion of MSLS (``format_mapillary.py``): it keeps every non-panorama val query (about
11,000) instead of the official protocol's 740, so its figures are not MSLS-val figures; reading it always warns
(use ``--dataset msls`` on the original MSLS folder). The same warning is given when any VG folder's file names carry
the conversion's note field (``day_forward_cph``, …).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import NetVLADWarning
from .manifest import Split
from .msls import ALL_CITIES as MSLS_CITIES
from .msls import PUBLISHED_VAL as MSLS_PUBLISHED_VAL
from .msls import VG_CONVERSION_QUERIES

NORDLAND_FRAMES_PER_RADIUS = 10          # positives: frames within ±10 of the query
NORDLAND_METRES_PER_FRAME = 25.0 / (NORDLAND_FRAMES_PER_RADIUS + 0.5)
NORDLAND_GRID_TOLERANCE_M = 0.1          # the file names write north truncated to 0.1 m


@dataclass(frozen=True)
class Published:
    """A published split: ``num_db`` database images and ``num_queries`` queries (None: not checked)."""

    split: str
    num_db: int | None
    num_queries: int
    queries_folder: str = "queries"


@dataclass(frozen=True)
class StandardSet:
    """One standard test set in VG format: where users get it, its published counts, its positives."""

    name: str
    description: str
    where: str
    published: tuple[Published, ...]
    positives: str = "database images within 25 m (UTM from the file names)"
    default_split: str = "test"
    queries_folder: str = "queries"
    #: checks the split's conventions beyond the counts; returns what to record in split.json ``extra``
    check: Callable[[Split], dict] | None = field(default=None, compare=False)


def nordland_frames(split: Split) -> dict:
    """Check the VG benchmark's Nordland grid (east 0, north = frame × 25/10.5 m, truncated to 0.1 m) on every
    image; warn when an image is off it (then its positives are by metres, not by ±10 frames)."""
    off = []
    for role, paths, utm in (("database", split.db_paths, split.db_utm), ("query", split.q_paths, split.q_utm)):
        frames = np.round(utm[:, 1] / NORDLAND_METRES_PER_FRAME)
        residual = utm[:, 1] - frames * NORDLAND_METRES_PER_FRAME
        bad = (utm[:, 0] != 0) | (residual > 1e-6) | (residual < -NORDLAND_GRID_TOLERANCE_M - 1e-6)
        off += [paths[i] for i in np.flatnonzero(bad)[:1]]
        if bad.any():
            off.append(f"{int(bad.sum())} {role} images")
    if off:
        warnings.warn(f"nordland {split.name}: images off the VG benchmark's frame grid (east 0, north = frame × "
                      f"{NORDLAND_METRES_PER_FRAME:.4f} m), e.g. {off[0]} ({', '.join(off[1::2])}): positives are "
                      f"then by metres, not the ±{NORDLAND_FRAMES_PER_RADIUS} frames papers use", NetVLADWarning)
    return {"positives": f"frames within ±{NORDLAND_FRAMES_PER_RADIUS} of the query (dummy UTM: east 0, north = "
                         f"frame × 25/10.5 m, radius 25 m)", "frame_grid": not off}


SETS: dict[str, StandardSet] = {s.name: s for s in (
    StandardSet("pitts30k-vg", "Pittsburgh 30k in VG format (format_pitts30k.py)",
                "the authors' images on request, converted with VPR-datasets-downloader format_pitts30k.py",
                (Published("test", 10000, 6816),)),
    StandardSet("pitts250k-vg", "Pittsburgh 250k in VG format (format_pitts250k.py)",
                "the authors' images on request, converted with VPR-datasets-downloader format_pitts250k.py",
                (Published("test", 83952, 8280),)),
    StandardSet("tokyo247-vg", "Tokyo 24/7 in VG format (format_tokyo247.py); every database image ranked on its "
                "own (the .mat reader tokyo247 collapses panoramas)",
                "the authors' images on request, converted with VPR-datasets-downloader format_tokyo247.py",
                (Published("test", 75984, 315),)),
    StandardSet("nordland", "Nordland, summer database vs winter queries (Patch-NetVLAD split, VG benchmark)",
                "VPR-datasets-downloader download_nordland.py",
                (Published("test", 27592, 27592),),
                positives="frames within ±10 (dummy UTM 25/10.5 m apart, radius 25 m)", check=nordland_frames),
    StandardSet("sped", "SPED (VPR-Bench version, VG format)", "VPR-datasets-downloader download_sped.py",
                (Published("test", 607, 607),)),
    StandardSet("sf-xl", "San Francisco eXtra Large test (CosPlace): database + queries_v1 (or queries_v2, "
                "queries_night, queries_occlusion with --queries-folder)",
                "the CosPlace authors' request form (gmberton/CosPlace README); folder processed/ (test/database, "
                "test/queries_v1 …)",
                (Published("test", None, 1000, "queries_v1"), Published("test", None, 598, "queries_v2")),
                queries_folder="queries_v1"),
    StandardSet("msls-vg", "MSLS as converted to VG folders by format_mapillary.py: NOT the official protocol",
                "the MSLS archives converted with VPR-datasets-downloader format_mapillary.py (prefer --dataset "
                "msls on the original folder)", (), default_split="val"),
)}


def published_for(info: StandardSet, split: str, queries_folder: str) -> Published | None:
    return next((p for p in info.published if p.split == split and p.queries_folder == queries_folder), None)


def check_standard_split(name: str, split: Split, queries_folder: str) -> dict:
    """The checks of set ``name`` on a split read from its VG folder: published counts (a warning when they differ)
    and the set's own conventions. Returns what to add to the split's ``extra``."""
    info = SETS[name]
    extra: dict = {"standard_set": name, "positives": info.positives, "queries_folder": queries_folder}
    published = published_for(info, split.name, queries_folder)
    if published is not None:
        extra["published_counts"] = {"num_db": published.num_db, "num_queries": published.num_queries}
        db_ok = published.num_db is None or published.num_db == split.num_db
        if not (db_ok and published.num_queries == split.num_queries):
            expected = (f"{published.num_db:,} and " if published.num_db is not None else "") + \
                f"{published.num_queries:,}"
            warnings.warn(f"{name} {split.name}: {split.num_db:,} database images and {split.num_queries:,} queries "
                          f"in {split.image_root}, the published version has {expected}"
                          f"{'' if published.num_db is not None else ' queries'}: recall on it is not comparable "
                          f"with published figures", NetVLADWarning)
    if info.check is not None:
        extra.update(info.check(split))
    return extra


def msls_conversion_note(split: Split) -> str | None:
    """Why ``split`` looks like the VG conversion of MSLS (the note field ``<day|night>_<view>_<msls city>`` of its
    file names), or None."""
    for path in split.q_paths[:50] + split.db_paths[:50]:
        fields = path.rsplit("/", 1)[-1].split("@")
        if len(fields) >= 15:
            note = fields[14].lower().split("_")
            if len(note) >= 3 and note[0] in ("day", "night") and note[-1] in MSLS_CITIES:
                return f"file names carry its note field ({fields[14]})"
    return None


def warn_msls_conversion(split: Split, why: str) -> None:
    warnings.warn(f"{split.image_root}: this is the VG folder conversion of MSLS ({why}; {split.num_queries:,} "
                  f"queries, {VG_CONVERSION_QUERIES} for val), not the official MSLS protocol "
                  f"({MSLS_PUBLISHED_VAL['num_queries']} val queries against {MSLS_PUBLISHED_VAL['num_db']:,} "
                  f"database images): its recall is not comparable with papers' MSLS-val figures; read the original "
                  f"MSLS folder with --dataset msls", NetVLADWarning)


def sizes_text(info: StandardSet) -> str:
    """``10,000 / 6,816`` style text of the published counts (the datasets page's table, help)."""
    parts = []
    for p in info.published:
        db = "—" if p.num_db is None else f"{p.num_db:,}"
        parts.append(f"{db} / {p.num_queries:,}" + ("" if p.queries_folder == "queries" else f" ({p.queries_folder})"))
    return "; ".join(parts) or "—"

