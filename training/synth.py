"""Synthetic defects drawn into normal images, with their masks: no real defect is ever needed.

Two disjoint families, so that choosing the decision rule measures how the model generalises to
defects it was not trained on:

- TRAINING_DEFECTS teach the denoising VAE and the defect head: regions of Perlin-noise shape
  (blobs of any size, from specks to large areas) filled with foreign texture (another normal
  image, transformed, or a procedural texture) at any opacity, as DRAEM does, and thin cracks
  (random-walk polylines a pixel or two wide, darker or brighter than their surroundings).
  SHADED_TRAINING_DEFECTS adds wide regions of the part's own surface darkened or brightened
  (``--shaded-defects``; not the default: see docs/quality-history.md, "Shaded regions").
- HELD_OUT_DEFECTS choose and check the decision rule: pasted rectangles of another image,
  ellipses of foreign colour, patches of noise and local changes of brightness and contrast.

Every function takes and returns float32 images ``(C, H, W)`` in [0, 1] and boolean masks
``(H, W)`` of the pixels that were changed.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

Defect = Callable[[F32Array, F32Array, np.random.Generator], BoolArray]


class ScalableDefect(Protocol):
    """A defect whose size bounds scale by ``size`` (the held-out kinds)."""

    def __call__(
        self, image: F32Array, others: F32Array, rng: np.random.Generator, *, size: float = 1.0
    ) -> BoolArray: ...


# A pixel counts as defective when some channel moved by more than this (about 3 grey levels).
CHANGED = 3.0 / 255.0


def ellipse_mask(
    h: int, w: int, centre: tuple[float, float], radii: tuple[float, float], angle: float
) -> BoolArray:
    """Pixels inside a rotated ellipse ``(cy, cx)``, ``(ry, rx)``, angle in radians."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.asarray((u / max(radii[1], 0.5)) ** 2 + (v / max(radii[0], 0.5)) ** 2 <= 1.0)


def polyline_mask(h: int, w: int, points: F64Array, thickness: float) -> BoolArray:
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


