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
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from ..errors import NetVLADError
from ..io import atomic_path
from .specs import DBStruct, read_dbstruct, write_dbstruct

SPLITS = ("train", "val", "test")
UTM_ORIGIN = (585000.0, 4477000.0)
SPLIT_SPACING_M = 2000.0  # districts lie this far apart along the easting
META_JSON = "synthetic.json"
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by netvlad_core.datasets.synthetic (deterministic header)"

DB_CAMERA_HEIGHT_M = 2.5  # a car roof, like Google Street View
MAX_HITS = 6  # visible wall segments per image column (front to back)
MAX_VIEW_M = 400.0


@dataclass
class SyntheticConfig:
    """Size and difficulty of the synthetic city.

    ``seed``: the city (palette, districts, poses, conditions); ``width``/``height``: image size in
    pixels; ``*_blocks``: city blocks per split (a near-square grid, streets between and around them);
    ``db_spacing_m``: distance between database positions along a street; ``headings``: database
    yaws per position, evenly spaced, the first ``heading_offset_deg`` from the street direction;
    ``*_queries``: queries per split; ``hfov_deg``: horizontal field of view of the database camera
    (queries: 0.85–1.1 times it); ``query_offset_m``: largest offset of a query from its database
    position along the street (across it at most 3 m); ``query_yaw_jitter_deg``: largest yaw change
    of a query from its database heading; ``jpeg_quality``: of every image.
    """

    seed: int = 0
    width: int = 320
    height: int = 240
    train_blocks: int = 9
    val_blocks: int = 2
    test_blocks: int = 6
    db_spacing_m: float = 4.0
    headings: int = 4
    heading_offset_deg: float = 45.0
    train_queries: int = 400
    val_queries: int = 150
    test_queries: int = 300
    hfov_deg: float = 65.0
    query_offset_m: float = 8.0
    query_yaw_jitter_deg: float = 30.0
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise :class:`NetVLADError` naming the first option that is out of range."""
        checks = [
            ("seed", self.seed >= 0, "must be >= 0"),
            ("width", 32 <= self.width <= 4096, "must be in 32..4096"),
            ("height", 24 <= self.height <= 4096, "must be in 24..4096"),
            ("train_blocks", 1 <= self.train_blocks <= 400, "must be in 1..400"),
            ("val_blocks", 1 <= self.val_blocks <= 400, "must be in 1..400"),
            ("test_blocks", 1 <= self.test_blocks <= 400, "must be in 1..400"),
            ("db_spacing_m", 0.5 <= self.db_spacing_m <= 15.0, "must be in 0.5..15 metres"),
            ("headings", 1 <= self.headings <= 36, "must be in 1..36"),
            ("heading_offset_deg", -360.0 <= self.heading_offset_deg <= 360.0, "must be in -360..360 degrees"),
            ("train_queries", self.train_queries >= 1, "must be >= 1"),
            ("val_queries", self.val_queries >= 1, "must be >= 1"),
            ("test_queries", self.test_queries >= 1, "must be >= 1"),
            ("hfov_deg", 20.0 <= self.hfov_deg <= 120.0, "must be in 20..120 degrees"),
            ("query_offset_m", 0.0 <= self.query_offset_m <= 12.0, "must be in 0..12 metres"),
            ("query_yaw_jitter_deg", 0.0 <= self.query_yaw_jitter_deg <= 90.0, "must be in 0..90 degrees"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in 1..100"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise NetVLADError(f"synthetic option {name}={getattr(self, name)!r} {why}")

    def blocks(self, split: str) -> int:
        return int(getattr(self, f"{split}_blocks"))

    def queries(self, split: str) -> int:
        return int(getattr(self, f"{split}_queries"))


# ----------------------------------------------------------------------------------------------
# Hashing and small helpers
# ----------------------------------------------------------------------------------------------


_NOISE64 = np.random.default_rng(20240517).random((64, 64), dtype=np.float32)  # a fixed texture
_NOISE_FLAT = _NOISE64.ravel()
# Gaussian quantiles at 256 levels: sensor noise from random bytes with one table lookup.
_GAUSS256 = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)


def _grid(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """The fixed 64×64 random texture at integer coordinates (wrapping): a cheap per-cell random value."""
    return np.take(_NOISE_FLAT, (iy.astype(np.int64) & 63) * 64 + (ix.astype(np.int64) & 63))


def _hash01(*keys: Any) -> np.ndarray:
    """A deterministic hash of integer arrays (broadcast together) to floats in [0, 1)."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    h = np.full(shape, 2166136261, dtype=np.uint32)
    for k in keys:
        k = (np.asarray(k).astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
        h = (h ^ k) * np.uint32(16777619)
        h ^= h >> np.uint32(15)
    h ^= h >> np.uint32(16)
    h = h * np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h = h * np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _fade(footprint: np.ndarray, period: float | np.ndarray) -> np.ndarray:
    """1 where a pattern of ``period`` metres is resolved by pixels of ``footprint`` metres, 0 where not."""
    return np.clip(2.0 - 4.0 * footprint / period, 0.0, 1.0).astype(np.float32)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# ----------------------------------------------------------------------------------------------
# The city: palette, districts, buildings
# ----------------------------------------------------------------------------------------------

MATERIALS = ("plaster", "brick", "siding", "stone", "glass", "panels")

_WALL_COLOURS = np.array(
    [
        [0.62, 0.30, 0.22], [0.55, 0.25, 0.20], [0.72, 0.45, 0.32],  # brick reds
        [0.85, 0.80, 0.68], [0.78, 0.72, 0.58], [0.90, 0.88, 0.82],  # beige, cream, white
        [0.55, 0.55, 0.55], [0.40, 0.42, 0.45], [0.68, 0.68, 0.64],  # greys
        [0.55, 0.65, 0.75], [0.60, 0.72, 0.60], [0.88, 0.78, 0.45],  # pastel blue, green, yellow
        [0.45, 0.33, 0.25], [0.75, 0.55, 0.50], [0.35, 0.45, 0.55],  # brown, pink, slate
        [0.80, 0.62, 0.40], [0.50, 0.58, 0.45], [0.66, 0.36, 0.38],  # ochre, olive, burgundy
    ],
    dtype=np.float32,
)
_SIGN_COLOURS = np.array(
    [
        [0.80, 0.10, 0.10], [0.10, 0.25, 0.70], [0.10, 0.50, 0.20], [0.95, 0.80, 0.10],
        [0.08, 0.08, 0.08], [0.95, 0.95, 0.92], [0.55, 0.10, 0.55], [0.95, 0.45, 0.05],
        [0.10, 0.55, 0.60], [0.45, 0.25, 0.10],
    ],
    dtype=np.float32,
)
_CAR_COLOURS = np.array(
    [
        [0.85, 0.85, 0.85], [0.10, 0.10, 0.12], [0.55, 0.56, 0.58], [0.70, 0.08, 0.08],
        [0.10, 0.20, 0.55], [0.90, 0.75, 0.10], [0.20, 0.40, 0.25], [0.95, 0.95, 0.97],
    ],
    dtype=np.float32,
)


@dataclass
class _Palette:
    """City-wide facade styles (shared by all splits so styles repeat) and sign glyphs."""

    material: np.ndarray  # (S,) int
    wall: np.ndarray  # (S, 3)
    trim: np.ndarray  # (S, 3)
    glass: np.ndarray  # (S, 3)
    floor_h: np.ndarray  # (S,)
    win_sp: np.ndarray
    win_w: np.ndarray
    win_h: np.ndarray
    shop_prob: np.ndarray
    glyphs: np.ndarray  # (G, 7, 5) bool


def _make_glyphs(rng: np.random.Generator, n: int = 48) -> np.ndarray:
    """Letter-like 5×7 bitmaps made of a few strokes."""
    strokes = []
    for r in (0, 3, 6):
        strokes.append([(r, c) for c in range(5)])
    for c in (0, 2, 4):
        strokes.append([(r, c) for r in range(7)])
    strokes.append([(r, c) for r in range(4) for c in (0,)] + [(0, c) for c in range(5)])
    strokes.append([(r, round(r * 4 / 6)) for r in range(7)])
    strokes.append([(r, 4 - round(r * 4 / 6)) for r in range(7)])
    strokes.append([(r, c) for r in range(3, 7) for c in (4,)])
    strokes.append([(r, c) for r in range(0, 4) for c in (4,)])
    strokes.append([(r, c) for r in range(3, 7) for c in (0,)])
    glyphs = np.zeros((n, 7, 5), dtype=bool)
    for g in range(n):
        for s in rng.choice(len(strokes), size=int(rng.integers(2, 5)), replace=False):
            for r, c in strokes[s]:
                glyphs[g, r, c] = True
    return glyphs


def _make_palette(seed: int, n_styles: int = 12) -> _Palette:
    rng = _rng(seed, 1000)
    material = rng.integers(0, len(MATERIALS), n_styles)
    wall = _WALL_COLOURS[rng.integers(0, len(_WALL_COLOURS), n_styles)]
    glass_mat = material == MATERIALS.index("glass")
    wall[glass_mat] = np.array([[0.30, 0.42, 0.50]], dtype=np.float32) * rng.uniform(0.8, 1.2, (glass_mat.sum(), 3))
    trim = np.where(rng.random((n_styles, 1)) < 0.5, 0.92, 0.25).astype(np.float32) * np.ones((1, 3), np.float32)
    trim = np.clip(trim + rng.normal(0, 0.05, (n_styles, 3)), 0, 1).astype(np.float32)
    glass = np.clip(
        np.array([0.16, 0.22, 0.28], np.float32) + rng.normal(0, 0.05, (n_styles, 3)), 0.05, 0.6
    ).astype(np.float32)
    return _Palette(
        material=material.astype(np.int64),
        wall=wall.astype(np.float32),
        trim=trim,
        glass=glass,
        floor_h=rng.uniform(2.9, 3.8, n_styles).astype(np.float32),
        win_sp=rng.uniform(1.8, 3.6, n_styles).astype(np.float32),
        win_w=rng.uniform(0.35, 0.75, n_styles).astype(np.float32),
        win_h=rng.uniform(0.40, 0.70, n_styles).astype(np.float32),
        shop_prob=rng.uniform(0.2, 0.95, n_styles).astype(np.float32),
        glyphs=_make_glyphs(rng),
    )


# Ground codes
ROAD_EW, ROAD_NS, CROSSING, SIDEWALK, LOT, GRASS = 0, 1, 2, 3, 4, 5
SIDEWALK_M = 2.5


@dataclass
class _District:
    """One split's part of the city in local metres (x east, y north), 1 m cells."""

    origin: tuple[float, float]
    heights: np.ndarray  # (ny, nx) float32, 0 = open
    bids: np.ndarray  # (ny, nx) int32, -1 = none
    ground: np.ndarray  # (ny, nx) uint8 ground code
    centre: np.ndarray  # (ny, nx) float32 street centre coordinate across the street (roads)
    # buildings (B,)
    b_height: np.ndarray
    b_material: np.ndarray
    b_wall: np.ndarray  # (B, 3)
    b_trim: np.ndarray
    b_glass: np.ndarray
    b_floor_h: np.ndarray
    b_ground_h: np.ndarray
    b_win_sp: np.ndarray
    b_win_w: np.ndarray
    b_win_h: np.ndarray
    b_shop: np.ndarray  # bool
    b_sign_bg: np.ndarray
    b_sign_fg: np.ndarray
    b_awning: np.ndarray
    b_text: np.ndarray  # (B, 10) glyph ids
    b_nchars: np.ndarray
    b_key: np.ndarray  # per-building hash key
    face_umin: np.ndarray  # (B, 4)
    face_w: np.ndarray  # (B, 4)
    glyphs: np.ndarray
    max_height: float
    # streets: (axis 0 = along x / 1 = along y, centre across, start, end, width)
    streets: list[tuple[int, float, float, float, float]]
    # static props (P,): kind 0 tree / 1 lamp, x, y, size, colour key
    props: np.ndarray
    b_box: np.ndarray | None = None  # (B, 4) int lot rectangle x0, x1, y0, y1 in cells
    clear: np.ndarray | None = None  # (ny, nx) chessboard distance to the nearest building cell
    street_box: np.ndarray | None = None  # (streets, 4) int free street rectangles x0, x1, y0, y1
    street_ew: np.ndarray | None = None  # (ny, nx) the east-west street rectangle holding a cell, or -1
    street_ns: np.ndarray | None = None  # (ny, nx) the north-south one, or -1
    table: np.ndarray | None = None  # facade colour table (see _facade_table)
    glyph_cols: np.ndarray | None = None


def _cut(total: int, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    """Cut ``total`` metres into widths in [lo, hi] (the last absorbs the remainder)."""
    widths: list[int] = []
    left = total
    while left > 0:
        if left <= hi:
            widths.append(left)
            break
        w = int(rng.integers(lo, hi + 1))
        if left - w < lo:
            w = left - lo if left - lo >= lo else left
        widths.append(w)
        left -= w
    return widths


def _make_district(seed: int, split_index: int, n_blocks: int, pal: _Palette) -> _District:
    rng = _rng(seed, 2000 + split_index)
    rows = max(1, int(math.floor(math.sqrt(n_blocks))))
    cols = int(math.ceil(n_blocks / rows))
    border = 24
    block_w = rng.integers(30, 49, cols)
    block_d = rng.integers(30, 49, rows)
    street_x = rng.integers(12, 17, cols + 1)  # widths of the streets running north-south
    street_y = rng.integers(12, 17, rows + 1)  # widths of the streets running east-west

    def layout(blocks: np.ndarray, streets: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        blk = [(0, border)]
        st = []
        pos = border
        for i in range(len(blocks) + 1):
            st.append((pos, pos + int(streets[i])))
            pos += int(streets[i])
            if i < len(blocks):
                blk.append((pos, pos + int(blocks[i])))
                pos += int(blocks[i])
        blk.append((pos, pos + border))
        return blk, st

    bx, sx = layout(block_w, street_x)
    by, sy = layout(block_d, street_y)
    nx, ny = bx[-1][1], by[-1][1]
    heights = np.zeros((ny, nx), np.float32)
    bids = np.full((ny, nx), -1, np.int32)
    ground = np.full((ny, nx), SIDEWALK, np.uint8)
    centre = np.zeros((ny, nx), np.float32)

    # Roads (carriageway inside the sidewalks) and crossings.
    for a, b in sy:
        ground[a + int(SIDEWALK_M):b - int(SIDEWALK_M), :] = ROAD_EW
        centre[a:b, :] = (a + b) / 2
    for a, b in sx:
        ns = slice(a + int(SIDEWALK_M), b - int(SIDEWALK_M))
        road_ew = ground[:, ns] == ROAD_EW
        ground[:, ns] = np.where(road_ew, CROSSING, ROAD_NS)
        centre[:, ns] = np.where(road_ew, centre[:, ns], (a + b) / 2)

    # Lots: every block is cut in two halves along its longer side, each half into lots.
    lots: list[tuple[int, int, int, int, bool]] = []  # x0, x1, y0, y1, border
    for i, (x0, x1) in enumerate(bx):
        for j, (y0, y1) in enumerate(by):
            is_border = i in (0, len(bx) - 1) or j in (0, len(by) - 1)
            w, d = x1 - x0, y1 - y0
            if w >= d:
                halves = [(y0, y0 + d // 2), (y0 + d // 2, y1)] if d >= 20 else [(y0, y1)]
                for ya, yb in halves:
                    xa = x0
                    for lw in _cut(w, 6, 18, rng):
                        lots.append((xa, xa + lw, ya, yb, is_border))
                        xa += lw
            else:
                halves = [(x0, x0 + w // 2), (x0 + w // 2, x1)] if w >= 20 else [(x0, x1)]
                for xa, xb in halves:
                    ya = y0
                    for lw in _cut(d, 6, 18, rng):
                        lots.append((xa, xb, ya, ya + lw, is_border))
                        ya += lw
    # Close every street at the edge of the district with a building across its end.
    for a, b in sy:
        lots.append((bx[0][0], bx[0][1], a, b, True))
        lots.append((bx[-1][0], bx[-1][1], a, b, True))
    for a, b in sx:
        lots.append((a, b, by[0][0], by[0][1], True))
        lots.append((a, b, by[-1][0], by[-1][1], True))

    n_lots = len(lots)
    style = rng.integers(0, len(pal.material), n_lots)
    block_base = rng.uniform(9, 22, n_lots)
    open_lot = (rng.random(n_lots) < 0.05) & ~np.array([lot[4] for lot in lots])
    tower = rng.random(n_lots) < 0.05
    floor_h = pal.floor_h[style] * rng.uniform(0.95, 1.05, n_lots)
    ground_h = np.clip(floor_h * rng.uniform(1.1, 1.4, n_lots), 3.4, 5.2)
    n_floors = np.where(tower, rng.integers(10, 18, n_lots), np.maximum(1, np.round((block_base - ground_h) / floor_h)))
    n_floors = n_floors + rng.integers(-1, 2, n_lots)
    n_floors = np.maximum(n_floors, 1)
    b_height = (ground_h + n_floors * floor_h + rng.uniform(0.4, 1.2, n_lots)).astype(np.float32)

    keep = np.flatnonzero(~open_lot)
    for new_id, li in enumerate(keep):
        x0, x1, y0, y1, _ = lots[li]
        heights[y0:y1, x0:x1] = b_height[li]
        bids[y0:y1, x0:x1] = new_id
        ground[y0:y1, x0:x1] = LOT
    for li in np.flatnonzero(open_lot):
        x0, x1, y0, y1, _ = lots[li]
        ground[y0:y1, x0:x1] = GRASS

    B = len(keep)
    st = style[keep]
    jitter = rng.normal(1.0, 0.07, (B, 3)).astype(np.float32) * rng.uniform(0.85, 1.15, (B, 1)).astype(np.float32)
    box = np.array([lots[i][:4] for i in keep], dtype=np.float32).reshape(-1, 4)
    x0, x1, y0, y1 = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    # face order: 0 east (+x), 1 west (-x), 2 north (+y), 3 south (-y); u grows to a viewer's right.
    face_umin = np.stack([y0, -y1, -x1, x0], axis=1)
    face_w = np.stack([y1 - y0, y1 - y0, x1 - x0, x1 - x0], axis=1)
    sign_bg = rng.integers(0, len(_SIGN_COLOURS), B)
    sign_fg = (sign_bg + rng.integers(1, len(_SIGN_COLOURS), B)) % len(_SIGN_COLOURS)
    # Contrast: dark text on light signs and the reverse.
    lum = _SIGN_COLOURS.mean(axis=1)
    fg = _SIGN_COLOURS[sign_fg].copy()
    low_contrast = np.abs(lum[sign_bg] - lum[sign_fg]) < 0.3
    fg[low_contrast] = np.where(lum[sign_bg][low_contrast, None] > 0.5, 0.05, 0.97)

    # Static props: street trees on some sidewalks, lamp posts on the others.
    props = []
    streets: list[tuple[int, float, float, float, float]] = []
    for a, b in sy:
        streets.append((0, (a + b) / 2, (sx[0][0] + sx[0][1]) / 2, (sx[-1][0] + sx[-1][1]) / 2, b - a))
    for a, b in sx:
        streets.append((1, (a + b) / 2, (sy[0][0] + sy[0][1]) / 2, (sy[-1][0] + sy[-1][1]) / 2, b - a))
    crossings_x = np.array([(a + b) / 2 for a, b in sx])
    crossings_y = np.array([(a + b) / 2 for a, b in sy])
    for axis, c, s0, s1, w in streets:
        cross = crossings_x if axis == 0 else crossings_y
        other_w = max(street_x.max(), street_y.max())
        for side in (-1, 1):
            kind = 0 if rng.random() < 0.55 else 1
            gap = rng.uniform(8, 13) if kind == 0 else rng.uniform(16, 24)
            t = s0 + rng.uniform(0, gap)
            across = c + side * (w / 2 - 1.2)
            while t < s1:
                if np.min(np.abs(cross - t)) > other_w / 2 + 2:
                    x, y = (t, across) if axis == 0 else (across, t)
                    size = rng.uniform(0.8, 1.25)
                    props.append((kind, x, y, size, rng.integers(0, 1 << 30)))
                t += gap * rng.uniform(0.8, 1.2)
    props_arr = np.array(props, dtype=np.float64).reshape(-1, 5)

    ox = UTM_ORIGIN[0] + split_index * SPLIT_SPACING_M
    oy = UTM_ORIGIN[1]
    d = _District(
        origin=(ox, oy),
        heights=heights,
        bids=bids,
        ground=ground,
        centre=centre,
        b_height=b_height[keep],
        b_material=pal.material[st],
        b_wall=np.clip(pal.wall[st] * jitter, 0.02, 1.0),
        b_trim=pal.trim[st],
        b_glass=pal.glass[st],
        b_floor_h=floor_h[keep].astype(np.float32),
        b_ground_h=ground_h[keep].astype(np.float32),
        b_win_sp=(pal.win_sp[st] * rng.uniform(0.92, 1.08, B)).astype(np.float32),
        b_win_w=pal.win_w[st],
        b_win_h=pal.win_h[st],
        b_shop=rng.random(B) < pal.shop_prob[st],
        b_sign_bg=_SIGN_COLOURS[sign_bg],
        b_sign_fg=fg.astype(np.float32),
        b_awning=_SIGN_COLOURS[rng.integers(0, len(_SIGN_COLOURS), B)],
        b_text=rng.integers(0, len(pal.glyphs), (B, 10)),
        b_nchars=rng.integers(3, 11, B),
        b_key=rng.integers(0, 1 << 30, B),
        face_umin=face_umin.astype(np.float32),
        face_w=face_w.astype(np.float32),
        glyphs=pal.glyphs,
        max_height=float(b_height[keep].max()) if B else 0.0,
        streets=streets,
        props=props_arr,
    )
    from scipy.ndimage import distance_transform_cdt

    d.b_box = box.astype(np.int64)
    d.clear = distance_transform_cdt(bids < 0, metric="chessboard").astype(np.int64)
    boxes = [(bx[0][1], bx[-1][0], a, b) for a, b in sy] + [(a, b, by[0][1], by[-1][0]) for a, b in sx]
    d.street_box = np.array(boxes, dtype=np.int64)
    d.street_ew = np.full((ny, nx), -1, np.int64)
    d.street_ns = np.full((ny, nx), -1, np.int64)
    for i, (x0_, x1_, y0_, y1_) in enumerate(boxes):
        (d.street_ew if i < len(sy) else d.street_ns)[y0_:y1_, x0_:x1_] = i
    assert (bids[d.street_ew >= 0] < 0).all() and (bids[d.street_ns >= 0] < 0).all()
    d.table = _facade_table(d)
    d.glyph_cols = _glyph_columns(d.glyphs)
    return d


# ----------------------------------------------------------------------------------------------
# Cameras and conditions
# ----------------------------------------------------------------------------------------------


@dataclass
class _Camera:
    x: float
    y: float
    yaw: float  # radians, counter-clockwise from east
    height: float
    hfov: float  # radians
    cy: float  # principal point row as a fraction of the image height


@dataclass
class _Condition:
    name: str
    sun_az: float
    sun_el: float
    sun: np.ndarray  # (3,) sun radiance
    ambient: np.ndarray  # (3,)
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    cloud_cover: float
    cloud_key: int
    fog: float  # per metre
    fog_rgb: np.ndarray
    lit: float  # fraction of lit windows
    lamps: bool
    gain: np.ndarray  # white balance / exposure per channel
    gamma: float
    noise: float  # sensor noise sigma in 8-bit levels
    blur: float  # gaussian blur sigma in pixels


def _database_condition(seed: int, split_index: int) -> _Condition:
    return _Condition(
        name="day",
        sun_az=2.3,
        sun_el=0.75,
        sun=np.array([0.55, 0.52, 0.46], np.float32),
        ambient=np.array([0.55, 0.57, 0.62], np.float32),
        sky_zenith=np.array([0.30, 0.50, 0.85], np.float32),
        sky_horizon=np.array([0.75, 0.83, 0.92], np.float32),
        cloud_cover=0.35,
        cloud_key=seed * 7 + split_index,
        fog=0.004,
        fog_rgb=np.array([0.78, 0.82, 0.88], np.float32),
        lit=0.0,
        lamps=False,
        gain=np.ones(3, np.float32),
        gamma=1.0,
        noise=1.0,
        blur=0.0,
    )


QUERY_CONDITIONS = ("sunny", "overcast", "golden", "dusk", "haze")


def _query_condition(rng: np.random.Generator) -> _Condition:
    name = QUERY_CONDITIONS[int(rng.integers(0, len(QUERY_CONDITIONS)))]
    f32 = lambda *v: np.array(v, np.float32)  # noqa: E731
    c = _Condition(
        name=name,
        sun_az=float(rng.uniform(0, 2 * np.pi)),
        sun_el=float(rng.uniform(0.4, 1.1)),
        sun=f32(0.6, 0.57, 0.5) * float(rng.uniform(0.8, 1.2)),
        ambient=f32(0.5, 0.53, 0.6) * float(rng.uniform(0.85, 1.1)),
        sky_zenith=f32(0.25, 0.45, 0.85),
        sky_horizon=f32(0.72, 0.8, 0.92),
        cloud_cover=float(rng.uniform(0.1, 0.6)),
        cloud_key=int(rng.integers(0, 1 << 30)),
        fog=float(rng.uniform(0.002, 0.008)),
        fog_rgb=f32(0.78, 0.82, 0.88),
        lit=0.0,
        lamps=False,
        gain=rng.uniform(0.88, 1.12, 3).astype(np.float32),
        gamma=float(rng.uniform(0.85, 1.2)),
        noise=float(rng.uniform(1.5, 5.0)),
        blur=float(rng.uniform(0.0, 1.2)) if rng.random() < 0.5 else 0.0,
    )
    if name == "overcast":
        c.sun = c.sun * 0.12
        c.ambient = f32(0.78, 0.78, 0.80) * float(rng.uniform(0.85, 1.05))
        c.sky_zenith = f32(0.62, 0.64, 0.68)
        c.sky_horizon = f32(0.80, 0.81, 0.83)
        c.cloud_cover = float(rng.uniform(0.75, 0.95))
        c.fog = float(rng.uniform(0.006, 0.015))
        c.fog_rgb = f32(0.75, 0.76, 0.78)
    elif name == "golden":
        c.sun_el = float(rng.uniform(0.08, 0.3))
        c.sun = f32(0.95, 0.62, 0.32) * float(rng.uniform(0.8, 1.1))
        c.ambient = f32(0.42, 0.38, 0.42)
        c.sky_zenith = f32(0.32, 0.40, 0.70)
        c.sky_horizon = f32(0.98, 0.72, 0.45)
        c.fog_rgb = f32(0.9, 0.72, 0.55)
    elif name == "dusk":
        c.sun = c.sun * 0.0
        c.ambient = f32(0.20, 0.22, 0.34) * float(rng.uniform(0.8, 1.2))
        c.sky_zenith = f32(0.05, 0.07, 0.20)
        c.sky_horizon = f32(0.45, 0.35, 0.45)
        c.cloud_cover = float(rng.uniform(0.0, 0.4))
        c.fog_rgb = f32(0.22, 0.22, 0.30)
        c.lit = float(rng.uniform(0.3, 0.6))
        c.lamps = True
        c.gain = c.gain * float(rng.uniform(1.2, 1.7))
        c.noise = float(rng.uniform(4.0, 9.0))
    elif name == "haze":
        c.ambient = f32(0.62, 0.62, 0.62)
        c.sun = c.sun * 0.5
        c.sky_zenith = f32(0.70, 0.72, 0.74)
        c.sky_horizon = f32(0.85, 0.85, 0.84)
        c.cloud_cover = 0.0
        c.fog = float(rng.uniform(0.02, 0.04))
        c.fog_rgb = f32(0.84, 0.84, 0.82)
    return c


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _cast_columns(d: _District, cam: _Camera, width: int, height: int) -> dict[str, Any]:
    """Cast one ray per column through the grid; return the visible wall segments front to back.

    Rays hop from box to box (all columns at once): through open ground by the largest free square
    around the current cell (a chessboard distance field), through a building by its whole lot
    rectangle. Segment ``k`` of column ``c`` covers image rows ``[top[k, c], bot[k, c])``: the
    first is the nearest wall down to its foot, each later one a farther, taller wall seen above
    the previous one.
    """
    f = (width / 2) / math.tan(cam.hfov / 2)
    y0 = cam.cy * height
    dx, dy = math.cos(cam.yaw), math.sin(cam.yaw)
    rx, ry = math.sin(cam.yaw), -math.cos(cam.yaw)
    camx = (2 * (np.arange(width) + 0.5) / width - 1) * math.tan(cam.hfov / 2)
    rdx_all = dx + rx * camx
    rdy_all = dy + ry * camx
    ny, nx = d.heights.shape
    bids_flat = d.bids.ravel()
    clear_flat = d.clear.ravel()
    ew_flat = d.street_ew.ravel()
    ns_flat = d.street_ns.ravel()
    street_box = d.street_box
    K = MAX_HITS
    top = np.full((K, width), np.inf)
    bot = np.full((K, width), np.inf)
    dist_h = np.ones((K, width))
    bid_h = np.zeros((K, width), np.int64)
    face_h = np.zeros((K, width), np.int64)
    u_h = np.zeros((K, width))
    count = np.zeros(width, np.int64)

    cols = np.arange(width)
    rdx, rdy = rdx_all, rdy_all
    pos_x, pos_y = rdx > 0, rdy > 0
    with np.errstate(divide="ignore"):
        inv_x = np.where(rdx == 0, np.inf, 1.0 / np.where(rdx == 0, 1.0, rdx))
        inv_y = np.where(rdy == 0, np.inf, 1.0 / np.where(rdy == 0, 1.0, rdy))
    mx = np.full(width, int(math.floor(cam.x)), np.int64)
    my = np.full(width, int(math.floor(cam.y)), np.int64)
    t = np.zeros(width)
    axis_x = np.zeros(width, bool)  # the last boundary crossed was an x = const line
    ytop = np.full(width, np.inf)
    cnt = np.zeros(width, np.int64)
    hmax = d.max_height - cam.height
    bx0, bx1, by0, by1 = d.b_box[:, 0], d.b_box[:, 1], d.b_box[:, 2], d.b_box[:, 3]
    for _ in range(4 * (nx + ny)):
        alive = (mx >= 0) & (mx < nx) & (my >= 0) & (my < ny) & (t < MAX_VIEW_M) & (ytop > 0) & (cnt < K)
        with np.errstate(divide="ignore"):
            alive &= (y0 - hmax * f / t) < ytop  # even the tallest building would be hidden
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        if n_alive < len(cols):
            keep = np.flatnonzero(alive)
            cols, rdx, rdy, pos_x, pos_y, inv_x, inv_y, mx, my, t, axis_x, ytop, cnt = (
                a[keep] for a in (cols, rdx, rdy, pos_x, pos_y, inv_x, inv_y, mx, my, t, axis_x, ytop, cnt))
        cell = my * nx + mx
        b = bids_flat[cell]
        inb = b >= 0
        if inb.any():
            v = np.flatnonzero(inb)
            bv = b[v]
            tv = t[v]
            row_top = y0 - (d.b_height[bv] - cam.height) * f / tv
            vis = row_top < ytop[v]
            if vis.any():
                v, bv, tv, row_top = v[vis], bv[vis], tv[vis], row_top[vis]
                c = cols[v]
                k = cnt[v]
                hx = cam.x + tv * rdx[v]
                hy = cam.y + tv * rdy[v]
                fc = np.where(axis_x[v], np.where(pos_x[v], 1, 0), np.where(pos_y[v], 3, 2))
                top[k, c] = row_top
                bot[k, c] = np.where(k == 0, y0 + cam.height * f / tv, ytop[v])
                dist_h[k, c] = tv
                bid_h[k, c] = bv
                face_h[k, c] = fc
                u_h[k, c] = np.select([fc == 0, fc == 1, fc == 2], [hy, -hy, -hx], hx)
                cnt[v] += 1
                count[c] += 1
                ytop[v] = row_top
        # The box to leave: the lot of a building, or the free square around an open cell.
        bs = np.maximum(b, 0)
        r = clear_flat[cell] - 1
        x_lo = np.where(inb, bx0[bs], mx - r)
        x_hi = np.where(inb, bx1[bs], mx + r + 1)
        y_lo = np.where(inb, by0[bs], my - r)
        y_hi = np.where(inb, by1[bs], my + r + 1)
        with np.errstate(invalid="ignore"):
            tx = (np.where(pos_x, x_hi, x_lo) - cam.x) * inv_x
            ty = (np.where(pos_y, y_hi, y_lo) - cam.y) * inv_y
        # On a street, its whole rectangle is free: leave that instead when it reaches farther.
        for street in (ew_flat[cell], ns_flat[cell]):
            on = (street >= 0) & ~inb
            if on.any():
                box = street_box[np.maximum(street, 0)]
                with np.errstate(invalid="ignore"):
                    tx2 = (np.where(pos_x, box[:, 1], box[:, 0]) - cam.x) * inv_x
                    ty2 = (np.where(pos_y, box[:, 3], box[:, 2]) - cam.y) * inv_y
                on &= np.minimum(tx2, ty2) > np.minimum(tx, ty)
                x_lo = np.where(on, box[:, 0], x_lo)
                x_hi = np.where(on, box[:, 1], x_hi)
                y_lo = np.where(on, box[:, 2], y_lo)
                y_hi = np.where(on, box[:, 3], y_hi)
                tx = np.where(on, tx2, tx)
                ty = np.where(on, ty2, ty)
        axis_x = tx <= ty
        t = np.where(axis_x, tx, ty)
        mx = np.where(axis_x, np.where(pos_x, x_hi, x_lo - 1), np.floor(cam.x + t * rdx).astype(np.int64))
        my = np.where(axis_x, np.floor(cam.y + t * rdy).astype(np.int64), np.where(pos_y, y_hi, y_lo - 1))
    return dict(top=top, bot=bot, dist=dist_h, bid=bid_h, face=face_h, u=u_h, count=count,
                rdx=rdx_all, rdy=rdy_all, norm=np.hypot(rdx_all, rdy_all), f=f, y0=y0)


_FACE_NORMALS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)

# Rows of the per-building colour table.
(L_WALL, L_TRIM, L_GLASS, L_CURTAIN, L_WIN_MEAN, L_SIGN_BG, L_SIGN_FG, L_SIGN_MEAN, L_AWNING, L_AWNING_MEAN,
 L_WHITE, L_SHOP_GLASS, L_DOOR) = range(13)
N_LAYERS = 13


def _facade_table(d: _District) -> np.ndarray:
    """Planar (3, B * N_LAYERS) albedos: column ``b * N_LAYERS + layer``."""
    B = len(d.b_height)
    glass_mat = d.b_material == 4
    sp = np.where(glass_mat, 1.5, d.b_win_sp)
    ww = np.where(glass_mat, 1.38, d.b_win_w * sp)
    wh = np.where(glass_mat, d.b_floor_h - 0.25, d.b_win_h * d.b_floor_h)
    cover = np.clip(ww * wh / (sp * d.b_floor_h), 0, 1)[:, None]
    t = np.zeros((B, N_LAYERS, 3), np.float32)
    t[:, L_WALL] = d.b_wall
    t[:, L_TRIM] = d.b_trim
    t[:, L_GLASS] = d.b_glass
    t[:, L_CURTAIN] = np.array([0.70, 0.64, 0.52], np.float32)
    t[:, L_WIN_MEAN] = d.b_wall * (1 - cover) + d.b_glass * 0.9 * cover
    t[:, L_SIGN_BG] = d.b_sign_bg
    t[:, L_SIGN_FG] = d.b_sign_fg
    t[:, L_SIGN_MEAN] = d.b_sign_bg * 0.7 + d.b_sign_fg * 0.3
    t[:, L_AWNING] = d.b_awning
    t[:, L_AWNING_MEAN] = (d.b_awning + 0.95) / 2
    t[:, L_WHITE] = 0.95
    t[:, L_SHOP_GLASS] = np.clip(d.b_glass * 1.3 + 0.05, 0, 1)
    t[:, L_DOOR] = d.b_glass * 0.6
    return np.ascontiguousarray(t.reshape(B * N_LAYERS, 3).T)


def _glyph_columns(glyphs: np.ndarray) -> np.ndarray:
    """(G, 5) int: bit r set where glyph column has ink in row r (row 0 at the top)."""
    return (glyphs.astype(np.int64) << np.arange(7)[None, :, None]).sum(axis=1)


def _shade_walls(d: _District, cond: _Condition, seg: dict[str, np.ndarray], counts: np.ndarray, sid: np.ndarray,
                 z: np.ndarray, table: np.ndarray, glyph_cols: np.ndarray) -> np.ndarray:
    """Colour (3, N) of wall pixels, lit and hazed. ``seg`` holds per-segment arrays; the pixels come
    segment by segment, ``counts`` of each (so ``sid`` = each pixel's segment = ``repeat(arange, counts)``);
    ``z`` is each pixel's height in metres; ``table`` the planar (3, B * N_LAYERS) facade colour table.

    Everything that depends on the position along the wall is computed once per segment (image
    column × visible wall), only what depends on the height ``z`` per pixel.
    """
    f32 = np.float32
    b, face, ul, fp_u, fp_z = seg["b"], seg["face"], seg["ul"], seg["fp_u"], seg["fp_z"]
    # --- per segment ---
    mat = d.b_material[b]
    key = d.b_key[b]
    fh = d.b_floor_h[b]
    gh = d.b_ground_h[b]
    fw = d.face_w[b, face]
    glass_mat = mat == 4
    sp = np.where(glass_mat, f32(1.5), d.b_win_sp[b])
    ww = np.where(glass_mat, f32(1.38), d.b_win_w[b] * sp)
    wh = np.where(glass_mat, fh - f32(0.25), d.b_win_h[b] * fh)
    sill = np.where(glass_mat, f32(0.12), (fh - wh) * f32(0.45))
    nfl = np.floor((d.b_height[b] - gh - 0.5) / fh)
    ncol = np.floor((fw - 0.8) / sp)
    margin = (fw - ncol * sp) / 2
    wc = np.floor((ul - margin) / sp)
    fu = np.abs(ul - margin - wc * sp - sp / 2)
    col_ok = (wc >= 0) & (wc < ncol)
    win_u = col_ok & (fu < ww / 2)
    frame_u = col_ok & (fu < ww / 2 + 0.12)
    win_key = (_hash01(key, face, wc) * f32(1 << 24)).astype(np.int64)
    t_win = 1 - _fade(np.maximum(fp_u / sp, fp_z / fh), 0.8)
    streak = f32(0.9) + f32(0.2) * _tile_noise(_NOISE64, ul / 2.5, (key % 64).astype(f32))
    rib = np.where((mat == 5) & ((ul / 1.1) % 1.0 < 0.18), f32(0.7), f32(1.0))
    rib_streak = (1 + (rib - 1) * _fade(fp_u, 1.1)) * streak
    shop = d.b_shop[b]
    top = d.b_height[b]
    # ground floor: shop windows between pillars, a door, an awning, a sign board with glyphs
    ssp = np.maximum(sp * 1.5, 2.4)
    sc = np.floor((ul - margin) / ssp)
    su = (ul - margin) - sc * ssp
    pillar = su < 0.35
    door_u = (sc == np.floor(_hash01(key, face, 3) * np.maximum(1, np.floor(fw / ssp)))) & ~pillar
    stripe = np.where((ul / 0.5) % 2.0 < 1.0, L_AWNING, L_WHITE).astype(np.uint8)
    t_stripe = 1 - _fade(fp_u, 0.5)
    nch = d.b_nchars[b]
    ch_w = f32(0.5)
    text_w = nch * ch_w
    tx = ul - (fw - text_w) / 2
    ci = np.floor(tx / ch_w)
    text_u = (ci >= 0) & (ci < nch)
    gx = np.floor((tx - ci * ch_w) / ch_w * 6).astype(np.int64)
    gid = d.b_text[b, np.clip(ci, 0, 9).astype(np.int64)]
    ink_bits = np.where(text_u & (gx < 5), glyph_cols[gid, np.clip(gx, 0, 4)], 0)
    board_u = (tx >= -0.35) & (tx <= text_w + 0.35)
    t_sign = 1 - _fade(np.maximum(fp_u, fp_z), 0.16)
    t_brick = _fade(np.maximum(fp_u, fp_z), 0.28)
    t_stone = _fade(np.maximum(fp_u, fp_z), 0.7)
    t_siding = _fade(fp_z, 0.35)

    # --- per pixel: only what depends on the height z (arithmetic selects; np.where is slow here) ---
    def g(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, counts)

    n = len(sid)
    gh_p, fh_p = g(gh), g(fh)
    zr = z - gh_p
    upper = zr >= 0
    fl = np.floor(zr / fh_p)
    fz = zr - fl * fh_p
    sill_p, wh_p = g(sill), g(wh)
    rel = (fz - sill_p) / wh_p  # 0..1 up a window
    in_grid = upper & (fl < g(nfl)) & g(col_ok)
    win = in_grid & g(win_u) & (rel > 0) & (rel < 1)
    frame = in_grid & g(frame_u) & (fz > sill_p - 0.12) & (fz < sill_p + wh_p + 0.15) & ~win
    wkey = g(win_key) + fl.astype(np.int64) * 7919
    wv = np.take(_NOISE_FLAT, wkey & 4095)
    wv2 = np.take(_NOISE_FLAT, (wkey * 3 + 1) & 4095)
    curtain = win & (wv2 < 0.25) & (rel > 0.45)

    # wall material: a brightness pattern, faded out where pixels cannot resolve it
    mat_p = g(mat)
    pat = np.ones(n, f32)
    for m_id, period, t_seg, joint_b, var0, var1, jz, ju in (
        (1, 0.28, t_brick, 1.35, 0.9, 0.2, 0.18, 0.08),
        (3, 0.7, t_stone, 0.7, 0.85, 0.3, 0.07, 0.04),
    ):
        m = np.flatnonzero(mat_p == m_id)
        if len(m):
            sm = np.take(sid, m)
            zz = np.take(z, m)
            row = np.floor(zz / period)
            uu = np.take(ul, sm) + (row % 2) * f32(period * 1.07)
            cw = f32(period * 2.14)
            ucol = np.floor(uu / cw)
            joint = (zz / period - row < jz) | (uu / cw - ucol < ju)
            var = var0 + var1 * _grid(ucol + np.take(key, sm), row)
            p = var + joint * (joint_b - var)
            pat[m] = 1 + (p - 1) * np.take(t_seg, sm)
    m = np.flatnonzero(mat_p == 2)
    if len(m):
        p = 1 - ((np.take(z, m) / 0.35) % 1.0 < 0.2) * f32(0.28)
        pat[m] = 1 + (p - 1) * np.take(t_siding, np.take(sid, m))
    pat *= g(rib_streak) * (f32(0.7) + f32(0.3) * np.minimum(z / f32(1.2), 1))

    # upper floors (layer ids are uint8: `a += m * (v - a)` sets a to v where m, wrapping harmlessly)
    u8 = np.uint8
    frame8, win8, curtain8, grid8 = (m.view(u8) for m in (frame, win, curtain, in_grid))
    la = u8(L_WALL) + frame8 * u8(L_TRIM - L_WALL) + win8 * u8(L_GLASS - L_WALL) + curtain8 * u8(L_CURTAIN - L_GLASS)
    glass_b = (0.55 + 0.6 * rel) * (0.75 + 0.5 * wv)
    ba = pat + frame * (1 - pat) + win * (glass_b - pat) + curtain * (0.7 + 0.3 * wv - glass_b)
    lb = u8(L_WALL) + grid8 * u8(L_WIN_MEAN - L_WALL)
    bb = pat.copy()
    t = in_grid * g(t_win)

    # ground floor of shops: sign board with glyphs, awning, shop windows between pillars, a door
    shop_p = g(shop)
    sign_lo = gh_p - 1.0
    sign_hi = gh_p - 0.2
    in_sign = shop_p & (z >= sign_lo) & (z < sign_hi) & g(board_u)
    text_v = (z >= sign_lo + 0.12) & (z < sign_hi - 0.12)
    gy = np.clip((sign_hi - 0.12 - z) * f32(7 / 0.56), 0, 6).astype(np.int64)
    ink = in_sign & text_v & (((g(ink_bits) >> gy) & 1) == 1)
    in_text = in_sign & text_v & g(text_u)
    sign8 = in_sign.view(u8)
    la += sign8 * (u8(L_SIGN_BG) + ink.view(u8) * u8(L_SIGN_FG - L_SIGN_BG) - la)
    lb += sign8 * (u8(L_SIGN_BG) + in_text.view(u8) * u8(L_SIGN_MEAN - L_SIGN_BG) - lb)
    t += in_sign * (g(t_sign) - t)
    awn = shop_p & (z >= sign_lo - 0.3) & (z < sign_lo)
    awn8 = awn.view(u8)
    la += awn8 * (g(stripe) - la)
    lb += awn8 * (u8(L_AWNING_MEAN) - lb)
    t += awn * (g(t_stripe) - t)
    board = in_sign | awn
    ba += board * (1 - ba)
    bb += board * (1 - bb)
    below = shop_p & (z < sign_lo - 0.3)
    shop_win = below & (z > 0.45) & ~g(pillar)
    door = below & g(door_u) & (z < sign_lo - 0.25)
    la += below.view(u8) * (u8(L_TRIM) - la)
    la += shop_win.view(u8) * (u8(L_SHOP_GLASS) - la)
    la += door.view(u8) * (u8(L_DOOR) - la)
    ba += below * (0.9 - ba) + (shop_win | door) * f32(0.1)
    # plain ground floors: a darker plinth, windows of the floor grid half a storey down
    plain = ~shop_p & ~upper
    pz = z - (gh_p - fh_p) / 2
    pwin = plain & g(win_u) & ~g(glass_mat) & (pz > sill_p + 0.3) & (pz < sill_p + wh_p)
    plinth = 1 - (plain & (z < 0.6)) * f32(0.25)
    ba *= plinth
    bb *= plinth
    la += pwin.view(u8) * (u8(L_GLASS) - la)
    ba += pwin * (0.9 - ba)
    fixed = below | pwin  # no distance blending here
    lb += fixed.view(u8) * (la - lb)
    bb += fixed * (ba - bb)
    # belt course over the ground floor, cornice at the top
    belt = ((zr >= -0.2) & ~upper) | (z > g(top) - 0.45)
    belt8 = belt.view(u8)
    la += belt8 * (u8(L_TRIM) - la)
    lb += belt8 * (u8(L_TRIM) - lb)
    ba += belt * (0.95 - ba)
    bb += belt * (0.95 - bb)

    base = g(b) * N_LAYERS
    idx_a = base + la
    idx_b = base + lb
    light, fog = seg["light"], seg["fog_add"]
    out = np.empty((3, n), f32)
    for c in range(3):
        col = np.take(table[c], idx_a) * ba
        col += (np.take(table[c], idx_b) * bb - col) * t
        out[c] = col * g(light[c]) + g(fog[c])
    if cond.lit > 0:  # lit windows and shop fronts at dusk
        clear = g(seg["clear"])
        lit = win & (np.take(_NOISE_FLAT, (wkey * 5 + 2) & 4095) < cond.lit) & ~belt
        glow = lit * (0.6 + 0.4 * wv) * clear
        shop_glow = (shop_win | door | in_sign) * clear
        for c, (w_rgb, s_rgb) in enumerate(zip((1.0, 0.8, 0.45), (0.55, 0.5, 0.35))):
            out[c] += w_rgb * glow + s_rgb * shop_glow
    return out


def _tile_noise(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup in a periodic 2-D grid of values."""
    n0, n1 = grid.shape
    iu = np.floor(u)
    iv = np.floor(v)
    fu = (u - iu).astype(np.float32)
    fv = (v - iv).astype(np.float32)
    iu = iu.astype(np.int64) % n1
    iv = iv.astype(np.int64) % n0
    ju = (iu + 1) % n1
    jv = (iv + 1) % n0
    a = grid[iv, iu] + (grid[iv, ju] - grid[iv, iu]) * fu
    b = grid[jv, iu] + (grid[jv, ju] - grid[jv, iu]) * fu
    return a + (b - a) * fv


def _shade_ground(d: _District, gx: np.ndarray, gy: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Planar (3, N) albedo of ground points: asphalt with lane marks, paving slabs, grass."""
    f32 = np.float32
    ny, nx = d.ground.shape
    ix = np.clip(gx.astype(np.int64), 0, nx - 1)  # ground points in view lie at x, y >= 0
    iy = np.clip(gy.astype(np.int64), 0, ny - 1)
    cell = iy * nx + ix
    code = np.take(d.ground.ravel(), cell)
    gx = gx.astype(f32)
    gy = gy.astype(f32)
    road = code <= CROSSING
    side = code == SIDEWALK
    other = code > SIDEWALK
    # asphalt: grain, repaved patches, a dashed centre line
    grain = 1 + (_grid(gx * 2, gy * 2) - 0.5) * 0.2 * _fade(fp, 0.5)
    road_b = grain * (0.92 + 0.16 * _grid(gx / 5 + 17, gy / 5 + 23))  # repaved patches
    ew = code == ROAD_EW
    along = gx + ~ew * (gy - gx)
    across = gy + ~ew * (gx - gy) - np.take(d.centre.ravel(), cell)
    dash = road & (np.abs(across) < 0.12) & ((along / 6.0) % 1.0 < 0.5) & (code != CROSSING)
    dt = dash * _fade(fp, 0.24)
    # paving slabs
    sx_, sy_ = gx / f32(1.5), gy / f32(1.5)
    joint = (sx_ % 1.0 < 0.06) | (sy_ % 1.0 < 0.06)
    slab = 0.95 + 0.1 * _grid(sx_ + 5, sy_ + 9)
    slab = 1 + (slab + joint * (0.8 - slab) - 1) * _fade(fp, 1.5)
    grass = 1 + (_grid(gx * 2 + 31, gy * 2) - 0.5) * 0.4 * _fade(fp, 0.5)
    out = np.empty((3, len(gx)), f32)
    for c, (asph, yellow, pave, green) in enumerate(zip((0.30, 0.30, 0.32), (0.85, 0.78, 0.35),
                                                        (0.62, 0.60, 0.57), (0.25, 0.45, 0.18))):
        out[c] = road * (asph * road_b * (1 - dt) + yellow * dt) + side * (pave * slab) + other * (green * grass)
    return out


def _sky(cond: _Condition, rdx: np.ndarray, rdy: np.ndarray, rz: np.ndarray) -> np.ndarray:
    """Planar (3, N) sky colour for rays (rdx, rdy, rz), rz > 0: a gradient, clouds on a plane 1 km up."""
    f32 = np.float32
    el = (rz / np.hypot(rdx, rdy)).astype(f32)  # tangent of the elevation
    t = np.sqrt(np.minimum(el / f32(0.8), 1))
    if cond.cloud_cover > 0:
        crng = np.random.default_rng(cond.cloud_key)
        g1 = crng.random((16, 16), dtype=f32)
        g2 = crng.random((32, 32), dtype=f32)
        s = (2.0 / np.maximum(rz, 1e-3)).astype(f32)  # 1 km up, a 500 m lattice
        cx = rdx.astype(f32) * s
        cy = rdy.astype(f32) * s
        nz = 0.65 * _tile_noise(g1, cx, cy) + 0.35 * _tile_noise(g2, cx * 2.7, cy * 2.7)
        amt = np.clip((nz - (1 - cond.cloud_cover)) * 4, 0, 1) * np.minimum(el / f32(0.08), 1)
        cloud = np.clip(cond.sky_horizon * 1.08 + 0.05, 0, 1)
    out = np.empty((3, len(rz)), f32)
    for c in range(3):
        out[c] = cond.sky_horizon[c] + (cond.sky_zenith[c] - cond.sky_horizon[c]) * t
        if cond.cloud_cover > 0:
            out[c] += (cloud[c] * (0.85 + 0.15 * nz) - out[c]) * amt
    return out


@dataclass
class _Sprite:
    kind: str  # tree, lamp, car, van, person
    x: float
    y: float
    yaw: float = 0.0  # vehicles: along-street direction
    size: float = 1.0
    colour: np.ndarray | None = None
    key: int = 0


def _sprite_extent(s: _Sprite) -> tuple[float, float, float]:
    """(half width across the view, half length along its yaw, height) in metres."""
    if s.kind == "tree":
        return 2.0 * s.size, 2.0 * s.size, 7.0 * s.size
    if s.kind == "lamp":
        return 0.6, 0.6, 5.5
    if s.kind == "car":
        return 0.9, 2.2, 1.5
    if s.kind == "van":
        return 1.0, 2.8, 2.6
    return 0.28, 0.28, 1.75 * s.size


def _paint(img: np.ndarray, zbuf: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray,
           colour: np.ndarray, depth: float) -> None:
    """Write ``colour`` ((3,) or broadcastable to (3, h, w)) into the planar ``img`` (3, H, W) inside
    ``box`` = (row0, row1, col0, col1) where ``mask`` holds and the sprite is nearer than what is there."""
    ra, rb, ca, cb = box
    zb = zbuf[ra:rb, ca:cb]
    m = np.broadcast_to(mask, zb.shape) & (zb > depth)
    if not m.any():
        return
    region = img[:, ra:rb, ca:cb]
    if colour.ndim == 1:
        for c in range(3):
            region[c][m] = colour[c]
    else:
        full = np.broadcast_to(colour, (3,) + zb.shape)
        for c in range(3):
            region[c][m] = full[c][m]
    zb[m] = depth


def _draw_sprites(img: np.ndarray, zbuf: np.ndarray, sprites: list[_Sprite], cam: _Camera, cond: _Condition,
                  f: float, y0: float, light: np.ndarray) -> None:
    """Depth-tested billboards, far to near, into the planar ``img`` (3, H, W) and ``zbuf`` (H, W)."""
    _, H, W = img.shape
    dx, dy = math.cos(cam.yaw), math.sin(cam.yaw)
    rx, ry = math.sin(cam.yaw), -math.cos(cam.yaw)
    items = []
    for s in sprites:
        vx, vy = s.x - cam.x, s.y - cam.y
        depth = vx * dx + vy * dy
        if depth < 1.0 or depth > 150.0:
            continue
        half_w, half_l, h = _sprite_extent(s)
        if s.kind in ("car", "van"):
            ax, ay = math.cos(s.yaw), math.sin(s.yaw)
            corners = [(s.x + ax * a * half_l - ay * b * half_w, s.y + ay * a * half_l + ax * b * half_w)
                       for a in (-1, 1) for b in (-1, 1)]
            deps = [(cxx - cam.x) * dx + (cyy - cam.y) * dy for cxx, cyy in corners]
            if min(deps) < 0.8:
                continue
            xs = [W / 2 + ((cxx - cam.x) * rx + (cyy - cam.y) * ry) * f / dp for (cxx, cyy), dp in zip(corners, deps)]
            c0, c1 = min(xs), max(xs)
            depth = min(deps) * 0.5 + depth * 0.5
        else:
            lat = vx * rx + vy * ry
            cxs = W / 2 + lat * f / depth
            c0, c1 = cxs - half_w * f / depth, cxs + half_w * f / depth
        r0 = y0 - (h - cam.height) * f / depth
        r1 = y0 + cam.height * f / depth
        if c1 < 0 or c0 >= W or r1 < 0 or r0 >= H or c1 - c0 < 0.5:
            continue
        items.append((depth, s, c0, c1, r0, r1))
    items.sort(key=lambda it: -it[0])
    fog = cond.fog_rgb
    f32 = np.float32
    for depth, s, c0, c1, r0, r1 in items:
        ca, cb = max(0, int(math.floor(c0))), min(W, int(math.ceil(c1)))
        ra, rb = max(0, int(math.floor(r0))), min(H, int(math.ceil(r1)))
        if cb <= ca or rb <= ra or zbuf[ra:rb, ca:cb].max() <= depth:
            continue
        box = (ra, rb, ca, cb)
        scale = f32(depth / f)  # metres per pixel at the sprite
        fogt = f32(1 - math.exp(-depth * cond.fog))

        def lit(c: Any) -> np.ndarray:
            return (np.asarray(c, f32) * light * (1 - fogt) + fog * fogt).astype(f32)

        cols = np.arange(ca, cb, dtype=f32) + f32(0.5)
        lx = (cols - f32((c0 + c1) / 2)) * scale  # metres across
        sx = (cols - f32(c0)) / f32(max(c1 - c0, 1e-6))
        z = f32(cam.height) + (f32(y0) - (np.arange(ra, rb, dtype=f32) + f32(0.5))) * scale
        lx2, z2 = lx[None, :], z[:, None]
        if s.kind == "tree":
            sz = f32(s.size)
            trunk = (np.abs(lx2) < 0.18 * sz) & (z2 < 3.2 * sz)
            _paint(img, zbuf, box, trunk, lit([0.33, 0.25, 0.17]), depth)
            # The crown: a noisy ellipse, its leaves a texture fixed to the tree.
            cz = 4.6 * sz
            rows = np.flatnonzero(np.abs(z - cz) < 2.9 * sz)
            if len(rows):
                zc = z[rows[0]:rows[-1] + 1, None]
                leaf_n = _tile_noise(_NOISE64, lx2 * 2.5 + (s.key % 61), zc * 2.5 + (s.key % 37))
                rad = (lx2 / (2.0 * sz)) ** 2 + ((zc - cz) / (2.2 * sz)) ** 2
                crown = rad < (0.85 + 0.25 * leaf_n) ** 2
                shade = lit([0.20, 0.38, 0.14])[:, None, None] * (0.7 + 0.6 * leaf_n)[None]
                _paint(img, zbuf, (ra + rows[0], ra + rows[-1] + 1, ca, cb), crown, shade, depth)
        elif s.kind == "lamp":
            pole = (np.abs(lx2) < 0.07) & (z2 < 5.3)
            arm = (z2 > 5.1) & (z2 < 5.3) & (lx2 > -0.05) & (lx2 < 0.55)
            head = (z2 > 4.95) & (z2 < 5.15) & (lx2 > 0.3) & (lx2 < 0.6)
            _paint(img, zbuf, box, pole | arm | head, lit([0.18, 0.2, 0.2]), depth)
            if cond.lamps:
                _paint(img, zbuf, box, head, np.array([1.0, 0.9, 0.6], f32), depth - 1e-3)
        elif s.kind in ("car", "van"):
            tall = s.kind == "van"
            body_top = 2.3 if tall else 1.0
            sx2 = sx[None, :]
            wheel = (z2 < 0.38) & (((sx2 > 0.08) & (sx2 < 0.24)) | ((sx2 > 0.76) & (sx2 < 0.92)))
            body = (z2 >= 0.28) & (z2 < body_top)
            cabin = (z2 >= body_top) & (z2 < (2.6 if tall else 1.48)) & (sx2 > 0.18) & (sx2 < 0.82)
            glass = cabin | ((z2 > 1.6) & (z2 < body_top - 0.15) & (sx2 > 0.06) & (sx2 < 0.94) & tall)
            shade = lit(s.colour)[:, None, None] * (0.8 + 0.2 * np.clip((z - 0.3) / 0.7, 0, 1))[None, :, None]
            _paint(img, zbuf, box, body & ~glass, shade, depth)
            _paint(img, zbuf, box, glass, lit([0.12, 0.14, 0.17]), depth)
            _paint(img, zbuf, box, wheel, lit([0.05, 0.05, 0.05]), depth)
            if cond.lamps:
                lamp = (z2 > 0.6) & (z2 < 0.8) & ((sx2 < 0.12) | (sx2 > 0.88))
                _paint(img, zbuf, box, lamp, np.array([1.0, 0.95, 0.8], f32), depth - 1e-3)
        else:  # a pedestrian
            hh = _sprite_extent(s)[2]
            legs = (z2 < 0.5 * hh) & (np.abs(np.abs(lx2) - 0.09) < 0.075)
            torso = (z2 >= 0.5 * hh) & (z2 < 0.82 * hh) & (np.abs(lx2) < 0.24 - 0.05 * (z2 - 0.5 * hh))
            head = (lx2 / 0.11) ** 2 + ((z2 - 0.91 * hh) / 0.13) ** 2 < 1
            _paint(img, zbuf, box, legs, lit([0.15, 0.15, 0.22]), depth)
            _paint(img, zbuf, box, torso, lit(s.colour), depth)
            _paint(img, zbuf, box, head, lit([0.75, 0.58, 0.45]), depth)


def _render(d: _District, cam: _Camera, cond: _Condition, width: int, height: int,
            movers: list[_Sprite], rng: np.random.Generator) -> np.ndarray:
    """Render one view to a uint8 (height, width, 3) array (planar float32 inside)."""
    f32 = np.float32
    hits = _cast_columns(d, cam, width, height)
    f, y0 = float(hits["f"]), float(hits["y0"])
    H, W = height, width
    img = np.empty((3, H * W), f32)
    zbuf = np.full(H * W, np.inf, f32)
    norm = hits["norm"]

    # Lighting: ambient plus the sun on each face orientation and on the ground.
    s_el = math.cos(cond.sun_el)
    sun_dir = np.array([math.cos(cond.sun_az) * s_el, math.sin(cond.sun_az) * s_el], f32)
    face_light = cond.ambient[None, :] + cond.sun[None, :] * np.maximum(_FACE_NORMALS @ sun_dir, 0)[:, None] * 1.3
    ground_light = cond.ambient + cond.sun * math.sin(cond.sun_el)

    # Walls. Segment k of column c covers the pixel rows whose centres lie in [top, bot): a run of
    # rows, so per-segment values reach their pixels with np.repeat (pixels ordered segment by segment).
    with np.errstate(invalid="ignore"):
        r0 = np.clip(np.ceil(hits["top"] - 0.5), 0, H).astype(np.int64).ravel()
        r1 = np.clip(np.ceil(hits["bot"] - 0.5), 0, H).astype(np.int64).ravel()
    runs = r1 - r0
    used = np.flatnonzero(runs > 0)  # segment ids k * W + column
    is_wall = np.zeros(H * W, bool)
    if len(used):
        counts = runs[used]
        n_px = int(counts.sum())
        starts = np.cumsum(counts) - counts
        sid = np.repeat(np.arange(len(used)), counts)  # each pixel's segment (index into `used`)
        r_w = np.repeat(r0[used] - starts, counts) + np.arange(n_px)
        c_seg = used % W
        flat = r_w * W + np.repeat(c_seg, counts)
        dist = hits["dist"].ravel()[used]
        face = hits["face"].ravel()[used]
        bid = hits["bid"].ravel()[used]
        rdx, rdy = hits["rdx"][c_seg], hits["rdy"][c_seg]
        cos_inc = np.abs(_FACE_NORMALS[face, 0] * rdx + _FACE_NORMALS[face, 1] * rdy) / norm[c_seg]
        fp = (dist / f).astype(f32)
        fogt = (1 - np.exp(-dist * norm[c_seg] * cond.fog)).astype(f32)
        seg = dict(
            b=bid, face=face,
            ul=(hits["u"].ravel()[used] - d.face_umin[bid, face]).astype(f32),
            fp_z=fp, fp_u=(fp / np.maximum(cos_inc, 0.08)).astype(f32),
            light=np.ascontiguousarray((face_light[face] * (1 - fogt)[:, None]).T.astype(f32)),
            fog_add=np.ascontiguousarray((cond.fog_rgb[None, :] * fogt[:, None]).T.astype(f32)),
            clear=(1 - fogt),
        )
        dist_p = np.repeat(dist.astype(f32), counts)
        z = f32(cam.height) + (f32(y0 - 0.5) - r_w.astype(f32)) * dist_p * f32(1 / f)
        walls = _shade_walls(d, cond, seg, counts, sid, z, d.table, d.glyph_cols)
        for c in range(3):
            img[c][flat] = walls[c]
        zbuf[flat] = dist_p
        is_wall[flat] = True
    row_of = np.repeat(np.arange(H, dtype=np.int64), W)
    # Ground (below the horizon) and sky.
    open_px = np.flatnonzero(~is_wall)
    r_o = np.take(row_of, open_px)
    below = r_o > y0
    flat = open_px[below]
    if len(flat):
        r_g = np.take(row_of, flat)
        c_g = flat - r_g * W
        depth = cam.height * f / (r_g + 0.5 - y0)
        rdx, rdy = np.take(hits["rdx"], c_g), np.take(hits["rdy"], c_g)
        fp = (depth * depth / (f * cam.height)).astype(f32)  # footprint along the view
        fogt = (1 - np.exp(-depth * np.take(norm, c_g) * cond.fog)).astype(f32)
        alb = _shade_ground(d, cam.x + depth * rdx, cam.y + depth * rdy, fp)
        for c in range(3):
            img[c][flat] = alb[c] * (ground_light[c] * (1 - fogt)) + cond.fog_rgb[c] * fogt
        zbuf[flat] = depth
    flat = open_px[~below]
    if len(flat):
        r_s = np.take(row_of, flat)
        c_s = flat - r_s * W
        rz = np.maximum((y0 - (r_s + 0.5)) / f, 1e-3)
        sky = _sky(cond, np.take(hits["rdx"], c_s), np.take(hits["rdy"], c_s), rz)
        for c in range(3):
            img[c][flat] = sky[c]
    img = img.reshape(3, H, W)
    zbuf = zbuf.reshape(H, W)

    # Static props (trees, lamp posts) and the dynamic occluders of this image.
    props = []
    if len(d.props):
        rel = d.props[:, 1:3] - np.array([cam.x, cam.y])
        dep = rel @ np.array([math.cos(cam.yaw), math.sin(cam.yaw)])
        lat = rel @ np.array([math.sin(cam.yaw), -math.cos(cam.yaw)])
        visible = (dep > 1.0) & (dep < 150.0) & (np.abs(lat) < dep * math.tan(cam.hfov / 2) + 3.0)
        for i in np.flatnonzero(visible):
            kind, x, y, size, key = d.props[i]
            props.append(_Sprite("tree" if kind == 0 else "lamp", float(x), float(y), size=float(size), key=int(key)))
    light = (cond.ambient + cond.sun * 0.6).astype(f32)
    _draw_sprites(img, zbuf, props + movers, cam, cond, f, y0, light)

    # Camera: exposure and white balance, blur, sensor noise, quantisation, gamma.
    img *= (cond.gain * f32(255.0))[:, None, None]
    if cond.blur > 0.05:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=(0, cond.blur, cond.blur))
    if cond.noise > 0:
        noise = np.take(_GAUSS256, np.frombuffer(rng.bytes(img.size), np.uint8)).reshape(img.shape)
        img += noise * f32(cond.noise)
    img += f32(0.5)
    out = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if abs(cond.gamma - 1.0) > 1e-6:
        lut = np.round(255.0 * (np.arange(256) / 255.0) ** (1.0 / cond.gamma)).astype(np.uint8)
        out = np.take(lut, out)
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pose:
    role: str  # database / query
    index: int
    path: str  # relative to images/ (database) or images/queries_real/ (queries)
    x: float
    y: float
    yaw: float
    cam_h: float
    hfov: float
    cy: float
    street: int
    position: int  # database position index (for queries: the one it was placed near)
    heading: int  # yaw index of the database heading it is near


def _db_poses(cfg: SyntheticConfig, split: str, d: _District) -> list[_Pose]:
    """Database poses along every street centre line, skipping duplicates at crossings."""
    poses: list[_Pose] = []
    pos_index = 0
    crossings = {0: [s[1] for s in d.streets if s[0] == 1], 1: [s[1] for s in d.streets if s[0] == 0]}
    for si, (axis, c, s0, s1, _w) in enumerate(d.streets):
        n = int(math.floor((s1 - s0) / cfg.db_spacing_m + 1e-9)) + 1
        for t in s0 + np.arange(n) * cfg.db_spacing_m:
            if axis == 1 and min(abs(t - cc) for cc in crossings[1]) < cfg.db_spacing_m / 2:
                continue  # an east-west street already has a position here
            x, y = (t, c) if axis == 0 else (c, t)
            base = 0.0 if axis == 0 else math.pi / 2
            for k in range(cfg.headings):
                yaw = base + math.radians(cfg.heading_offset_deg) + 2 * math.pi * k / cfg.headings
                rel = f"{split}/{pos_index // 100:03d}/{pos_index:06d}_yaw{k:02d}.jpg"
                poses.append(_Pose("database", len(poses), rel, float(x), float(y), yaw, DB_CAMERA_HEIGHT_M,
                                   math.radians(cfg.hfov_deg), 0.62, si, pos_index, k))
            pos_index += 1
    return poses


def _query_poses(cfg: SyntheticConfig, split: str, split_index: int, d: _District, db: list[_Pose]) -> list[_Pose]:
    rng = _rng(cfg.seed, 3000 + split_index)
    positions = [p for p in db if p.heading == 0]
    n = cfg.queries(split)
    picks = rng.choice(len(positions), size=n, replace=n > len(positions))
    out: list[_Pose] = []
    for qi, pi in enumerate(picks):
        base = positions[int(pi)]
        axis, c, s0, s1, w = d.streets[base.street]
        along = (base.x if axis == 0 else base.y) + rng.uniform(-cfg.query_offset_m, cfg.query_offset_m)
        along = float(np.clip(along, s0 - 1.0, s1 + 1.0))  # not into the buildings closing the street
        across = c + rng.uniform(-1.0, 1.0) * min(3.0, w / 2 - 3.5)
        x, y = (along, across) if axis == 0 else (across, along)
        k = int(rng.integers(0, cfg.headings))
        yaw = (0.0 if axis == 0 else math.pi / 2) + math.radians(cfg.heading_offset_deg)
        yaw += 2 * math.pi * k / cfg.headings
        yaw += math.radians(rng.uniform(-cfg.query_yaw_jitter_deg, cfg.query_yaw_jitter_deg))
        hfov = math.radians(cfg.hfov_deg * rng.uniform(0.85, 1.1))
        rel = f"{split}/{qi // 100:03d}/{qi:06d}.jpg"
        out.append(_Pose("query", qi, rel, x, y, yaw, float(rng.uniform(1.5, 1.9)), hfov,
                         float(rng.uniform(0.52, 0.62)), base.street, base.position, k))
    return out


def _movers(d: _District, pose: _Pose, rng: np.random.Generator, n_cars: float, n_people: float) -> list[_Sprite]:
    """Vehicles in the lanes and pedestrians on the sidewalks near the camera's street."""
    axis, c, s0, s1, w = d.streets[pose.street]
    along0 = pose.x if axis == 0 else pose.y
    out = []
    for _ in range(int(rng.poisson(n_cars))):
        t = along0 + rng.choice([-1, 1]) * rng.uniform(5.0, 45.0)
        lane = c + rng.choice([-1, 1]) * rng.uniform(1.6, w / 2 - SIDEWALK_M - 1.0)
        x, y = (t, lane) if axis == 0 else (lane, t)
        kind = "van" if rng.random() < 0.2 else "car"
        yaw = (0.0 if axis == 0 else math.pi / 2) + rng.normal(0, 0.05)
        out.append(_Sprite(kind, x, y, yaw=yaw, colour=_CAR_COLOURS[int(rng.integers(0, len(_CAR_COLOURS)))]))
    for _ in range(int(rng.poisson(n_people))):
        t = along0 + rng.choice([-1, 1]) * rng.uniform(2.5, 30.0)
        side = c + rng.choice([-1, 1]) * rng.uniform(w / 2 - SIDEWALK_M + 0.3, w / 2 - 0.4)
        x, y = (t, side) if axis == 0 else (side, t)
        shirt = rng.uniform(0.1, 0.9, 3).astype(np.float32)
        out.append(_Sprite("person", x, y, size=float(rng.uniform(0.9, 1.1)), colour=shirt))
    return out


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # per-process cache of the districts (set by the pool initialiser)


def _districts(cfg: SyntheticConfig) -> dict[str, _District]:
    pal = _make_palette(cfg.seed)
    return {s: _make_district(cfg.seed, i, cfg.blocks(s), pal) for i, s in enumerate(SPLITS)}


def _keep_freed_memory() -> None:
    """Let glibc keep freed heap memory in this (worker) process: every image allocates and frees the
    same large arrays, and returning them to the system each time costs more than the rendering."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def _init_worker(cfg_dict: dict, pool_worker: bool = True) -> None:
    if pool_worker:
        _keep_freed_memory()
    cfg = SyntheticConfig(**cfg_dict)
    _WORKER["cfg"] = cfg
    _WORKER["districts"] = _districts(cfg)


def _render_pose(cfg: SyntheticConfig, d: _District, split_index: int, pose: _Pose) -> tuple[np.ndarray, str]:
    role_key = 0 if pose.role == "database" else 1
    rng = _rng(cfg.seed, split_index, role_key, pose.index)
    cam = _Camera(pose.x, pose.y, pose.yaw, pose.cam_h, pose.hfov, pose.cy)
    if pose.role == "database":
        cond = _database_condition(cfg.seed, split_index)
        cond.gain = cond.gain * np.float32(rng.uniform(0.96, 1.04))
        movers = _movers(d, pose, rng, n_cars=1.0, n_people=0.5)
    else:
        cond = _query_condition(rng)
        movers = _movers(d, pose, rng, n_cars=4.0, n_people=5.0)
    return _render(d, cam, cond, cfg.width, cfg.height, movers, rng), cond.name


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def _work(task: tuple[int, dict, str]) -> tuple[str, str]:
    split_index, pose_dict, out_file = task
    cfg: SyntheticConfig = _WORKER["cfg"]
    d = _WORKER["districts"][SPLITS[split_index]]
    img, cond = _render_pose(cfg, d, split_index, _Pose(**pose_dict))
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_bytes(_encode_jpeg(img, cfg.jpeg_quality))
    return out_file, cond


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _write_mat_deterministic(path: Path, spec: DBStruct) -> None:
    """``write_dbstruct`` with the 116-byte header text (scipy puts a timestamp there) made fixed."""
    with atomic_path(path) as tmp:
        write_dbstruct(tmp, spec)
        with open(tmp, "r+b") as fh:
            fh.seek(0)
            fh.write(MAT_HEADER.ljust(116, b" ")[:116])


def _split_poses(cfg: SyntheticConfig, districts: dict[str, _District]) -> dict[str, tuple[list[_Pose], list[_Pose]]]:
    out = {}
    for i, split in enumerate(SPLITS):
        d = districts[split]
        db = _db_poses(cfg, split, d)
        q = _query_poses(cfg, split, i, d, db)
        out[split] = (db, q)
    return out


def _utm(d: _District, poses: list[_Pose]) -> np.ndarray:
    return np.array([[d.origin[0] + p.x, d.origin[1] + p.y] for p in poses], dtype=np.float64).reshape(-1, 2)


def _check_geometry(utm: dict[str, tuple[np.ndarray, np.ndarray]], thr: float = 25.0) -> None:
    """Every query has a database image within ``thr``; val/test are farther than ``thr`` from train."""
    from scipy.spatial import cKDTree

    for split, (db, q) in utm.items():
        dist, _ = cKDTree(db).query(q)
        if (dist > thr).any():
            raise NetVLADError(
                f"synthetic split {split}: {int((dist > thr).sum())} queries have no database image within {thr} m "
                "(lower query_offset_m or db_spacing_m)"
            )
    train = np.vstack(utm["train"])
    tree = cKDTree(train)
    for split in ("val", "test"):
        dist, _ = tree.query(np.vstack(utm[split]))
        if dist.min() <= thr:
            raise NetVLADError(f"synthetic split {split} comes within {thr} m of train")  # cannot happen: 2 km apart


def render_dataset(cfg: SyntheticConfig, out_dir: str | Path, *, workers: int = 2, progress: bool = True) -> None:
    """Render the synthetic city into ``out_dir`` (see the module docstring for the layout).

    All or nothing: everything is written into a temporary sibling folder which replaces ``out_dir``
    at the end. An existing ``out_dir`` is replaced only when it is empty or a previous synthetic
    dataset (it has ``synthetic.json``); anything else is refused with :class:`NetVLADError`.
    The same ``cfg`` gives byte-identical files for any ``workers``.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NetVLADError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / META_JSON).is_file():
            raise NetVLADError(f"{out_dir}: folder is not empty and holds no synthetic dataset; refusing to replace it")
    districts = _districts(cfg)
    poses = _split_poses(cfg, districts)
    _check_geometry({s: (_utm(districts[s], db), _utm(districts[s], q)) for s, (db, q) in poses.items()})

    with atomic_path(out_dir, is_dir=True) as tmp:
        images = tmp / "images"
        tasks = []
        for i, split in enumerate(SPLITS):
            db, q = poses[split]
            tasks += [(i, asdict(p), str(images / p.path)) for p in db]
            tasks += [(i, asdict(p), str(images / "queries_real" / p.path)) for p in q]
        conditions: dict[str, str] = {}
        bar = tqdm(total=len(tasks), desc="render synthetic city", unit="img", disable=not progress)
        if workers <= 1:
            _init_worker(asdict(cfg), pool_worker=False)
            try:
                for t in tasks:
                    path, cond = _work(t)
                    conditions[path] = cond
                    bar.update()
            finally:
                _WORKER.clear()
        else:
            with get_context("fork" if "fork" in _start_methods() else "spawn").Pool(
                workers, initializer=_init_worker, initargs=(asdict(cfg),)
            ) as pool:
                for path, cond in pool.imap_unordered(_work, tasks, chunksize=8):
                    conditions[path] = cond
                    bar.update()
        bar.close()

        counts = {}
        for i, split in enumerate(SPLITS):
            d = districts[split]
            db, q = poses[split]
            utm_db, utm_q = _utm(d, db), _utm(d, q)
            spec = DBStruct(which_set=split, db_image_fns=[p.path for p in db], utm_db=utm_db,
                            q_image_fns=[p.path for p in q], utm_q=utm_q)
            _write_mat_deterministic(tmp / f"synthetic_{split}.mat", spec)
            with open(tmp / f"poses_{split}.csv", "w", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(["path", "role", "utm_east", "utm_north", "yaw_deg", "camera_height_m", "hfov_deg",
                            "heading_index", "condition"])
                for p, (e, n) in zip(db + q, np.vstack([utm_db, utm_q])):
                    full = str(images / p.path) if p.role == "database" else str(images / "queries_real" / p.path)
                    w.writerow([p.path, p.role, f"{e:.3f}", f"{n:.3f}", f"{math.degrees(p.yaw) % 360:.2f}",
                                f"{p.cam_h:.2f}", f"{math.degrees(p.hfov):.2f}", p.heading, conditions[full]])
            counts[split] = {"database": len(db), "queries": len(q)}
        (tmp / META_JSON).write_text(json.dumps({"dataset": "synthetic", "config": asdict(cfg), "counts": counts},
                                                indent=2) + "\n")


def prepare_synthetic_dataset(cfg: SyntheticConfig, out_dir: str | Path, *, splits: Sequence[str] | None = None,
                              workers: int = 2, progress: bool = True) -> list[Path]:
    """The built-in dataset as ``netvlad download --dataset synthetic`` writes it: the city rendered into
    ``out_dir/raw`` and read back like Pittsburgh into ``out_dir/<split>/`` folders; returns those folders.

    Every option and ``out_dir`` are checked before anything is rendered: ``out_dir`` may be missing, empty or a
    previous synthetic download (it has ``raw/synthetic.json``); a file or any other folder is refused. All or
    nothing: the whole folder is built under a temporary name that replaces ``out_dir`` at the end.
    """
    from .official import build_splits

    cfg.validate()
    if workers < 0:
        raise NetVLADError(f"workers must be >= 0, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise NetVLADError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "raw" / META_JSON).is_file():
            raise NetVLADError(f"{out_dir}: folder is not empty and holds no synthetic dataset; refusing to replace it")
    with atomic_path(out_dir, is_dir=True) as tmp:
        render_dataset(cfg, tmp / "raw", workers=workers, progress=progress)
        build_splits("synthetic", tmp, spec_dir=tmp / "raw", image_root=tmp / "raw" / "images", splits=splits)
    return [out_dir / s.name for s in sorted(out_dir.iterdir()) if (s / "split.json").is_file()]


def _start_methods() -> list[str]:
    from multiprocessing import get_all_start_methods

    return get_all_start_methods()


def read_config(dataset_dir: str | Path) -> SyntheticConfig:
    """The :class:`SyntheticConfig` a dataset folder was rendered with (from ``synthetic.json``)."""
    path = Path(dataset_dir) / META_JSON
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found (not a synthetic dataset folder)")
    try:
        meta = json.loads(path.read_text())
        known = {f.name for f in fields(SyntheticConfig)}
        return SyntheticConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise NetVLADError(f"{path}: not a synthetic dataset description ({e})") from None


def _read_poses(dataset_dir: Path, split: str) -> list[dict[str, str]]:
    path = dataset_dir / f"poses_{split}.csv"
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found (not a synthetic dataset folder)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def render_mosaic(dataset_dir: str | Path, out_png: str | Path, *, split: str = "test", pairs: int = 4,
                  seed: int = 1) -> Path:
    """Save a PNG with ``pairs`` rows: a database image (left) beside a query of the same place (right).

    Queries are picked at random (``seed``), preferring a different condition per row; the database
    image is the nearest in position among those with the query's heading index. ``docs/synthetic.png``
    is ``render_mosaic(<default dataset>, "docs/synthetic.png")``. Written atomically.
    """
    from PIL import Image, ImageDraw

    dataset_dir = Path(dataset_dir)
    rows = _read_poses(dataset_dir, split)
    db = [r for r in rows if r["role"] == "database"]
    qs = [r for r in rows if r["role"] == "query"]
    if not db or not qs:
        raise NetVLADError(f"{dataset_dir}: split {split} has no database images or no queries")
    db_xy = np.array([[float(r["utm_east"]), float(r["utm_north"])] for r in db])
    db_heading = np.array([int(r["heading_index"]) for r in db])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(qs))
    chosen, seen = [], set()
    for i in order:  # prefer a different condition per row
        if qs[i]["condition"] not in seen or len(seen) >= len(QUERY_CONDITIONS):
            chosen.append(i)
            seen.add(qs[i]["condition"])
        if len(chosen) == pairs:
            break
    tiles = []
    for i in chosen:
        q = qs[i]
        qxy = np.array([float(q["utm_east"]), float(q["utm_north"])])
        dist = np.linalg.norm(db_xy - qxy, axis=1)
        dist = np.where(db_heading == int(q["heading_index"]), dist, np.inf)
        j = int(np.argmin(dist))
        db_img = Image.open(dataset_dir / "images" / db[j]["path"]).convert("RGB")
        q_img = Image.open(dataset_dir / "images" / "queries_real" / q["path"]).convert("RGB")
        tiles.append((db_img, q_img, f"database {db[j]['path']}", f"query ({q['condition']}), {dist[j]:.1f} m away"))
    w, h = tiles[0][0].size
    pad, label = 4, 14
    mosaic = Image.new("RGB", (2 * w + 3 * pad, len(tiles) * (h + label + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(mosaic)
    for r, (a, b, la, lb) in enumerate(tiles):
        y = pad + r * (h + label + pad)
        mosaic.paste(a, (pad, y + label))
        mosaic.paste(b, (2 * pad + w, y + label))
        draw.text((pad, y + 1), la, fill=(0, 0, 0))
        draw.text((2 * pad + w, y + 1), lb, fill=(0, 0, 0))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:  # 256 adaptive colours keep the file small (about 300 KB)
        mosaic.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            tmp, format="PNG", optimize=True)
    return out_png


def pixel_baseline_recall(dataset_dir: str | Path, split: str = "test", *, size: tuple[int, int] = (16, 12),
                          ns: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Recall@N of nearest-neighbour search on raw pixels (grey, ``size``, mean-removed, L2-normalised).

    A difficulty check for the synthetic city: if raw pixels already localise most queries, the
    task is too easy to say anything about a learnt descriptor.
    """
    from PIL import Image

    dataset_dir = Path(dataset_dir)
    spec = read_dbstruct(dataset_dir / f"synthetic_{split}.mat")
    root = dataset_dir / "images"

    def vec(p: Path) -> np.ndarray:
        a = np.asarray(Image.open(p).convert("L").resize(size, Image.BILINEAR), np.float32).ravel()
        a = a - a.mean()
        return a / max(np.linalg.norm(a), 1e-6)

    db = np.stack([vec(root / p) for p in spec.db_image_fns])
    q = np.stack([vec(root / "queries_real" / p) for p in spec.q_image_fns])
    rank = np.argsort(-(q @ db.T), axis=1, kind="stable")
    dist = np.linalg.norm(spec.utm_q[:, None, :] - spec.utm_db[None, :, :], axis=2)
    hit = np.take_along_axis(dist, rank, axis=1) <= spec.pos_dist_thr
    return {n: float(hit[:, :n].any(axis=1).mean()) for n in ns}
