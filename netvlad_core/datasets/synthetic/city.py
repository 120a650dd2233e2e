"""The city's layout: the city-wide facade palette, one district per split (streets, lots, buildings,
street furniture), the per-building facade colour table, and the database and query poses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .config import DB_CAMERA_HEIGHT_M, SPLIT_SPACING_M, UTM_ORIGIN, SyntheticConfig
from .noise import _rng


class Material(IntEnum):
    """A facade's wall material (``_Palette.material``, ``_District.b_material`` hold these values)."""

    PLASTER = 0
    BRICK = 1  # a bond of bricks with joints
    SIDING = 2  # horizontal boards
    STONE = 3  # large blocks with joints
    GLASS = 4  # a curtain wall: window grid of fixed proportions over the whole facade
    PANELS = 5  # vertical ribs


MATERIALS = tuple(m.name.lower() for m in Material)


class Ground(IntEnum):
    """What a 1 m cell of a district's ground is (``_District.ground``). The roads come first:
    ``code <= Ground.CROSSING`` is a carriageway."""

    ROAD_EW = 0  # carriageway of an east-west street
    ROAD_NS = 1  # carriageway of a north-south street
    CROSSING = 2  # where the two meet
    SIDEWALK = 3
    LOT = 4  # under a building
    GRASS = 5  # an open lot


SIDEWALK_M = 2.5

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


# ----------------------------------------------------------------------------------------------
# The palette
# ----------------------------------------------------------------------------------------------


@dataclass
class _Palette:
    """City-wide facade styles (shared by all splits so styles repeat) and sign glyphs."""

    material: np.ndarray  # (S,) int: Material values
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
    material = rng.integers(0, len(Material), n_styles)
    wall = _WALL_COLOURS[rng.integers(0, len(_WALL_COLOURS), n_styles)]
    glass_mat = material == Material.GLASS
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


# ----------------------------------------------------------------------------------------------
# Districts
# ----------------------------------------------------------------------------------------------


@dataclass
class _District:
    """One split's part of the city in local metres (x east, y north), 1 m cells."""

    origin: tuple[float, float]
    heights: np.ndarray  # (ny, nx) float32, 0 = open
    bids: np.ndarray  # (ny, nx) int32, -1 = none
    ground: np.ndarray  # (ny, nx) uint8 Ground code
    centre: np.ndarray  # (ny, nx) float32 street centre coordinate across the street (roads)
    # buildings (B,)
    b_height: np.ndarray
    b_material: np.ndarray  # Material values
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


@dataclass
class _StreetPlan:
    """A district's grid: ``bx``/``by`` the block intervals (the first and last the border strips), ``sx`` the
    intervals of the streets running north-south, ``sy`` of those running east-west, in cells along x / y;
    ``street_x``/``street_y`` their widths."""

    bx: list[tuple[int, int]]
    sx: list[tuple[int, int]]
    by: list[tuple[int, int]]
    sy: list[tuple[int, int]]
    street_x: np.ndarray
    street_y: np.ndarray


_BORDER_M = 24  # a strip of buildings around the district


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


