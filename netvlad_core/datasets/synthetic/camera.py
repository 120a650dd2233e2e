"""Per-image settings: the pinhole camera, the condition (light, weather, camera response) and the moving
occluders (vehicles, pedestrians) of one view."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .city import _CAR_COLOURS, SIDEWALK_M, _District, _Pose


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


@dataclass
class _Sprite:
    """A billboard: the static props (trees, lamp posts) and the movers of one image."""

    kind: str  # tree, lamp, car, van, person
    x: float
    y: float
    yaw: float = 0.0  # vehicles: along-street direction
    size: float = 1.0
    colour: np.ndarray | None = None
    key: int = 0


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
