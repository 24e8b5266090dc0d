"""The losses: the ELBO of the VAE (a Gaussian decoder whose noise level is calibrated) and the
defect head's focal loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_SIGMA = 1e-3  # pixel-noise floor: 1/4 of an 8-bit grey level


@dataclass(frozen=True)
class LossParts:
    """Per-image means of the loss and its terms (floats for logging)."""

    total: float
    nll: float
    kl: float
    mse: float


class ELBOLoss(nn.Module):
    """Negative ELBO per image: Gaussian pixel NLL + ``beta`` * KL(q(z|x) || N(0, I)).

    The decoder's pixel noise sigma is not a guess but its maximum-likelihood value for the
    batch, ``sigma^2 = mean squared error`` (the "calibrated decoder" of Rybkin et al., 2021).
    A fixed sigma silently sets the balance of the two terms: too large and the KL term wins,
    the posterior collapses and every reconstruction is the mean image; too small and the
    latent stops being regular. With the calibrated sigma, ``beta = 1`` is the true ELBO.
    The pixel term is the squared error, which is also what the service scores.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(
        self, recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor
    ) -> tuple[Tensor, LossParts]:
        sse = (recon - target).pow(2).flatten(1).sum(dim=1)  # (B,)
        n_pixels = recon[0].numel()
        variance = (sse.detach().mean() / n_pixels).clamp_min(MIN_SIGMA**2)
        nll = sse / (2 * variance) + 0.5 * n_pixels * torch.log(2 * math.pi * variance)  # (B,)
        kl = kl_divergence(mu, logvar)  # (B,)
        total = (nll + self.beta * kl).mean()
        parts = LossParts(
            total=float(total.detach()),
            nll=float(nll.detach().mean()),
            kl=float(kl.detach().mean()),
            mse=float(sse.detach().mean()) / n_pixels,
        )
        return total, parts


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, in nats: ``(B, ...) -> (B,)``."""
    return 0.5 * torch.sum((mu.pow(2) + logvar.exp() - logvar - 1.0).flatten(1), dim=1)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean binary focal loss (Lin et al., 2017) of per-pixel logits against a 0/1 mask.

    Defects cover a small share of the pixels; the focal term lets the many easy normal pixels
    count for little, so the rare defect pixels are learned (as DRAEM trains its head).
    """
    target = target.to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return ((1.0 - p_true).pow(gamma) * bce).mean()
