"""Scoring maths and calibration (service/scoring.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest
from scipy import optimize, stats

from service import tail
from service.scoring import (
    COARSE_WINDOW_DIVISOR,
    LATENT_RIDGE,
    LATENT_SHRINKAGE,
    LATENT_WINDOW,
    MAD_TO_STD,
    OUTLIER_DEVIATIONS,
    OUTLIER_MIN_VALUES,
    POSITION_FLOOR,
    SCORE_NAMES,
    TAIL_MIN_VALUES,
    Calibration,
    DecisionRule,
    ErrorReference,
    F64Array,
    LatentBaseline,
    LatentGrid,
    LatentMoments,
    LatentReference,
    ModelOutputs,
    ScoreCalibration,
    anomaly_map,
    batch_slices,
    box_mean,
    coarse_window,
    empirical_p_values,
    kl_divergence,
    lowest_conformal_rate,
    position_maps,
    raw_scores,
    student_t_upper_quantile,
    threshold_for_rate,
    window_max,
    without_outliers,
)

GRID = LatentGrid(channels=3, rows=2, columns=4)


def _reference_case(n: int = 40) -> tuple[F64Array, LatentReference]:
    """Posterior means of ``n`` normal images on GRID, each cell with its own Gaussian."""
    rng = np.random.default_rng(11)
    cells = rng.normal(size=(GRID.cells, GRID.channels))  # per-cell means
    scales = rng.uniform(0.2, 2.0, (GRID.cells, GRID.channels))
    vectors = cells + scales * rng.standard_normal((n, GRID.cells, GRID.channels))
    mu = vectors.transpose(0, 2, 1).reshape(n, GRID.size)  # channel-major flat layout
    return mu, LatentReference.fit(mu.astype(np.float32), GRID)


def _brute_force_distances(train: F64Array, test: F64Array) -> F64Array:
    """Mahalanobis distance of each cell, spelled out with numpy.linalg: ``(N, rows, columns)``."""
    k, p = GRID.channels, GRID.cells
    train_cells = [train.reshape(-1, k, p)[:, :, cell] for cell in range(p)]  # (N, k) each
    means = np.stack([v.mean(axis=0) for v in train_cells])
    per_cell = [np.cov(v, rowvar=False, ddof=1) for v in train_cells]
    between = np.cov(means, rowvar=False, bias=True)
    pooled = np.mean(per_cell, axis=0) + between
    out = np.zeros((test.shape[0], p))
    for cell in range(p):
        covariance = (1 - LATENT_SHRINKAGE) * per_cell[cell] + LATENT_SHRINKAGE * pooled
        covariance += LATENT_RIDGE * np.eye(k)
        for n in range(test.shape[0]):
            d = test.reshape(-1, k, p)[n, :, cell] - means[cell]
            out[n, cell] = np.sqrt(d @ np.linalg.solve(covariance, d))
    return out.reshape(-1, GRID.rows, GRID.columns)


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form() -> None:
    mu = np.zeros((2, 4), dtype=np.float32)
    logvar = np.zeros((2, 4), dtype=np.float32)
    assert kl_divergence(mu, logvar).tolist() == [0.0, 0.0]
    mu[1, 0], logvar[1, 1] = 2.0, math.log(3.0)
    # 1/2 * (mu^2) + 1/2 * (sigma^2 - log sigma^2 - 1) for the two non-trivial dimensions
    expected = 0.5 * 4.0 + 0.5 * (3.0 - math.log(3.0) - 1.0)
    assert kl_divergence(mu, logvar)[1] == pytest.approx(expected, rel=1e-6)


def _outputs(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, ModelOutputs]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, height, width), dtype=np.float32)
    out = ModelOutputs(
        mu=rng.standard_normal((n, GRID.size)).astype(np.float32),
        logvar=rng.standard_normal((n, GRID.size)).astype(np.float32),
        recon=rng.random((n, 3, height, width), dtype=np.float32),
        defect_map=rng.random((n, height, width), dtype=np.float32),
        coarse_input=rng.random((n, 3, height // 2, width // 2), dtype=np.float32),
        coarse_recon=rng.random((n, 3, height // 2, width // 2), dtype=np.float32),
    )
    return x, out


def _errors(height: int, width: int) -> ErrorReference:
    """An error reference fitted on 5 other random images."""
    return ErrorReference.fit(*_outputs(5, height, width, seed=1))


def _relative(maps: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """A map over the reference's mean there plus POSITION_FLOOR times its image-wide mean."""
    return np.asarray(maps / (mean + POSITION_FLOOR * mean.mean()))


