"""Scoring maths and its calibration: the one implementation used by training and serving.

Raw scores per image (all grow with how anomalous the image looks):
- ``recon_error``: mean squared error between the input and ``decoder(mu)``;
- ``kl``: KL(q(z|x) || N(0, I)) = 1/2 * sum(mu^2 + exp(logvar) - logvar - 1);
- ``local_error``: the highest mean of the squared-error map over any ``window x window`` square;
- ``latent_distance``: the largest mean, over any ``3 x 3`` cells of the latent grid, of the
  Mahalanobis distance of a cell's posterior mean from the posterior means of normal training
  images at that cell, relative to those images' mean distance there (:class:`LatentReference`);
- ``defect_probability``: the highest mean of the defect head's per-pixel anomaly probability
  over any ``window x window`` square;
- ``coarse_error``: the highest mean of the coarse VAE's squared-error map (at its own, lower
  resolution) over any square of an eighth of its shorter side: large defects, which the local
  model redraws, are what the coarse model cannot.

The four maps behind ``local_error``, ``latent_distance``, ``defect_probability`` and
``coarse_error`` are read relative to the training images' mean map (:class:`ErrorReference`,
:class:`LatentReference`): each position's value over what normal parts show there.

Calibration, fitted on held-out normal images, turns each raw score into a p-value (the share of
held-out normal scores at least as high, conformal style: ``(1 + #{cal >= s}) / (n + 1)``), defines
the combined score (a soft maximum, log-sum-exp, of the weighted log scores standardised on the
held-out set: one score far out on its own is enough to flag an image, and a score that finds the
image very normal cannot cancel another's alarm), and sets the decision threshold on the combined
score for a target false-alarm rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property, lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.special import betaincinv

from service import tail
from service.score_names import SCORE_NAMES as SCORE_NAMES

FloatArray = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

_LOG_FLOOR = 1e-12
ThresholdMethod = Literal["empirical", "normal_tail"]
# Share of the pooled (all cells) covariance mixed into each cell's covariance: keeps the
# per-cell Gaussians well conditioned with a few hundred images, and sensible for parts whose
# pose varies (where every cell sees everything).
LATENT_SHRINKAGE = 0.9
LATENT_RIDGE = 1e-3
# latent_distance averages the distance map over squares of this many cells before taking the
# largest: a defect spans neighbouring cells, a lone unusual cell is more often noise.
LATENT_WINDOW = 3
# coarse_error's window is the coarse map's shorter side over this.
COARSE_WINDOW_DIVISOR = 8
# Each error (and latent distance) map is divided by the normal images' mean there plus this
# share of its image-wide mean, so that positions normal parts never err at do not turn noise
# into evidence.
POSITION_FLOOR = 0.1
# The median absolute deviation of Gaussian data times this is their standard deviation.
MAD_TO_STD = 1.4826
# Held-out combined scores more than this many robust standard deviations above their median
# are parts in the "good" folder that do not look good: the threshold is set without them, when
# at least OUTLIER_MIN_VALUES were held out (fewer do not pin down a median and deviation).
OUTLIER_DEVIATIONS = 4.0
OUTLIER_MIN_VALUES = 20
# The Gaussian prediction bound is set after a Yeo-Johnson transform fitted to the held-out
# values (service/tail.py) when at least this many are kept: fewer do not pin down a tail's shape,
# and a shape fitted to them flags more good parts than the bound on the values as they are.
TAIL_MIN_VALUES = 20


@dataclass(frozen=True)
class ModelOutputs:
    """What the exported graphs give for one batch of ``N`` images."""

    mu: FloatArray  # (N, D)
    logvar: FloatArray  # (N, D)
    recon: FloatArray  # (N, C, H, W)
    defect_map: FloatArray  # (N, H, W), the defect head's anomaly probability per pixel
    coarse_input: FloatArray  # (N, C, H/f, W/f), the image downsampled for the coarse VAE
    coarse_recon: FloatArray  # (N, C, H/f, W/f), the coarse VAE's reconstruction of it

    def rows(self, index: slice | npt.NDArray[np.intp]) -> ModelOutputs:
        """The outputs of some images of the batch: a slice (views) or row numbers (copies)."""
        return ModelOutputs(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def joined(cls, parts: Sequence[ModelOutputs]) -> ModelOutputs:
        """The outputs of consecutive batches as those of one batch."""
        if not parts:
            raise ValueError("joining needs the outputs of at least one batch")
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def batch_slices(count: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows that cover ``count`` rows, in order."""
    if size < 1:
        raise ValueError(f"batch size is {size}; expected at least 1")
    return [slice(start, start + size) for start in range(0, count, size)]


