"""Calibration maths, the decision-rule choice on real ONNX outputs, and the metrics."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import training.calibrate
from service.bundle import Bundle, load_bundle
from service.preprocessing import load_image_file, stack
from service.runtime import OnnxGraphs, Scorer
from service.scoring import (
    SCORE_NAMES,
    TAIL_MIN_VALUES,
    Calibration,
    DecisionRule,
    ErrorReference,
    LatentReference,
    ModelOutputs,
    fewest_for_conformal,
    raw_scores,
)
from training.calibrate import (
    DEFAULT_WEIGHTS,
    SYNTHETIC_COPIES,
    HeldOut,
    LightingCheck,
    RuleChoice,
    batched_raw_scores,
    calibrate,
    choose_rule,
    default_window,
    describe_lighting,
    describe_rule,
    fit_references,
    lighting_check,
    lighting_gains,
    lighting_warning,
    relight,
    resolve_window,
    score_held_out,
)
from training.data import load_samples
from training.metrics import (
    auroc,
    average_precision,
    best_tpr_at_fpr,
    roc_curve,
    threshold_stats,
)

# Scores of normal images: positive and heavy-tailed, like reconstruction errors.
RNG = np.random.default_rng(7)


def _normal_scores(n: int, rng: np.random.Generator = RNG) -> dict[str, np.ndarray]:
    return {
        "recon_error": rng.lognormal(-5.0, 0.3, n),
        "kl": rng.gamma(20.0, 2.0, n),
        "local_error": rng.lognormal(-3.0, 0.5, n),
        "latent_distance": rng.gamma(9.0, 0.5, n),
        "defect_probability": rng.beta(2.0, 20.0, n),
        "coarse_error": rng.lognormal(-4.0, 0.4, n),
    }


def test_p_values_are_uniform_on_normal_data() -> None:
    # Conformal p-values are uniform over calibration sets: with n = 49 held-out scores, a new
    # normal image's p-value is k/50 for k = 1..50, each with probability 1/50. Pool many
    # calibration sets and check the distribution of every score's p-value.
    n_cal, n_sets, n_new = 49, 1000, 50
    pooled: dict[str, list[np.ndarray]] = {}
    for _ in range(n_sets):
        calibration = Calibration.fit(
            _normal_scores(n_cal),
            {"recon_error": 1.0, "kl": 1.0, "latent_distance": 1.0},
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


@pytest.mark.parametrize(("rate", "fewest"), [(0.01, 99), (0.05, 19), (0.03, 33), (0.5, 1)])
def test_fewest_values_for_a_conformal_threshold(rate: float, fewest: int) -> None:
    assert fewest_for_conformal(rate) == fewest
    normal = _normal_scores(fewest, np.random.default_rng(11))
    for n in (fewest, fewest - 1):
        if n < 2:
            continue
        calibration = Calibration.fit(
            {name: values[:n] for name, values in normal.items()},
            {"local_error": 1.0},
            target_false_alarm_rate=rate,
            local_window=4,
        )
        rule, largest = calibration.rule, max(calibration.combined.values)
        if n < fewest:
            assert rule.method == "normal_tail", n
        else:
            # The conformal bound is the largest held-out value; where the Gaussian bound at
            # 1 / (n + 1) sits lower, no higher rate may get more than it (threshold_for_rate).
            expected = "empirical" if rule.threshold == largest else "normal_tail"
            assert rule.method == expected and rule.threshold <= largest, n


def test_fewest_values_refuses_rates_outside_zero_one() -> None:
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="false-alarm rate"):
            fewest_for_conformal(rate)


def test_the_fit_log_says_how_the_threshold_was_set() -> None:
    tail = describe_rule(DecisionRule(3.47, 0.01, "normal_tail", outliers=2), held_out=42)
    assert tail.startswith(
        "threshold 3.470 for a 1% false-alarm rate: a Gaussian prediction bound from 40 held-out "
        "good images after a transform fitted to their tail (the conformal bound"
    )
    few = describe_rule(DecisionRule(3.47, 0.01, "normal_tail"), held_out=TAIL_MIN_VALUES - 1)
    assert f"from {TAIL_MIN_VALUES - 1} held-out good images (the conformal bound" in few
    assert "needs 99" in tail and "2 far above the rest left out" in tail
    assert "--holdout-fraction holds out more" in tail
    conformal = describe_rule(DecisionRule(2.5, 0.05, "empirical"), held_out=300)
    assert conformal == (
        "threshold 2.500 for a 5% false-alarm rate: the conformal bound on 300 held-out good images"
    )
    # 64 held-out images bound 3% conformally, but that bound sat above the lowest Gaussian one.
    capped = describe_rule(DecisionRule(3.98, 0.03, "normal_tail"), held_out=64)
    assert capped == (
        "threshold 3.980 for a 3% false-alarm rate: the Gaussian prediction bound from 64 held-out "
        "good images after a transform fitted to their tail at 1.54%, the lowest rate their "
        "conformal bound reaches, which sits below the conformal bound at this rate: no rate gets "
        "a higher threshold than a lower one"
    )


def test_anomalous_scores_get_small_p_values() -> None:
    calibration = Calibration.fit(
        _normal_scores(100), {"recon_error": 1.0}, target_false_alarm_rate=0.01, local_window=4
    )
    high = {name: values * 20 for name, values in _normal_scores(10).items()}
    batch = calibration.score(high)
    assert np.all(batch.p_values["recon_error"] == pytest.approx(1 / 101))
    assert batch.is_anomaly.all()


def test_default_window() -> None:
    assert default_window(256, 256) == 8
    assert default_window(256, 96) == 3  # from the shorter side
    assert default_window(32, 48) == 2  # never below 2 pixels


def test_default_weights_are_valid() -> None:
    assert set(DEFAULT_WEIGHTS) <= set(SCORE_NAMES)
    assert all(w > 0 for w in DEFAULT_WEIGHTS.values())


@pytest.fixture(scope="module")
def bundle_and_holdout(
    trained_bundle: Path, demo_data: Path
) -> tuple[Bundle, OnnxGraphs, np.ndarray]:
    """The session bundle, its ONNX graphs and its held-out normal images."""
    bundle = load_bundle(trained_bundle)
    graphs = OnnxGraphs(
        bundle.encoder_path,
        bundle.decoder_path,
        bundle.head_path,
        bundle.coarse_path,
        device="cpu",
        threads=1,
    )
    names = bundle.manifest.training["data"]["holdout_files"]
    folder = demo_data / "train" / "good"
    holdout = stack([load_image_file(folder / name, bundle.manifest.input) for name in names])
    return bundle, graphs, holdout


def test_choose_rule_keeps_a_given_window_and_weights(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    choice = choose_rule(
        graphs,
        bundle.latent_reference,
        bundle.error_reference,
        holdout,
        graphs.run_in_batches(holdout),
        seed=0,
        local_window=5,
        weights={"kl": 1.0},
    )
    assert (choice.local_window, dict(choice.weights)) == (5, {"kl": 1.0})
    assert choice.method.startswith("window and weights given by the user")
    assert 0.0 <= choice.synthetic_auroc <= 1.0
    only_window = choose_rule(
        graphs,
        bundle.latent_reference,
        bundle.error_reference,
        holdout,
        graphs.run_in_batches(holdout),
        seed=0,
        local_window=3,
        weights=None,
    )
    assert (only_window.local_window, dict(only_window.weights)) == (3, dict(DEFAULT_WEIGHTS))
    assert only_window.method.startswith("window given by the user")


def test_choose_rule_defaults_and_their_synthetic_auroc(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    height, width = bundle.manifest.input.height, bundle.manifest.input.width
    outputs = graphs.run_in_batches(holdout)

    def default_choice() -> RuleChoice:
        return choose_rule(
            graphs,
            bundle.latent_reference,
            bundle.error_reference,
            holdout,
            outputs,
            seed=0,
            local_window=None,
            weights=None,
        )

    choice = default_choice()
    assert choice.local_window == default_window(height, width)
    assert dict(choice.weights) == dict(DEFAULT_WEIGHTS)
    assert choice.method.startswith("the product's default rule")
    assert f"{holdout.shape[0] * SYNTHETIC_COPIES} synthetic" in choice.method
    # Synthetic defects drawn into the images are visible to the demo model.
    assert choice.synthetic_auroc > 0.6
    assert default_choice().to_dict() == choice.to_dict()


def test_calibrate_matches_the_bundle(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    stored = bundle.manifest.calibration
    choice = choose_rule(
        graphs,
        bundle.latent_reference,
        bundle.error_reference,
        holdout,
        graphs.run_in_batches(holdout),
        seed=0,
        local_window=stored.local_window,
        weights=stored.weights,
    )
    held_out = _score_held_out(
        bundle, graphs, holdout, window=choice.local_window, checked=slice(None)
    )
    calibration = calibrate(
        held_out, choice, target_false_alarm_rate=stored.rule.target_false_alarm_rate
    )
    assert set(calibration.scores) == set(SCORE_NAMES)
    assert calibration.local_window == stored.local_window
    assert dict(calibration.weights) == dict(stored.weights)
    for name in SCORE_NAMES:
        np.testing.assert_allclose(
            calibration.scores[name].values, stored.scores[name].values, rtol=1e-6, err_msg=name
        )
    assert calibration.rule.threshold == pytest.approx(stored.rule.threshold, rel=1e-6)


def _lighting_check(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray], change: float
) -> LightingCheck:
    """The lighting check of the session bundle's held-out images under its stored calibration."""
    bundle, graphs, holdout = bundle_and_holdout
    return lighting_check(
        graphs,
        bundle.latent_reference,
        bundle.error_reference,
        holdout,
        graphs.run_in_batches(holdout),
        bundle.manifest.calibration,
        change=change,
    )