def test_raw_scores_are_every_score_by_its_definition() -> None:
    x, out = _outputs(3, 16, 32)
    _, reference = _reference_case()
    normal_x, normal_out = _outputs(5, 16, 32, seed=1)
    errors = ErrorReference.fit(normal_x, normal_out)
    raw, parts = raw_scores(x, out, 3, reference, errors)
    assert list(raw) == list(SCORE_NAMES)
    assert all(values.shape == (3,) and values.dtype == np.float64 for values in raw.values())
    squared = ((x - out.recon) ** 2).mean(axis=1)
    np.testing.assert_allclose(anomaly_map(x, out.recon), squared, rtol=1e-6)
    np.testing.assert_allclose(raw["recon_error"], squared.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(raw["kl"], kl_divergence(out.mu, out.logvar))
    # The local, defect and coarse maps are read relative to the normal images' mean maps.
    normal_squared = ((normal_x - normal_out.recon) ** 2).mean(axis=1).mean(axis=0)
    local = _relative(squared, normal_squared)
    np.testing.assert_allclose(raw["local_error"], window_max(local, 3), rtol=1e-6)
    # The latent distances are read relative to the training images' mean distance per cell.
    distances = _relative(reference.distance_map(out.mu), reference.mean_distance)
    # The largest mean distance over LATENT_WINDOW x LATENT_WINDOW cells, by brute force.
    k = min(LATENT_WINDOW, GRID.rows, GRID.columns)
    means = [
        distances[:, r : r + k, c : c + k].mean(axis=(1, 2))
        for r in range(GRID.rows - k + 1)
        for c in range(GRID.columns - k + 1)
    ]
    np.testing.assert_allclose(raw["latent_distance"], np.max(means, axis=0), rtol=1e-9)
    defect = _relative(out.defect_map, normal_out.defect_map.mean(axis=0))
    np.testing.assert_allclose(raw["defect_probability"], window_max(defect, 3), rtol=1e-6)
    coarse = _relative(  # (3, 8, 16)
        ((out.coarse_input - out.coarse_recon) ** 2).mean(axis=1),
        ((normal_out.coarse_input - normal_out.coarse_recon) ** 2).mean(axis=1).mean(axis=0),
    )
    assert coarse_window(coarse) == 8 // COARSE_WINDOW_DIVISOR == 1
    np.testing.assert_allclose(raw["coarse_error"], coarse.max(axis=(1, 2)), rtol=1e-6)
    # What the anomaly map is made of: the four local evidences, as computed for the scores.
    np.testing.assert_allclose(parts.squared_error, local, rtol=1e-6)
    np.testing.assert_allclose(parts.defect_map, defect, rtol=1e-6)
    np.testing.assert_allclose(parts.latent_distance, distances, rtol=1e-9)
    np.testing.assert_allclose(parts.coarse_error, coarse, rtol=1e-6)


def test_an_error_every_normal_part_shows_there_is_discounted_where_it_lies() -> None:
    """A bright stripe the model never redraws on good parts scores low; the same error
    where good parts are redrawn well scores high."""
    rng = np.random.default_rng(3)

    def batch(n: int, spot: tuple[int, int] | None) -> tuple[np.ndarray, ModelOutputs]:
        x = np.full((n, 1, 16, 16), 0.5, dtype=np.float32)
        x += rng.normal(0.0, 0.01, x.shape).astype(np.float32)
        recon = np.full_like(x, 0.5)
        x[:, :, :, 3] = 0.9  # every part has a stripe the model does not redraw
        if spot is not None:
            x[:, :, spot[0], spot[1]] = 0.9
        out = ModelOutputs(
            mu=np.zeros((n, GRID.size), np.float32),
            logvar=np.zeros((n, GRID.size), np.float32),
            recon=recon,
            defect_map=np.full((n, 16, 16), 0.1, np.float32),
            coarse_input=x[:, :, ::2, ::2].copy(),
            coarse_recon=recon[:, :, ::2, ::2].copy(),
        )
        return x, out

    errors = ErrorReference.fit(*batch(8, None))
    _, reference = _reference_case()
    stripe_only, _ = raw_scores(*batch(1, None), 1, reference, errors)
    with_spot, parts = raw_scores(*batch(1, (8, 12)), 1, reference, errors)
    # The plain squared error is 0.16 on the stripe and on the spot alike ...
    assert stripe_only["recon_error"][0] < with_spot["recon_error"][0]
    # ... but only the spot is far above what good parts show where it lies.
    assert stripe_only["local_error"][0] < 1.0 < with_spot["local_error"][0]
    row, column = np.unravel_index(np.argmax(parts.squared_error[0]), (16, 16))
    assert (int(row), int(column)) == (8, 12)


def test_an_error_reference_of_another_shape_is_refused() -> None:
    x, out = _outputs(2, 16, 32)
    _, reference = _reference_case()
    with pytest.raises(ValueError, match="reference has"):
        raw_scores(x, out, 3, reference, _errors(16, 16))


def test_the_coarse_window_is_an_eighth_of_the_shorter_side() -> None:
    assert coarse_window(np.zeros((1, 64, 64))) == 8
    assert coarse_window(np.zeros((1, 44, 90))) == 5
    assert coarse_window(np.zeros((1, 4, 4))) == 1
    amap = np.random.default_rng(1).random((2, 24, 40))
    # On a 24-row map the window is 3: the largest mean over 3 x 3 squares, by brute force.
    means = [amap[:, r : r + 3, c : c + 3].mean(axis=(1, 2)) for r in range(22) for c in range(38)]
    np.testing.assert_allclose(window_max(amap, coarse_window(amap)), np.max(means, axis=0))


def _brute_force_box_mean(amap: np.ndarray, window: int) -> np.ndarray:
    _, h, w = amap.shape
    result = np.zeros(amap.shape)
    for r in range(h):
        for c in range(w):
            r0, c0 = max(0, r - window // 2), max(0, c - window // 2)
            r1, c1 = min(h, r - window // 2 + window), min(w, c - window // 2 + window)
            result[:, r, c] = amap[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return result


@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 40])
def test_box_mean_is_the_centred_window_mean_clipped_at_the_borders(window: int) -> None:
    amap = np.random.default_rng(window).random((2, 9, 13))
    np.testing.assert_allclose(box_mean(amap, window), _brute_force_box_mean(amap, min(window, 9)))


def test_position_maps_hold_each_scores_evidence_where_it_is() -> None:
    x, out = _outputs(3, 16, 32)
    _, reference = _reference_case()
    raw, parts = raw_scores(x, out, 4, reference, _errors(16, 32))
    maps = position_maps(raw, parts, 4)
    assert set(maps) == set(SCORE_NAMES)
    assert all(m.shape == (3, 16, 32) for m in maps.values())
    # Image-wide scores are the same everywhere.
    for name in ("recon_error", "kl"):
        np.testing.assert_array_equal(
            maps[name], np.broadcast_to(raw[name][:, None, None], maps[name].shape)
        )
    # Over the positions whose window lies inside the image, the highest local mean is the score.
    inside = (slice(None), slice(2, 16 - 1), slice(2, 32 - 1))
    for name in ("local_error", "defect_probability"):
        np.testing.assert_allclose(maps[name][inside].max(axis=(1, 2)), raw[name], rtol=1e-12)
    # Each pixel carries the (3x3-averaged) distance of the latent cell it lies in.
    cells = box_mean(parts.latent_distance, LATENT_WINDOW)
    cell_h, cell_w = 16 // GRID.rows, 32 // GRID.columns
    for r, c in [(0, 0), (15, 31), (9, 20)]:
        np.testing.assert_array_equal(
            maps["latent_distance"][:, r, c], cells[:, r // cell_h, c // cell_w]
        )
        # And the coarse error of the coarse pixel it lies in (each covers 2 x 2 pixels here).
        np.testing.assert_allclose(
            maps["coarse_error"][:, r, c], parts.coarse_error[:, r // 2, c // 2], rtol=1e-12
        )


def test_the_anomaly_map_is_the_combined_score_at_every_pixel() -> None:
    x, out = _outputs(4, 16, 32)
    _, reference = _reference_case()
    raw, parts = raw_scores(x, out, 4, reference, _errors(16, 32))
    weights = {"local_error": 1.0, "latent_distance": 0.5, "kl": 2.0}
    calibration = Calibration.fit(raw, weights, target_false_alarm_rate=0.25, local_window=4)
    batch = calibration.score(raw, parts=parts)
    assert batch.anomaly_map is not None and batch.anomaly_map.dtype == np.float32
    maps = position_maps(raw, parts, 4)
    expected = np.log(
        sum(
            np.exp(w * calibration.scores[name].standardise(maps[name]))
            for name, w in weights.items()
        )
    )
    np.testing.assert_allclose(batch.anomaly_map, expected, rtol=1e-5, atol=1e-5)
    # With the local error alone, the map's highest value where the window fits is the combined
    # score: the map shows where the verdict comes from.
    alone = Calibration.fit(raw, {"local_error": 1.0}, target_false_alarm_rate=0.25, local_window=4)
    amap = alone.score(raw, parts=parts).anomaly_map
    assert amap is not None
    inside = (slice(None), slice(2, 15), slice(2, 31))
    np.testing.assert_allclose(amap[inside].max(axis=(1, 2)), alone.combine(raw), rtol=1e-5)
    # No parts, no map.
    assert calibration.score(raw).anomaly_map is None


def test_the_combined_score_is_the_soft_maximum_of_the_weighted_standardised_scores() -> None:
    raw = {name: np.exp(np.linspace(-1.0, 1.0, 9)) for name in SCORE_NAMES}
    weights = {"local_error": 1.0, "coarse_error": 2.0}
    calibration = Calibration.fit(raw, weights, target_false_alarm_rate=0.25, local_window=4)
    z = {name: calibration.scores[name].standardise(raw[name]) for name in weights}
    np.testing.assert_allclose(
        calibration.combine(raw), np.log(np.exp(z["local_error"]) + np.exp(2.0 * z["coarse_error"]))
    )
    # A score that finds the image very normal cannot cancel another score's alarm: an image far
    # out on the coarse error alone scores about as high as on the coarse error with nothing else,
    # where a sum would have pulled it back below the held-out images.
    coarse = calibration.scores["coarse_error"]
    far, very_normal = coarse.log_scale * 3.0 + coarse.log_centre, -6.0
    image = dict(raw, coarse_error=np.exp([far]), local_error=np.exp([very_normal]))
    combined = float(calibration.combine(image)[0])
    assert combined == pytest.approx(6.0, abs=1e-3)
    assert combined > max(calibration.combined.values)
    # Terms that agree add up: two equal terms score log(2) above either alone.
    same = Calibration.fit(
        raw, {"recon_error": 1.0, "kl": 1.0}, target_false_alarm_rate=0.25, local_window=4
    )
    alone = Calibration.fit(raw, {"recon_error": 1.0}, target_false_alarm_rate=0.25, local_window=4)
    np.testing.assert_allclose(same.combine(raw), alone.combine(raw) + np.log(2.0))


def test_latent_reference_is_the_brute_force_mahalanobis_distance() -> None:
    train, reference = _reference_case()
    assert reference.mean.shape == (GRID.cells, GRID.channels)
    assert reference.precision.shape == (GRID.cells, GRID.channels, GRID.channels)
    test = np.random.default_rng(12).normal(size=(5, GRID.size))
    distances = reference.distance_map(test.astype(np.float32))
    assert distances.shape == (5, GRID.rows, GRID.columns)
    expected = _brute_force_distances(train.astype(np.float32).astype(np.float64), test)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)


def test_a_cell_far_from_its_reference_has_the_largest_distance() -> None:
    train, reference = _reference_case()
    normal = train[:1].copy()
    pushed = normal.copy()
    row, column = 1, 2
    cell = row * GRID.columns + column
    pushed[0, 0 * GRID.cells + cell] += 10.0  # channel 0 of that cell, channel-major layout
    before = reference.distance_map(normal.astype(np.float32))[0]
    after = reference.distance_map(pushed.astype(np.float32))[0]
    assert tuple(int(i) for i in np.unravel_index(np.argmax(after), after.shape)) == (row, column)
    assert after[row, column] > 3 * np.delete(after.ravel(), cell).max()
    # The other cells do not move.
    np.testing.assert_array_equal(np.delete(after.ravel(), cell), np.delete(before.ravel(), cell))


def test_a_latent_cell_where_normal_parts_vary_is_discounted() -> None:
    """A cell whose normal posteriors spread widely (an edge, a texture) is as far from its
    Gaussian on a good part as a small change of a steady cell is; read relative to the normal
    images' mean distance there, only the change stands out."""
    rng = np.random.default_rng(5)
    scales = np.full((GRID.cells, GRID.channels), 0.3)
    scales[0] = 3.0  # cell 0 varies ten times as much as the others on good parts
    vectors = scales * rng.standard_normal((200, GRID.cells, GRID.channels))
    train = vectors.transpose(0, 2, 1).reshape(200, GRID.size).astype(np.float32)
    reference = LatentReference.fit(train, GRID)
    assert reference.mean_distance.shape == (GRID.rows, GRID.columns)
    np.testing.assert_allclose(
        reference.mean_distance, reference.distance_map(train).mean(axis=0), rtol=1e-12
    )
    good = train[:1].copy()
    changed = good.copy()
    steady = 5
    changed[0, steady :: GRID.cells] += 2.0  # every channel of the steady cell
    # By distance alone, the good part's widely varying cell is as far out as the change ...
    assert reference.distance_map(good).max() > reference.distance_map(changed)[0].flat[steady]
    # ... relative to what good parts show there, the change is far above anything else.
    relative_good = reference.relative_distance_map(good)[0]
    relative_changed = reference.relative_distance_map(changed)[0]
    divisor = reference.mean_distance + POSITION_FLOOR * reference.mean_distance.mean()
    np.testing.assert_allclose(
        relative_changed, reference.distance_map(changed)[0] / divisor, rtol=1e-9
    )
    assert int(np.argmax(relative_changed)) == steady
    assert relative_changed.flat[steady] > 3 * relative_good.max()


def test_latent_reference_refuses_means_of_the_wrong_shape() -> None:
    rng = np.random.default_rng(0)
    for bad in (rng.random((5, GRID.size + 1)), rng.random((1, GRID.size)), rng.random(GRID.size)):
        with pytest.raises(ValueError, match="latent reference needs"):
            LatentReference.fit(bad.astype(np.float32), GRID)


def test_latent_grid_layout() -> None:
    mu = np.arange(2 * GRID.size, dtype=np.float32).reshape(2, GRID.size)
    cells = GRID.cell_vectors(mu)
    assert cells.shape == (2, GRID.cells, GRID.channels)
    assert (GRID.size, GRID.cells) == (24, 8)
    # mu[n, (c * rows + r) * columns + q] is channel c of the cell at row r, column q.
    n, c, r, q = 1, 2, 1, 3
    assert cells[n, r * GRID.columns + q, c] == mu[n, (c * GRID.rows + r) * GRID.columns + q]


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


def test_standardisation_is_robust_to_a_few_bad_parts_among_the_held_out_images() -> None:
    rng = np.random.default_rng(4)
    logs = rng.normal(1.0, 0.5, 2000)
    clean = ScoreCalibration.fit(np.exp(logs))
    # On Gaussian logs the centre and scale are the mean and standard deviation.
    assert clean.log_centre == pytest.approx(1.0, abs=0.03)
    assert clean.log_scale == pytest.approx(0.5, abs=0.03)
    # 2% of the "good" images are defective parts scoring far out: the centre and scale hardly
    # move, so a defect like them still stands out, where the standard deviation would triple.
    spoilt = np.r_[logs, np.full(40, 8.0)]
    robust = ScoreCalibration.fit(np.exp(spoilt))
    assert robust.log_centre == pytest.approx(clean.log_centre, abs=0.02)
    assert robust.log_scale == pytest.approx(clean.log_scale, rel=0.05)
    assert spoilt.std(ddof=1) > 2.0 * clean.log_scale
    assert float(robust.standardise(np.exp(np.array([8.0])))[0]) > 12.0


def test_standardisation_falls_back_to_the_standard_deviation_when_most_values_tie() -> None:
    values = np.array([2.0, 2.0, 2.0, 3.0, 5.0])
    calibration = ScoreCalibration.fit(values)
    assert calibration.log_centre == pytest.approx(np.log(2.0))
    assert calibration.log_scale == pytest.approx(np.log(values).std(ddof=1))


def test_threshold_is_conformal_with_enough_images_and_gaussian_otherwise() -> None:
    rng = np.random.default_rng(3)
    many = np.sort(rng.standard_normal(999))
    rule = threshold_for_rate(many, 0.01)
    assert rule.method == "empirical"
    assert rule.threshold == many[math.ceil(1000 * 0.99) - 1]
    few = np.sort(rng.standard_normal(40))
    rule = threshold_for_rate(few, 0.01)
    assert rule.method == "normal_tail"
    assert rule.threshold == pytest.approx(transformed_bound(few, 0.01), rel=1e-9)
    fewer = np.sort(rng.standard_normal(TAIL_MIN_VALUES - 1))
    assert threshold_for_rate(fewer, 0.01).threshold == pytest.approx(
        prediction_bound(fewer, 0.01), rel=1e-9
    )


def prediction_bound(values: F64Array, rate: float) -> float:
    """The Gaussian prediction bound, from scipy.stats' Student's t (another code path)."""
    n = values.shape[0]
    t = float(stats.t.isf(rate, n - 1))
    return float(values.mean() + values.std(ddof=1) * math.sqrt(1 + 1 / n) * t)


def transformed_bound(values: F64Array, rate: float) -> float:
    """The prediction bound of the values after their fitted Yeo-Johnson transform, mapped back
    by scipy.stats' transform and a root finder (another code path than service.tail.inverse)."""
    lam = tail.fit_lambda(values)
    bound = prediction_bound(stats.yeojohnson(values, lmbda=lam), rate)
    high = float(values.max()) + 1.0
    while stats.yeojohnson(np.array([high]), lmbda=lam)[0] < bound:
        high *= 2.0
    return float(
        optimize.brentq(
            lambda x: stats.yeojohnson(np.array([x]), lmbda=lam)[0] - bound,
            float(values.min()),
            high,
            xtol=1e-14,
            rtol=1e-13,
        )
    )


@pytest.mark.parametrize("dof", [1, 2, 5, 11, 41, 97, 500])
@pytest.mark.parametrize("rate", [1e-12, 1e-4, 0.01, 0.05, 0.3, 0.5, 0.7, 0.99])
def test_student_t_upper_quantile_matches_scipy_stats(rate: float, dof: int) -> None:
    assert student_t_upper_quantile(rate, dof) == pytest.approx(
        float(stats.t.isf(rate, dof)), rel=1e-9, abs=1e-12
    )


def test_student_t_upper_quantile_refuses_what_has_no_quantile() -> None:
    for rate in (0.0, 1.0, -0.5, math.nan):
        with pytest.raises(ValueError, match="false-alarm rate"):
            student_t_upper_quantile(rate, 5)
    with pytest.raises(ValueError, match="degree of freedom"):
        student_t_upper_quantile(0.01, 0)


@pytest.mark.parametrize("n", [5, 12, TAIL_MIN_VALUES - 1])
def test_the_small_set_threshold_holds_its_rate_on_new_normal_images(n: int) -> None:
    # Over many held-out sets of n Gaussian values, the chance that a new value from the same
    # Gaussian passes the threshold averages to the rate asked: the prediction bound is exact
    # there. A Gaussian quantile with the estimates taken as exact flags more (2.3% at n = 12).
    rng = np.random.default_rng(n)
    rate = 0.01
    exceed = [
        NormalDist().cdf(-threshold_for_rate(np.sort(rng.standard_normal(n)), rate).threshold)
        for _ in range(4000)
    ]
    assert float(np.mean(exceed)) == pytest.approx(rate, rel=0.1)


Draw = Callable[[np.random.Generator, int], F64Array]
Survival = Callable[[float], float]
TAILS: dict[str, tuple[Draw, Survival]] = {
    "gaussian": (lambda rng, n: rng.standard_normal(n), lambda t: NormalDist().cdf(-t)),
    "gamma": (lambda rng, n: rng.gamma(4.0, 1.0, n), lambda t: stats.gamma.sf(t, 4.0)),
    "gumbel": (lambda rng, n: rng.gumbel(0.0, 1.0, n), lambda t: stats.gumbel_r.sf(t)),
}


@pytest.mark.parametrize("family", sorted(TAILS))
@pytest.mark.parametrize("n", [40, 90])
def test_the_threshold_holds_near_its_rate_on_long_upper_tails(family: str, n: int) -> None:
    # Held-out combined scores have a longer upper tail than a Gaussian. The prediction bound on
    # them as they are flags nearly three times the rate asked on such tails; after the fitted
    # transform, at most twice (and a Gaussian pays little for the fit).
    draw, survival = TAILS[family]
    rng = np.random.default_rng(n)
    rate = 0.01
    sets = [np.sort(draw(rng, n)) for _ in range(600)]
    exceed = np.mean([survival(threshold_for_rate(v, rate).threshold) for v in sets])
    untransformed = np.mean([survival(prediction_bound(v, rate)) for v in sets])
    assert 0.5 * rate < exceed < 2.0 * rate
    if family != "gaussian":
        assert untransformed > 2.5 * rate


def test_a_rate_too_small_for_the_held_out_set_is_refused_with_the_reason() -> None:
    two = np.array([0.0, 1.0])
    assert math.isfinite(threshold_for_rate(two, 1e-6).threshold)
    with pytest.raises(ValueError, match="too small for a threshold from 2 held-out scores"):
        threshold_for_rate(two, 1e-300)


def test_parts_in_the_good_folder_that_do_not_look_good_do_not_set_the_threshold() -> None:
    rng = np.random.default_rng(8)
    clean = rng.standard_normal(60)
    contaminated = np.sort(np.r_[clean, 15.0, 22.0])  # two bad parts among the good ones
    rule = threshold_for_rate(contaminated, 0.01)
    assert rule.outliers == 2
    assert rule.threshold == pytest.approx(threshold_for_rate(np.sort(clean), 0.01).threshold)
    assert rule.threshold == pytest.approx(transformed_bound(clean, 0.01), rel=1e-9)
    # Without leaving them out, a Gaussian fit's spread would more than triple.
    assert contaminated.std(ddof=1) > 3 * clean.std(ddof=1)
    np.testing.assert_array_equal(without_outliers(contaminated), np.sort(clean))
    # The boundary: OUTLIER_DEVIATIONS robust standard deviations above the median.
    values = np.sort(np.r_[np.linspace(-1.0, 1.0, 41), 3.9, 4.1])
    centre = np.median(values)
    scale = MAD_TO_STD * np.median(np.abs(values - centre))
    kept = without_outliers(values)
    assert kept.max() <= centre + OUTLIER_DEVIATIONS * scale < values.max()
    assert values.shape[0] - kept.shape[0] == int(np.sum(values > centre + 4.0 * scale))


def test_nothing_is_left_out_where_most_held_out_values_tie() -> None:
    values = np.sort(np.r_[np.zeros(30), 0.5, 9.0])
    assert without_outliers(values).shape == values.shape
    assert threshold_for_rate(values, 0.01).outliers == 0


def test_nothing_is_left_out_of_too_few_held_out_values() -> None:
    rng = np.random.default_rng(10)
    few = np.sort(np.r_[rng.standard_normal(OUTLIER_MIN_VALUES - 2), 40.0])
    assert few.shape[0] < OUTLIER_MIN_VALUES
    np.testing.assert_array_equal(without_outliers(few), few)
    enough = np.sort(np.r_[rng.standard_normal(OUTLIER_MIN_VALUES - 1), 40.0])
    assert without_outliers(enough).shape[0] == OUTLIER_MIN_VALUES - 1


def test_the_outliers_left_out_travel_with_the_calibration() -> None:
    rng = np.random.default_rng(9)
    raw = {name: rng.lognormal(0.0, 0.3, 50) for name in SCORE_NAMES}
    raw["local_error"][:2] = 1e6  # two held-out parts far out on one score
    calibration = Calibration.fit(
        raw, {"local_error": 1.0}, target_false_alarm_rate=0.01, local_window=4
    )
    assert calibration.rule.outliers == 2
    assert Calibration.from_dict(calibration.to_dict()).rule == calibration.rule
    assert calibration.rule_for(threshold=1.0).outliers == 0


@pytest.mark.parametrize(
    "rate", [5e-324, 1e-300, 1e-17, 1.1e-16, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-16, 0.9999999999999999]
)
def test_every_rate_strictly_between_0_and_1_gives_a_finite_threshold(rate: float) -> None:
    # Rates below ~1.1e-16 used to round 1 - rate to 1.0 and fail in inv_cdf(1.0). (Fewer than
    # TAIL_MIN_VALUES values: the bound on the values as they are, which grows slowest.)
    n = TAIL_MIN_VALUES - 1
    few = np.sort(np.random.default_rng(6).standard_normal(n))
    rule = threshold_for_rate(few, rate)
    assert math.isfinite(rule.threshold) and rule.target_false_alarm_rate == rate
    if rule.method == "normal_tail" and rate >= 1e-300:
        t = (rule.threshold - few.mean()) / (few.std(ddof=1) * math.sqrt(1 + 1 / n))
        assert float(stats.t.sf(t, n - 1)) == pytest.approx(rate, rel=1e-6)


@pytest.mark.parametrize("rate", [0.02, 0.01, 1e-4, 1e-8])
def test_the_transformed_bound_leaves_the_rate_asked_above_it(rate: float) -> None:
    few = np.sort(np.random.default_rng(6).gamma(3.0, 1.0, 40))
    rule = threshold_for_rate(few, rate)
    assert rule.method == "normal_tail" and rule.outliers == 0
    lam = tail.fit_lambda(few)
    shaped = stats.yeojohnson(few, lmbda=lam)
    at = stats.yeojohnson(np.array([rule.threshold]), lmbda=lam)[0]
    t = (at - shaped.mean()) / (shaped.std(ddof=1) * math.sqrt(1 + 1 / 40))
    assert float(stats.t.sf(t, 39)) == pytest.approx(rate, rel=1e-6)


def test_a_short_upper_tail_keeps_the_bound_on_the_scores_as_they_are() -> None:
    # Held-out scores whose upper tail is shorter than a Gaussian's (here bounded above) would
    # fit a lambda above 1, whose bound sits below the plain one: the transform is not allowed to
    # lower the threshold so.
    short = np.sort(-np.random.default_rng(9).gamma(2.0, 1.0, 60))
    rule = threshold_for_rate(short, 0.01)
    assert rule.method == "normal_tail" and rule.outliers == 0
    assert rule.threshold == pytest.approx(prediction_bound(short, 0.01), rel=1e-4)
    longer = np.sort(np.random.default_rng(9).gamma(2.0, 1.0, 60))
    assert threshold_for_rate(longer, 0.01).threshold > prediction_bound(longer, 0.01)


def test_a_bound_past_the_largest_double_is_refused_with_the_reason() -> None:
    long_tail = np.sort(np.random.default_rng(6).lognormal(0.0, 1.5, 40))
    assert tail.fit_lambda(long_tail) < 0.01
    with pytest.raises(ValueError, match="held-out scores: the bound is beyond the largest double"):
        threshold_for_rate(long_tail, 1e-300)


def test_smaller_rates_give_higher_thresholds_down_to_the_smallest_double() -> None:
    few = np.sort(np.random.default_rng(7).standard_normal(TAIL_MIN_VALUES - 1))
    rates = [0.5, 0.1, 1e-3, 1e-9, 1e-16, 1e-17, 1e-100, 1e-300, 5e-324]
    thresholds = [threshold_for_rate(few, rate).threshold for rate in rates]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(rates)


def _one_high_value(n: int) -> F64Array:
    """``n - 1`` Gaussian values and one high, though not far enough above them to be left out
    as an outlier: the conformal bound at rates that just reach it is that one value."""
    rest = np.random.default_rng(n).standard_normal(n - 1)
    centre = np.median(rest)
    scale = MAD_TO_STD * np.median(np.abs(rest - centre))
    return np.sort(np.append(rest, centre + 0.95 * OUTLIER_DEVIATIONS * scale))


RATE_GRID = np.geomspace(1e-4, 0.5, 80)


@pytest.mark.parametrize(
    "values",
    [
        _one_high_value(64),
        _one_high_value(150),
        np.sort(np.random.default_rng(1).gamma(2.0, 1.0, 40)),
        np.sort(np.random.default_rng(2).lognormal(0.0, 0.5, 99)),
        np.sort(np.random.default_rng(3).standard_normal(500)),
        np.sort(np.random.default_rng(4).standard_normal(TAIL_MIN_VALUES - 1)),
    ],
    ids=["one-high-64", "one-high-150", "gamma-40", "lognormal-99", "normal-500", "normal-19"],
)
def test_a_higher_rate_never_gets_a_higher_threshold(values: F64Array) -> None:
    thresholds = [threshold_for_rate(values, float(rate)).threshold for rate in RATE_GRID]
    assert all(a >= b for a, b in itertools.pairwise(thresholds))


def test_a_conformal_bound_above_the_lowest_gaussian_one_is_set_to_it() -> None:
    values = _one_high_value(64)
    lowest = lowest_conformal_rate(64)
    assert lowest == 1 / 65 and threshold_for_rate(values, lowest).threshold < values[-1]
    just_below = threshold_for_rate(values, lowest * (1 - 1e-9))
    assert just_below.method == "normal_tail"
    # 3% reaches the conformal bound, the largest value (65 * 0.97 rounds up to 64), which sits
    # above the 1% threshold: it is set to the Gaussian bound at 1/65 instead.
    assert math.ceil(65 * 0.97) == 64 and values[-1] > threshold_for_rate(values, 0.01).threshold
    capped = threshold_for_rate(values, 0.03)
    assert capped.method == "normal_tail" and capped.target_false_alarm_rate == 0.03
    assert capped.threshold == pytest.approx(just_below.threshold, rel=1e-6)
    # Where the conformal bound sits below that ceiling it stands: 10% is the 59th value.
    assert threshold_for_rate(values, 0.1) == DecisionRule(values[58], 0.1, "empirical", 0)


def test_false_alarm_rate_of_the_calibrated_threshold_is_near_the_target() -> None:
    rng = np.random.default_rng(4)

    def normal_scores(n: int) -> dict[str, np.ndarray]:
        return {name: rng.lognormal(-i, 0.3, n) for i, name in enumerate(SCORE_NAMES)}

    calibration = Calibration.fit(
        normal_scores(2000),
        {"defect_probability": 1.0, "local_error": 1.0, "latent_distance": 1.0},
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
    raw = {name: np.ones(5) for name in SCORE_NAMES}
    with pytest.raises(ValueError, match=match):
        Calibration.fit(raw, weights, target_false_alarm_rate=0.01, local_window=4)


def test_calibration_needs_every_score() -> None:
    raw = {name: np.ones(5) for name in SCORE_NAMES if name != "latent_distance"}
    with pytest.raises(ValueError, match="latent_distance"):
        Calibration.fit(raw, {"kl": 1.0}, target_false_alarm_rate=0.01, local_window=4)
    full = {name: np.linspace(1.0, 2.0, 5) for name in SCORE_NAMES}
    data = Calibration.fit(full, {"kl": 1.0}, target_false_alarm_rate=0.01, local_window=4)
    stored = data.to_dict()
    del stored["scores"]["defect_probability"]
    with pytest.raises(ValueError, match="defect_probability"):
        Calibration.from_dict(stored)


def test_calibration_round_trips_and_overrides_are_validated() -> None:
    rng = np.random.default_rng(5)
    raw = {name: rng.lognormal(size=50) for name in SCORE_NAMES}
    calibration = Calibration.fit(
        raw,
        {"latent_distance": 1.0, "defect_probability": 0.5},
        target_false_alarm_rate=0.01,
        local_window=4,
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


@pytest.mark.parametrize(("count", "size"), [(0, 3), (1, 3), (6, 3), (7, 3), (7, 1), (2, 32)])
def test_batch_slices_cover_every_row_once_in_order(count: int, size: int) -> None:
    slices = batch_slices(count, size)
    rows = [i for s in slices for i in range(count)[s]]
    assert rows == list(range(count))
    assert all(len(range(count)[s]) <= size for s in slices)
    assert len(slices) == -(-count // size)


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch size is 0"):
        batch_slices(5, 0)


def test_the_tail_is_fitted_once_per_held_out_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request that asks its own rate reads the bundle's same held-out scores.
    fits: list[int] = []
    fit_lambda = tail.fit_lambda

    def counted(values: F64Array) -> float:
        fits.append(values.shape[0])
        return fit_lambda(values)

    monkeypatch.setattr(tail, "fit_lambda", counted)
    held_out = np.sort(np.random.default_rng(11).gumbel(0.0, 1.0, 50))
    first = [threshold_for_rate(held_out, rate).threshold for rate in (0.01, 0.005, 0.02)]
    again = [threshold_for_rate(held_out, rate).threshold for rate in (0.01, 0.005, 0.02)]
    assert fits == [50] and first == again
    threshold_for_rate(np.sort(np.r_[held_out, 0.5]), 0.01)
    assert fits == [50, 51]


def test_latent_moments_gathered_in_batches_give_the_baseline_of_all_the_means() -> None:
    # Means far from 0 with a small spread: where a one-pass sum of squares would lose digits.
    mu = 1e3 + np.random.default_rng(5).normal(0.0, 1e-2, (77, 6)).astype(np.float32)
    moments = LatentMoments()
    for rows in (slice(0, 32), slice(32, 32), slice(32, 64), slice(64, 77)):
        moments.add(mu[rows])
    whole = LatentBaseline.fit(mu)
    gathered = moments.baseline()
    assert gathered.count == whole.count == 77
    np.testing.assert_allclose(gathered.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(gathered.std, whole.std, rtol=1e-9)
    single = LatentMoments()
    single.add(mu)
    np.testing.assert_allclose(single.baseline().std, whole.std, rtol=1e-12)


def test_latent_moments_need_two_means_of_one_shape() -> None:
    moments = LatentMoments()
    moments.add(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 means, got 1"):
        moments.baseline()
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        moments.add(np.zeros(3, dtype=np.float32))