@dataclass(frozen=True)
class LatentGrid:
    """How the flat latent ``(N, D)`` is laid out: ``D = channels * rows * columns``."""

    channels: int
    rows: int
    columns: int

    @property
    def size(self) -> int:
        """``D``."""
        return self.channels * self.rows * self.columns

    @property
    def cells(self) -> int:
        """``rows * columns``."""
        return self.rows * self.columns

    def cell_vectors(self, mu: FloatArray) -> F64Array:
        """``(N, D)`` -> ``(N, cells, channels)``: each cell's posterior mean."""
        grid = np.asarray(mu, dtype=np.float64).reshape(-1, self.channels, self.cells)
        return np.ascontiguousarray(grid.transpose(0, 2, 1))


@dataclass(frozen=True)
class LatentReference:
    """A Gaussian of the normal posterior means at each latent cell, and how far from it the
    normal images' own posterior means lie there.

    Fitted on the training images, as they are and relit over the lighting range their
    training called normal (``training.calibrate.fit_references``). ``latent_distance`` reads
    each cell's Mahalanobis distance from its cell's Gaussian relative to the training images'
    mean distance at that cell (plus ``POSITION_FLOOR`` times its grid-wide mean), as the error
    maps are read: a cell whose normal parts vary in ways the shrunk covariance does not capture
    (an edge, a busbar, a texture) is discounted, and the same distance where normal parts agree
    stands out.
    """

    grid: LatentGrid
    mean: F64Array  # (cells, channels)
    precision: F64Array  # (cells, channels, channels)
    mean_distance: F64Array  # (rows, columns), the training images' mean distance per cell

    @classmethod
    def fit(cls, mu: FloatArray, grid: LatentGrid) -> LatentReference:
        """Per-cell means, shrunk covariances and mean distances of the posterior means
        ``mu (N, D)``."""
        if mu.ndim != 2 or mu.shape[1] != grid.size or mu.shape[0] < 2:
            raise ValueError(f"latent reference needs (N >= 2, {grid.size}) means, got {mu.shape}")
        cells = grid.cell_vectors(mu)  # (N, P, k)
        mean = cells.mean(axis=0)  # (P, k)
        centred = cells - mean
        per_cell = np.einsum("npi,npj->pij", centred, centred) / (cells.shape[0] - 1)
        pooled = (
            per_cell.mean(axis=0)
            + np.einsum("pi,pj->ij", mean - mean.mean(0), mean - mean.mean(0)) / grid.cells
        )
        ridge = LATENT_RIDGE * np.eye(grid.channels)
        covariance = (1 - LATENT_SHRINKAGE) * per_cell + LATENT_SHRINKAGE * pooled + ridge
        precision = np.linalg.inv(covariance)
        distances = _mahalanobis(grid, cells - mean, precision)
        return cls(grid, mean, precision, distances.mean(axis=0))

    def distance_map(self, mu: FloatArray) -> F64Array:
        """Mahalanobis distance of each cell's posterior mean: ``(N, D) -> (N, rows, columns)``."""
        return _mahalanobis(self.grid, self.grid.cell_vectors(mu) - self.mean, self.precision)

    @cached_property
    def _divisor(self) -> F64Array:
        return floored_mean(self.mean_distance)

    def relative_distance_map(self, mu: FloatArray) -> F64Array:
        """Each cell's distance over the training images' mean distance there (plus the floor):
        ``(N, D) -> (N, rows, columns)``; what ``latent_distance`` reads."""
        return _divided(self.distance_map(mu), self._divisor)


def _mahalanobis(grid: LatentGrid, centred: F64Array, precision: F64Array) -> F64Array:
    """``(N, cells, channels)`` deviations -> their distances ``(N, rows, columns)``."""
    squared = np.einsum("npi,pij,npj->np", centred, precision, centred)
    distance = np.sqrt(np.maximum(squared, 0.0))
    return np.asarray(distance, dtype=np.float64).reshape(-1, grid.rows, grid.columns)


def floored_mean(mean: F64Array) -> F64Array:
    """A normal images' mean map plus ``POSITION_FLOOR`` times its map-wide mean: the divisor
    that reads a map relative to normal images, without turning noise where they show nothing
    into evidence."""
    return np.asarray(mean + POSITION_FLOOR * float(mean.mean()) + _LOG_FLOOR)


