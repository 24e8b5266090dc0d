"""Scoring maths and calibration (service/scoring.py)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from service.scoring import (
    Calibration,
    ScoreCalibration,
    anomaly_map,
    empirical_p_values,
    kl_divergence,
    local_error,
    raw_scores,
    threshold_for_rate,
)


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form() -> None:
    mu = np.zeros((2, 4), dtype=np.float32)
    logvar = np.zeros((2, 4), dtype=np.float32)
    assert kl_divergence(mu, logvar).tolist() == [0.0, 0.0]
    mu[1, 0], logvar[1, 1] = 2.0, math.log(3.0)
    # 1/2 * (mu^2) + 1/2 * (sigma^2 - log sigma^2 - 1) for the two non-trivial dimensions
    expected = 0.5 * 4.0 + 0.5 * (3.0 - math.log(3.0) - 1.0)
    assert kl_divergence(mu, logvar)[1] == pytest.approx(expected, rel=1e-6)


def test_recon_error_and_map_agree_with_the_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 8, 6), dtype=np.float32)
    recon = rng.random((3, 3, 8, 6), dtype=np.float32)
    mu = rng.standard_normal((3, 5)).astype(np.float32)
    raw, amap = raw_scores(x, mu, np.zeros_like(mu), recon, window=3)
    assert amap.shape == (3, 8, 6)
    np.testing.assert_allclose(amap, ((x - recon) ** 2).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(raw["recon_error"], ((x - recon) ** 2).mean(axis=(1, 2, 3)), 1e-6)


def test_local_error_is_the_brute_force_window_maximum() -> None:
    rng = np.random.default_rng(1)
    amap = rng.random((2, 9, 7)).astype(np.float32)
    for window in (1, 3, 7, 20):
        k = min(window, 9, 7)
        brute = [
            max(
                float(amap[n, i : i + k, j : j + k].mean())
                for i in range(9 - k + 1)
                for j in range(7 - k + 1)
            )
            for n in range(2)
        ]
        np.testing.assert_allclose(local_error(amap, window), brute, rtol=1e-6)


def test_local_error_finds_a_small_defect_the_mean_barely_sees() -> None:
    x = np.zeros((2, 1, 32, 32), dtype=np.float32)
    recon = x.copy()
    recon[1, 0, 10:14, 20:24] = 0.5
    amap = anomaly_map(x, recon)
    assert local_error(amap, 4)[1] == pytest.approx(0.25)
    assert amap[1].mean() == pytest.approx(0.25 * 16 / 1024)


def test_empirical_p_values_count_ties_as_at_least_as_high() -> None:
    reference = np.array([1.0, 2.0, 2.0, 3.0])
    p = empirical_p_values(reference, np.array([0.5, 2.0, 3.5]))
    np.testing.assert_allclose(p, [5 / 5, 4 / 5, 1 / 5])


def test_p_values_are_uniform_on_normal_data() -> None:
    # Conformal p-values are uniform over draws of the calibration set and the new image: with
    # n = 99 held-out images, P(p <= alpha) = alpha exactly for alpha a multiple of 1/100.
    rng = np.random.default_rng(2)
    p = np.concatenate(
        [
            ScoreCalibration.fit(rng.lognormal(size=99)).p_values(rng.lognormal(size=100))
            for _ in range(300)
        ]
    )
    for alpha in (0.01, 0.05, 0.1, 0.5):
        assert np.mean(p <= alpha) == pytest.approx(alpha, abs=0.01)


def test_threshold_is_conformal_with_enough_images_and_gaussian_otherwise() -> None:
    rng = np.random.default_rng(3)
    many = np.sort(rng.standard_normal(999))
    rule = threshold_for_rate(many, 0.01)
    assert rule.method == "empirical"
    assert rule.threshold == many[math.ceil(1000 * 0.99) - 1]
    few = np.sort(rng.standard_normal(40))
    rule = threshold_for_rate(few, 0.01)
    assert rule.method == "normal_tail"
    assert rule.threshold == pytest.approx(few.mean() + 2.3263 * few.std(ddof=1), rel=1e-3)


@pytest.mark.parametrize(
    "rate", [5e-324, 1e-300, 1e-17, 1.1e-16, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-16, 0.9999999999999999]
)
def test_every_rate_strictly_between_0_and_1_gives_a_finite_threshold(rate: float) -> None:
    # Rates below ~1.1e-16 used to round 1 - rate to 1.0 and fail in inv_cdf(1.0).
    few = np.sort(np.random.default_rng(6).standard_normal(40))
    rule = threshold_for_rate(few, rate)
    assert math.isfinite(rule.threshold) and rule.target_false_alarm_rate == rate
    if rule.method == "normal_tail":
        z = (rule.threshold - few.mean()) / few.std(ddof=1)
        assert NormalDist().cdf(-z) == pytest.approx(rate, rel=1e-6)


def test_smaller_rates_give_higher_thresholds_down_to_the_smallest_double() -> None:
    few = np.sort(np.random.default_rng(7).standard_normal(40))
    rates = [0.5, 0.1, 1e-3, 1e-9, 1e-16, 1e-17, 1e-100, 1e-300, 5e-324]
    thresholds = [threshold_for_rate(few, rate).threshold for rate in rates]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(rates)


def test_false_alarm_rate_of_the_calibrated_threshold_is_near_the_target() -> None:
    rng = np.random.default_rng(4)

    def normal_scores(n: int) -> dict[str, np.ndarray]:
        return {
            "recon_error": rng.lognormal(-5, 0.3, n),
            "kl": rng.lognormal(3, 0.2, n),
            "local_error": rng.lognormal(-3, 0.4, n),
        }

    calibration = Calibration.fit(
        normal_scores(2000),
        {"recon_error": 1.0, "local_error": 1.0},
        target_false_alarm_rate=0.05,
        local_window=8,
    )
    scored = calibration.score(normal_scores(20_000))
    assert scored.is_anomaly.mean() == pytest.approx(0.05, abs=0.01)
    assert scored.combined_p_value.min() > 0.0


@pytest.mark.parametrize(
    ("weights", "match"),
    [({"ssim": 1.0}, "weights"), ({"kl": 0.0}, "weights")],
)
def test_calibration_rejects_bad_weights(weights: dict[str, float], match: str) -> None:
    raw = {name: np.ones(5) for name in ("recon_error", "kl", "local_error")}
    with pytest.raises(ValueError, match=match):
        Calibration.fit(raw, weights, target_false_alarm_rate=0.01, local_window=4)


def test_calibration_round_trips_and_overrides_are_validated() -> None:
    rng = np.random.default_rng(5)
    raw = {name: rng.lognormal(size=50) for name in ("recon_error", "kl", "local_error")}
    calibration = Calibration.fit(
        raw, {"recon_error": 1.0, "kl": 0.5}, target_false_alarm_rate=0.01, local_window=4
    )
    again = Calibration.from_dict(calibration.to_dict())
    assert again == calibration
    assert calibration.rule_for(threshold=1.5).threshold == 1.5
    assert calibration.rule_for(target_false_alarm_rate=0.5).threshold < calibration.rule.threshold
    with pytest.raises(ValueError, match="finite"):
        calibration.rule_for(threshold=float("nan"))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        calibration.rule_for(target_false_alarm_rate=1.5)
    with pytest.raises(ValueError, match="not both"):
        calibration.rule_for(threshold=1.0, target_false_alarm_rate=0.1)
