"""The built-in demo dataset: a machined flange on a conveyor, in the MVTec AD layout.

Each image shows a turned steel flange (concentric tool marks, a central bore, four bolt holes)
under slightly varying light, position and tint on a dark textured belt. Defective images carry
one defect with its exact pixel mask: a scratch, contamination spots, a crack, missing material
at the rim, or a colour shift (heat tint), each varied in size and contrast. Everything is drawn
from a seeded generator, one independent stream per image, so a seed fixes the dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from training.errors import ConfigError
from training.synth import ellipse_mask, polyline_mask

F64Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DEFECT_TYPES = ("scratch", "contamination", "crack", "missing_material", "color_shift")


@dataclass(frozen=True)
class DemoSize:
    """How many images of which size; every field can be passed to generate_demo_dataset."""

    image_size: int = 128
    n_train: int = 80
    n_test_good: int = 20
    n_test_per_defect: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"demo image_size is {self.image_size}; expected at least 16")
        for name in ("n_train", "n_test_good", "n_test_per_defect"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo {name} is {getattr(self, name)}; expected at least 1")


@dataclass(frozen=True)
class Part:
    """A rendered good part: the RGB image in [0, 1] and where the metal is."""

    image: F64Array  # (H, W, 3)
    metal: BoolArray  # (H, W)
    centre: tuple[float, float]
    radius: float
    bore: float


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> F64Array:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return np.asarray(rows[:, i] * (1 - f) + rows[:, i + 1] * f)


def render_part(rng: np.random.Generator, size: int) -> Part:
    """Draw one good flange with its natural variation."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = s / 2 + rng.normal(0, s * 0.008, 2)
    radius = s * 0.40 * (1 + rng.normal(0, 0.006))
    bore = s * 0.13
    r = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)

    belt = 0.16 + 0.04 * _smooth_noise(rng, size, 6) + rng.normal(0, 0.02, (size, size))
    image = np.repeat(belt[:, :, None], 3, axis=2) * np.array([1.0, 1.0, 1.05])

    metal = (r <= radius) & (r >= bore)
    rotation = rng.normal(0, 0.02)
    for k in range(4):
        a = rotation + k * np.pi / 2 + np.pi / 4
        hy, hx = cy + 0.27 * s * np.sin(a), cx + 0.27 * s * np.cos(a)
        metal &= np.hypot(yy - hy, xx - hx) > s * 0.045
    # Turned surface: fine concentric tool marks, a brighter land near the rim, a chamfer.
    rings = 0.05 * np.sin(r * (2 * np.pi / max(2.0, s / 40)) + rng.uniform(0, 6.3))
    land = 0.06 * np.exp(-(((r - 0.82 * radius) / (0.05 * s)) ** 2))
    chamfer = -0.12 * (r > radius - s * 0.02)
    sheen = 0.10 * np.cos(theta - rng.normal(0.8, 0.1))
    light = 0.04 * ((xx - cx) / s) + rng.normal(0, 0.015)
    steel = 0.58 + rings + land + chamfer + sheen + light + rng.normal(0, 0.012, (size, size))
    tint = np.array([1.0, 0.99, 0.97]) * (1 + rng.normal(0, 0.01, 3))
    image[metal] = steel[metal][:, None] * tint
    return Part(np.clip(image, 0, 1), metal, (float(cy), float(cx)), float(radius), float(bore))


def _shade(part: Part, mask: BoolArray, colour: F64Array, alpha: float) -> BoolArray:
    part.image[mask] = (1 - alpha) * part.image[mask] + alpha * colour
    return mask


def _scratch(part: Part, rng: np.random.Generator, size: int) -> BoolArray:
    cy, cx = part.centre
    a, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.5) * size
    r0 = rng.uniform(part.bore + 2, part.radius - length / 3)
    start = np.array([cy + r0 * np.sin(a), cx + r0 * np.cos(a)])
    bend = rng.uniform(-0.3, 0.3)
    heading = rng.uniform(0, 2 * np.pi)
    steps = np.linspace(0, 1, 8)
    angles = heading + bend * steps
    points = start + np.cumsum(
        np.stack([np.sin(angles), np.cos(angles)], axis=1) * length / 8, axis=0
    )
    thickness = rng.uniform(1.0, max(1.2, size / 50))
    mask = polyline_mask(size, size, np.vstack([start, points]), thickness) & part.metal
    bright = rng.random() < 0.5
    colour = np.full(3, 0.95 if bright else 0.2)
    return _shade(part, mask, colour, rng.uniform(0.25, 0.9))


def _contamination(part: Part, rng: np.random.Generator, size: int) -> BoolArray:
    mask = np.zeros((size, size), dtype=bool)
    colour = np.array(rng.choice([[0.30, 0.20, 0.10], [0.10, 0.10, 0.10], [0.55, 0.45, 0.20]]))
    cy, cx = part.centre
    for _ in range(int(rng.integers(1, 4))):
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(part.bore + 3, part.radius - 3)
        radii = tuple(rng.uniform(0.015, 0.06, 2) * size)
        centre = (cy + r * np.sin(a), cx + r * np.cos(a))
        mask |= ellipse_mask(size, size, centre, radii, rng.uniform(0, np.pi))
    mask &= part.metal
    return _shade(part, mask, colour, rng.uniform(0.3, 0.9))


