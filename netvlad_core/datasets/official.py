"""The catalogue of datasets the ``download`` stage knows, and their conversion to normalised splits.

Datasets (names are matched case-insensitively):

=========  ============================================  ==========================  =========================
name       spec                                          splits                      query paths
=========  ============================================  ==========================  =========================
pitts30k   ``pitts30k_{train,val,test}.mat``             train, val, test            ``queries_real/<qImageFn>``
pitts250k  ``pitts250k_{train,val,test}.mat``            train, val, test            ``queries_real/<qImageFn>``
tokyoTM    ``tokyoTM_{train,val}.mat`` (timestamps)      train, val                  ``<qImageFn>`` (see below)
tokyo247   ``tokyo247.mat``                              test                        ``queries_real/<qImageFn>``
synthetic  ``synthetic_{train,val,test}.mat``            train, val, test            ``queries_real/<qImageFn>``
vg         folders, no spec (see :func:`vg_split`)       those present               ``queries/<file>``
msls       MSLS CSVs, no spec (see :mod:`.msls`)         val, train, or a city       ``train_val/<city>/query/…``
=========  ============================================  ==========================  =========================

The standard test sets in VG format (``nordland``, ``sped``, ``sf-xl``, ``pitts30k-vg``, ``pitts250k-vg``,
``tokyo247-vg``, ``msls-vg``) are ``vg`` folders checked against their published counts and conventions
(:mod:`.standard`).

Image-root conventions (all paths in a :class:`Split` are relative to its ``image_root``):

- Pittsburgh (and the built-in synthetic city): database images as listed in ``dbImageFns``
  (``000/000829_pitch1_yaw1.jpg``); queries under ``<image_root>/queries_real/`` as in the Pittsburgh
  distribution and the PyTorch port.
- TokyoTM: the authors' MATLAB code (``dbTokyoTimeMachine.m``) reads queries from the SAME folder as the
  database (``qPath = dbPath``), so query names are used as listed, without a prefix. Its positives and
  rankings must ignore database images taken at the query's timestamp (the authors'
  ``nontrivialPosQ``/``nnSearchPostprocess``); the split records ``extra.require_different_timestamp``.
- Tokyo 24/7: ``tokyo247.mat`` names the database cut-outs ``.jpg`` but they are ``.png`` on disk, so the
  database suffix is mapped ``.jpg`` → ``.png``. The authors keep queries in a separate folder; we put them
  under ``<image_root>/queries_real/`` like Pittsburgh's (unzip ``247query_subset_v2`` there). Each panorama
  is 12 consecutive database cut-outs; ``extra.views_per_panorama = 12`` makes evaluation suppress duplicates
  of a panorama by default, as the papers do (database rows ``12p … 12p+11`` are panorama ``p``, the authors'
  ``floor((id-1)/12)``; ``netvlad evaluate --collapse-panoramas no`` overrides it).
- VG benchmark folders: ``image_root`` is ``<root>/images/<split>`` (or ``<root>/<split>``), database paths
  ``database/<file>``, query paths ``queries/<file>`` (another queries folder on request: SF-XL ``queries_v1``).
- MSLS: ``image_root`` is the MSLS root, paths ``train_val/<city>/{database,query}/images/<key>.jpg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np

from ..config import option
from ..errors import NetVLADError
from ..io import atomic_path
from .manifest import Split, write_split
from .specs import DBStruct, check_thresholds, read_dbstruct

QUERY_DIR = "queries_real"
VG_SPLITS = ("train", "val", "test")
VG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VG_POS_DIST_THR = 25.0
VG_NON_TRIV_POS_DIST_SQ_THR = 100.0
DEFAULT_CACHE_NAME = ".netvlad_cache"


@dataclass
class DownloadConfig:
    """What ``download`` reads (params.yaml group ``download``; the built-in city's size is a ``SyntheticConfig``)."""

    dataset: str = option("synthetic", "Dataset: pitts30k, pitts250k, tokyoTM, tokyo247, vg (benchmark folders), msls "
                          "(official protocol), a standard set in VG format (nordland, sped, sf-xl, pitts30k-vg, "
                          "pitts250k-vg, tokyo247-vg, msls-vg), gsv-cities (a train split of places, for train.recipe "
                          "places) or synthetic (the built-in city).")
    spec: str | None = option(None, "The dbStruct .mat files: an http(s)/file URL, a local tar/zip archive or a "
                              "folder holding them (searched recursively); unset: the authors' "
                              "netvlad_v100_datasets.tar.gz. Not used for vg and synthetic.")
    image_root: str | None = option(None, "Folder holding the images (distributed separately by the authors); "
                                    "queries under DIR/queries_real/. For vg and the VG-format sets: the benchmark's "
                                    "dataset folder; for msls: the MSLS root (with train_val/).")
    sha256: str | None = option(None, "Expected sha256 of the spec archive; a mismatch is an error. The digest of "
                                "every archive used is printed so it can be pinned.")
    cache_dir: str | None = option(None, "Where downloads are kept (interrupted ones resumed; a kept one reused "
                                   "when it matches --sha256, or else when the server says it has not changed); "
                                   "unset: <parent of --out>/.netvlad_cache.")
    split: list[str] = option([], "Only this split (repeatable), e.g. --split test; none given: every split. msls: "
                              "val, train or a train/val city (e.g. cph) evaluated on its own.")
    msls_subtask: str = option("all", "msls: the official subtask filter of val and single-city splits: all, s2w, "
                               "w2s, o2n, n2o, d2n or n2d.")
    queries_folder: str | None = option(None, "VG folders: the queries sub-folder of each split; unset: queries "
                                        "(sf-xl: queries_v1; queries_v2, queries_night, queries_occlusion on "
                                        "request).")
    workers: int = option(2, "synthetic: rendering processes.")
    cities: list[str] = option([], "gsv-cities: only this city (repeatable, e.g. --cities London); none given: all.")
    min_images_per_place: int = option(4, "gsv-cities: places with fewer images are dropped (and counted).")


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of the catalogue."""

    name: str
    description: str
    #: (split name, spec .mat file name) pairs, in order; empty for the folder format (vg).
    split_files: tuple[tuple[str, str], ...] = ()
    #: prefix of query paths relative to the image root ("" = as listed in qImageFns).
    query_prefix: str = QUERY_DIR + "/"
    #: database file suffix as listed → as on disk (tokyo247: .jpg → .png).
    db_suffix_map: tuple[str, str] | None = None
    #: recorded in every split's ``split.json`` under ``extra``.
    extra: dict = field(default_factory=dict)
    #: how the dataset is read: ``mat`` (dbStruct specs), ``vg`` (benchmark folders) or ``msls`` (MSLS CSVs).
    reader: str = "mat"
    #: a standard test set in VG format checked against its published version (:mod:`.standard`), or None.
    standard: str | None = None

    @property
    def folder_format(self) -> bool:
        return self.reader == "vg"

    @property
    def split_names(self) -> tuple[str, ...]:
        if self.reader == "msls":
            from .msls import split_names

            return split_names()
        return tuple(s for s, _ in self.split_files) if self.split_files else VG_SPLITS

    @property
    def benchmark_split(self) -> str:
        """The split a benchmark evaluates when none is named: the standard set's, else test (msls: val)."""
        if self.standard is not None:
            from .standard import SETS

            return SETS[self.standard].default_split
        return "val" if self.reader == "msls" else "test"


def _standard_sets() -> dict:
    from .standard import SETS

    return SETS


def _pitts(name: str, description: str) -> DatasetInfo:
    return DatasetInfo(name, description, tuple((s, f"{name}_{s}.mat") for s in ("train", "val", "test")))


CATALOGUE: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _pitts("pitts30k", "Pittsburgh 30k (authors' spec; images distributed separately)"),
        _pitts("pitts250k", "Pittsburgh 250k (authors' spec; images distributed separately)"),
        DatasetInfo(
            "tokyoTM", "Tokyo Time Machine (authors' spec with timestamps; train/val)",
            (("train", "tokyoTM_train.mat"), ("val", "tokyoTM_val.mat")),
            query_prefix="", extra={"require_different_timestamp": True},
        ),
        DatasetInfo(
            "tokyo247", "Tokyo 24/7 (authors' spec; test only; database .png cut-outs)",
            (("test", "tokyo247.mat"),),
            db_suffix_map=(".jpg", ".png"), extra={"views_per_panorama": 12},
        ),
        _pitts("synthetic", "The built-in synthetic city (spec files written by the renderer)"),
        DatasetInfo("vg", "Deep visual geo-localization benchmark folders (images/<split>/{database,queries})",
                    reader="vg"),
        DatasetInfo("msls", "Mapillary SLS, official protocol (val = cph + sf, subtask filter, no panoramas, "
                    "queries with a positive within 25 m)", reader="msls"),
        *(DatasetInfo(name, info.description, reader="vg", standard=name) for name, info in _standard_sets().items()),
    )
}


