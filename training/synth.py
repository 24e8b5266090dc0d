"""Cheap, generic synthetic defects, drawn into normal images to choose the decision rule.

No real defect is ever needed: each normal image gets one of a pasted patch of another image,
a scratch, a blotch of foreign colour or a patch of noise, of random size, place and contrast.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

F32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def ellipse_mask(
    h: int, w: int, centre: tuple[float, float], radii: tuple[float, float], angle: float
) -> BoolArray:
    """Pixels inside a rotated ellipse ``(cy, cx)``, ``(ry, rx)``, angle in radians."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.asarray((u / max(radii[1], 0.5)) ** 2 + (v / max(radii[0], 0.5)) ** 2 <= 1.0)


def polyline_mask(h: int, w: int, points: npt.NDArray[np.float64], thickness: float) -> BoolArray:
    """Pixels within ``thickness / 2`` of a polyline through ``points`` (rows of ``(y, x)``)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    mask = np.zeros((h, w), dtype=bool)
    half = max(thickness / 2.0, 0.5)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        vy, vx = y1 - y0, x1 - x0
        length2 = max(vy * vy + vx * vx, 1e-9)
        t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / length2, 0.0, 1.0)
        mask |= (yy - y0 - t * vy) ** 2 + (xx - x0 - t * vx) ** 2 <= half * half
    return mask


def _blend(image: F32Array, mask: BoolArray, colour: F32Array, alpha: float) -> None:
    image[:, mask] = (1 - alpha) * image[:, mask] + alpha * colour[:, None]


def _paste(image: F32Array, others: F32Array, rng: np.random.Generator) -> None:
    _, h, w = image.shape
    ph, pw = (int(rng.integers(max(2, s // 16), max(3, s // 4) + 1)) for s in (h, w))
    source = others[rng.integers(others.shape[0])]
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    image[:, ty : ty + ph, tx : tx + pw] = source[:, sy : sy + ph, sx : sx + pw]


def _scratch(image: F32Array, others: F32Array, rng: np.random.Generator) -> None:
    c, h, w = image.shape
    side = min(h, w)
    start = rng.uniform(0, [h, w])
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(side / 8, side / 2)
    end = start + length * np.array([np.sin(angle), np.cos(angle)])
    thickness = rng.uniform(1.0, max(1.5, side / 48))
    colour = np.asarray(rng.uniform(0, 1, c), dtype=np.float32)
    mask = polyline_mask(h, w, np.stack([start, end]), thickness)
    _blend(image, mask, colour, float(rng.uniform(0.6, 1.0)))


def _blotch(image: F32Array, others: F32Array, rng: np.random.Generator) -> None:
    c, h, w = image.shape
    side = min(h, w)
    radii = (rng.uniform(side / 40, side / 8), rng.uniform(side / 40, side / 8))
    mask = ellipse_mask(h, w, tuple(rng.uniform(0, [h, w])), radii, rng.uniform(0, np.pi))
    colour = np.asarray(rng.uniform(0, 1, c), dtype=np.float32)
    _blend(image, mask, colour, float(rng.uniform(0.5, 1.0)))


def _noise(image: F32Array, others: F32Array, rng: np.random.Generator) -> None:
    _, h, w = image.shape
    ph, pw = (int(rng.integers(max(2, s // 16), max(3, s // 6) + 1)) for s in (h, w))
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = image[:, ty : ty + ph, tx : tx + pw]
    noise = rng.normal(0.0, rng.uniform(0.1, 0.3), patch.shape).astype(np.float32)
    image[:, ty : ty + ph, tx : tx + pw] = np.clip(patch + noise, 0.0, 1.0)


DEFECTS: tuple[Callable[[F32Array, F32Array, np.random.Generator], None], ...] = (
    _paste,
    _scratch,
    _blotch,
    _noise,
)


def synthesise_anomalies(images: F32Array, *, copies: int, seed: int) -> F32Array:
    """``copies`` defective versions of each image ``(N, C, H, W)``, one random defect each."""
    rng = np.random.default_rng(seed)
    out = np.repeat(images, copies, axis=0).copy()
    for i in range(out.shape[0]):
        DEFECTS[i % len(DEFECTS)](out[i], images, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def corrupt(images: F32Array, probability: float, rng: np.random.Generator) -> F32Array:
    """A copy of ``images`` in which each image carries a random defect with ``probability``."""
    out = images.copy()
    for i in np.flatnonzero(rng.random(images.shape[0]) < probability):
        DEFECTS[int(rng.integers(len(DEFECTS)))](out[i], images, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
