"""Rendering one view: rays cast per image column through a district, walls, ground and sky shaded per
pixel, sprites depth-tested against them, then the camera's response (exposure, blur, noise, gamma)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

from .camera import _Camera, _Condition, _Sprite
from .city import (
    L_AWNING,
    L_AWNING_MEAN,
    L_CURTAIN,
    L_DOOR,
    L_GLASS,
    L_SHOP_GLASS,
    L_SIGN_BG,
    L_SIGN_FG,
    L_SIGN_MEAN,
    L_TRIM,
    L_WALL,
    L_WHITE,
    L_WIN_MEAN,
    N_LAYERS,
    Ground,
    Material,
    _District,
)
from .config import MAX_HITS, MAX_VIEW_M
from .noise import _GAUSS256, _NOISE64, _NOISE_FLAT, _fade, _grid, _hash01, _tile_noise

_FACE_NORMALS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)

# ----------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------


@dataclass
class _Rays:
    """The state of the columns still being traced (arrays over those columns, compacted as columns finish)."""

    cols: np.ndarray  # image column of each ray
    rdx: np.ndarray  # ray direction
    rdy: np.ndarray
    pos_x: np.ndarray  # rdx > 0
    pos_y: np.ndarray
    inv_x: np.ndarray  # 1 / rdx (inf where 0)
    inv_y: np.ndarray
    mx: np.ndarray  # current cell
    my: np.ndarray
    t: np.ndarray  # distance travelled (in units of the ray direction)
    axis_x: np.ndarray  # the last boundary crossed was an x = const line
    ytop: np.ndarray  # image row above which the column is still open
    cnt: np.ndarray  # wall segments recorded

    def keep(self, idx: np.ndarray) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[idx])


def _start_rays(cam: _Camera, rdx: np.ndarray, rdy: np.ndarray) -> _Rays:
    width = len(rdx)
    pos_x, pos_y = rdx > 0, rdy > 0
    with np.errstate(divide="ignore"):
        inv_x = np.where(rdx == 0, np.inf, 1.0 / np.where(rdx == 0, 1.0, rdx))
        inv_y = np.where(rdy == 0, np.inf, 1.0 / np.where(rdy == 0, 1.0, rdy))
    return _Rays(
        cols=np.arange(width), rdx=rdx, rdy=rdy, pos_x=pos_x, pos_y=pos_y, inv_x=inv_x, inv_y=inv_y,
        mx=np.full(width, int(math.floor(cam.x)), np.int64), my=np.full(width, int(math.floor(cam.y)), np.int64),
        t=np.zeros(width), axis_x=np.zeros(width, bool), ytop=np.full(width, np.inf), cnt=np.zeros(width, np.int64),
    )


def _record_walls(d: _District, cam: _Camera, f: float, y0: float, rays: _Rays, b: np.ndarray, inb: np.ndarray,
                  hits: dict[str, np.ndarray]) -> None:
    """Record, for the rays that entered a building cell (``inb``, building ``b``), the wall they hit where it
    shows above what the column already holds (front to back: each later wall is seen above the previous)."""
    v = np.flatnonzero(inb)
    bv = b[v]
    tv = rays.t[v]
    row_top = y0 - (d.b_height[bv] - cam.height) * f / tv
    vis = row_top < rays.ytop[v]
    if not vis.any():
        return
    v, bv, tv, row_top = v[vis], bv[vis], tv[vis], row_top[vis]
    c = rays.cols[v]
    k = rays.cnt[v]
    hx = cam.x + tv * rays.rdx[v]
    hy = cam.y + tv * rays.rdy[v]
    fc = np.where(rays.axis_x[v], np.where(rays.pos_x[v], 1, 0), np.where(rays.pos_y[v], 3, 2))
    hits["top"][k, c] = row_top
    hits["bot"][k, c] = np.where(k == 0, y0 + cam.height * f / tv, rays.ytop[v])
    hits["dist"][k, c] = tv
    hits["bid"][k, c] = bv
    hits["face"][k, c] = fc
    hits["u"][k, c] = np.select([fc == 0, fc == 1, fc == 2], [hy, -hy, -hx], hx)
    rays.cnt[v] += 1
    hits["count"][c] += 1
    rays.ytop[v] = row_top


def _leave_box(d: _District, cam: _Camera, rays: _Rays, cell: np.ndarray, b: np.ndarray, inb: np.ndarray) -> None:
    """Move every ray to the first cell past the box it is in: the lot of a building, or the free square around
    an open cell, or, on a street, the street's whole free rectangle when that reaches farther."""
    pos_x, pos_y, inv_x, inv_y, mx, my = rays.pos_x, rays.pos_y, rays.inv_x, rays.inv_y, rays.mx, rays.my
    bx0, bx1, by0, by1 = d.b_box[:, 0], d.b_box[:, 1], d.b_box[:, 2], d.b_box[:, 3]
    bs = np.maximum(b, 0)
    r = d.clear.ravel()[cell] - 1
    x_lo = np.where(inb, bx0[bs], mx - r)
    x_hi = np.where(inb, bx1[bs], mx + r + 1)
    y_lo = np.where(inb, by0[bs], my - r)
    y_hi = np.where(inb, by1[bs], my + r + 1)
    with np.errstate(invalid="ignore"):
        tx = (np.where(pos_x, x_hi, x_lo) - cam.x) * inv_x
        ty = (np.where(pos_y, y_hi, y_lo) - cam.y) * inv_y
    for street in (d.street_ew.ravel()[cell], d.street_ns.ravel()[cell]):
        on = (street >= 0) & ~inb
        if on.any():
            box = d.street_box[np.maximum(street, 0)]
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
    rays.axis_x = tx <= ty
    t = np.where(rays.axis_x, tx, ty)
    rays.t = t
    rays.mx = np.where(rays.axis_x, np.where(pos_x, x_hi, x_lo - 1), np.floor(cam.x + t * rays.rdx).astype(np.int64))
    rays.my = np.where(rays.axis_x, np.floor(cam.y + t * rays.rdy).astype(np.int64), np.where(pos_y, y_hi, y_lo - 1))


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
    K = MAX_HITS
    hits = dict(top=np.full((K, width), np.inf), bot=np.full((K, width), np.inf), dist=np.ones((K, width)),
                bid=np.zeros((K, width), np.int64), face=np.zeros((K, width), np.int64), u=np.zeros((K, width)),
                count=np.zeros(width, np.int64))
    rays = _start_rays(cam, rdx_all, rdy_all)
    hmax = d.max_height - cam.height
    for _ in range(4 * (nx + ny)):
        mx, my, t, ytop = rays.mx, rays.my, rays.t, rays.ytop
        alive = (mx >= 0) & (mx < nx) & (my >= 0) & (my < ny) & (t < MAX_VIEW_M) & (ytop > 0) & (rays.cnt < K)
        with np.errstate(divide="ignore"):
            alive &= (y0 - hmax * f / t) < ytop  # even the tallest building would be hidden
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        if n_alive < len(rays.cols):
            rays.keep(np.flatnonzero(alive))
        cell = rays.my * nx + rays.mx
        b = bids_flat[cell]
        inb = b >= 0
        if inb.any():
            _record_walls(d, cam, f, y0, rays, b, inb, hits)
        _leave_box(d, cam, rays, cell, b, inb)
    return dict(**hits, rdx=rdx_all, rdy=rdy_all, norm=np.hypot(rdx_all, rdy_all), f=f, y0=y0)