def test_the_lighting_check_counts_what_the_service_flags(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
) -> None:
    bundle, _, holdout = bundle_and_holdout
    check = _lighting_check(bundle_and_holdout, 0.2)
    # The service's own verdicts on the same images, as they are and relit by 0.8 and 1.2.
    scorer = Scorer(bundle, device="cpu", threads=1)
    darker = (holdout * np.float32(0.8)).astype(np.float32)
    brighter = np.clip(holdout * np.float32(1.2), 0.0, 1.0).astype(np.float32)
    expected = [float(np.mean(scorer.score(x).is_anomaly)) for x in (holdout, darker, brighter)]
    assert check.change == 0.2
    assert [check.flagged, check.flagged_darker, check.flagged_brighter] == expected
    # The fit ran the same check at its jitter and stored it.
    change = bundle.manifest.training["config"]["jitter"]
    again = _lighting_check(bundle_and_holdout, change)
    assert bundle.manifest.training["lighting"] == again.to_dict()
    line = describe_lighting(again)
    assert f"{again.flagged_darker:.1%} of them {change:.0%} darker" in line


def test_a_fit_warns_where_a_change_of_light_flags_many_good_images() -> None:
    # Screw's suite fit: a third of its held-out good screws flagged once 10% brighter.
    screw = LightingCheck(change=0.1, flagged=0.0, flagged_darker=0.0, flagged_brighter=0.328)
    warning = lighting_warning(screw)
    assert warning is not None
    assert warning.startswith("lit 10% brighter, 32.8% of the held-out good images")
    assert "calibrate the bundle again on good images taken in it" in warning
    darker = LightingCheck(change=0.2, flagged=0.0, flagged_darker=0.5, flagged_brighter=0.2)
    assert str(lighting_warning(darker)).startswith("lit 20% darker, 50.0%")
    at_most = LightingCheck(change=0.1, flagged=0.3, flagged_darker=0.1, flagged_brighter=0.05)
    assert lighting_warning(at_most) is None  # 10% at most, whatever the images as they are


