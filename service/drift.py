"""Drift of "normal": a rolling window of recent images and two statistics of it.

For normal parts the combined p-value is uniform (conformal p-values over ``n`` held-out normal
images take the values ``1/(n+1), ..., 1`` with equal chance), and the posterior means scatter
around the mean of the held-out normal images. A camera that moved, a lamp that aged or a new
supplier's parts shift both, before the anomaly rate says anything clear. So the server keeps the
combined p-values and posterior means of its last ``window`` images (per model: a reload starts a
fresh window) and exports:

- ``p_value_ks``: the Kolmogorov-Smirnov distance between the window's p-values and the discrete
  uniform distribution on ``{1/(n+1), ..., 1}`` (compared at those values only: against the
  continuous uniform, discreteness alone would add up to ``1/(n+1)``);
- ``latent_shift``: the root mean square, over latent dimensions, of the window's mean posterior
  mean minus the held-out images' mean, in units of the held-out images' standard deviation.

What normal traffic gives. Both statistics compare the window with the held-out images, so both
carry the held-out set's own sampling error as well as the window's: of order
``sqrt(1/n + 1/window)`` (the KS distance is the two-sample KS statistic of the window's combined
scores against the held-out ones; for the latent shift, each dimension's standardised difference of
means has variance ``1/count + 1/window`` for independent images, so its RMS is about that much).
The default thresholds (``0`` in the flags) are those multiples of it that normal traffic exceeds
with a chance of about 0.1%: the Kolmogorov distribution's 99.9% point for the KS distance, and the
normal distribution's two-sided 0.1% point for the latent shift (exact if all dimensions moved
together, conservative otherwise). The held-out set is fixed per bundle, so this is the chance that
a bundle's held-out images are so untypical that normal traffic alarms, not a rate of alarms.

Cost: per image O(latent size) numpy, in calls made once for many images (when the gauges are
read, or when a window's worth of images is waiting): per ONNX Runtime batch the inference thread
only hands its arrays over.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from service.metrics import ServiceMetrics
from service.scoring import Calibration, F64Array, FloatArray, LatentBaseline

log = logging.getLogger(__name__)

# The chance that normal traffic exceeds a default threshold (see the module doc).
DEFAULT_THRESHOLD_CHANCE = 0.001
KOLMOGOROV_FACTOR = math.sqrt(-math.log(DEFAULT_THRESHOLD_CHANCE / 2) / 2)  # 1.95
NORMAL_FACTOR = NormalDist().inv_cdf(1 - DEFAULT_THRESHOLD_CHANCE / 2)  # 3.29
# A latent dimension whose held-out spread is below this share of the largest one does not vary
# (float32 noise at most): it is left out of the latent shift rather than divided by ~0.
CONSTANT_DIMENSION = 1e-6


def varying_dimensions(baseline: LatentBaseline) -> npt.NDArray[np.bool_]:
    """Boolean mask ``(D,)`` of the latent dimensions whose held-out spread is not ~0."""
    largest = float(baseline.std.max(initial=0.0))
    return np.asarray((baseline.std > CONSTANT_DIMENSION * largest) & (largest > 0))


@dataclass(frozen=True)
class DriftThresholds:
    """What the drift window of one model uses: its size and the two thresholds."""

    window: int
    p_value_ks: float
    latent_shift: float
    latent_dimensions: int  # dimensions that vary, over which the latent shift is taken


@dataclass(frozen=True)
class DriftSettings:
    """The server's drift options: the window size (0: off) and the thresholds (0: default)."""

    window: int
    p_value_ks_threshold: float = 0.0
    latent_shift_threshold: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the server keeps a drift window at all."""
        return self.window > 0

    def for_model(self, calibration_size: int, baseline: LatentBaseline) -> DriftThresholds:
        """The thresholds for a model calibrated on ``calibration_size`` held-out images."""
        if not self.enabled:
            raise ValueError("drift watching is off (a window of 0 images): no thresholds")
        ks = self.p_value_ks_threshold or KOLMOGOROV_FACTOR * math.sqrt(
            1 / calibration_size + 1 / self.window
        )
        latent = self.latent_shift_threshold or NORMAL_FACTOR * math.sqrt(
            1 / baseline.count + 1 / self.window
        )
        dimensions = int(np.count_nonzero(varying_dimensions(baseline)))
        return DriftThresholds(self.window, ks, latent, dimensions)


class DriftWindow:
    """The combined p-values and posterior means of the last ``size`` images, in a ring buffer.

    Adding images costs O(latent size) each; the statistics cost O(n + latent size).
    """

    def __init__(self, size: int, calibration_size: int, baseline: LatentBaseline) -> None:
        if size < 1 or calibration_size < 1:
            raise ValueError(f"a drift window needs size >= 1 and a calibration; got {size}")
        self.size = size
        self.levels = calibration_size + 1  # p-values are k / levels, k = 1 .. levels
        self._baseline_mean = baseline.mean
        used = varying_dimensions(baseline)
        self._inverse_std = np.where(used, 1.0 / np.where(used, baseline.std, 1.0), 0.0)
        self._dimensions = int(np.count_nonzero(used))
        self._bins = np.zeros(size, dtype=np.intp)  # the p-value level of each slot, 0-based
        self._mu = np.zeros((size, baseline.mean.shape[0]), dtype=np.float64)
        self._counts = np.zeros(self.levels, dtype=np.int64)  # images per p-value level
        self._sum = np.zeros(baseline.mean.shape[0], dtype=np.float64)  # of the window's mu
        self._next = 0
        self.count = 0
        self._since_exact = 0
        self._expected_cdf = np.arange(1, self.levels + 1, dtype=np.float64) / self.levels

    @property
    def full(self) -> bool:
        """Whether the window holds ``size`` images."""
        return self.count == self.size

    def add(self, p_values: F64Array, mu: FloatArray) -> None:
        """Add images: their combined p-values ``(N,)`` and posterior means ``(N, D)``."""
        if p_values.shape[0] != mu.shape[0] or mu.shape[1:] != self._sum.shape:
            raise ValueError(
                f"drift window of {self._sum.shape[0]} latent dimensions got p-values "
                f"{p_values.shape} and posterior means {mu.shape}"
            )
        bins = np.rint(np.asarray(p_values, dtype=np.float64) * self.levels).astype(np.intp) - 1
        if bins.size and (bins.min() < 0 or bins.max() >= self.levels):
            raise ValueError(f"{p_values.tolist()} are not conformal p-values of this model")
        mu64 = np.asarray(mu, dtype=np.float64)
        if bins.shape[0] > self.size:  # more images than the window holds: the last ones
            bins, mu64 = bins[-self.size :], mu64[-self.size :]
        added = bins.shape[0]
        slots = (self._next + np.arange(added)) % self.size
        # The free slots come first (the window fills from slot 0); then the oldest images.
        evicted = slots[added - max(0, self.count + added - self.size) :]
        if evicted.size:
            self._counts -= np.bincount(self._bins[evicted], minlength=self.levels)
            self._sum -= self._mu[evicted].sum(axis=0)
        self._bins[slots] = bins
        self._mu[slots] = mu64
        self._counts += np.bincount(bins, minlength=self.levels)
        self._sum += mu64.sum(axis=0)
        self._next = (self._next + added) % self.size
        self.count = min(self.size, self.count + added)
        self._since_exact += added
        if self._since_exact >= self.size:  # keep rounding errors of the running sum bounded
            self._sum = self._mu[: self.count].sum(axis=0)
            self._since_exact = 0

    def p_value_ks(self) -> float:
        """KS distance of the window's p-values from the discrete uniform; NaN when empty."""
        if self.count == 0:
            return math.nan
        cdf = np.cumsum(self._counts) / self.count
        return float(np.abs(cdf - self._expected_cdf).max())

    def latent_shift(self) -> float:
        """RMS over varying dimensions of the standardised shift of the window's mean posterior
        mean from the held-out images'; NaN when empty or when no dimension varies."""
        if self.count == 0 or self._dimensions == 0:
            return math.nan
        z = (self._sum / self.count - self._baseline_mean) * self._inverse_std
        return float(math.sqrt(float(np.dot(z, z)) / self._dimensions))