# ----------------------------------------------------------------------------------------------
# Walls
# ----------------------------------------------------------------------------------------------


@dataclass
class _Facade:
    """Everything about the facade that depends on the position along the wall, per segment (image column ×
    visible wall): the window grid, the wall material's texture weights and the shop front."""

    b: np.ndarray  # building
    mat: np.ndarray  # Material
    key: np.ndarray  # the building's hash key
    gh: np.ndarray  # ground floor height
    fh: np.ndarray  # floor height
    top: np.ndarray  # building height
    shop: np.ndarray  # the ground floor is a shop
    glass_mat: np.ndarray
    # window grid of the upper floors
    sill: np.ndarray
    wh: np.ndarray  # window height
    nfl: np.ndarray  # floors with windows
    col_ok: np.ndarray  # inside a window column's span
    win_u: np.ndarray  # across a window
    frame_u: np.ndarray  # across a window or its frame
    win_key: np.ndarray
    t_win: np.ndarray  # weight of the window grid's mean colour (unresolved windows)
    rib_streak: np.ndarray  # panel ribs and vertical weathering streaks (brightness)
    t_brick: np.ndarray  # 1 where the brick, stone and siding patterns are resolved
    t_stone: np.ndarray
    t_siding: np.ndarray
    # shop front of the ground floor
    pillar: np.ndarray
    door_u: np.ndarray
    stripe: np.ndarray  # uint8 awning layer
    t_stripe: np.ndarray
    text_u: np.ndarray  # across the sign's text
    ink_bits: np.ndarray  # glyph column: bit r set where row r has ink
    board_u: np.ndarray  # across the sign board
    t_sign: np.ndarray