def dataset_names() -> list[str]:
    return list(CATALOGUE)


def get_dataset(name: str) -> DatasetInfo:
    """The catalogue entry for ``name`` (case-insensitive); a NetVLADError listing valid names otherwise."""
    for key, info in CATALOGUE.items():
        if key.lower() == str(name).lower():
            return info
    raise NetVLADError(f"unknown dataset {name!r} (valid: {', '.join(CATALOGUE)})")


# ------------------------------------------------------------------------------------------- .mat specs


def _relative_image_path(p: str, source: str, field_name: str) -> str:
    q = PurePosixPath(p)
    if not p or q.is_absolute() or ".." in q.parts or (len(p) > 1 and p[1] == ":"):
        raise NetVLADError(f"{source}: {field_name} entry {p!r} is not a relative path inside the image root")
    return p


def _map_suffix(p: str, mapping: tuple[str, str] | None) -> str:
    if mapping is None:
        return p
    old, new = mapping
    return p[: -len(old)] + new if p.lower().endswith(old.lower()) else p


def dbstruct_to_split(
    spec: DBStruct,
    dataset: str,
    split_name: str,
    image_root: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
) -> Split:
    """Convert one ``dbStruct`` into a :class:`Split` following the dataset's image-root convention.

    Database paths are ``dbImageFns`` as listed (tokyo247: ``.jpg`` → ``.png``); query paths are
    ``queries_real/<qImageFn>`` (TokyoTM: ``<qImageFn>``, see the module docstring). Thresholds and
    timestamps come from the spec (thresholds checked with :func:`~.specs.check_thresholds`). Absolute paths or
    ``..`` in a file name are refused.
    """
    info = get_dataset(dataset)
    where = str(source) if source is not None else f"{info.name} {split_name}"
    db = [_map_suffix(_relative_image_path(p, where, "dbImageFns"), info.db_suffix_map) for p in spec.db_image_fns]
    q = [info.query_prefix + _relative_image_path(p, where, "qImageFns") for p in spec.q_image_fns]
    check_thresholds(where, pos_dist_thr=spec.pos_dist_thr, pos_dist_sq_thr=spec.pos_dist_sq_thr,
                     non_triv_pos_dist_sq_thr=spec.non_triv_pos_dist_sq_thr)
    extra = {"which_set": spec.which_set, **info.extra}
    return Split(
        dataset=info.name,
        name=split_name,
        image_root=Path(image_root),
        db_paths=db,
        db_utm=spec.utm_db,
        q_paths=q,
        q_utm=spec.utm_q,
        pos_dist_thr=float(spec.pos_dist_thr),
        non_triv_pos_dist_sq_thr=float(spec.non_triv_pos_dist_sq_thr),
        db_timestamps=None if spec.db_timestamps is None else np.asarray(spec.db_timestamps, dtype=np.float64),
        q_timestamps=None if spec.q_timestamps is None else np.asarray(spec.q_timestamps, dtype=np.float64),
        extra=extra,
    )