@dataclass
class _Watched:
    """The model in service: its window, and the batches scored since the window was updated."""

    key: object
    calibration: Calibration
    window: DriftWindow
    raw: list[Mapping[str, F64Array]] = field(default_factory=list)
    mu: list[FloatArray] = field(default_factory=list)
    pending: int = 0  # images in ``raw`` and ``mu``

    def flush(self) -> None:
        """Add the pending batches to the window: one combined score and p-value computation
        for all of them, as :meth:`Calibration.score` does it (neither depends on a request's
        decision rule)."""
        if not self.pending:
            return
        raw = {name: np.concatenate([batch[name] for batch in self.raw]) for name in self.raw[0]}
        p_values = self.calibration.combined.p_values(self.calibration.combine(raw))
        self.window.add(p_values, np.concatenate(self.mu))
        self.raw, self.mu, self.pending = [], [], 0


class DriftMonitor:
    """The drift window of the model in service, exported as gauges.

    :meth:`start` (at start-up and after each reload, on the event loop) begins a fresh window for
    a model; :meth:`observe` (once per batch, in the inference thread) hands it a batch's raw
    scores and posterior means when they were computed by that model (batches of a model already
    replaced are left out). The batches are added to the window when the gauges are read (a
    scrape) or when a window's worth is waiting, so that the numpy calls are paid once for many
    images rather than once per batch. The statistics are published once the window is full (NaN
    before): a partly filled window after a reload would read as drift.
    """

    def __init__(self, settings: DriftSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._lock = threading.Lock()
        self._current: _Watched | None = None

    def start(
        self,
        key: object,
        *,
        model_id: str,
        model_version: str,
        calibration: Calibration,
        baseline: LatentBaseline,
    ) -> None:
        """Begin a fresh window for the model ``key`` (the model object batches are run with),
        whose scores ``calibration`` turns into p-values."""
        if not self.settings.enabled:
            return
        calibration_size = len(calibration.combined.values)
        thresholds = self.settings.for_model(calibration_size, baseline)
        metrics = self._metrics
        labels = (model_id, model_version)
        window = DriftWindow(thresholds.window, calibration_size, baseline)
        watched = _Watched(key, calibration, window)
        with self._lock:
            for gauge in metrics.drift_gauges():
                gauge.clear()
            metrics.drift_window_size.labels(*labels).set(thresholds.window)
            metrics.drift_p_value_ks_threshold.labels(*labels).set(thresholds.p_value_ks)
            metrics.drift_latent_shift_threshold.labels(*labels).set(thresholds.latent_shift)
            metrics.drift_window.labels(*labels).set_function(
                partial(self._read, watched, lambda window: float(window.count))
            )
            metrics.drift_p_value_ks.labels(*labels).set_function(
                partial(self._read, watched, _when_full(DriftWindow.p_value_ks))
            )
            metrics.drift_latent_shift.labels(*labels).set_function(
                partial(self._read, watched, _when_full(DriftWindow.latent_shift))
            )
            self._current = watched
        log.info(
            "drift of model %s: window of %d images, p-value KS threshold %.3f, latent shift "
            "threshold %.3f over %d of %d latent dimensions",
            model_id,
            thresholds.window,
            thresholds.p_value_ks,
            thresholds.latent_shift,
            thresholds.latent_dimensions,
            baseline.mean.shape[0],
        )
        most = 1.0 - 1.0 / (calibration_size + 1)
        if thresholds.p_value_ks >= most:
            log.warning(
                "drift of model %s: with %d held-out images the p-value KS distance is at most "
                "%.3f, below its threshold %.3f: that test cannot fire. Set --drift-ks-threshold "
                "below it, or calibrate on more held-out images",
                model_id,
                calibration_size,
                most,
                thresholds.p_value_ks,
            )

    def observe(self, key: object, raw: Mapping[str, F64Array], mu: FloatArray) -> None:
        """Hand over a batch's raw scores ``{name: (N,)}`` and posterior means ``(N, D)``, if
        ``key`` is the model in service."""
        with self._lock:
            watched = self._current
            if watched is None or watched.key is not key:
                return
            watched.raw.append(raw)
            watched.mu.append(mu)
            watched.pending += mu.shape[0]
            if watched.pending >= watched.window.size:
                watched.flush()

    def _read(self, watched: _Watched, statistic: Callable[[DriftWindow], float]) -> float:
        """A gauge's value (in the thread that collects the metrics): the window brought up to
        date first."""
        with self._lock:
            watched.flush()
            return statistic(watched.window)


def _when_full(statistic: Callable[[DriftWindow], float]) -> Callable[[DriftWindow], float]:
    """``statistic`` of a full window, NaN before."""

    def published(window: DriftWindow) -> float:
        return statistic(window) if window.full else math.nan

    return published