@dataclass(frozen=True)
class LatentBaseline:
    """Mean and spread, per latent dimension, of the posterior means of held-out normal images.

    What the drift of "normal" is measured against: recent traffic whose mean posterior mean
    moves away from ``mean``, in units of ``std``, no longer looks like the normal images did.
    """

    mean: F64Array  # (D,)
    std: F64Array  # (D,)
    count: int

    @classmethod
    def fit(cls, mu: FloatArray) -> LatentBaseline:
        """From the posterior means ``mu (N, D)`` of held-out normal images."""
        if mu.ndim != 2 or mu.shape[0] < 2:
            raise ValueError(f"a latent baseline needs (N >= 2, D) means, got {mu.shape}")
        values = np.asarray(mu, dtype=np.float64)
        return cls(values.mean(axis=0), values.std(axis=0, ddof=1), int(values.shape[0]))


@dataclass
class LatentMoments:
    """The mean and spread of posterior means gathered a batch at a time (the pairwise merge of
    Chan, Golub and LeVeque), so that a baseline of any number of images holds two vectors
    rather than every image's posterior mean."""

    count: int = 0
    mean: F64Array | None = None
    m2: F64Array | None = None  # sum of squared deviations from the mean

    def add(self, mu: FloatArray) -> None:
        """Add the posterior means ``mu (N, D)`` of a batch."""
        values = np.asarray(mu, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"posterior means have shape {values.shape}; expected (N, D)")
        n = values.shape[0]
        if n == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def baseline(self) -> LatentBaseline:
        """The :class:`LatentBaseline` of every mean added (at least 2)."""
        if self.mean is None or self.m2 is None or self.count < 2:
            raise ValueError(f"a latent baseline needs at least 2 means, got {self.count}")
        return LatentBaseline(self.mean, np.sqrt(self.m2 / (self.count - 1)), self.count)


def anomaly_map(x: FloatArray, recon: FloatArray) -> FloatArray:
    """Per-pixel squared error averaged over channels: ``(N, C, H, W) -> (N, H, W)``."""
    # In place, channel by channel: the same float32 sums as ``np.mean(d * d, axis=1)`` (bit for
    # bit), at a third of the time and memory traffic (it runs once per served batch).
    diff = np.subtract(x, recon)
    np.multiply(diff, diff, out=diff)
    channels = diff.shape[1]
    amap = np.array(diff[:, 0], dtype=np.float32)
    for channel in range(1, channels):
        np.add(amap, diff[:, channel], out=amap, dtype=np.float32)
    np.divide(amap, np.float32(channels), out=amap)
    return amap


def recon_error_from_map(amap: FloatArray) -> F64Array:
    """Mean squared error per image from its anomaly map (equal to the mean over C, H, W)."""
    return np.asarray(amap.reshape(amap.shape[0], -1).mean(axis=1, dtype=np.float64))


def kl_divergence(mu: FloatArray, logvar: FloatArray) -> F64Array:
    """KL divergence of N(mu, exp(logvar)) from N(0, I) per image, in nats: ``(N, D) -> (N,)``."""
    mu64 = mu.astype(np.float64)
    lv64 = logvar.astype(np.float64)
    return np.asarray(0.5 * np.sum(mu64 * mu64 + np.exp(lv64) - lv64 - 1.0, axis=1))


def _summed_area(amap: npt.NDArray[np.floating[Any]]) -> F64Array:
    """The summed-area table ``(N, H + 1, W + 1)`` of ``amap (N, H, W)``, zero-padded on top and
    left, in float64."""
    n, h, w = amap.shape
    # Built in place (row by row down, then along each row): the same float64 sums as two
    # ``np.cumsum`` calls, without their temporaries and strided scan.
    integral = np.zeros((n, h + 1, w + 1), dtype=np.float64)
    inner = integral[:, 1:, 1:]
    inner[...] = amap
    for row in range(1, h):
        np.add(inner[:, row], inner[:, row - 1], out=inner[:, row])
    np.cumsum(inner, axis=2, out=inner)
    return integral


def window_max(amap: npt.NDArray[np.floating[Any]], window: int) -> F64Array:
    """Highest mean of ``amap`` over any square of side ``window``: ``(N, H, W) -> (N,)``."""
    n, h, w = amap.shape
    k = max(1, min(window, h, w))
    integral = _summed_area(amap)
    sums = integral[:, k:, k:] - integral[:, :-k, k:]
    sums -= integral[:, k:, :-k]
    sums += integral[:, :-k, :-k]
    return np.asarray(sums.reshape(n, -1).max(axis=1) / float(k * k), dtype=np.float64)


