"""The names of the raw scores every reply carries, in their order: declared here, apart from the
scoring maths (:mod:`service.scoring`), so that the client imports them without numpy's and
scipy's numerics."""

from __future__ import annotations

SCORE_NAMES: tuple[str, ...] = (
    "recon_error",
    "kl",
    "local_error",
    "latent_distance",
    "defect_probability",
    "coarse_error",
)
