"""The Yeo-Johnson transform under the threshold's Gaussian prediction bound.

Held-out combined scores (a soft maximum of standardised log scores) have a longer upper tail
than a Gaussian: a Gaussian bound set on them flags more good parts than the rate it was set
for. :func:`threshold_for_rate <service.scoring.threshold_for_rate>` therefore sets the bound on
the scores after a Yeo-Johnson transform whose ``lambda`` is fitted to them by maximum
likelihood, and maps it back: ``lambda = 1`` is the identity, ``lambda < 1`` draws a long upper
tail in.

``lambda`` is kept within ``LAMBDA_RANGE``. Below 0 the transform of positive scores is bounded
above (a bound beyond it would stand for no score at all). Above 1 the transform would take the
tail for shorter than a Gaussian's and set the bound below the one on the scores as they are:
the outlier rule trims the top of the held-out scores before the fit, which can make the tail
kept look short, so the transform may only lengthen the tail the bound assumes.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.stats import yeojohnson, yeojohnson_llf

LAMBDA_RANGE = (0.0, 1.0)
# The lambda that leaves every value as it is.
IDENTITY = 1.0
_LAMBDA_TOLERANCE = 1e-6


def fit_lambda(values: npt.NDArray[np.float64]) -> float:
    """The maximum-likelihood Yeo-Johnson ``lambda`` of ``values`` within ``LAMBDA_RANGE``;
    1 (the identity) where they have no spread, which leaves no shape to fit."""
    if values.size < 2 or not np.all(np.isfinite(values)):
        raise ValueError(
            f"a tail transform needs at least 2 finite values, got {values.tolist()!r}"
        )
    if float(np.ptp(values)) <= 0.0:
        return IDENTITY
    result = minimize_scalar(
        lambda lam: -float(yeojohnson_llf(lam, values)),
        bounds=LAMBDA_RANGE,
        method="bounded",
        options={"xatol": _LAMBDA_TOLERANCE},
    )
    return float(result.x)


def transform(values: npt.NDArray[np.float64], lam: float) -> npt.NDArray[np.float64]:
    """The Yeo-Johnson transform of ``values`` with ``lam``."""
    _check_lambda(lam)
    return np.asarray(yeojohnson(np.asarray(values, dtype=np.float64), lmbda=lam), np.float64)


def inverse(y: float, lam: float) -> float:
    """The value whose Yeo-Johnson transform with ``lam`` is ``y`` (``inf`` past the largest
    double)."""
    _check_lambda(lam)
    try:
        if y >= 0.0:
            return math.expm1(y) if lam == 0.0 else math.pow(lam * y + 1.0, 1.0 / lam) - 1.0
        return 1.0 - math.pow(1.0 - (2.0 - lam) * y, 1.0 / (2.0 - lam))
    except OverflowError:
        return math.inf if y > 0.0 else -math.inf


def _check_lambda(lam: float) -> None:
    low, high = LAMBDA_RANGE
    if not low <= lam <= high:
        raise ValueError(f"Yeo-Johnson lambda is {lam!r}; expected one in [{low}, {high}]")