# ------------------------------------------------------------------------------------------- VG folders


def parse_vg_name(filename: str) -> tuple[float, float]:
    """UTM (east, north) from a VG benchmark file name ``@utm_east@utm_north@zone@...@.jpg``.

    Only the first two fields are required; a name that does not start with ``@`` or whose first two
    fields are not numbers raises a NetVLADError naming the file.
    """
    base = os.path.basename(filename)
    fields = base.split("@")
    if len(fields) < 4 or fields[0] != "":
        raise NetVLADError(f"{filename}: not a VG benchmark file name (@utm_east@utm_north@...@.jpg)")
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise NetVLADError(f"{filename}: UTM east/north fields are not numbers ({fields[1]!r}, "
                           f"{fields[2]!r})") from None
    if not (np.isfinite(east) and np.isfinite(north)):
        raise NetVLADError(f"{filename}: UTM coordinates are not finite")
    return east, north


def vg_base(root: str | os.PathLike) -> Path:
    """``<root>/images`` when it exists, else ``<root>`` (both layouts of the VG benchmark are accepted)."""
    root = Path(root)
    return root / "images" if (root / "images").is_dir() else root


def vg_available_splits(root: str | os.PathLike) -> list[str]:
    base = vg_base(root)
    return [s for s in VG_SPLITS if (base / s).is_dir()]


