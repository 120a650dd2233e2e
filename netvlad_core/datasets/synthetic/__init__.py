"""The built-in dataset: a procedurally rendered city with Pittsburgh-style ``dbStruct`` files.

The world is a 2.5-D map on a 1 m grid: streets, sidewalks, and blocks cut into lots, each lot a
building with a height and a facade (material, window grid, colours, a shop sign with glyphs).
Facade styles come from a city-wide palette, so styles repeat across the city and across splits
while each building keeps its own colours, proportions and sign. Views are rendered with a pinhole
camera by casting one ray per image column through the 2.5-D map, all columns at once with numpy
(rays hop from box to box: a street rectangle, a free square, a building's lot); every wall pixel is
textured from (building, face, position along the wall, height), so the same place looks the same
from nearby positions. Trees and lamp posts are static sprites; vehicles and pedestrians are
per-image sprites; all sprites are depth-tested against walls and ground.

Database views stand every ``db_spacing_m`` metres along the street centre lines, ``headings`` yaws
each, in one fixed daylight condition. Queries stand a few metres off a database position (along
and across the street), lower (a pedestrian's eye height), with another focal length and a yaw near
a database yaw, under another condition: time of day and illumination, white balance, haze, vehicles
and pedestrians, sensor noise and blur.

The three splits are separate districts 2 km apart in a UTM-like frame (easting 585000,
northing 4477000 + local metres). Every image is rendered from a random generator seeded by
(seed, split, role, index), so the files are byte-identical for the same configuration whatever
the number of workers.

Layout under ``out_dir``::

    synthetic_{train,val,test}.mat          dbStruct (Pittsburgh fields)
    images/<split>/<ppp>/<pos:06d>_yaw<k>.jpg   database images (dbImageFns relative to images/)
    images/queries_real/<split>/<qqq>/<q:06d>.jpg   queries (qImageFns relative to images/queries_real/)
    poses_<split>.csv                       every image's pose and condition (for inspection)
    synthetic.json                          the configuration and counts

Modules: ``config`` (:class:`SyntheticConfig` and the fixed constants), ``city`` (palette, districts, the
facade colour table, poses; :class:`Material` and :class:`Ground` name the wall materials and ground codes),
``camera`` (camera, conditions, vehicles and pedestrians), ``render`` (ray casting, shading, sprites, the
camera response), ``noise`` (seeded generators, hashes, noise textures), ``workers`` (the rendering
processes) and ``writer`` (:func:`render_dataset`, :func:`prepare_synthetic_dataset` and reading a
dataset back). The public names are importable from this package.
"""

from __future__ import annotations

# Internals, importable from here as they were from the former single module (tests/test_synthetic.py uses some).
from .camera import QUERY_CONDITIONS, _Camera, _Condition, _database_condition, _query_condition, _Sprite  # noqa: F401
from .city import MATERIALS, SIDEWALK_M, Ground, Material, _District, _make_district, _make_palette, _Pose  # noqa: F401
from .config import (
    DB_CAMERA_HEIGHT_M,
    MAT_HEADER,
    MAX_HITS,
    MAX_VIEW_M,
    META_JSON,
    SPLIT_SPACING_M,
    SPLITS,
    UTM_ORIGIN,
    SyntheticConfig,
)
from .render import _render  # noqa: F401
from .workers import _districts  # noqa: F401
from .writer import (
    _write_mat_deterministic,  # noqa: F401
    pixel_baseline_recall,
    prepare_synthetic_dataset,
    read_config,
    render_dataset,
    render_mosaic,
)

__all__ = [
    "DB_CAMERA_HEIGHT_M", "MATERIALS", "MAT_HEADER", "MAX_HITS", "MAX_VIEW_M", "META_JSON", "QUERY_CONDITIONS",
    "SIDEWALK_M", "SPLITS", "SPLIT_SPACING_M", "UTM_ORIGIN", "Ground", "Material", "SyntheticConfig",
    "pixel_baseline_recall", "prepare_synthetic_dataset", "read_config", "render_dataset", "render_mosaic",
]