@pytest.mark.parametrize("change", [0.0, 1.0, -0.1, float("nan")])
def test_the_lighting_check_refuses_changes_outside_zero_one(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray], change: float
) -> None:
    with pytest.raises(ValueError, match="lighting change"):
        _lighting_check(bundle_and_holdout, change)


def test_the_lighting_range_is_as_they_are_darker_and_brighter() -> None:
    images = np.random.default_rng(3).random((4, 1, 6, 5), dtype=np.float32)
    assert lighting_gains(0.25) == (1.0, 0.75, 1.25)
    darker, brighter = relight(images, 0.75), relight(images, 1.25)
    assert darker.dtype == brighter.dtype == np.float32
    np.testing.assert_allclose(darker, images * 0.75, rtol=1e-6)
    np.testing.assert_allclose(brighter, np.minimum(images * 1.25, 1.0), rtol=1e-6)
    assert brighter.max() <= 1.0 and (brighter == 1.0).any()
    # No jitter: the training called no lighting change normal, so the images alone.
    assert lighting_gains(0.0) == (1.0,)


@pytest.mark.parametrize("change", [1.0, -0.1, float("nan")])
def test_the_lighting_range_refuses_changes_outside_zero_one(change: float) -> None:
    with pytest.raises(ValueError, match="lighting change"):
        lighting_gains(change)


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


