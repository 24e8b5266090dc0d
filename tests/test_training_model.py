"""The VAE modules, the ELBO loss and the training loop's building blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.scoring import kl_divergence as service_kl
from training.config import FitConfig
from training.errors import ConfigError
from training.loss import ELBOLoss, kl_divergence
from training.model import VAE, VAEConfig
from training.train import augment_batch, select_device, train_vae

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize(
    ("size", "channels", "levels", "bottom"),
    [(32, 3, 3, 4), (64, 1, 4, 4), (128, 3, 5, 4), (48, 3, 3, 6), (256, 1, 6, 4)],
)
def test_shapes(size: int, channels: int, levels: int, bottom: int) -> None:
    cfg = VAEConfig(channels=channels, image_size=size, latent_dim=8, width=4, max_width=16)
    assert (cfg.levels, cfg.bottom) == (levels, bottom)
    model = VAE(cfg).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        recon, mu, logvar = model(x)
    assert recon.shape == x.shape
    assert mu.shape == logvar.shape == (2, 8)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


@pytest.mark.parametrize(("size", "stride", "channels"), [(32, 8, 4), (64, 16, 2), (64, 4, 1)])
def test_spatial_latent_shapes(size: int, stride: int, channels: int) -> None:
    cfg = VAEConfig(
        image_size=size, width=4, max_width=16, latent_channels=channels, latent_stride=stride
    )
    assert cfg.bottom == size // stride
    assert cfg.latent_size == channels * (size // stride) ** 2
    model = VAE(cfg).eval()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        recon, mu, logvar = model(x)
        assert torch.equal(model.decoder(mu), recon)
    assert recon.shape == x.shape
    assert mu.shape == logvar.shape == (3, cfg.latent_size)


def test_eval_mode_decodes_the_mean_train_mode_samples() -> None:
    model = VAE(VAEConfig(image_size=32, latent_dim=8, width=4)).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        first, mu, _ = model(x)
        assert torch.equal(first, model.decoder(mu))
        model.train()
        torch.manual_seed(0)
        sampled, _, _ = model(x)
    assert not torch.allclose(sampled, first)


def test_bad_model_config() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        VAEConfig(image_size=30)
    with pytest.raises(ValueError, match="channels"):
        VAEConfig(channels=2)
    with pytest.raises(ValueError, match="latent_stride"):
        VAEConfig(image_size=40, latent_channels=4, latent_stride=16)


def test_kl_matches_the_service_formula() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(4, 6)).astype(np.float32)
    logvar = rng.normal(size=(4, 6)).astype(np.float32)
    ours = kl_divergence(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    np.testing.assert_allclose(ours, service_kl(mu, logvar), rtol=1e-5)
    zero = kl_divergence(torch.zeros(1, 5), torch.zeros(1, 5))
    assert float(zero) == 0.0


def test_elbo_is_calibrated_gaussian_nll_plus_beta_kl() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    recon = torch.full((2, 1, 4, 4), 0.25)
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
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


def test_augment_keeps_shape_and_none_is_identity() -> None:
    x = torch.rand(4, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, "none", gen), x)
    for mode in ("flip", "shift", "flip+shift"):
        out = augment_batch(x, mode, gen)
        assert out.shape == x.shape


def test_training_reduces_the_loss_and_keeps_the_best_epoch() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, (1, 1, 16, 16)).astype(np.float32)
    images = np.clip(base + rng.normal(0, 0.02, (12, 1, 16, 16)), 0, 1).astype(np.float32)
    config = FitConfig(image_size=16, epochs=15, batch_size=4, patience=50, progress=False)
    torch.manual_seed(0)
    model = VAE(VAEConfig(channels=1, image_size=16, latent_dim=4, width=4, max_width=8))
    result = train_vae(model, images[:8], images[8:], config, torch.device("cpu"))
    losses = [s.val_loss for s in result.history]
    assert len(losses) == 15
    assert min(losses) < losses[0]
    assert result.history[result.best_epoch - 1].val_loss == min(losses)
    assert not model.training


def test_early_stopping() -> None:
    images = np.full((6, 1, 16, 16), 0.5, dtype=np.float32)
    config = FitConfig(image_size=16, epochs=50, batch_size=4, patience=1, progress=False)
    model = VAE(VAEConfig(channels=1, image_size=16, latent_dim=4, width=4, max_width=8))
    result = train_vae(model, images[:4], images[4:], config, torch.device("cpu"))
    assert len(result.history) < 50
    assert result.stop_reason.startswith("early stop")


def test_device_policy() -> None:
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="cuda"):
            select_device("cuda")