@dataclass(frozen=True)
class MapParts:
    """Where in a batch each local score sees its evidence; the anomaly map is made from these
    on request only (:meth:`Calibration.anomaly_map`)."""

    squared_error: F64Array  # (N, H, W), relative to normal images' (ErrorReference)
    defect_map: F64Array  # (N, H, W), the defect head's probabilities, relative likewise
    latent_distance: F64Array  # (N, rows, columns), per latent cell, relative likewise
    coarse_error: F64Array  # (N, H/f, W/f), the coarse VAE's squared error, relative likewise

    def rows(self, index: slice) -> MapParts:
        """The parts of some images of the batch."""
        return MapParts(
            self.squared_error[index],
            self.defect_map[index],
            self.latent_distance[index],
            self.coarse_error[index],
        )


@dataclass(frozen=True)
class ErrorReference:
    """What normal images' error maps look like at each position: the mean over the training
    images (and their relit copies, as for :class:`LatentReference`) of the squared-error map
    and the defect head's map ``(H, W)`` and of the coarse VAE's squared-error map ``(h, w)``.

    The local, defect and coarse scores read each map divided by this mean (plus
    ``POSITION_FLOOR`` times its image-wide mean): what is hard to redraw on every good part
    (edges, busbars, texture) is discounted, and what is unusual where it lies stands out."""

    squared_error: F64Array
    defect_map: F64Array
    coarse_error: F64Array

    @classmethod
    def fit(cls, x: FloatArray, out: ModelOutputs) -> ErrorReference:
        """The means over a batch of normal images ``x`` and the graphs' outputs for them."""
        if x.shape[0] < 1:
            raise ValueError("an error reference needs at least one image")
        return cls(
            anomaly_map(x, out.recon).mean(axis=0, dtype=np.float64),
            np.asarray(out.defect_map).mean(axis=0, dtype=np.float64),
            anomaly_map(out.coarse_input, out.coarse_recon).mean(axis=0, dtype=np.float64),
        )

    @cached_property
    def _divisors(self) -> tuple[F64Array, F64Array, F64Array]:
        """Each mean map plus its floor, computed once rather than for every batch."""
        return (
            floored_mean(self.squared_error),
            floored_mean(self.defect_map),
            floored_mean(self.coarse_error),
        )

    def relative(
        self, squared_error: FloatArray, defect_map: FloatArray, coarse: FloatArray
    ) -> tuple[F64Array, F64Array, F64Array]:
        """Each map ``(N, ...)`` divided by its reference (plus the floor)."""
        local, defect, small = self._divisors
        return (
            _divided(squared_error, local),
            _divided(defect_map, defect),
            _divided(coarse, small),
        )


def _divided(maps: npt.NDArray[np.floating[Any]], divisor: F64Array) -> F64Array:
    if maps.shape[1:] != divisor.shape:
        raise ValueError(f"maps of shape {maps.shape[1:]}; the reference has {divisor.shape}")
    return np.asarray(maps / divisor)