def _vg_images(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(VG_IMAGE_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, fn), folder).replace(os.sep, "/"))
    return sorted(out)


def vg_split(root: str | os.PathLike, split_name: str, *, dataset: str = "vg",
             queries_folder: str = "queries") -> Split:
    """Read ``<root>/images/<split>/{database,queries}/`` (or ``<root>/<split>/...``) into a Split.

    Files (``.jpg``/``.jpeg``/``.png``, searched recursively, sorted by path) are named
    ``@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.
    Thresholds: 25 m for positives, 10 m (100 m²) for training positives, as in the benchmark. ``queries_folder``
    names the queries sub-folder (SF-XL: ``queries_v1``, ``queries_v2``, …).
    """
    split_dir = vg_base(root) / split_name
    if not queries_folder or "/" in queries_folder or queries_folder in (".", ".."):
        raise NetVLADError(f"{queries_folder!r}: the queries folder must be the name of a sub-folder of {split_dir}")
    parts: dict[str, tuple[list[str], np.ndarray]] = {}
    for role, folder_name in (("database", "database"), ("queries", queries_folder)):
        folder = split_dir / folder_name
        if not folder.is_dir():
            raise NetVLADError(f"{folder}: folder not found (VG layout: images/<split>/database and "
                               f"images/<split>/{queries_folder})")
        names = _vg_images(folder)
        if not names:
            raise NetVLADError(f"{folder}: no .jpg/.png images")
        utm = np.array([parse_vg_name(str(folder / n)) for n in names], dtype=np.float64).reshape(-1, 2)
        parts[role] = ([f"{folder_name}/{n}" for n in names], utm)
    return Split(
        dataset=dataset,
        name=split_name,
        image_root=split_dir,
        db_paths=parts["database"][0],
        db_utm=parts["database"][1],
        q_paths=parts["queries"][0],
        q_utm=parts["queries"][1],
        pos_dist_thr=VG_POS_DIST_THR,
        non_triv_pos_dist_sq_thr=VG_NON_TRIV_POS_DIST_SQ_THR,
        extra={"layout": "vg"},
    )


# ------------------------------------------------------------------------------------------- checks


def check_images(split: Split, *, show: int = 5) -> None:
    """Every database and query image of ``split`` exists under its image root, else a NetVLADError.

    The message names the image root, how many of how many images are missing and the first few,
    e.g. ``/x/images: 3 of 120 images missing, first: 000/000001_pitch1_yaw1.jpg, ... (pitts30k test)``.
    One directory listing per folder, so a 250k-image split is checked in seconds.
    """
    root = Path(split.image_root)
    if not root.is_dir():
        raise NetVLADError(f"{root}: image root not found ({split.dataset} {split.name})")
    listings: dict[str, set[str]] = {}
    missing: list[str] = []
    paths = list(split.db_paths) + list(split.q_paths)
    for rel in paths:
        parent, _, name = rel.rpartition("/")
        names = listings.get(parent)
        if names is None:
            try:
                names = set(os.listdir(root / parent)) if parent else set(os.listdir(root))
            except (FileNotFoundError, NotADirectoryError):
                names = set()
            listings[parent] = names
        if name not in names:
            missing.append(rel)
    if missing:
        first = ", ".join(missing[:show]) + (", ..." if len(missing) > show else "")
        raise NetVLADError(
            f"{root}: {len(missing)} of {len(paths)} images missing, first: {first} ({split.dataset} {split.name})"
        )


# ------------------------------------------------------------------------------------------- the stage's library call


def _inside(child: Path, parent: Path) -> bool:
    try:
        return child.resolve().is_relative_to(parent.resolve())
    except OSError:  # pragma: no cover
        return False