def _crack(part: Part, rng: np.random.Generator, size: int) -> BoolArray:
    cy, cx = part.centre
    a = rng.uniform(0, 2 * np.pi)
    from_rim = rng.random() < 0.5
    r = part.radius - 1 if from_rim else part.bore + 1
    points = [np.array([cy + r * np.sin(a), cx + r * np.cos(a)])]
    heading = a + (np.pi if from_rim else 0.0)
    for _ in range(int(rng.integers(6, 12))):
        heading += rng.normal(0, 0.45)
        step = rng.uniform(0.02, 0.035) * size
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    thickness = rng.uniform(1.0, max(1.2, size / 80))
    mask = polyline_mask(size, size, np.stack(points), thickness) & part.metal
    return _shade(part, mask, np.full(3, 0.05), rng.uniform(0.4, 0.95))


def _missing_material(part: Part, rng: np.random.Generator, size: int) -> BoolArray:
    cy, cx = part.centre
    a = rng.uniform(0, 2 * np.pi)
    centre = (cy + part.radius * np.sin(a), cx + part.radius * np.cos(a))
    radii = tuple(rng.uniform(0.03, 0.09, 2) * size)
    mask = ellipse_mask(size, size, centre, radii, rng.uniform(0, np.pi)) & part.metal
    belt = 0.16 + rng.normal(0, 0.02, (int(mask.sum()), 1))
    part.image[mask] = np.clip(belt, 0, 1) * np.array([1.0, 1.0, 1.05])
    return mask


def _color_shift(part: Part, rng: np.random.Generator, size: int) -> BoolArray:
    cy, cx = part.centre
    a, r = rng.uniform(0, 2 * np.pi), rng.uniform(part.bore, part.radius)
    centre = (cy + r * np.sin(a), cx + r * np.cos(a))
    radii = tuple(rng.uniform(0.06, 0.16, 2) * size)
    mask = ellipse_mask(size, size, centre, radii, rng.uniform(0, np.pi)) & part.metal
    heat_tint = np.array(rng.choice([[1.25, 1.0, 0.6], [0.75, 0.85, 1.3], [1.2, 0.8, 0.9]]))
    strength = rng.uniform(0.25, 1.0)
    factor = 1 + strength * (heat_tint - 1)
    part.image[mask] = np.clip(part.image[mask] * factor, 0, 1)
    return mask


_DEFECTS: dict[str, Callable[[Part, np.random.Generator, int], BoolArray]] = {
    "scratch": _scratch,
    "contamination": _contamination,
    "crack": _crack,
    "missing_material": _missing_material,
    "color_shift": _color_shift,
}


def draw_defect(part: Part, rng: np.random.Generator, defect: str) -> BoolArray:
    """Draw ``defect`` (one of DEFECT_TYPES) into ``part`` in place; returns its exact mask."""
    if defect not in _DEFECTS:
        raise ConfigError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    return _DEFECTS[defect](part, rng, part.image.shape[0])


def _save_rgb(image: F64Array, path: Path) -> None:
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB").save(path)


def _defective(rng: np.random.Generator, size: int, defect: str) -> tuple[F64Array, BoolArray]:
    # Redraw on the rare chance that the defect fell where it changes no pixel.
    while True:
        part = render_part(rng, size)
        mask = draw_defect(part, rng, defect)
        if mask.sum() >= 3:
            return part.image, mask


def generate_demo_dataset(out_dir: Path, *, seed: int = 0, **size_options: int) -> Path:
    """Write the demo dataset under ``out_dir`` (MVTec layout) and return ``out_dir``.

    ``size_options`` are the fields of :class:`DemoSize`: ``image_size``, ``n_train``,
    ``n_test_good`` and ``n_test_per_defect``.
    """
    unknown = set(size_options) - set(DemoSize.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown demo size options {sorted(unknown)}; expected among "
            f"{sorted(DemoSize.__dataclass_fields__)}"
        )
    size = DemoSize(**size_options)
    out_dir = Path(out_dir)
    streams = iter(
        np.random.SeedSequence(seed).spawn(
            size.n_train + size.n_test_good + size.n_test_per_defect * len(DEFECT_TYPES)
        )
    )

    def rng() -> np.random.Generator:
        return np.random.default_rng(next(streams))

    for folder, count in (("train/good", size.n_train), ("test/good", size.n_test_good)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _save_rgb(render_part(rng(), size.image_size).image, out_dir / folder / f"{i:03d}.png")
    for defect in DEFECT_TYPES:
        (out_dir / "test" / defect).mkdir(parents=True, exist_ok=True)
        (out_dir / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(size.n_test_per_defect):
            image, mask = _defective(rng(), size.image_size, defect)
            _save_rgb(image, out_dir / "test" / defect / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(
                out_dir / "ground_truth" / defect / f"{i:03d}_mask.png"
            )
    return out_dir