def _facade(d: _District, seg: dict[str, np.ndarray], glyph_cols: np.ndarray) -> _Facade:
    """The per-segment facade values of ``seg`` (see :func:`_shade_walls`)."""
    f32 = np.float32
    b, face, ul, fp_u, fp_z = seg["b"], seg["face"], seg["ul"], seg["fp_u"], seg["fp_z"]
    mat = d.b_material[b]
    key = d.b_key[b]
    fh = d.b_floor_h[b]
    gh = d.b_ground_h[b]
    fw = d.face_w[b, face]
    glass_mat = mat == Material.GLASS
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
    streak = f32(0.9) + f32(0.2) * _tile_noise(_NOISE64, ul / 2.5, (key % 64).astype(f32))
    rib = np.where((mat == Material.PANELS) & ((ul / 1.1) % 1.0 < 0.18), f32(0.7), f32(1.0))
    # ground floor: shop windows between pillars, a door, an awning, a sign board with glyphs
    ssp = np.maximum(sp * 1.5, 2.4)
    sc = np.floor((ul - margin) / ssp)
    su = (ul - margin) - sc * ssp
    pillar = su < 0.35
    nch = d.b_nchars[b]
    ch_w = f32(0.5)
    text_w = nch * ch_w
    tx = ul - (fw - text_w) / 2
    ci = np.floor(tx / ch_w)
    text_u = (ci >= 0) & (ci < nch)
    gx = np.floor((tx - ci * ch_w) / ch_w * 6).astype(np.int64)
    gid = d.b_text[b, np.clip(ci, 0, 9).astype(np.int64)]
    return _Facade(
        b=b, mat=mat, key=key, gh=gh, fh=fh, top=d.b_height[b], shop=d.b_shop[b], glass_mat=glass_mat,
        sill=sill, wh=wh, nfl=nfl, col_ok=col_ok,
        win_u=col_ok & (fu < ww / 2),
        frame_u=col_ok & (fu < ww / 2 + 0.12),
        win_key=(_hash01(key, face, wc) * f32(1 << 24)).astype(np.int64),
        t_win=1 - _fade(np.maximum(fp_u / sp, fp_z / fh), 0.8),
        rib_streak=(1 + (rib - 1) * _fade(fp_u, 1.1)) * streak,
        t_brick=_fade(np.maximum(fp_u, fp_z), 0.28),
        t_stone=_fade(np.maximum(fp_u, fp_z), 0.7),
        t_siding=_fade(fp_z, 0.35),
        pillar=pillar,
        door_u=(sc == np.floor(_hash01(key, face, 3) * np.maximum(1, np.floor(fw / ssp)))) & ~pillar,
        stripe=np.where((ul / 0.5) % 2.0 < 1.0, L_AWNING, L_WHITE).astype(np.uint8),
        t_stripe=1 - _fade(fp_u, 0.5),
        text_u=text_u,
        ink_bits=np.where(text_u & (gx < 5), glyph_cols[gid, np.clip(gx, 0, 4)], 0),
        board_u=(tx >= -0.35) & (tx <= text_w + 0.35),
        t_sign=1 - _fade(np.maximum(fp_u, fp_z), 0.16),
    )


@dataclass
class _Windows:
    """Per pixel: where it lies in the upper floors' window grid."""

    gh: np.ndarray  # ground floor height
    fh: np.ndarray  # floor height
    zr: np.ndarray  # height above the ground floor
    upper: np.ndarray  # in the upper floors
    sill: np.ndarray
    wh: np.ndarray
    rel: np.ndarray  # 0..1 up a window
    in_grid: np.ndarray
    win: np.ndarray
    frame: np.ndarray
    wkey: np.ndarray  # per window
    wv: np.ndarray  # a random value per window
    curtain: np.ndarray


