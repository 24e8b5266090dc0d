"""The drift window and its statistics (service/drift.py), against their definitions, and the drift
a real server publishes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from service.client import Client
from service.drift import (
    KOLMOGOROV_FACTOR,
    NORMAL_FACTOR,
    DriftMonitor,
    DriftSettings,
    DriftWindow,
)
from service.metrics import ServiceMetrics
from service.model_slot import LoadedModel, load_model
from service.preprocessing import load_image_file, stack
from service.scoring import (
    SCORE_NAMES,
    Calibration,
    F64Array,
    LatentBaseline,
    empirical_p_values,
)
from service.server import ServerThread
from tests.service_helpers import demo_test_images, random_pixels, scrape, serve_config

CALIBRATION = 9  # p-values k / 10, k = 1 .. 10
D = 6


def baseline(std: F64Array | None = None, count: int = 20) -> LatentBaseline:
    mean = np.linspace(-1.0, 1.0, D)
    return LatentBaseline(mean, np.full(D, 0.5) if std is None else std, count)


def levels(*ks: int) -> F64Array:
    """Conformal p-values k / (n + 1)."""
    return np.asarray(ks, dtype=np.float64) / (CALIBRATION + 1)


def latents(rows: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.asarray(rows, dtype=np.float32).reshape(-1, D)


def ks_by_definition(p: F64Array) -> float:
    grid = np.arange(1, CALIBRATION + 2) / (CALIBRATION + 1)
    cdf = np.array([np.mean(p <= g + 1e-12) for g in grid])
    return float(np.abs(cdf - grid).max())


def shift_by_definition(mu: F64Array, base: LatentBaseline) -> float:
    z = (mu.mean(axis=0) - base.mean) / base.std
    return float(np.sqrt(np.mean(z**2)))


def test_uniform_p_values_and_the_baseline_mean_give_zero() -> None:
    base = baseline()
    window = DriftWindow(CALIBRATION + 1, CALIBRATION, base)
    window.add(levels(*range(1, CALIBRATION + 2)), latents(np.tile(base.mean, CALIBRATION + 1)))
    assert window.full
    assert window.p_value_ks() == pytest.approx(0.0, abs=1e-12)
    assert window.latent_shift() == pytest.approx(0.0, abs=1e-6)


def test_the_extremes() -> None:
    base = baseline()
    window = DriftWindow(4, CALIBRATION, base)
    # Every image more anomalous than every held-out one: F(1/(n+1)) = 1 against 1/(n+1).
    window.add(levels(1, 1, 1, 1), latents(np.tile(base.mean + base.std, 4)))
    assert window.p_value_ks() == pytest.approx(CALIBRATION / (CALIBRATION + 1))
    # One standard deviation in every dimension: a shift of exactly 1.
    assert window.latent_shift() == pytest.approx(1.0, rel=1e-6)
    # Less anomalous than every held-out one: F is 0 below 1, the distance n/(n+1) again.
    window.add(levels(10, 10, 10, 10), latents(np.tile(base.mean - 2 * base.std, 4)))
    assert window.p_value_ks() == pytest.approx(CALIBRATION / (CALIBRATION + 1))
    assert window.latent_shift() == pytest.approx(2.0, rel=1e-6)


def test_a_rolling_window_keeps_exactly_the_last_images() -> None:
    """Batches of every size, larger than the window too; statistics equal those computed from
    scratch on the last ``size`` images, long after the running sum was first refreshed."""
    rng = np.random.default_rng(0)
    base = baseline(std=rng.uniform(0.1, 2.0, D))
    size = 7
    window = DriftWindow(size, CALIBRATION, base)
    all_p: list[float] = []
    all_mu: list[npt.NDArray[np.float32]] = []
    for batch in [1, 3, 2, 9, 1, 1, 5, 7, 4, 12, 2, 3] * 5:
        p = levels(*rng.integers(1, CALIBRATION + 2, batch))
        mu = latents(rng.normal(0.3, 1.0, (batch, D)))
        window.add(p, mu)
        all_p += p.tolist()
        all_mu += list(mu)
        last = min(size, len(all_p))
        assert window.count == last
        assert window.full == (last == size)
        expected_p = np.asarray(all_p[-last:])
        expected_mu = np.asarray(all_mu[-last:], dtype=np.float64)
        assert window.p_value_ks() == pytest.approx(ks_by_definition(expected_p), abs=1e-12)
        assert window.latent_shift() == pytest.approx(
            shift_by_definition(expected_mu, base), rel=1e-9
        )


def test_dimensions_that_never_vary_are_left_out() -> None:
    std = np.array([0.5, 0.0, 0.5, 1e-12, 0.5, 0.5])
    base = baseline(std=std)
    window = DriftWindow(2, CALIBRATION, base)
    moved = base.mean + np.where(std > 1e-9, std, 5.0)  # constant dimensions moved too
    window.add(levels(3, 4), latents(np.tile(moved, 2)))
    assert math.isfinite(window.latent_shift())
    assert window.latent_shift() == pytest.approx(1.0, rel=1e-6)
    assert DriftSettings(8).for_model(CALIBRATION, base).latent_dimensions == 4
    nothing_varies = DriftWindow(2, CALIBRATION, baseline(std=np.zeros(D)))
    nothing_varies.add(levels(3, 4), latents(np.tile(base.mean, 2)))
    assert math.isnan(nothing_varies.latent_shift())


def test_an_empty_window_has_no_statistics_and_foreign_p_values_are_refused() -> None:
    window = DriftWindow(4, CALIBRATION, baseline())
    assert math.isnan(window.p_value_ks()) and math.isnan(window.latent_shift())
    with pytest.raises(ValueError, match="not conformal p-values"):
        window.add(np.array([0.0]), latents(np.zeros(D)))
    with pytest.raises(ValueError, match="latent dimensions"):
        window.add(levels(1), np.zeros((1, D + 1), dtype=np.float32))


def test_default_thresholds_scale_with_the_held_out_set_and_the_window() -> None:
    base = baseline(count=16)
    defaults = DriftSettings(128).for_model(16, base)
    assert defaults.window == 128
    assert defaults.p_value_ks == pytest.approx(1.9495 * math.sqrt(1 / 16 + 1 / 128), rel=1e-4)
    assert defaults.latent_shift == pytest.approx(3.2905 * math.sqrt(1 / 16 + 1 / 128), rel=1e-4)
    assert round(KOLMOGOROV_FACTOR, 4) == 1.9495
    assert round(NORMAL_FACTOR, 4) == 3.2905
    explicit = DriftSettings(128, 0.4, 2.5).for_model(16, base)
    assert (explicit.p_value_ks, explicit.latent_shift) == (0.4, 2.5)
    assert not DriftSettings(0).enabled
    with pytest.raises(ValueError, match="off"):
        DriftSettings(0).for_model(16, base)


def test_normal_traffic_stays_under_the_default_thresholds() -> None:
    """Draws of the null hypothesis: exchangeable scores and Gaussian latents."""
    rng = np.random.default_rng(1)
    n, size = 16, 128
    rows = rng.normal(size=(n + 2000, D))
    base = LatentBaseline(rows[:n].mean(0), rows[:n].std(0, ddof=1), n)
    thresholds = DriftSettings(size).for_model(n, base)
    calibration = np.sort(rng.normal(size=n))
    window = DriftWindow(size, n, base)
    worst_ks = worst_shift = 0.0
    for start in range(n, n + 2000, 16):
        p_values = empirical_p_values(calibration, rng.normal(size=16))
        window.add(p_values, latents_of(rows[start : start + 16]))
        if window.full:
            worst_ks = max(worst_ks, window.p_value_ks())
            worst_shift = max(worst_shift, window.latent_shift())
    assert 0 < worst_ks < thresholds.p_value_ks
    assert 0 < worst_shift < thresholds.latent_shift


def latents_of(rows: F64Array) -> npt.NDArray[np.float32]:
    return np.asarray(rows, dtype=np.float32)


# --- the monitor: gauges, per model ----------------------------------------------------------


def gauge(registry: CollectorRegistry, name: str, model: str) -> float | None:
    return registry.get_sample_value(name, {"model_id": model, "model_version": "v"})


def held_out(count: int = CALIBRATION) -> Calibration:
    """A calibration on ``count`` held-out images whose combined score is log(recon_error)."""
    values = np.arange(1.0, count + 1.0)
    raw = {name: values for name in SCORE_NAMES}
    return Calibration.fit(raw, {"recon_error": 1.0}, target_false_alarm_rate=0.1, local_window=3)


def scored(*recon_errors: float) -> dict[str, F64Array]:
    """Raw scores of images: a recon_error above every held-out one has p-value 1/(n+1), one
    below them all p-value 1."""
    values = np.asarray(recon_errors, dtype=np.float64)
    return {name: values for name in SCORE_NAMES}


def start(monitor: DriftMonitor, key: object, model: str, base: LatentBaseline) -> None:
    monitor.start(key, model_id=model, model_version="v", calibration=held_out(), baseline=base)


def test_the_monitor_publishes_once_full_and_starts_afresh_for_a_new_model() -> None:
    registry = CollectorRegistry()
    monitor = DriftMonitor(DriftSettings(4, 0.3, 1.5), ServiceMetrics(registry))
    base = baseline()
    first, second = object(), object()
    start(monitor, first, "m1", base)
    assert gauge(registry, "anomaly_drift_window_images", "m1") == 0
    assert gauge(registry, "anomaly_drift_window_size_images", "m1") == 4
    assert gauge(registry, "anomaly_drift_p_value_ks_threshold", "m1") == 0.3
    assert gauge(registry, "anomaly_drift_latent_shift_threshold", "m1") == 1.5
    monitor.observe(first, scored(100, 100, 100), latents(np.tile(base.mean + base.std, 3)))
    assert gauge(registry, "anomaly_drift_window_images", "m1") == 3
    assert math.isnan(gauge(registry, "anomaly_drift_p_value_ks_statistic", "m1") or 0.0)
    assert math.isnan(gauge(registry, "anomaly_drift_latent_shift", "m1") or 0.0)
    monitor.observe(first, scored(100), latents(base.mean + base.std))
    assert gauge(registry, "anomaly_drift_p_value_ks_statistic", "m1") == pytest.approx(0.9)
    assert gauge(registry, "anomaly_drift_latent_shift", "m1") == pytest.approx(1.0, rel=1e-6)

    start(monitor, second, "m2", base)  # a reload
    for name in ("anomaly_drift_window_images", "anomaly_drift_p_value_ks_threshold"):
        assert gauge(registry, name, "m1") is None, name
    assert gauge(registry, "anomaly_drift_window_images", "m2") == 0
    # A batch the replaced model was still running is left out.
    monitor.observe(first, scored(100), latents(base.mean))
    assert gauge(registry, "anomaly_drift_window_images", "m2") == 0
    assert gauge(registry, "anomaly_drift_window_images", "m1") is None
    monitor.observe(second, scored(5.5), latents(base.mean))
    assert gauge(registry, "anomaly_drift_window_images", "m2") == 1


def test_the_gauges_are_those_of_the_last_images_however_batches_and_scrapes_fall() -> None:
    """Batches are added to the window in bulk (at a read, or when a window's worth waits)."""
    rng = np.random.default_rng(2)
    registry = CollectorRegistry()
    monitor = DriftMonitor(DriftSettings(8, 0.3, 1.5), ServiceMetrics(registry))
    base = baseline()
    key = object()
    start(monitor, key, "m1", base)
    expected = DriftWindow(8, CALIBRATION, base)
    calibration = held_out()
    for step, batch in enumerate([1, 2, 5, 9, 1, 3, 20, 2, 1, 1, 4] * 3):
        raw = scored(*rng.uniform(0.5, 12.0, batch))
        mu = latents(rng.normal(0.0, 1.0, (batch, D)))
        monitor.observe(key, raw, mu)
        expected.add(calibration.combined.p_values(calibration.combine(raw)), mu)
        if step % 3 == 0:  # scrapes now and then
            ks = gauge(registry, "anomaly_drift_p_value_ks_statistic", "m1")
            shift = gauge(registry, "anomaly_drift_latent_shift", "m1")
            assert gauge(registry, "anomaly_drift_window_images", "m1") == expected.count
            if expected.full:
                assert ks == pytest.approx(expected.p_value_ks(), abs=1e-12)
                assert shift == pytest.approx(expected.latent_shift(), rel=1e-9)


def test_a_disabled_monitor_exports_nothing() -> None:
    registry = CollectorRegistry()
    monitor = DriftMonitor(DriftSettings(0), ServiceMetrics(registry))
    key = object()
    start(monitor, key, "m1", baseline())
    monitor.observe(key, scored(100), latents(np.zeros(D)))
    assert not [
        sample
        for family in registry.collect()
        if family.name.startswith("anomaly_drift")
        for sample in family.samples
    ]


def test_a_threshold_the_held_out_set_cannot_reach_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = DriftMonitor(DriftSettings(32), ServiceMetrics(CollectorRegistry()))
    with caplog.at_level(logging.WARNING, logger="service.drift"):
        monitor.start(
            object(), model_id="m", model_version="v", calibration=held_out(5), baseline=baseline()
        )
    (record,) = caplog.records
    assert "with 5 held-out images the p-value KS distance is at most 0.833" in record.message
    assert "--drift-ks-threshold" in record.message


# --- on a real server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


def drift_samples(port: int) -> dict[str, float]:
    return {name: value for (name, _), value in scrape(port).items() if "drift" in name}


def test_a_server_publishes_the_drift_of_what_it_scored(
    trained_bundle: Path, model: LoadedModel, demo_data: Path
) -> None:
    paths = demo_test_images(demo_data)[:6]
    x = stack([load_image_file(p, model.spec) for p in paths])
    raw, _, mu = model.scorer.raw_scores(x)
    p = model.calibration.combined.p_values(model.calibration.combine(raw))
    expected = DriftWindow(4, model.calibration_size, model.latent_baseline)
    expected.add(p, mu)  # the last 4 of the 6
    config = serve_config(trained_bundle, drift_window=4, drift_ks_threshold=0.5)
    with (
        ServerThread(config, model=model) as running,
        Client(f"127.0.0.1:{running.port}", retries=0) as client,
    ):
        client.score(paths[:3], threshold=-1e6)  # a request's rule makes no difference
        assert drift_samples(running.metrics_port)["anomaly_drift_window_images"] == 3
        client.score(paths[3:])
        samples = drift_samples(running.metrics_port)
        info = client.info()
        running.reload()  # the same bundle, loaded again: a fresh window all the same
        reloaded = drift_samples(running.metrics_port)
    assert samples["anomaly_drift_window_images"] == 4
    assert samples["anomaly_drift_p_value_ks_statistic"] == pytest.approx(expected.p_value_ks())
    assert samples["anomaly_drift_latent_shift"] == pytest.approx(expected.latent_shift())
    assert samples["anomaly_drift_p_value_ks_threshold"] == info.drift.p_value_ks_threshold == 0.5
    assert samples["anomaly_drift_latent_shift_threshold"] == info.drift.latent_shift_threshold
    assert info.drift.window_size == samples["anomaly_drift_window_size_images"] == 4
    assert reloaded["anomaly_drift_window_images"] == 0
    assert math.isnan(reloaded["anomaly_drift_p_value_ks_statistic"])


def test_drift_can_be_turned_off(trained_bundle: Path, model: LoadedModel) -> None:
    config = serve_config(trained_bundle, drift_window=0)
    with (
        ServerThread(config, model=model) as running,
        Client(f"127.0.0.1:{running.port}", retries=0) as client,
    ):
        assert client.score([random_pixels(1)])[0].ok
        assert drift_samples(running.metrics_port) == {}
        assert not client.info().HasField("drift")
