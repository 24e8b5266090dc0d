"""Calibration maths, the decision-rule choice, synthetic defects and the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from service.scoring import Calibration
from training.calibrate import WEIGHT_CANDIDATES, window_candidates
from training.metrics import auroc, average_precision, roc_curve, threshold_stats
from training.synth import DEFECTS, synthesise_anomalies

# Scores of normal images: positive and heavy-tailed, like reconstruction errors.
RNG = np.random.default_rng(7)


def _normal_scores(n: int) -> dict[str, np.ndarray]:
    return {
        "recon_error": RNG.lognormal(-5.0, 0.3, n),
        "kl": RNG.gamma(20.0, 2.0, n),
        "local_error": RNG.lognormal(-3.0, 0.5, n),
    }


def test_p_values_are_uniform_on_normal_data() -> None:
    # Conformal p-values are uniform over calibration sets: with n = 49 held-out scores, a new
    # normal image's p-value is k/50 for k = 1..50, each with probability 1/50. Pool many
    # calibration sets and check the distribution of every score's p-value.
    n_cal, n_sets, n_new = 49, 200, 50
    pooled: dict[str, list[np.ndarray]] = {}
    for _ in range(n_sets):
        calibration = Calibration.fit(
            _normal_scores(n_cal),
            {"recon_error": 1.0, "kl": 1.0},
            target_false_alarm_rate=0.1,
            local_window=4,
        )
        batch = calibration.score(_normal_scores(n_new))
        for name, p in [*batch.p_values.items(), ("combined", batch.combined_p_value)]:
            pooled.setdefault(name, []).append(p)
    for name, parts in pooled.items():
        p = np.concatenate(parts)
        # The combined score is standardised with moments of the same held-out set, which makes
        # new images look slightly more extreme than held-out ones (about +10% relative at
        # n = 49); the single scores are exactly conformal.
        tolerance = 0.025 if name == "combined" else 0.01
        for k in (1, 5, 10, 25, 40):
            share = np.mean(p <= k / (n_cal + 1) + 1e-12)
            assert share == pytest.approx(k / 50, abs=tolerance), name


def test_conformal_threshold_keeps_the_false_alarm_rate() -> None:
    calibration = Calibration.fit(
        _normal_scores(400), {"local_error": 1.0}, target_false_alarm_rate=0.05, local_window=4
    )
    assert calibration.rule.method == "empirical"
    flagged = calibration.score(_normal_scores(20000)).is_anomaly.mean()
    assert flagged == pytest.approx(0.05, abs=0.03)


def test_small_calibration_sets_use_the_normal_tail() -> None:
    calibration = Calibration.fit(
        _normal_scores(30), {"local_error": 1.0}, target_false_alarm_rate=0.01, local_window=4
    )
    assert calibration.rule.method == "normal_tail"
    flagged = calibration.score(_normal_scores(20000)).is_anomaly.mean()
    assert flagged < 0.05


def test_anomalous_scores_get_small_p_values() -> None:
    calibration = Calibration.fit(
        _normal_scores(100), {"recon_error": 1.0}, target_false_alarm_rate=0.01, local_window=4
    )
    high = {name: values * 20 for name, values in _normal_scores(10).items()}
    batch = calibration.score(high)
    assert np.all(batch.p_values["recon_error"] == pytest.approx(1 / 101))
    assert batch.is_anomaly.all()


def test_window_candidates() -> None:
    assert window_candidates(128) == [8, 16, 32]
    assert window_candidates(16) == [2, 4]


def test_weight_candidates_are_valid_and_distinct() -> None:
    seen = {tuple(sorted(w.items())) for w in WEIGHT_CANDIDATES}
    assert len(seen) == len(WEIGHT_CANDIDATES)
    assert all(any(v > 0 for v in w.values()) for w in WEIGHT_CANDIDATES)


def test_synthetic_defects_change_every_image_locally() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0.4, 0.6, (3, 3, 32, 32)).astype(np.float32)
    out = synthesise_anomalies(images, copies=len(DEFECTS), seed=0)
    assert out.shape == (3 * len(DEFECTS), 3, 32, 32)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    source = np.repeat(images, len(DEFECTS), axis=0)
    changed = np.any(np.abs(out - source) > 1e-6, axis=1).reshape(out.shape[0], -1).mean(axis=1)
    assert np.all(changed > 0) and np.all(changed < 0.5)
    assert np.array_equal(out, synthesise_anomalies(images, copies=len(DEFECTS), seed=0))


def test_auroc_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=60), 1)  # with ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(scores, labels) == pytest.approx(pairs / (pos.size * neg.size))
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    with pytest.raises(ValueError, match="both"):
        auroc([1, 2], [1, 1])


def test_roc_curve_and_average_precision() -> None:
    fpr, tpr = roc_curve([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    # Ranked: +, -, +, - -> precision at the positives 1 and 2/3.
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0


def test_threshold_stats() -> None:
    stats = threshold_stats([True, True, False, False, True], [True, False, False, True, True])
    assert (stats.true_positives, stats.false_positives) == (2, 1)
    assert (stats.true_negatives, stats.false_negatives) == (1, 1)
    assert stats.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert stats.fpr == 0.5
    assert stats.tpr == pytest.approx(2 / 3)