def _windows(fac: _Facade, g: Callable[[np.ndarray], np.ndarray], z: np.ndarray) -> _Windows:
    gh_p, fh_p = g(fac.gh), g(fac.fh)
    zr = z - gh_p
    upper = zr >= 0
    fl = np.floor(zr / fh_p)
    fz = zr - fl * fh_p
    sill_p, wh_p = g(fac.sill), g(fac.wh)
    rel = (fz - sill_p) / wh_p  # 0..1 up a window
    in_grid = upper & (fl < g(fac.nfl)) & g(fac.col_ok)
    win = in_grid & g(fac.win_u) & (rel > 0) & (rel < 1)
    frame = in_grid & g(fac.frame_u) & (fz > sill_p - 0.12) & (fz < sill_p + wh_p + 0.15) & ~win
    wkey = g(fac.win_key) + fl.astype(np.int64) * 7919
    wv = np.take(_NOISE_FLAT, wkey & 4095)
    wv2 = np.take(_NOISE_FLAT, (wkey * 3 + 1) & 4095)
    curtain = win & (wv2 < 0.25) & (rel > 0.45)
    return _Windows(gh_p, fh_p, zr, upper, sill_p, wh_p, rel, in_grid, win, frame, wkey, wv, curtain)


def _wall_pattern(fac: _Facade, g: Callable[[np.ndarray], np.ndarray], sid: np.ndarray, z: np.ndarray,
                  ul: np.ndarray) -> np.ndarray:
    """Per-pixel brightness of the wall material (bricks, stone blocks, siding boards, ribs and streaks), faded
    out where pixels cannot resolve it, darker near the ground."""
    f32 = np.float32
    mat_p = g(fac.mat)
    pat = np.ones(len(sid), f32)
    for m_id, period, t_seg, joint_b, var0, var1, jz, ju in (
        (Material.BRICK, 0.28, fac.t_brick, 1.35, 0.9, 0.2, 0.18, 0.08),
        (Material.STONE, 0.7, fac.t_stone, 0.7, 0.85, 0.3, 0.07, 0.04),
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
            var = var0 + var1 * _grid(ucol + np.take(fac.key, sm), row)
            p = var + joint * (joint_b - var)
            pat[m] = 1 + (p - 1) * np.take(t_seg, sm)
    m = np.flatnonzero(mat_p == Material.SIDING)
    if len(m):
        p = 1 - ((np.take(z, m) / 0.35) % 1.0 < 0.2) * f32(0.28)
        pat[m] = 1 + (p - 1) * np.take(fac.t_siding, np.take(sid, m))
    pat *= g(fac.rib_streak) * (f32(0.7) + f32(0.3) * np.minimum(z / f32(1.2), 1))
    return pat


@dataclass
class _Layers:
    """Per pixel, two looks blended by ``t``: the resolved one (colour table layer ``la`` at brightness ``ba``)
    and the far one (``lb`` at ``bb``: the mean of a pattern too fine for the pixel). Updated in place:
    ``a += m * (v - a)`` sets ``a`` to ``v`` where ``m`` (the uint8 layer ids wrap harmlessly)."""

    la: np.ndarray  # uint8
    ba: np.ndarray
    lb: np.ndarray  # uint8
    bb: np.ndarray
    t: np.ndarray


def _upper_floor_layers(fac: _Facade, g: Callable[[np.ndarray], np.ndarray], w: _Windows,
                        pat: np.ndarray) -> _Layers:
    """Wall, window frames, glass and curtains of the window grid."""
    u8 = np.uint8
    frame8, win8, curtain8, grid8 = (m.view(u8) for m in (w.frame, w.win, w.curtain, w.in_grid))
    la = u8(L_WALL) + frame8 * u8(L_TRIM - L_WALL) + win8 * u8(L_GLASS - L_WALL) + curtain8 * u8(L_CURTAIN - L_GLASS)
    glass_b = (0.55 + 0.6 * w.rel) * (0.75 + 0.5 * w.wv)
    ba = pat + w.frame * (1 - pat) + w.win * (glass_b - pat) + w.curtain * (0.7 + 0.3 * w.wv - glass_b)
    lb = u8(L_WALL) + grid8 * u8(L_WIN_MEAN - L_WALL)
    bb = pat.copy()
    t = w.in_grid * g(fac.t_win)
    return _Layers(la, ba, lb, bb, t)


def _shop_front(fac: _Facade, g: Callable[[np.ndarray], np.ndarray], w: _Windows, z: np.ndarray,
                lay: _Layers) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ground floor of shops into ``lay``: a sign board with glyphs, an awning, shop windows between pillars
    and a door. Returns the pixels of the sign, the shop windows and the door (they glow at dusk), and all those
    below the awning."""
    f32, u8 = np.float32, np.uint8
    la, lb = lay.la, lay.lb
    shop_p = g(fac.shop)
    sign_lo = w.gh - 1.0
    sign_hi = w.gh - 0.2
    in_sign = shop_p & (z >= sign_lo) & (z < sign_hi) & g(fac.board_u)
    text_v = (z >= sign_lo + 0.12) & (z < sign_hi - 0.12)
    gy = np.clip((sign_hi - 0.12 - z) * f32(7 / 0.56), 0, 6).astype(np.int64)
    ink = in_sign & text_v & (((g(fac.ink_bits) >> gy) & 1) == 1)
    in_text = in_sign & text_v & g(fac.text_u)
    sign8 = in_sign.view(u8)
    la += sign8 * (u8(L_SIGN_BG) + ink.view(u8) * u8(L_SIGN_FG - L_SIGN_BG) - la)
    lb += sign8 * (u8(L_SIGN_BG) + in_text.view(u8) * u8(L_SIGN_MEAN - L_SIGN_BG) - lb)
    lay.t += in_sign * (g(fac.t_sign) - lay.t)
    awn = shop_p & (z >= sign_lo - 0.3) & (z < sign_lo)
    awn8 = awn.view(u8)
    la += awn8 * (g(fac.stripe) - la)
    lb += awn8 * (u8(L_AWNING_MEAN) - lb)
    lay.t += awn * (g(fac.t_stripe) - lay.t)
    board = in_sign | awn
    lay.ba += board * (1 - lay.ba)
    lay.bb += board * (1 - lay.bb)
    below = shop_p & (z < sign_lo - 0.3)
    shop_win = below & (z > 0.45) & ~g(fac.pillar)
    door = below & g(fac.door_u) & (z < sign_lo - 0.25)
    la += below.view(u8) * (u8(L_TRIM) - la)
    la += shop_win.view(u8) * (u8(L_SHOP_GLASS) - la)
    la += door.view(u8) * (u8(L_DOOR) - la)
    lay.ba += below * (0.9 - lay.ba) + (shop_win | door) * f32(0.1)
    return in_sign, shop_win, door, below


def _plain_ground_floor_and_trim(fac: _Facade, g: Callable[[np.ndarray], np.ndarray], w: _Windows, z: np.ndarray,
                                 below: np.ndarray, lay: _Layers) -> np.ndarray:
    """Plain ground floors into ``lay`` (a darker plinth, windows of the floor grid half a storey down), then the
    belt course over the ground floor and the cornice at the top. Returns the belt and cornice pixels."""
    f32, u8 = np.float32, np.uint8
    la, lb = lay.la, lay.lb
    plain = ~g(fac.shop) & ~w.upper
    pz = z - (w.gh - w.fh) / 2
    pwin = plain & g(fac.win_u) & ~g(fac.glass_mat) & (pz > w.sill + 0.3) & (pz < w.sill + w.wh)
    plinth = 1 - (plain & (z < 0.6)) * f32(0.25)
    lay.ba *= plinth
    lay.bb *= plinth
    la += pwin.view(u8) * (u8(L_GLASS) - la)
    lay.ba += pwin * (0.9 - lay.ba)
    fixed = below | pwin  # no distance blending here
    lb += fixed.view(u8) * (la - lb)
    lay.bb += fixed * (lay.ba - lay.bb)
    belt = ((w.zr >= -0.2) & ~w.upper) | (z > g(fac.top) - 0.45)
    belt8 = belt.view(u8)
    la += belt8 * (u8(L_TRIM) - la)
    lb += belt8 * (u8(L_TRIM) - lb)
    lay.ba += belt * (0.95 - lay.ba)
    lay.bb += belt * (0.95 - lay.bb)
    return belt


def _shade_walls(d: _District, cond: _Condition, seg: dict[str, np.ndarray], counts: np.ndarray, sid: np.ndarray,
                 z: np.ndarray, table: np.ndarray, glyph_cols: np.ndarray) -> np.ndarray:
    """Colour (3, N) of wall pixels, lit and hazed. ``seg`` holds per-segment arrays; the pixels come
    segment by segment, ``counts`` of each (so ``sid`` = each pixel's segment = ``repeat(arange, counts)``);
    ``z`` is each pixel's height in metres; ``table`` the planar (3, B * N_LAYERS) facade colour table.

    Everything that depends on the position along the wall is computed once per segment (image
    column × visible wall), only what depends on the height ``z`` per pixel (arithmetic selects; np.where is
    slow here).
    """
    f32 = np.float32

    def g(a: np.ndarray) -> np.ndarray:  # per-segment values to their pixels
        return np.repeat(a, counts)

    fac = _facade(d, seg, glyph_cols)
    w = _windows(fac, g, z)
    pat = _wall_pattern(fac, g, sid, z, seg["ul"])
    lay = _upper_floor_layers(fac, g, w, pat)
    in_sign, shop_win, door, below = _shop_front(fac, g, w, z, lay)
    belt = _plain_ground_floor_and_trim(fac, g, w, z, below, lay)

    base = g(fac.b) * N_LAYERS
    idx_a = base + lay.la
    idx_b = base + lay.lb
    light, fog = seg["light"], seg["fog_add"]
    out = np.empty((3, len(sid)), f32)
    for c in range(3):
        col = np.take(table[c], idx_a) * lay.ba
        col += (np.take(table[c], idx_b) * lay.bb - col) * lay.t
        out[c] = col * g(light[c]) + g(fog[c])
    if cond.lit > 0:  # lit windows and shop fronts at dusk
        clear = g(seg["clear"])
        lit = w.win & (np.take(_NOISE_FLAT, (w.wkey * 5 + 2) & 4095) < cond.lit) & ~belt
        glow = lit * (0.6 + 0.4 * w.wv) * clear
        shop_glow = (shop_win | door | in_sign) * clear
        for c, (w_rgb, s_rgb) in enumerate(zip((1.0, 0.8, 0.45), (0.55, 0.5, 0.35))):
            out[c] += w_rgb * glow + s_rgb * shop_glow
    return out


# ----------------------------------------------------------------------------------------------
# Ground and sky
# ----------------------------------------------------------------------------------------------


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
    road = code <= Ground.CROSSING
    side = code == Ground.SIDEWALK
    other = code > Ground.SIDEWALK
    # asphalt: grain, repaved patches, a dashed centre line
    grain = 1 + (_grid(gx * 2, gy * 2) - 0.5) * 0.2 * _fade(fp, 0.5)
    road_b = grain * (0.92 + 0.16 * _grid(gx / 5 + 17, gy / 5 + 23))  # repaved patches
    ew = code == Ground.ROAD_EW
    along = gx + ~ew * (gy - gx)
    across = gy + ~ew * (gx - gy) - np.take(d.centre.ravel(), cell)
    dash = road & (np.abs(across) < 0.12) & ((along / 6.0) % 1.0 < 0.5) & (code != Ground.CROSSING)
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


# ----------------------------------------------------------------------------------------------
# Sprites
# ----------------------------------------------------------------------------------------------


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


def _project_sprites(sprites: list[_Sprite], cam: _Camera, f: float, y0: float, W: int,
                     H: int) -> list[tuple[float, _Sprite, float, float, float, float]]:
    """(depth, sprite, c0, c1, r0, r1) of each sprite in view (its column span [c0, c1) and row span [r0, r1)
    in the image), far to near."""
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
    return items


@dataclass
class _Billboard:
    """Where a sprite is drawn: its pixel ``box`` (row0, row1, col0, col1), per column its position ``lx`` in
    metres from its centre and ``sx`` 0..1 across it, per row the height ``z`` in metres; ``lit`` shades an
    albedo at its ``depth`` (light and haze)."""

    box: tuple[int, int, int, int]
    lx: np.ndarray
    sx: np.ndarray
    z: np.ndarray
    depth: float
    lit: Callable[[Any], np.ndarray]


def _paint_tree(img: np.ndarray, zbuf: np.ndarray, s: _Sprite, bb: _Billboard, cond: _Condition) -> None:
    f32 = np.float32
    box, z, depth, lit = bb.box, bb.z, bb.depth, bb.lit
    lx2, z2 = bb.lx[None, :], z[:, None]
    ra, _, ca, cb = box
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


def _paint_lamp(img: np.ndarray, zbuf: np.ndarray, s: _Sprite, bb: _Billboard, cond: _Condition) -> None:
    box, depth = bb.box, bb.depth
    lx2, z2 = bb.lx[None, :], bb.z[:, None]
    pole = (np.abs(lx2) < 0.07) & (z2 < 5.3)
    arm = (z2 > 5.1) & (z2 < 5.3) & (lx2 > -0.05) & (lx2 < 0.55)
    head = (z2 > 4.95) & (z2 < 5.15) & (lx2 > 0.3) & (lx2 < 0.6)
    _paint(img, zbuf, box, pole | arm | head, bb.lit([0.18, 0.2, 0.2]), depth)
    if cond.lamps:
        _paint(img, zbuf, box, head, np.array([1.0, 0.9, 0.6], np.float32), depth - 1e-3)


def _paint_vehicle(img: np.ndarray, zbuf: np.ndarray, s: _Sprite, bb: _Billboard, cond: _Condition) -> None:
    box, z, depth, lit = bb.box, bb.z, bb.depth, bb.lit
    z2 = z[:, None]
    tall = s.kind == "van"
    body_top = 2.3 if tall else 1.0
    sx2 = bb.sx[None, :]
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
        _paint(img, zbuf, box, lamp, np.array([1.0, 0.95, 0.8], np.float32), depth - 1e-3)


def _paint_person(img: np.ndarray, zbuf: np.ndarray, s: _Sprite, bb: _Billboard, cond: _Condition) -> None:
    box, depth, lit = bb.box, bb.depth, bb.lit
    lx2, z2 = bb.lx[None, :], bb.z[:, None]
    hh = _sprite_extent(s)[2]
    legs = (z2 < 0.5 * hh) & (np.abs(np.abs(lx2) - 0.09) < 0.075)
    torso = (z2 >= 0.5 * hh) & (z2 < 0.82 * hh) & (np.abs(lx2) < 0.24 - 0.05 * (z2 - 0.5 * hh))
    head = (lx2 / 0.11) ** 2 + ((z2 - 0.91 * hh) / 0.13) ** 2 < 1
    _paint(img, zbuf, box, legs, lit([0.15, 0.15, 0.22]), depth)
    _paint(img, zbuf, box, torso, lit(s.colour), depth)
    _paint(img, zbuf, box, head, lit([0.75, 0.58, 0.45]), depth)


_PAINTERS = {"tree": _paint_tree, "lamp": _paint_lamp, "car": _paint_vehicle, "van": _paint_vehicle,
             "person": _paint_person}


def _draw_sprites(img: np.ndarray, zbuf: np.ndarray, sprites: list[_Sprite], cam: _Camera, cond: _Condition,
                  f: float, y0: float, light: np.ndarray) -> None:
    """Depth-tested billboards, far to near, into the planar ``img`` (3, H, W) and ``zbuf`` (H, W)."""
    _, H, W = img.shape
    fog = cond.fog_rgb
    f32 = np.float32
    for depth, s, c0, c1, r0, r1 in _project_sprites(sprites, cam, f, y0, W, H):
        ca, cb = max(0, int(math.floor(c0))), min(W, int(math.ceil(c1)))
        ra, rb = max(0, int(math.floor(r0))), min(H, int(math.ceil(r1)))
        if cb <= ca or rb <= ra or zbuf[ra:rb, ca:cb].max() <= depth:
            continue
        scale = f32(depth / f)  # metres per pixel at the sprite
        fogt = f32(1 - math.exp(-depth * cond.fog))

        def lit(c: Any, fogt: np.float32 = fogt) -> np.ndarray:
            return (np.asarray(c, f32) * light * (1 - fogt) + fog * fogt).astype(f32)

        cols = np.arange(ca, cb, dtype=f32) + f32(0.5)
        bb = _Billboard(
            box=(ra, rb, ca, cb),
            lx=(cols - f32((c0 + c1) / 2)) * scale,  # metres across
            sx=(cols - f32(c0)) / f32(max(c1 - c0, 1e-6)),
            z=f32(cam.height) + (f32(y0) - (np.arange(ra, rb, dtype=f32) + f32(0.5))) * scale,
            depth=depth,
            lit=lit,
        )
        _PAINTERS.get(s.kind, _paint_person)(img, zbuf, s, bb, cond)


# ----------------------------------------------------------------------------------------------
# One view
# ----------------------------------------------------------------------------------------------


def _draw_walls(d: _District, cam: _Camera, cond: _Condition, hits: dict[str, Any], img: np.ndarray,
                zbuf: np.ndarray, H: int, W: int) -> np.ndarray:
    """Shade the wall segments of ``hits`` into the flat planar ``img`` (3, H * W) and ``zbuf``; returns the
    (H * W,) mask of wall pixels.

    Segment k of column c covers the pixel rows whose centres lie in [top, bot): a run of rows, so per-segment
    values reach their pixels with np.repeat (pixels ordered segment by segment). Light: ambient plus the sun
    on each face orientation.
    """
    f32 = np.float32
    f, y0, norm = float(hits["f"]), float(hits["y0"]), hits["norm"]
    s_el = math.cos(cond.sun_el)
    sun_dir = np.array([math.cos(cond.sun_az) * s_el, math.sin(cond.sun_az) * s_el], f32)
    face_light = cond.ambient[None, :] + cond.sun[None, :] * np.maximum(_FACE_NORMALS @ sun_dir, 0)[:, None] * 1.3
    with np.errstate(invalid="ignore"):
        r0 = np.clip(np.ceil(hits["top"] - 0.5), 0, H).astype(np.int64).ravel()
        r1 = np.clip(np.ceil(hits["bot"] - 0.5), 0, H).astype(np.int64).ravel()
    runs = r1 - r0
    used = np.flatnonzero(runs > 0)  # segment ids k * W + column
    is_wall = np.zeros(H * W, bool)
    if not len(used):
        return is_wall
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
    return is_wall


def _draw_ground_and_sky(d: _District, cam: _Camera, cond: _Condition, hits: dict[str, Any], img: np.ndarray,
                         zbuf: np.ndarray, is_wall: np.ndarray, H: int, W: int) -> None:
    """Shade the pixels that show no wall into the flat planar ``img`` (3, H * W) and ``zbuf``: ground below the
    horizon (lit by ambient light and the sun), sky above it."""
    f32 = np.float32
    f, y0, norm = float(hits["f"]), float(hits["y0"]), hits["norm"]
    ground_light = cond.ambient + cond.sun * math.sin(cond.sun_el)
    row_of = np.repeat(np.arange(H, dtype=np.int64), W)
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


def _static_props(d: _District, cam: _Camera) -> list[_Sprite]:
    """The district's trees and lamp posts near enough to the view to show."""
    props = []
    if len(d.props):
        rel = d.props[:, 1:3] - np.array([cam.x, cam.y])
        dep = rel @ np.array([math.cos(cam.yaw), math.sin(cam.yaw)])
        lat = rel @ np.array([math.sin(cam.yaw), -math.cos(cam.yaw)])
        visible = (dep > 1.0) & (dep < 150.0) & (np.abs(lat) < dep * math.tan(cam.hfov / 2) + 3.0)
        for i in np.flatnonzero(visible):
            kind, x, y, size, key = d.props[i]
            props.append(_Sprite("tree" if kind == 0 else "lamp", float(x), float(y), size=float(size), key=int(key)))
    return props


def _camera_response(img: np.ndarray, cond: _Condition, rng: np.random.Generator) -> np.ndarray:
    """The planar radiance ``img`` (3, H, W) as the camera records it, uint8 (H, W, 3): exposure and white
    balance, blur, sensor noise (drawn from ``rng``), quantisation, gamma."""
    f32 = np.float32
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


def _render(d: _District, cam: _Camera, cond: _Condition, width: int, height: int,
            movers: list[_Sprite], rng: np.random.Generator) -> np.ndarray:
    """Render one view to a uint8 (height, width, 3) array (planar float32 inside): walls, ground and sky, then
    the static props (trees, lamp posts) and the dynamic occluders ``movers`` of this image, then the camera."""
    f32 = np.float32
    hits = _cast_columns(d, cam, width, height)
    f, y0 = float(hits["f"]), float(hits["y0"])
    H, W = height, width
    img = np.empty((3, H * W), f32)
    zbuf = np.full(H * W, np.inf, f32)
    is_wall = _draw_walls(d, cam, cond, hits, img, zbuf, H, W)
    _draw_ground_and_sky(d, cam, cond, hits, img, zbuf, is_wall, H, W)
    img = img.reshape(3, H, W)
    zbuf = zbuf.reshape(H, W)
    light = (cond.ambient + cond.sun * 0.6).astype(f32)
    _draw_sprites(img, zbuf, _static_props(d, cam) + movers, cam, cond, f, y0, light)
    return _camera_response(img, cond, rng)