def load_splits(
    name: str,
    *,
    spec_dir: str | os.PathLike | None,
    image_root: str | os.PathLike,
    splits: Sequence[str] | None = None,
    msls_subtask: str = "all",
    queries_folder: str | None = None,
) -> list[Split]:
    """Read, convert and check every requested split of dataset ``name`` (nothing is written).

    ``spec_dir`` is a folder in which the dataset's .mat files are found (searched recursively; unused for
    ``vg`` and ``msls``); ``image_root`` is the folder holding the images (for ``vg``: the benchmark's dataset
    folder; for ``msls``: the MSLS root with ``train_val/``). ``msls_subtask`` is MSLS's subtask filter,
    ``queries_folder`` the VG queries sub-folder (unset: ``queries``, or the standard set's).
    """
    from ..download import find_spec_file

    info = get_dataset(name)
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise NetVLADError(f"{image_root}: image root folder not found")
    wanted = list(splits) if splits else list(info.split_names)
    unknown = [s for s in wanted if s not in info.split_names]
    if unknown:
        raise NetVLADError(f"{info.name}: unknown split {unknown[0]!r} (valid: {', '.join(info.split_names)})")
    if len(set(wanted)) != len(wanted):
        raise NetVLADError(f"{info.name}: a split is requested twice ({', '.join(wanted)})")

    out: list[Split] = []
    if info.reader == "msls":
        from .msls import msls_splits

        for split in msls_splits(image_root, splits, subtask=msls_subtask):
            check_images(split)
            out.append(split)
        return out
    if queries_folder is not None and not info.folder_format:
        raise NetVLADError(f"{info.name}: --queries-folder is for VG folders only")
    if info.folder_format:
        from .standard import SETS, check_standard_split, msls_conversion_note, warn_msls_conversion

        standard = SETS.get(info.standard) if info.standard else None
        queries = queries_folder or (standard.queries_folder if standard else "queries")
        present = vg_available_splits(image_root)
        if not splits:
            wanted = present
        if not wanted:
            raise NetVLADError(
                f"{image_root}: no train/val/test folders (VG layout: images/<split>/database, images/<split>/queries)"
            )
        for s in wanted:
            if s not in present:
                raise NetVLADError(f"{vg_base(image_root) / s}: split folder not found")
            split = vg_split(image_root, s, dataset=info.name, queries_folder=queries)
            check_images(split)
            if standard is not None:
                split.extra.update(check_standard_split(standard.name, split, queries))
            why = "read as msls-vg" if info.name == "msls-vg" else msls_conversion_note(split)
            if why:
                split.extra["msls_vg_conversion"] = True
                warn_msls_conversion(split, why)
            out.append(split)
        return out

    if spec_dir is None:
        raise NetVLADError(f"{info.name}: a spec folder with the .mat files is required")
    files = dict(info.split_files)
    for s in wanted:
        mat = find_spec_file(spec_dir, files[s])
        split = dbstruct_to_split(read_dbstruct(mat), info.name, s, image_root.resolve(), source=mat)
        check_images(split)
        out.append(split)
    return out


def build_splits(
    name: str,
    dest_dir: str | os.PathLike,
    *,
    spec_dir: str | os.PathLike | None,
    image_root: str | os.PathLike,
    splits: Sequence[str] | None = None,
) -> list[Split]:
    """:func:`load_splits`, then ``write_split`` each into ``dest_dir/<split>``; returns the splits written.

    No all-or-nothing guarantee on ``dest_dir`` itself (each split folder is atomic): call it inside
    ``atomic_path(out_dir, is_dir=True)``, as :func:`prepare_dataset` does. An image root inside
    ``dest_dir`` is stored relative to the split folders, so the whole folder can move.
    """
    dest_dir = Path(dest_dir)
    loaded = load_splits(name, spec_dir=spec_dir, image_root=image_root, splits=splits)
    for split in loaded:
        write_split(split, dest_dir / split.name)
    return loaded


def default_cache_dir(out_dir: str | os.PathLike) -> Path:
    """Where downloads are kept between runs: ``<parent of out_dir>/.netvlad_cache``."""
    return Path(out_dir).resolve().parent / DEFAULT_CACHE_NAME