def test_best_tpr_at_fpr_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=200), 1)  # with ties
    labels = rng.random(200) < 0.3
    scores[labels] += 1.0
    for max_fpr in (0.0, 0.01, 0.03, 0.05, 0.29, 0.5, 1.0):
        best = 0.0
        for threshold in np.r_[np.unique(scores), np.inf]:
            flagged = scores >= threshold
            if flagged[~labels].sum() <= max_fpr * (~labels).sum() + 1e-9:
                best = max(best, flagged[labels].mean())
        assert best_tpr_at_fpr(scores, labels, max_fpr) == pytest.approx(best), max_fpr
    # Ten good parts, one false alarm allowed at 10%: the threshold goes above the second highest.
    good = np.arange(10.0)
    bad = np.array([7.5, 8.5, 9.5])
    both, truth = np.r_[good, bad], np.r_[np.zeros(10), np.ones(3)]
    assert best_tpr_at_fpr(both, truth, 0.1) == pytest.approx(2 / 3)
    assert best_tpr_at_fpr(both, truth, 0.0) == pytest.approx(1 / 3)
    for bad_rate in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_fpr"):
            best_tpr_at_fpr(both, truth, bad_rate)


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


def test_scores_in_batches_are_the_scores_of_the_whole_set(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    monkeypatch.setattr(training.calibrate, "SCORING_BATCH", 2)
    assert holdout.shape[0] > 2  # several batches, the last one shorter when the count is odd
    outputs = graphs.run_in_batches(holdout, batch_size=2)
    window = bundle.manifest.calibration.local_window
    args = (window, bundle.latent_reference, bundle.error_reference)
    whole, _ = raw_scores(holdout, outputs, *args)
    from_outputs = batched_raw_scores(holdout, outputs, *args)
    from_graphs = batched_raw_scores(holdout, graphs, *args)
    assert set(from_outputs) == set(from_graphs) == set(SCORE_NAMES)
    for name in SCORE_NAMES:
        np.testing.assert_array_equal(from_outputs[name], whole[name], err_msg=name)
        np.testing.assert_array_equal(from_graphs[name], whole[name], err_msg=name)


def _held_out_samples(bundle: Bundle, demo_data: Path) -> np.ndarray:
    """The session bundle's held-out images as 8-bit samples, as a fit holds them."""
    folder = demo_data / "train" / "good"
    names = bundle.manifest.training["data"]["holdout_files"]
    paths = [folder / name for name in names]
    return load_samples(paths, bundle.manifest.input, skip_bad=False).images


def _score_held_out(
    bundle: Bundle, graphs: OnnxGraphs, images: np.ndarray, *, window: int, checked: slice
) -> HeldOut:
    """The fit's held-out pass over ``images`` with the session bundle's references and scale."""
    return score_held_out(
        graphs,
        images,
        scale=bundle.manifest.input.scale,
        window=window,
        reference=bundle.latent_reference,
        errors=bundle.error_reference,
        checked=checked,
    )


def test_the_held_out_pass_keeps_every_score_and_the_checked_rows_outputs(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
    demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fit reads its held-out images once, from their 8-bit samples, a batch at a time: the
    # scores and posterior means of all of them, the input and outputs of the checked rows
    # only, each equal to what the whole set's outputs give.
    bundle, graphs, holdout = bundle_and_holdout
    monkeypatch.setattr(training.calibrate, "SCORING_BATCH", 2)
    samples = _held_out_samples(bundle, demo_data)
    assert samples.dtype == np.uint8 and samples.shape == holdout.shape
    assert holdout.shape[0] > 4
    window = bundle.manifest.calibration.local_window
    reference, errors = bundle.latent_reference, bundle.error_reference
    every = graphs.run_in_batches(holdout, batch_size=2)
    checked = slice(1, None, 3)  # rows in some batches and not others
    held_out = _score_held_out(bundle, graphs, samples, window=window, checked=checked)
    expected = batched_raw_scores(holdout, every, window, reference, errors)
    assert held_out.window == window and set(held_out.raw) == set(SCORE_NAMES)
    for name in SCORE_NAMES:
        np.testing.assert_array_equal(held_out.raw[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(held_out.mu, every.mu)
    np.testing.assert_array_equal(held_out.check_images, holdout[checked])
    wanted = every.rows(checked)
    for f in fields(ModelOutputs):
        np.testing.assert_array_equal(
            getattr(held_out.check_out, f.name), getattr(wanted, f.name), err_msg=f.name
        )


def test_calibration_refuses_scores_taken_at_another_window(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    stored = bundle.manifest.calibration
    held_out = _score_held_out(
        bundle, graphs, holdout, window=stored.local_window + 1, checked=slice(0, 1)
    )
    choice = RuleChoice(stored.local_window, stored.weights, 0.5, "the stored rule")
    with pytest.raises(ValueError, match="window of"):
        calibrate(held_out, choice, target_false_alarm_rate=0.01)


def test_the_window_is_the_given_one_or_the_default() -> None:
    assert resolve_window(5, 256, 128) == 5
    assert resolve_window(None, 256, 128) == default_window(256, 128) == 4


def test_references_fitted_on_samples_are_those_of_their_model_input(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray],
    demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle, graphs, holdout = bundle_and_holdout
    monkeypatch.setattr(training.calibrate, "SCORING_BATCH", 2)
    grid = bundle.latent_reference.grid
    samples = _held_out_samples(bundle, demo_data)
    scale = bundle.manifest.input.scale
    from_samples = fit_references(graphs, samples, grid, lighting=0.1, scale=scale)
    from_input = fit_references(graphs, holdout, grid, lighting=0.1)
    np.testing.assert_array_equal(from_samples[0].mean, from_input[0].mean)
    np.testing.assert_array_equal(from_samples[0].mean_distance, from_input[0].mean_distance)
    for f in fields(ErrorReference):
        np.testing.assert_array_equal(
            getattr(from_samples[1], f.name), getattr(from_input[1], f.name), err_msg=f.name
        )


def test_references_fitted_in_batches_are_the_means_over_every_image(
    bundle_and_holdout: tuple[Bundle, OnnxGraphs, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, graphs, images = bundle_and_holdout
    monkeypatch.setattr(training.calibrate, "SCORING_BATCH", 2)
    grid = bundle.latent_reference.grid
    reference, errors = fit_references(graphs, images, grid, lighting=0.1)
    lit = [relight(images, gain) for gain in lighting_gains(0.1)]
    outputs = [graphs.run_in_batches(x, batch_size=2) for x in lit]
    expected = LatentReference.fit(np.concatenate([out.mu for out in outputs]), grid)
    np.testing.assert_array_equal(reference.mean, expected.mean)
    np.testing.assert_array_equal(reference.mean_distance, expected.mean_distance)
    together = ModelOutputs(
        *(np.concatenate([getattr(o, f.name) for o in outputs]) for f in fields(ModelOutputs))
    )
    every = ErrorReference.fit(np.concatenate(lit), together)
    for name in ("squared_error", "defect_map", "coarse_error"):
        np.testing.assert_allclose(
            getattr(errors, name), getattr(every, name), rtol=1e-12, err_msg=name
        )