def perlin_noise(h: int, w: int, cells: tuple[int, int], rng: np.random.Generator) -> F64Array:
    """2-D Perlin gradient noise on a lattice of ``cells = (rows, columns)``; about [-0.7, 0.7]."""
    rows, cols = cells
    angles = rng.uniform(0.0, 2.0 * np.pi, (rows + 1, cols + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    ys = np.arange(h) * (rows / h)
    xs = np.arange(w) * (cols / w)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy = np.asarray(ys - y0, dtype=np.float64)[:, None]
    fx = np.asarray(xs - x0, dtype=np.float64)[None, :]

    def corner(dy: int, dx: int) -> F64Array:
        iy, ix = (y0 + dy)[:, None], (x0 + dx)[None, :]
        return np.asarray(gy[iy, ix] * (fy - dy) + gx[iy, ix] * (fx - dx))

    def fade(t: F64Array) -> F64Array:
        return np.asarray(t * t * t * (t * (t * 6 - 15) + 10))

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return np.asarray(top * (1 - u) + bottom * u)


# Perlin regions from specks to blobs: thresholds from 0.5 (a median 0.4% of a 96x96 crop) down
# to DRAEM's 0.5 on noise scaled by sqrt(2) (a median 5%).
PERLIN_THRESHOLDS = (0.5 / math.sqrt(2.0), 0.5)


def perlin_mask(h: int, w: int, rng: np.random.Generator) -> BoolArray:
    """A random blob-shaped region: thresholded Perlin noise of a random scale and a random
    threshold within ``PERLIN_THRESHOLDS`` (never empty)."""
    threshold = float(rng.uniform(*PERLIN_THRESHOLDS))
    for _ in range(8):
        cells = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        mask = perlin_noise(h, w, cells, rng) > threshold
        if mask.any():
            return mask
    side = min(h, w)
    radii = (side / 8.0, side / 10.0)
    return ellipse_mask(h, w, tuple(rng.uniform(0, [h, w])), radii, rng.uniform(0, np.pi))


def _transformed(source: F32Array, rng: np.random.Generator) -> F32Array:
    """A normal image made foreign: rotated or flipped, and its intensities remapped."""
    _, h, w = source.shape
    turns = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
    out = np.rot90(source, turns, axes=(1, 2))
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    gain = rng.uniform(0.4, 1.6, (out.shape[0], 1, 1))
    out = (out - out.mean()) * gain + out.mean() + rng.uniform(-0.3, 0.3)
    if rng.random() < 0.3:
        out = 1.0 - out
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _procedural_texture(c: int, h: int, w: int, rng: np.random.Generator) -> F32Array:
    """A foreign texture: a random colour modulated by Perlin noise and fine grain."""
    base = rng.uniform(0.0, 1.0, (c, 1, 1))
    cells = (2 ** int(rng.integers(1, 6)), 2 ** int(rng.integers(1, 6)))
    texture = base + rng.uniform(0.0, 0.6) * perlin_noise(h, w, cells, rng)[None]
    texture = texture + rng.normal(0.0, rng.uniform(0.0, 0.1), (c, h, w))
    return np.asarray(np.clip(texture, 0.0, 1.0), dtype=np.float32)


def _fill(image: F32Array, region: BoolArray, texture: F32Array, opacity: float) -> BoolArray:
    before = image.copy()
    image[:, region] = (1 - opacity) * image[:, region] + opacity * texture[:, region]
    return np.asarray(region & (np.abs(image - before).max(axis=0) > CHANGED), dtype=bool)


def perlin_texture(image: F32Array, others: F32Array, rng: np.random.Generator) -> BoolArray:
    """A Perlin-shaped region filled with a transformed normal image or a procedural texture."""
    c, h, w = image.shape
    source = others[rng.integers(others.shape[0])]
    if rng.random() < 0.5 and source.shape[1:] == (h, w):
        texture = _transformed(source, rng)
    else:
        texture = _procedural_texture(c, h, w, rng)
    return _fill(image, perlin_mask(h, w, rng), texture, float(rng.uniform(0.2, 1.0)))


def crack(image: F32Array, others: F32Array, rng: np.random.Generator) -> BoolArray:
    """A thin random-walk line, darker or brighter than the image around it."""
    c, h, w = image.shape
    side = min(h, w)
    steps = int(rng.integers(2, 7))
    heading = rng.uniform(0, 2 * np.pi)
    points = [rng.uniform(0, [h, w])]
    for _ in range(steps):
        heading += rng.normal(0.0, 0.5)
        length = rng.uniform(side / 24, side / 6)
        points.append(points[-1] + length * np.array([np.sin(heading), np.cos(heading)]))
    mask = polyline_mask(h, w, np.stack(points), rng.uniform(1.0, max(1.5, side / 64)))
    level = float(image[:, mask].mean()) if mask.any() else 0.5
    # From barely visible hairlines to stark cracks: the contrast is log-uniform.
    shift = float(np.exp(rng.uniform(np.log(0.04), np.log(0.5)))) * (
        -1 if rng.random() < 0.7 else 1
    )
    colour = np.clip(level + shift + rng.normal(0, 0.05, (c, 1, 1)), 0, 1).astype(np.float32)
    return _fill(image, mask, np.broadcast_to(colour, image.shape), float(rng.uniform(0.7, 1.0)))


def shade(image: F32Array, others: F32Array, rng: np.random.Generator) -> BoolArray:
    """A region of the part's own surface darkened or brightened, its texture kept (an area gone
    dark, a stain, a burn): a Perlin-shaped region, half the time cut along a straight edge."""
    c, h, w = image.shape
    # Wider regions than perlin_mask's (3-35% of the image rather than specks to a few per cent).
    cells = (2 ** int(rng.integers(0, 5)), 2 ** int(rng.integers(0, 5)))
    region = perlin_noise(h, w, cells, rng) > rng.uniform(0.1, 0.4)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        cy, cx = rng.uniform(0, [h, w])
        angle = rng.uniform(0, 2 * np.pi)
        region &= np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy) > 0
    darker = rng.random() < 0.7
    low, high = (0.3, 0.9) if darker else (1.1, 1.5)
    gain = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    tint = 1.0 + rng.normal(0.0, 0.05, (c, 1, 1)) if c > 1 else np.ones((1, 1, 1))
    texture = np.clip(image * (gain * tint), 0.0, 1.0).astype(np.float32)
    return _fill(image, region, texture, 1.0)


def _scaled(side: int, size: float) -> int:
    return max(1, round(side * size))


def paste(
    image: F32Array, others: F32Array, rng: np.random.Generator, *, size: float = 1.0
) -> BoolArray:
    """A rectangle cut from another normal image and pasted at another place; ``size`` scales
    its sides' bounds (as it does every held-out kind's)."""
    _, h, w = image.shape
    ph, pw = (
        int(rng.integers(max(2, s // 16), max(3, s // 4) + 1))
        for s in (_scaled(h, size), _scaled(w, size))
    )
    source = others[rng.integers(others.shape[0])]
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    region = np.zeros((h, w), dtype=bool)
    region[ty : ty + ph, tx : tx + pw] = True
    texture = np.zeros_like(image)
    texture[:, ty : ty + ph, tx : tx + pw] = source[:, sy : sy + ph, sx : sx + pw]
    return _fill(image, region, texture, 1.0)


def blotch(
    image: F32Array, others: F32Array, rng: np.random.Generator, *, size: float = 1.0
) -> BoolArray:
    """An ellipse of a foreign flat colour."""
    c, h, w = image.shape
    side = min(h, w) * size
    radii = (rng.uniform(side / 40, side / 8), rng.uniform(side / 40, side / 8))
    region = ellipse_mask(h, w, tuple(rng.uniform(0, [h, w])), radii, rng.uniform(0, np.pi))
    colour = rng.uniform(0, 1, (c, 1, 1)).astype(np.float32)
    return _fill(image, region, np.broadcast_to(colour, image.shape), float(rng.uniform(0.5, 1.0)))


def noise(
    image: F32Array, others: F32Array, rng: np.random.Generator, *, size: float = 1.0
) -> BoolArray:
    """A rectangle of added Gaussian noise."""
    _, h, w = image.shape
    ph, pw = (
        int(rng.integers(max(2, s // 16), max(3, s // 6) + 1))
        for s in (_scaled(h, size), _scaled(w, size))
    )
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    region = np.zeros((h, w), dtype=bool)
    region[ty : ty + ph, tx : tx + pw] = True
    texture = image + rng.normal(0.0, rng.uniform(0.1, 0.3), image.shape).astype(np.float32)
    return _fill(image, region, np.clip(texture, 0, 1), 1.0)


def relight(
    image: F32Array, others: F32Array, rng: np.random.Generator, *, size: float = 1.0
) -> BoolArray:
    """An ellipse whose brightness and contrast change (a stain, a dent catching the light)."""
    _, h, w = image.shape
    side = min(h, w) * size
    radii = (rng.uniform(side / 24, side / 6), rng.uniform(side / 24, side / 6))
    region = ellipse_mask(h, w, tuple(rng.uniform(0, [h, w])), radii, rng.uniform(0, np.pi))
    mean = image.mean(axis=(1, 2), keepdims=True)
    texture = (image - mean) * rng.uniform(0.3, 2.0) + mean + rng.uniform(-0.3, 0.3)
    return _fill(image, region, np.clip(texture, 0, 1).astype(np.float32), 1.0)


TRAINING_DEFECTS: tuple[Defect, ...] = (perlin_texture, perlin_texture, crack)
SHADED_TRAINING_DEFECTS: tuple[Defect, ...] = (*TRAINING_DEFECTS, shade)
HELD_OUT_KINDS: tuple[ScalableDefect, ...] = (paste, blotch, noise, relight)
HELD_OUT_DEFECTS: tuple[Defect, ...] = HELD_OUT_KINDS


def held_out_defects(size: float) -> tuple[Defect, ...]:
    """The held-out kinds with their size bounds scaled by ``size`` (1 gives HELD_OUT_DEFECTS'
    defects exactly; 0.25 makes specks from a 64th of the side)."""
    if not 0.0 < size <= 1.0:
        raise ValueError(f"defect size is {size}; expected a scale in (0, 1]")
    return tuple(functools.partial(defect, size=size) for defect in HELD_OUT_KINDS)


def corrupt(
    images: F32Array,
    probability: float,
    rng: np.random.Generator,
    defects: Sequence[Defect] = TRAINING_DEFECTS,
) -> tuple[F32Array, BoolArray]:
    """Copies of ``images (N, C, H, W)``, each given a random defect with ``probability``.

    Returns the images and the masks ``(N, H, W)`` of the pixels each defect changed.
    """
    out = images.copy()
    masks = np.zeros((images.shape[0], *images.shape[2:]), dtype=bool)
    for i in np.flatnonzero(rng.random(images.shape[0]) < probability):
        masks[i] = defects[int(rng.integers(len(defects)))](out[i], images, rng)
    return np.clip(out, 0.0, 1.0), masks


def synthesised_batches(
    images: F32Array,
    *,
    copies: int,
    seed: int,
    batch: int,
    defects: Sequence[Defect] = HELD_OUT_DEFECTS,
) -> Iterator[F32Array]:
    """``copies`` defective versions of each image ``(N, C, H, W)``, cycling through
    ``defects``, ``batch`` of them at a time (in the order of ``np.repeat(images, copies)``) and
    the same whatever the batch: memory holds one batch of them, however many are made."""
    if batch < 1:
        raise ValueError(f"batch is {batch}; expected at least 1")
    rng = np.random.default_rng(seed)
    total = images.shape[0] * copies
    for start in range(0, total, batch):
        made = np.arange(start, min(start + batch, total))
        out = images[made // copies].astype(np.float32, copy=False)  # a new array: one row a copy
        for row, i in enumerate(made):
            defects[i % len(defects)](out[row], images, rng)
        yield np.clip(out, 0.0, 1.0, out=out)
