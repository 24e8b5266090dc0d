"""The losses (training/loss.py): the calibrated ELBO and the defect head's focal loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from service.scoring import kl_divergence as service_kl
from training.loss import ELBOLoss, focal_loss, kl_divergence


def test_kl_matches_the_service_formula_on_a_latent_grid() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)  # (B, k, rows, columns)
    logvar = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)
    ours = kl_divergence(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, service_kl(mu.reshape(4, -1), logvar.reshape(4, -1)), 1e-5)
    zero = kl_divergence(torch.zeros(1, 5), torch.zeros(1, 5))
    assert float(zero) == 0.0


def test_elbo_is_calibrated_gaussian_nll_plus_beta_kl() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    recon = torch.full((2, 1, 4, 4), 0.25)
    mu, logvar = torch.ones(2, 3, 1, 1), torch.zeros(2, 3, 1, 1)
    total, parts = ELBOLoss(beta=0.5)(recon, x, mu, logvar)
    # sigma^2 is the mean squared error 0.0625: NLL = 16 * (1/2 + log(2 pi 0.0625) / 2).
    nll = 16 * (0.5 + 0.5 * math.log(2 * math.pi * 0.0625))
    assert parts.mse == pytest.approx(0.0625)
    assert parts.nll == pytest.approx(nll, rel=1e-5)
    assert parts.kl == pytest.approx(1.5)
    assert float(total) == pytest.approx(nll + 0.5 * 1.5, rel=1e-5)


def test_sigma_has_a_floor() -> None:
    x = torch.full((1, 1, 4, 4), 0.5)
    _, parts = ELBOLoss(beta=1.0)(x.clone(), x, torch.zeros(1, 2), torch.zeros(1, 2))
    assert math.isfinite(parts.nll) and parts.mse == 0.0


def _logits_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 1, 8, 8, generator=generator)
    mask = torch.rand(2, 1, 8, 8, generator=generator) < 0.2
    return logits, mask


def test_focal_loss_at_gamma_zero_is_binary_cross_entropy() -> None:
    logits, mask = _logits_and_mask()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, mask.float())
    torch.testing.assert_close(focal_loss(logits, mask, gamma=0.0), bce)
    # The boolean masks of the synthetic defects are taken as they are.
    torch.testing.assert_close(focal_loss(logits, mask), focal_loss(logits, mask.float()))


def test_focal_loss_discounts_confident_correct_pixels_only() -> None:
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :2] = True
    confident = torch.where(mask, 6.0, -6.0)  # right, with p = 0.9975
    bce = nn.functional.binary_cross_entropy_with_logits(confident, mask.float())
    focal = focal_loss(confident, mask)
    assert 0 < float(focal) < 1e-3 * float(bce)
    # Confidently wrong pixels keep almost their whole cross-entropy.
    wrong = -confident
    bce_wrong = nn.functional.binary_cross_entropy_with_logits(wrong, mask.float())
    assert float(focal_loss(wrong, mask)) == pytest.approx(float(bce_wrong), rel=0.01)
    # And the loss still falls as predictions improve.
    losses = [float(focal_loss(torch.where(mask, s, -s), mask)) for s in (-2.0, 0.0, 2.0, 4.0)]
    assert losses == sorted(losses, reverse=True)
