"""GSV-Cities (Ali-bey et al. 2022), the places dataset today's VPR models train on, as a train split with places.

Layout: ``<root>/Dataframes/<City>.csv`` (columns ``place_id, year, month, northdeg, city_id, lat, lon, panoid``, one
row per image) and ``<root>/Images/<City>/`` holding
``<City>_<place_id 7 digits>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>.jpg``.
Each row is matched to its file by (place id, year, month, panorama id) read from the file names. A place is a
(city, place_id) pair; places with fewer than ``min_images`` images are dropped and counted (the reference loader's
``min_img_per_place``).

``netvlad download --dataset gsv-cities --image-root <root> [--cities London --cities Boston]`` writes one split
folder ``<out>/train``: every kept image as a database row (paths ``<City>/<file>`` under ``<root>/Images``, UTM
from lat/lon, no queries), and ``places.csv`` (``path, place, city``) that the places recipe trains on
(:mod:`netvlad_core.datasets.places`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import NetVLADError
from ..io import atomic_path, require_file
from .manifest import Split, write_split
from .places import PLACES_CSV, keep_places

CSV_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


@dataclass
class GSVCities:
    """The images kept (paths under ``<root>/Images``), their place (0..P-1), city, UTM and heading, and what was
    dropped."""

    image_root: Path
    paths: list[str]
    places: np.ndarray
    cities: list[str]
    utm: np.ndarray
    headings: np.ndarray
    dropped_places: int
    dropped_images: int


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """WGS84 latitude/longitude (degrees) → UTM (east, north) in metres, each point in its own zone (Krüger's
    series to the 3rd order, < 1 mm within a zone; southern northings + 10,000 km)."""
    lat, lon = np.radians(np.asarray(lat, np.float64)), np.asarray(lon, np.float64)
    zone = np.floor((lon + 180.0) / 6.0) + 1
    lon0 = np.radians(zone * 6.0 - 183.0)
    f = 1 / 298.257223563
    n = f / (2 - f)
    a_hat = 6378137.0 / (1 + n) * (1 + n**2 / 4 + n**4 / 64)
    alpha = (n / 2 - 2 * n**2 / 3 + 5 * n**3 / 16, 13 * n**2 / 48 - 3 * n**3 / 5, 61 * n**3 / 240)
    e = 2 * math.sqrt(n) / (1 + n)
    t = np.sinh(np.arctanh(np.sin(lat)) - e * np.arctanh(e * np.sin(lat)))
    xi, eta = np.arctan2(t, np.cos(np.radians(lon) - lon0)), np.arctanh(np.sin(np.radians(lon) - lon0) /
                                                                         np.sqrt(1 + t**2))
    east = eta + sum(a * np.cos(2 * j * xi) * np.sinh(2 * j * eta) for j, a in enumerate(alpha, 1))
    north = xi + sum(a * np.sin(2 * j * xi) * np.cosh(2 * j * eta) for j, a in enumerate(alpha, 1))
    k0 = 0.9996
    north = k0 * a_hat * north + np.where(lat < 0, 10_000_000.0, 0.0)
    return np.column_stack([500_000.0 + k0 * a_hat * east, north])


def _file_key(city: str, name: str) -> tuple | None:
    """(place id, year, month, panorama id) of a file name ``<City>_<place>_<year>_<month>_<deg>_<lat>_<lon>_<pano>``
    (``None``: not one)."""
    stem, ext = os.path.splitext(name)
    if ext.lower() not in (".jpg", ".jpeg", ".png") or not stem.startswith(city + "_"):
        return None
    fields = stem[len(city) + 1:].split("_", 6)
    try:
        return (int(fields[0]), int(fields[1]), int(fields[2]), fields[6]) if len(fields) == 7 else None
    except ValueError:
        return None


def _read_city(root: Path, city: str) -> pd.DataFrame:
    """One city's rows with the file each names (``path``), checked."""
    csv = require_file(root / "Dataframes" / f"{city}.csv")
    try:
        frame = pd.read_csv(csv, dtype={"panoid": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise NetVLADError(f"{csv}: not a GSV-Cities dataframe ({e})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise NetVLADError(f"{csv}: missing columns {', '.join(missing)}")
    folder = root / "Images" / city
    if not folder.is_dir():
        raise NetVLADError(f"{folder}: image folder of {city} not found")
    files = {key: name for name in sorted(os.listdir(folder)) if (key := _file_key(city, name)) is not None}
    keys = zip(frame["place_id"].astype(int), frame["year"].astype(int), frame["month"].astype(int), frame["panoid"])
    frame["path"] = [f"{city}/{files[k]}" if k in files else None for k in keys]
    absent = frame["path"].isna()
    if absent.any():
        row = frame[absent].iloc[0]
        raise NetVLADError(f"{folder}: {int(absent.sum())} of {len(frame)} images of {csv.name} missing, first: place "
                           f"{row['place_id']}, panorama {row['panoid']} ({row['year']}-{row['month']})")
    frame["city"] = city
    return frame


def read_gsv_cities(root: str | os.PathLike, *, cities: Sequence[str] = (), min_images: int = 4) -> GSVCities:
    """The GSV-Cities tree at ``root``: the ``cities`` given (all of ``Dataframes/*.csv`` when empty), places with
    fewer than ``min_images`` images dropped and counted."""
    root = Path(root)
    available = sorted(p.stem for p in (root / "Dataframes").glob("*.csv"))
    if not available:
        raise NetVLADError(f"{root / 'Dataframes'}: no <City>.csv (GSV-Cities layout: Dataframes/, Images/)")
    unknown = [c for c in cities if c not in available]
    if unknown:
        raise NetVLADError(f"{root}: no city {unknown[0]!r} (available: {', '.join(available)})")
    frame = pd.concat([_read_city(root, c) for c in (list(cities) or available)], ignore_index=True)
    city_index = {c: i for i, c in enumerate(dict.fromkeys(frame["city"]))}
    keys = np.column_stack([frame["city"].map(city_index).to_numpy(np.int64), frame["place_id"].to_numpy(np.int64)])
    labels, dropped, dropped_images = keep_places(keys, min_images)
    kept = labels >= 0
    frame = frame[kept]
    return GSVCities(image_root=root / "Images", paths=frame["path"].tolist(), places=labels[kept],
                     cities=frame["city"].tolist(), utm=latlon_to_utm(frame["lat"], frame["lon"]),
                     headings=frame["northdeg"].to_numpy(np.float64), dropped_places=dropped,
                     dropped_images=dropped_images)


def prepare_gsv_cities(image_root: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                       cities: Sequence[str] = (), min_images: int = 4,
                       log: Callable[[str], None] = print) -> list[Path]:
    """``out_dir/train``: the GSV-Cities tree at ``image_root`` as a split of database images with ``places.csv``
    (see the module docstring); all or nothing. Returns the split folder."""
    if image_root is None or not Path(image_root).is_dir():
        raise NetVLADError(f"gsv-cities: --image-root must be the GSV-Cities folder (Dataframes/, Images/), got "
                           f"{image_root!r}")
    data = read_gsv_cities(image_root, cities=cities, min_images=min_images)
    if not data.paths:
        raise NetVLADError(f"{image_root}: no place has {min_images} images")
    split = Split(dataset="gsv-cities", name="train", image_root=data.image_root.resolve(), db_paths=data.paths,
                  db_utm=data.utm, q_paths=[], q_utm=np.zeros((0, 2)),
                  extra={"cities": sorted(set(data.cities)), "min_images_per_place": min_images})
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_split(split, tmp / "train")
        pd.DataFrame({"path": data.paths, "place": data.places, "city": data.cities}).to_csv(
            tmp / "train" / PLACES_CSV, index=False)
    log(f"download: gsv-cities: {int(data.places.max()) + 1} places of {len(set(data.cities))} cities, "
        f"{len(data.paths)} images; {data.dropped_places} places with fewer than {min_images} images dropped "
        f"({data.dropped_images} images)")
    return [out_dir / "train"]
