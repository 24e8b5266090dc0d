"""The Yeo-Johnson transform under the threshold's prediction bound (service/tail.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service import tail


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_the_inverse_undoes_scipy_stats_transform(lam: float) -> None:
    values = np.r_[-50.0, -3.0, -0.5, 0.0, 1e-9, 0.4, 2.0, 7.5, 40.0]
    shaped = stats.yeojohnson(values, lmbda=lam)
    np.testing.assert_allclose(tail.transform(values, lam), shaped, rtol=1e-12)
    back = [tail.inverse(float(y), lam) for y in shaped]
    np.testing.assert_allclose(back, values, rtol=1e-9, atol=1e-12)


def test_lambda_one_leaves_values_as_they_are() -> None:
    values = np.array([-4.0, -1.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(tail.transform(values, tail.IDENTITY), values, atol=1e-15)
    assert [tail.inverse(v, tail.IDENTITY) for v in values] == pytest.approx(values.tolist())


def test_the_fitted_lambda_is_the_likelihood_maximum_within_the_range() -> None:
    rng = np.random.default_rng(0)
    grid = np.linspace(*tail.LAMBDA_RANGE, 2001)
    for values in (rng.gamma(4.0, 1.0, 60), rng.gumbel(0.0, 1.0, 60), rng.standard_normal(60)):
        best = grid[np.argmax([stats.yeojohnson_llf(lam, values) for lam in grid])]
        assert tail.fit_lambda(values) == pytest.approx(best, abs=2e-3)


def test_a_long_upper_tail_is_drawn_in_and_a_gaussian_left_nearly_alone() -> None:
    rng = np.random.default_rng(1)
    assert tail.fit_lambda(rng.gamma(2.0, 1.0, 400)) < 0.6
    assert tail.fit_lambda(rng.standard_normal(400)) == pytest.approx(1.0, abs=0.15)


def test_a_lambda_beyond_the_range_stops_at_its_edge() -> None:
    # Lognormal scores want a lambda below 0, where the inverse would not reach every score.
    values = np.random.default_rng(2).lognormal(0.0, 1.5, 200)
    assert tail.fit_lambda(values) == pytest.approx(tail.LAMBDA_RANGE[0], abs=1e-4)
    assert tail.inverse(20.0, tail.fit_lambda(values)) == pytest.approx(math.expm1(20.0), rel=1e-3)


def test_a_tail_shorter_than_a_gaussian_keeps_the_identity() -> None:
    # Scores whose top was trimmed (as the outlier rule trims the held-out scores) or that are
    # bounded above want a lambda above 1, which would set the bound below the plain one.
    rng = np.random.default_rng(3)
    gaussian = rng.standard_normal(400)
    for values in (-rng.gamma(2.0, 1.0, 200), gaussian[gaussian < 0.5] + 3.0):
        assert stats.yeojohnson_llf(1.5, values) > stats.yeojohnson_llf(1.0, values)
        assert tail.fit_lambda(values) == pytest.approx(tail.IDENTITY, abs=1e-4)


def test_values_without_spread_keep_the_identity() -> None:
    assert tail.fit_lambda(np.full(30, 2.5)) == tail.IDENTITY


def test_what_cannot_be_fitted_or_inverted_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 finite values"):
        tail.fit_lambda(np.array([1.0]))
    with pytest.raises(ValueError, match="at least 2 finite values"):
        tail.fit_lambda(np.array([1.0, math.nan, 2.0]))
    with pytest.raises(ValueError, match=r"lambda is -0\.5"):
        tail.inverse(1.0, -0.5)
    with pytest.raises(ValueError, match=r"lambda is 1\.5"):
        tail.transform(np.array([1.0]), 1.5)


def test_a_bound_past_the_largest_double_maps_to_infinity() -> None:
    assert tail.inverse(1e6, 0.0) == math.inf