def _intervals(blocks: np.ndarray, streets: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Blocks and streets alternating along one axis: border, street, block, ..., street, border."""
    border = _BORDER_M
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


def _street_plan(n_blocks: int, rng: np.random.Generator) -> _StreetPlan:
    """A near-square grid of ``n_blocks`` blocks with random block and street widths."""
    rows = max(1, int(math.floor(math.sqrt(n_blocks))))
    cols = int(math.ceil(n_blocks / rows))
    block_w = rng.integers(30, 49, cols)
    block_d = rng.integers(30, 49, rows)
    street_x = rng.integers(12, 17, cols + 1)  # widths of the streets running north-south
    street_y = rng.integers(12, 17, rows + 1)  # widths of the streets running east-west
    bx, sx = _intervals(block_w, street_x)
    by, sy = _intervals(block_d, street_y)
    return _StreetPlan(bx, sx, by, sy, street_x, street_y)


def _road_ground(plan: _StreetPlan) -> tuple[np.ndarray, np.ndarray]:
    """The (ny, nx) Ground codes (carriageways inside the sidewalks, crossings; sidewalk elsewhere) and
    the street centre coordinate across each road cell."""
    nx, ny = plan.bx[-1][1], plan.by[-1][1]
    ground = np.full((ny, nx), Ground.SIDEWALK, np.uint8)
    centre = np.zeros((ny, nx), np.float32)
    for a, b in plan.sy:
        ground[a + int(SIDEWALK_M):b - int(SIDEWALK_M), :] = Ground.ROAD_EW
        centre[a:b, :] = (a + b) / 2
    for a, b in plan.sx:
        ns = slice(a + int(SIDEWALK_M), b - int(SIDEWALK_M))
        road_ew = ground[:, ns] == Ground.ROAD_EW
        ground[:, ns] = np.where(road_ew, Ground.CROSSING, Ground.ROAD_NS)
        centre[:, ns] = np.where(road_ew, centre[:, ns], (a + b) / 2)
    return ground, centre


def _cut_lots(plan: _StreetPlan, rng: np.random.Generator) -> list[tuple[int, int, int, int, bool]]:
    """Lots (x0, x1, y0, y1, on the border): every block is cut in two halves along its longer side, each half
    into lots; every street is closed at the edge of the district by a lot across its end."""
    bx, by = plan.bx, plan.by
    lots: list[tuple[int, int, int, int, bool]] = []
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
    for a, b in plan.sy:
        lots.append((bx[0][0], bx[0][1], a, b, True))
        lots.append((bx[-1][0], bx[-1][1], a, b, True))
    for a, b in plan.sx:
        lots.append((a, b, by[0][0], by[0][1], True))
        lots.append((a, b, by[-1][0], by[-1][1], True))
    return lots


@dataclass
class _LotBuildings:
    """Per lot (all lots, built or open): its style, whether it stays open, and its building's storeys."""

    style: np.ndarray
    open_lot: np.ndarray  # bool
    floor_h: np.ndarray
    ground_h: np.ndarray
    height: np.ndarray  # float32


def _lot_buildings(lots: list[tuple[int, int, int, int, bool]], pal: _Palette,
                   rng: np.random.Generator) -> _LotBuildings:
    """A style and a height per lot (5% towers); 5% of the inner lots stay open (grass)."""
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
    return _LotBuildings(style, open_lot, floor_h, ground_h, b_height)


def _sign_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n`` sign backgrounds in ``_SIGN_COLOURS`` and the (n, 3) text colours: another sign colour,
    or dark text on light signs and the reverse where the two would lack contrast."""
    sign_bg = rng.integers(0, len(_SIGN_COLOURS), n)
    sign_fg = (sign_bg + rng.integers(1, len(_SIGN_COLOURS), n)) % len(_SIGN_COLOURS)
    lum = _SIGN_COLOURS.mean(axis=1)
    fg = _SIGN_COLOURS[sign_fg].copy()
    low_contrast = np.abs(lum[sign_bg] - lum[sign_fg]) < 0.3
    fg[low_contrast] = np.where(lum[sign_bg][low_contrast, None] > 0.5, 0.05, 0.97)
    return sign_bg, fg


def _street_lines(plan: _StreetPlan) -> list[tuple[int, float, float, float, float]]:
    """(axis, centre across, start, end, width) of every street: the east-west ones first; each runs between
    the centres of the first and the last crossing street."""
    sx, sy = plan.sx, plan.sy
    streets: list[tuple[int, float, float, float, float]] = []
    for a, b in sy:
        streets.append((0, (a + b) / 2, (sx[0][0] + sx[0][1]) / 2, (sx[-1][0] + sx[-1][1]) / 2, b - a))
    for a, b in sx:
        streets.append((1, (a + b) / 2, (sy[0][0] + sy[0][1]) / 2, (sy[-1][0] + sy[-1][1]) / 2, b - a))
    return streets


def _street_props(plan: _StreetPlan, streets: list[tuple[int, float, float, float, float]],
                  rng: np.random.Generator) -> np.ndarray:
    """Static props (P, 5): kind (0 tree, 1 lamp post), x, y, size, key; street trees along some sidewalks,
    lamp posts along the others, none at crossings."""
    props = []
    crossings_x = np.array([(a + b) / 2 for a, b in plan.sx])
    crossings_y = np.array([(a + b) / 2 for a, b in plan.sy])
    for axis, c, s0, s1, w in streets:
        cross = crossings_x if axis == 0 else crossings_y
        other_w = max(plan.street_x.max(), plan.street_y.max())
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
    return np.array(props, dtype=np.float64).reshape(-1, 5)


def _add_ray_boxes(d: _District, plan: _StreetPlan) -> None:
    """The boxes rays hop through (see ``_cast_columns``): lot rectangles, the free square around every open
    cell (a chessboard distance field) and the free rectangle of every street."""
    from scipy.ndimage import distance_transform_cdt

    ny, nx = d.bids.shape
    bx, by, sx, sy = plan.bx, plan.by, plan.sx, plan.sy
    d.clear = distance_transform_cdt(d.bids < 0, metric="chessboard").astype(np.int64)
    boxes = [(bx[0][1], bx[-1][0], a, b) for a, b in sy] + [(a, b, by[0][1], by[-1][0]) for a, b in sx]
    d.street_box = np.array(boxes, dtype=np.int64)
    d.street_ew = np.full((ny, nx), -1, np.int64)
    d.street_ns = np.full((ny, nx), -1, np.int64)
    for i, (x0_, x1_, y0_, y1_) in enumerate(boxes):
        (d.street_ew if i < len(sy) else d.street_ns)[y0_:y1_, x0_:x1_] = i
    assert (d.bids[d.street_ew >= 0] < 0).all() and (d.bids[d.street_ns >= 0] < 0).all()


def _make_district(seed: int, split_index: int, n_blocks: int, pal: _Palette) -> _District:
    """Split ``split_index``'s district of ``n_blocks`` blocks, its buildings styled from ``pal``.

    Everything is drawn from one generator seeded by (seed, split), in a fixed order: the street grid, the lots,
    their buildings, facade colour jitter and signs, street furniture, the remaining facade details.
    """
    rng = _rng(seed, 2000 + split_index)
    plan = _street_plan(n_blocks, rng)
    ground, centre = _road_ground(plan)
    ny, nx = ground.shape
    heights = np.zeros((ny, nx), np.float32)
    bids = np.full((ny, nx), -1, np.int32)
    lots = _cut_lots(plan, rng)
    lb = _lot_buildings(lots, pal, rng)

    keep = np.flatnonzero(~lb.open_lot)
    for new_id, li in enumerate(keep):
        x0, x1, y0, y1, _ = lots[li]
        heights[y0:y1, x0:x1] = lb.height[li]
        bids[y0:y1, x0:x1] = new_id
        ground[y0:y1, x0:x1] = Ground.LOT
    for li in np.flatnonzero(lb.open_lot):
        x0, x1, y0, y1, _ = lots[li]
        ground[y0:y1, x0:x1] = Ground.GRASS

    B = len(keep)
    st = lb.style[keep]
    jitter = rng.normal(1.0, 0.07, (B, 3)).astype(np.float32) * rng.uniform(0.85, 1.15, (B, 1)).astype(np.float32)
    box = np.array([lots[i][:4] for i in keep], dtype=np.float32).reshape(-1, 4)
    x0, x1, y0, y1 = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    # face order: 0 east (+x), 1 west (-x), 2 north (+y), 3 south (-y); u grows to a viewer's right.
    face_umin = np.stack([y0, -y1, -x1, x0], axis=1)
    face_w = np.stack([y1 - y0, y1 - y0, x1 - x0, x1 - x0], axis=1)
    sign_bg, fg = _sign_colours(rng, B)
    streets = _street_lines(plan)
    props = _street_props(plan, streets, rng)

    d = _District(
        origin=(UTM_ORIGIN[0] + split_index * SPLIT_SPACING_M, UTM_ORIGIN[1]),
        heights=heights,
        bids=bids,
        ground=ground,
        centre=centre,
        b_height=lb.height[keep],
        b_material=pal.material[st],
        b_wall=np.clip(pal.wall[st] * jitter, 0.02, 1.0),
        b_trim=pal.trim[st],
        b_glass=pal.glass[st],
        b_floor_h=lb.floor_h[keep].astype(np.float32),
        b_ground_h=lb.ground_h[keep].astype(np.float32),
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
        max_height=float(lb.height[keep].max()) if B else 0.0,
        streets=streets,
        props=props,
        b_box=box.astype(np.int64),
    )
    _add_ray_boxes(d, plan)
    d.table = _facade_table(d)
    d.glyph_cols = _glyph_columns(d.glyphs)
    return d


# ----------------------------------------------------------------------------------------------
# The facade colour table
# ----------------------------------------------------------------------------------------------

# Rows of the per-building colour table.
(L_WALL, L_TRIM, L_GLASS, L_CURTAIN, L_WIN_MEAN, L_SIGN_BG, L_SIGN_FG, L_SIGN_MEAN, L_AWNING, L_AWNING_MEAN,
 L_WHITE, L_SHOP_GLASS, L_DOOR) = range(13)
N_LAYERS = 13


def _facade_table(d: _District) -> np.ndarray:
    """Planar (3, B * N_LAYERS) albedos: column ``b * N_LAYERS + layer``."""
    B = len(d.b_height)
    glass_mat = d.b_material == Material.GLASS
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