def coarse_window(coarse_map: npt.NDArray[np.floating[Any]]) -> int:
    """The side of ``coarse_error``'s window on a coarse map ``(N, h, w)``."""
    return max(1, int(min(coarse_map.shape[1:])) // COARSE_WINDOW_DIVISOR)


def raw_scores(
    x: FloatArray,
    out: ModelOutputs,
    window: int,
    reference: LatentReference,
    errors: ErrorReference,
) -> tuple[dict[str, F64Array], MapParts]:
    """All raw scores of a batch, and the parts its anomaly maps are made of: the local, latent,
    defect and coarse maps relative to normal images' mean there (:class:`ErrorReference`,
    :class:`LatentReference`)."""
    squared_error = anomaly_map(x, out.recon)
    distances = reference.relative_distance_map(out.mu)
    local, defect, coarse = errors.relative(
        squared_error, out.defect_map, anomaly_map(out.coarse_input, out.coarse_recon)
    )
    scores = {
        "recon_error": recon_error_from_map(squared_error),
        "kl": kl_divergence(out.mu, out.logvar),
        "local_error": window_max(local, window),
        "latent_distance": window_max(distances, LATENT_WINDOW),
        "defect_probability": window_max(defect, window),
        "coarse_error": window_max(coarse, coarse_window(coarse)),
    }
    return scores, MapParts(local, defect, distances, coarse)


def box_mean(amap: npt.NDArray[np.floating[Any]], window: int) -> F64Array:
    """Mean of ``amap`` over the square of side ``window`` centred on each position, clipped at
    the borders: ``(N, H, W) -> (N, H, W)``."""
    _, h, w = amap.shape
    k = max(1, min(window, h, w))
    integral = _summed_area(amap)
    row0, row1 = _window_bounds(h, k)
    col0, col1 = _window_bounds(w, k)
    sums = (
        integral[:, row1][:, :, col1]
        - integral[:, row0][:, :, col1]
        - integral[:, row1][:, :, col0]
        + integral[:, row0][:, :, col0]
    )
    area = np.outer(row1 - row0, col1 - col0).astype(np.float64)
    return np.asarray(sums / area, dtype=np.float64)


def _window_bounds(size: int, window: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    start = np.arange(size) - window // 2
    return np.clip(start, 0, size), np.clip(start + window, 0, size)


def position_maps(raw: Mapping[str, F64Array], parts: MapParts, window: int) -> dict[str, F64Array]:
    """Each score's evidence at every pixel ``(N, H, W)``, in the units of the score: the local
    error and defect probability averaged over the window around the pixel, the latent distance
    of the cells around the pixel's cell, the coarse error averaged over its window around the
    pixel's coarse pixel; image-wide scores are the same everywhere."""
    n, h, w = parts.squared_error.shape
    cells = box_mean(parts.latent_distance, LATENT_WINDOW)
    coarse = box_mean(parts.coarse_error, coarse_window(parts.coarse_error))
    return {
        "recon_error": np.broadcast_to(np.asarray(raw["recon_error"])[:, None, None], (n, h, w)),
        "kl": np.broadcast_to(np.asarray(raw["kl"])[:, None, None], (n, h, w)),
        "local_error": box_mean(parts.squared_error, window),
        "latent_distance": _upsample(cells, h, w),
        "defect_probability": box_mean(parts.defect_map, window),
        "coarse_error": _upsample(coarse, h, w),
    }


def _upsample(grid: F64Array, height: int, width: int) -> F64Array:
    """Each pixel of a ``height x width`` image takes the value of the grid square it lies in."""
    rows = (np.arange(height) * grid.shape[1]) // height
    columns = (np.arange(width) * grid.shape[2]) // width
    return np.asarray(grid[:, rows][:, :, columns])


def empirical_p_values(reference_sorted: F64Array, scores: F64Array) -> F64Array:
    """Conformal p-values: ``(1 + #{reference >= s}) / (n + 1)`` for each score ``s``."""
    n = reference_sorted.shape[0]
    at_least = n - np.searchsorted(reference_sorted, scores, side="left")
    return np.asarray((1.0 + at_least) / (n + 1.0), dtype=np.float64)


def robust_centre_scale(values: F64Array) -> tuple[float, float]:
    """The median of ``values`` and ``MAD_TO_STD`` times their median absolute deviation (the
    standard deviation, for Gaussian data; 0 where more than half the values tie)."""
    centre = float(np.median(values))
    return centre, MAD_TO_STD * float(np.median(np.abs(values - centre)))


@dataclass(frozen=True)
class ScoreCalibration:
    """Held-out normal values of one score, sorted, and the centre and scale of their logarithm.

    The centre is the median and the scale the median absolute deviation (times 1.4826, the
    standard deviation for Gaussian data): a few parts in the "good" folder that are not good, a
    common sight in a factory's data, do not shift them the way they shift a mean and a standard
    deviation. Where more than half the held-out logs tie the deviation is 0, and the scale is
    their standard deviation instead."""

    values: tuple[float, ...]
    log_centre: float
    log_scale: float

    @classmethod
    def fit(cls, values: F64Array) -> ScoreCalibration:
        """Calibrate from the scores of held-out normal images."""
        if values.size < 2 or not np.all(np.isfinite(values)):
            raise ValueError(f"calibration needs at least 2 finite scores, got {values.tolist()!r}")
        logs = np.log(np.maximum(values, _LOG_FLOOR))
        centre, scale = robust_centre_scale(logs)
        if scale <= 0.0:
            scale = float(logs.std(ddof=1))
        return cls(
            values=tuple(float(v) for v in np.sort(values)),
            log_centre=centre,
            log_scale=max(scale, 1e-6),
        )

    def standardise(self, scores: F64Array) -> F64Array:
        """``(log(s) - centre) / scale`` of the held-out log scores."""
        return (np.log(np.maximum(scores, _LOG_FLOOR)) - self.log_centre) / self.log_scale

    def p_values(self, scores: F64Array) -> F64Array:
        """Conformal p-values against the held-out values."""
        return empirical_p_values(np.asarray(self.values, dtype=np.float64), scores)


@dataclass(frozen=True)
class DecisionRule:
    """``is_anomaly = combined >= threshold``, with the rate and method that set the threshold
    and how many held-out values were left out as outliers before setting it."""

    threshold: float
    target_false_alarm_rate: float
    method: ThresholdMethod
    outliers: int = 0


def without_outliers(combined_sorted: F64Array) -> F64Array:
    """The sorted held-out combined scores less those more than ``OUTLIER_DEVIATIONS`` robust
    standard deviations (``MAD_TO_STD`` times the median absolute deviation) above their median.

    With fewer than ``OUTLIER_MIN_VALUES`` values, or where more than half of them tie (a
    deviation of 0), nothing is left out."""
    if combined_sorted.shape[0] < OUTLIER_MIN_VALUES:
        return combined_sorted
    centre, scale = robust_centre_scale(combined_sorted)
    if scale <= 0.0:
        return combined_sorted
    kept = combined_sorted[combined_sorted <= centre + OUTLIER_DEVIATIONS * scale]
    return np.asarray(kept, dtype=np.float64)


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0 or not math.isfinite(rate):
        raise ValueError(f"target false-alarm rate is {rate}; expected a number in (0, 1)")


def _conformal_rank(n: int, rate: float) -> int:
    """The rank (from 1, smallest first) of the conformal threshold among ``n`` values."""
    return math.ceil((n + 1) * (1.0 - rate))


def fewest_for_conformal(rate: float) -> int:
    """The fewest held-out values for which :func:`threshold_for_rate` can set a conformal
    (``empirical``) threshold at ``rate`` (it does where that sits below the Gaussian bound at
    :func:`lowest_conformal_rate`); below it, the threshold is a Gaussian prediction bound."""
    _check_rate(rate)
    n = max(1, math.floor(1.0 / rate) - 2)
    while _conformal_rank(n, rate) > n:
        n += 1
    return n


def student_t_upper_quantile(rate: float, dof: int) -> float:
    """``t`` with ``P(T >= t) = rate`` for Student's t with ``dof`` degrees of freedom.

    Computed from the inverse regularised incomplete beta function of ``2 * rate`` (for rates
    below one half), which keeps its precision for rates far below the double spacing near 1."""
    _check_rate(rate)
    if dof < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {dof}")
    if rate > 0.5:
        return -student_t_upper_quantile(1.0 - rate, dof)
    if rate == 0.5:
        return 0.0
    x = float(betaincinv(dof / 2.0, 0.5, 2.0 * rate))
    return math.sqrt(dof * (1.0 - x) / x) if x > 0.0 else math.inf


@lru_cache(maxsize=8)
def _tail_lambda(kept: tuple[float, ...]) -> float:
    """:func:`service.tail.fit_lambda` of a bundle's kept held-out scores, fitted once: every
    request that asks its own rate reads the same values (the fit takes milliseconds)."""
    return tail.fit_lambda(np.asarray(kept, dtype=np.float64))


def threshold_for_rate(combined_sorted: F64Array, rate: float) -> DecisionRule:
    """Threshold on the combined score giving false-alarm rate ``rate`` on normal images.

    Held-out values far above the rest (:func:`without_outliers`) are left out first: a few
    parts in the "good" folder that are not good would otherwise raise the threshold for every
    part (a Gaussian fit's standard deviation grows with them). On the ``n`` values kept, the
    threshold is conformal when ``n`` is large enough: the ``ceil((n + 1)(1 - rate))``-th
    smallest, which bounds the false-alarm rate by ``rate``. With fewer than ``1 / rate - 1``
    values that order statistic does not exist, and the threshold is the Gaussian prediction
    bound of the values kept instead (method ``normal_tail``; :func:`fewest_for_conformal`):
    ``mean + sd * sqrt(1 + 1/n) * t``, ``t`` Student's upper ``rate`` quantile with ``n - 1``
    degrees of freedom, the bound a new normal image exceeds with probability ``rate`` when the
    mean and spread are themselves estimated from ``n`` images (a plain Gaussian quantile would
    take them as exact, and flag more than ``rate`` of good parts, the more so the fewer were
    held out). From ``TAIL_MIN_VALUES`` values kept, the bound is set on the values after a
    Yeo-Johnson transform fitted to them (:mod:`service.tail`) and mapped back: combined scores
    have a longer upper tail than a Gaussian, and a bound on them as they are flags more good
    parts than ``rate``. The transform only ever lengthens the tail assumed: where the values
    kept look shorter-tailed than a Gaussian, the bound is the one on them as they are.

    A higher rate never gets a higher threshold than a lower one. Every rate below
    ``1 / (n + 1)`` gets the Gaussian bound, so a conformal threshold above the bound at
    ``1 / (n + 1)`` (the lowest of them) is set to that bound (method ``normal_tail``): with few
    values more than needed, the conformal order statistic is one of the largest held out, and
    a client asking 3% would otherwise be given a higher threshold, and fewer alarms, than the
    default 1%.
    """
    _check_rate(rate)
    kept = without_outliers(combined_sorted)
    outliers = int(combined_sorted.shape[0] - kept.shape[0])
    n = kept.shape[0]
    k = _conformal_rank(n, rate)
    if k <= n:
        conformal = float(kept[k - 1])
        if n >= 2:
            ceiling = _conformal_ceiling(tuple(kept.tolist()))
            if conformal > ceiling:
                return DecisionRule(ceiling, rate, "normal_tail", outliers)
        return DecisionRule(conformal, rate, "empirical", outliers)
    if n < 2:
        raise ValueError(f"a threshold needs at least 2 held-out scores, got {n}")
    return DecisionRule(_normal_tail_bound(kept, rate), rate, "normal_tail", outliers)


def lowest_conformal_rate(n: int) -> float:
    """The smallest false-alarm rate whose conformal threshold ``n`` held-out values give,
    ``1 / (n + 1)``: its order statistic is the largest of them."""
    return 1.0 / (n + 1)


@lru_cache(maxsize=8)
def _conformal_ceiling(kept: tuple[float, ...]) -> float:
    """The Gaussian bound at :func:`lowest_conformal_rate` of a bundle's kept held-out scores:
    every lower rate gets the Gaussian bound, and this is the lowest of them. Computed once per
    held-out set, as every request that asks its own rate needs it."""
    return _normal_tail_bound(np.asarray(kept, dtype=np.float64), lowest_conformal_rate(len(kept)))


def _normal_tail_bound(kept: F64Array, rate: float) -> float:
    """The Gaussian prediction bound at ``rate`` of the ``n >= 2`` values ``kept``, set after
    their tail's transform from ``TAIL_MIN_VALUES`` of them and mapped back."""
    n = kept.shape[0]
    lam = _tail_lambda(tuple(kept.tolist())) if n >= TAIL_MIN_VALUES else tail.IDENTITY
    shaped = tail.transform(kept, lam)
    mean = float(shaped.mean())
    std = float(max(shaped.std(ddof=1), 1e-6))
    bound = mean + std * math.sqrt(1.0 + 1.0 / n) * student_t_upper_quantile(rate, n - 1)
    threshold = tail.inverse(bound, lam)
    if not math.isfinite(threshold):
        raise ValueError(
            f"target false-alarm rate {rate} is too small for a threshold from {n} held-out "
            "scores: the bound is beyond the largest double"
        )
    return threshold


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of a batch of images: raw scores, p-values, combined score and verdicts."""

    raw: dict[str, F64Array]
    p_values: dict[str, F64Array]
    combined: F64Array
    combined_p_value: F64Array
    threshold: float
    is_anomaly: npt.NDArray[np.bool_]
    anomaly_map: FloatArray | None = None
    latent_mean: FloatArray | None = None  # (N, D) posterior means, when asked for


@dataclass(frozen=True)
class Calibration:
    """Everything that turns raw scores into p-values, a combined score and a verdict."""

    scores: Mapping[str, ScoreCalibration]
    weights: Mapping[str, float]
    combined: ScoreCalibration
    rule: DecisionRule
    local_window: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        raw: Mapping[str, F64Array],
        weights: Mapping[str, float],
        *,
        target_false_alarm_rate: float,
        local_window: int,
        extra: Mapping[str, Any] | None = None,
    ) -> Calibration:
        """Calibrate every score and the combined score on held-out normal images."""
        missing = set(SCORE_NAMES) - set(raw)
        if missing:
            raise ValueError(f"calibration needs scores {sorted(missing)}")
        unknown = set(weights) - set(SCORE_NAMES)
        if unknown or not any(w != 0 for w in weights.values()):
            raise ValueError(
                f"weights {dict(weights)} must name scores among {SCORE_NAMES}, one non-zero"
            )
        per_score = {name: ScoreCalibration.fit(np.asarray(raw[name])) for name in SCORE_NAMES}
        combined_values = _combine(per_score, weights, raw)
        sorted_combined = np.sort(combined_values)
        # Combined scores can be negative, so the calibration keeps their raw moments for the
        # normal-tail threshold; its log centre and scale are unused.
        combined = ScoreCalibration(
            values=tuple(float(v) for v in sorted_combined), log_centre=0.0, log_scale=1.0
        )
        rule = threshold_for_rate(sorted_combined, target_false_alarm_rate)
        return cls(per_score, dict(weights), combined, rule, local_window, dict(extra or {}))

    def combine(self, raw: Mapping[str, F64Array]) -> F64Array:
        """Combined score: the soft maximum of the weighted standardised log scores."""
        return _combine(self.scores, self.weights, raw)

    def rule_for(
        self, *, threshold: float | None = None, target_false_alarm_rate: float | None = None
    ) -> DecisionRule:
        """The default rule, or one overridden by a threshold or a target false-alarm rate."""
        if threshold is not None and target_false_alarm_rate is not None:
            raise ValueError("give a threshold or a target false-alarm rate, not both")
        if threshold is not None:
            if not math.isfinite(threshold):
                raise ValueError(f"threshold is {threshold}; expected a finite number")
            return DecisionRule(float(threshold), float("nan"), self.rule.method)
        if target_false_alarm_rate is not None:
            return threshold_for_rate(
                np.asarray(self.combined.values, dtype=np.float64), target_false_alarm_rate
            )
        return self.rule

    def anomaly_map(self, raw: Mapping[str, F64Array], parts: MapParts) -> FloatArray:
        """The combined score at every pixel ``(N, H, W)``: the soft maximum of each score's
        weighted standardised log evidence there (:func:`position_maps`), on the scale of
        ``combined``."""
        maps = position_maps(raw, parts, self.local_window)
        return _combine(self.scores, self.weights, maps).astype(np.float32)

    def score(
        self,
        raw: Mapping[str, F64Array],
        rule: DecisionRule | None = None,
        parts: MapParts | None = None,
    ) -> ScoreBatch:
        """Turn raw scores into p-values, combined score and verdicts; anomaly maps when given
        the parts they are made of."""
        rule = rule or self.rule
        combined = self.combine(raw)
        amap = None if parts is None else self.anomaly_map(raw, parts)
        return ScoreBatch(
            raw={name: np.asarray(raw[name], dtype=np.float64) for name in SCORE_NAMES},
            p_values={name: self.scores[name].p_values(raw[name]) for name in SCORE_NAMES},
            combined=combined,
            combined_p_value=self.combined.p_values(combined),
            threshold=rule.threshold,
            is_anomaly=combined >= rule.threshold,
            anomaly_map=amap,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        return {
            "scores": {
                name: {
                    "values": list(c.values),
                    "log_centre": c.log_centre,
                    "log_scale": c.log_scale,
                }
                for name, c in self.scores.items()
            },
            "weights": dict(self.weights),
            "combined_values": list(self.combined.values),
            "rule": {
                "threshold": self.rule.threshold,
                "target_false_alarm_rate": self.rule.target_false_alarm_rate,
                "method": self.rule.method,
                "outliers": self.rule.outliers,
            },
            "local_window": self.local_window,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`."""
        scores = {
            name: ScoreCalibration(
                values=tuple(float(v) for v in entry["values"]),
                log_centre=float(entry["log_centre"]),
                log_scale=float(entry["log_scale"]),
            )
            for name, entry in data["scores"].items()
        }
        missing = set(SCORE_NAMES) - set(scores)
        if missing:
            raise ValueError(f"calibration lacks scores {sorted(missing)}")
        rule = data["rule"]
        if rule["method"] not in ("empirical", "normal_tail"):
            raise ValueError(f"unknown threshold method {rule['method']!r}")
        return cls(
            scores=scores,
            weights={k: float(v) for k, v in data["weights"].items()},
            combined=ScoreCalibration(
                values=tuple(float(v) for v in data["combined_values"]),
                log_centre=0.0,
                log_scale=1.0,
            ),
            rule=DecisionRule(
                float(rule["threshold"]),
                float(rule["target_false_alarm_rate"]),
                rule["method"],
                int(rule["outliers"]),
            ),
            local_window=int(data["local_window"]),
            extra=dict(data.get("extra", {})),
        )


def _combine(
    calibrations: Mapping[str, ScoreCalibration],
    weights: Mapping[str, float],
    raw: Mapping[str, F64Array],
) -> F64Array:
    """``log(sum(exp(w * z)))`` over the scores of non-zero weight ``w``, ``z`` each one's
    standardised log score, per image ``(N,)`` or per pixel ``(N, H, W)``.

    Within ``log(k)`` of the largest weighted term for ``k`` terms: a defect that only one score
    sees is flagged, several scores that agree add up, and a term far below zero adds nothing."""
    first = np.asarray(raw[SCORE_NAMES[0]])
    total = np.full(first.shape, -np.inf, dtype=np.float64)
    for name, weight in weights.items():
        if weight:
            np.logaddexp(
                total, weight * calibrations[name].standardise(np.asarray(raw[name])), out=total
            )
    return total