def prepare_dataset(
    name: str,
    out_dir: str | os.PathLike,
    *,
    spec: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
    msls_subtask: str = "all",
    queries_folder: str | None = None,
) -> list[Path]:
    """Turn dataset ``name`` into ``out_dir/<split>/`` folders (manifest, split.json, ground truth).

    Steps: resolve ``spec`` (URL, archive or folder; default :data:`AUTHORS_SPEC_URL`; unused for ``vg``/``msls``)
    into a folder of .mat files, read each split's .mat, convert it, check that every image exists under
    ``image_root``, then write all splits. All or nothing: the splits are built in a temporary sibling of
    ``out_dir`` that replaces it at the end, so on any error ``out_dir`` is left as it was (and is not
    created). Downloads are kept in ``cache_dir`` (default ``<parent of out_dir>/.netvlad_cache``) so that an
    interrupted download resumes on the next run. ``image_root``, a local spec and the cache may not lie
    inside ``out_dir`` (it is replaced as a whole). The sha256 of a fetched or given archive goes to ``log``.
    Returns the split folders written.
    """
    from ..download import AUTHORS_SPEC_URL, resolve_spec_source

    info = get_dataset(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NetVLADError(f"{out_dir}: exists and is not a folder")
    if image_root is None:
        raise NetVLADError(f"{info.name}: image_root (--image-root) is required: the folder holding the images")
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise NetVLADError(f"{image_root}: image root folder not found")
    if _inside(image_root, out_dir):
        raise NetVLADError(f"{image_root}: the image root lies inside the output folder {out_dir}, which is "
                           f"replaced as a whole")

    spec_dir: Path | None = None
    if info.reader != "mat":
        if spec is not None or sha256:
            raise NetVLADError(f"{info.name}: no spec file is used; pass the dataset folder as image_root "
                               f"(--image-root)")
    else:
        spec = AUTHORS_SPEC_URL if spec is None else spec
        if "://" not in os.fspath(spec) and _inside(Path(spec), out_dir):
            raise NetVLADError(f"{spec}: the spec lies inside the output folder {out_dir}, which is replaced as a "
                               f"whole")
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(out_dir)
        if _inside(cache, out_dir):
            raise NetVLADError(f"{cache}: the cache folder lies inside the output folder {out_dir}, which is "
                               f"replaced as a whole")
        spec_dir = resolve_spec_source(spec, cache, sha256=sha256, progress=progress, timeout=timeout, log=log)

    loaded = load_splits(info.name, spec_dir=spec_dir, image_root=image_root, splits=splits,
                         msls_subtask=msls_subtask, queries_folder=queries_folder)
    with atomic_path(out_dir, is_dir=True) as tmp:
        for split in loaded:
            write_split(split, tmp / split.name)
    return [out_dir / split.name for split in loaded]


def write_dataset(out_dir: str | os.PathLike, *, cfg: DownloadConfig, city, progress: bool = True,
                  log: Callable[[str], None] = print, notice: Callable[[str], None] | None = None) -> list[Path]:
    """The ``download`` stage: dataset ``cfg.dataset`` as split folders under ``out_dir``
    (:func:`prepare_dataset`; the built-in city, rendered from ``city``, a ``SyntheticConfig``, by
    ``prepare_synthetic_dataset``; GSV-Cities by :func:`.gsv_cities.prepare_gsv_cities`); logs one line per split
    written, and passes the downloads' notices (the sha256 of every archive) to ``notice``. Returns the split
    folders."""
    from ..io import read_json

    if str(cfg.dataset).lower() == "gsv-cities":
        from .gsv_cities import prepare_gsv_cities

        paths = prepare_gsv_cities(cfg.image_root, out_dir, cities=cfg.cities, min_images=cfg.min_images_per_place,
                                   log=log)
    elif get_dataset(cfg.dataset).name == "synthetic":
        from .synthetic import prepare_synthetic_dataset

        paths = prepare_synthetic_dataset(city, out_dir, splits=cfg.split or None, workers=cfg.workers,
                                          progress=progress)
    else:
        paths = prepare_dataset(get_dataset(cfg.dataset).name, out_dir, spec=cfg.spec, image_root=cfg.image_root,
                                sha256=cfg.sha256, cache_dir=cfg.cache_dir, splits=cfg.split or None,
                                progress=progress, log=notice, msls_subtask=cfg.msls_subtask,
                                queries_folder=cfg.queries_folder)
    for path in paths:
        meta = read_json(path / "split.json")
        log(f"download: {meta['dataset']} {meta['split']}: {meta['num_db']} database images, "
            f"{meta['num_queries']} queries → {path}")
    return paths
