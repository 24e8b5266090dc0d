"""The convolutional VAE: pure ``nn.Module``s, no training logic.

Encoder: a stride-1 stem, then ``levels`` stride-2 downsamplings (each optionally followed by
residual blocks) to a ``bottom x bottom`` feature map. The latent is either

- a vector (``latent_channels == 0``): the map, downsampled to 4x4, goes through a linear layer
  to ``latent_dim`` means and log-variances; or
- a spatial grid (``latent_channels > 0``): a 1x1 convolution turns the map at 1/``latent_stride``
  of the input size into ``latent_channels`` means and log-variances per cell, flattened to
  ``(B, D)`` with ``D = latent_channels * bottom^2``. Each cell describes its neighbourhood, so
  fine detail survives and reconstructions are sharp, while the KL term still limits how much
  the code can say.

The decoder mirrors the encoder with transposed convolutions and ends in a sigmoid, so
reconstructions live in the [0, 1] pixel range of the input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

MIN_BOTTOM = 4


@dataclass(frozen=True)
class VAEConfig:
    """Everything that rebuilds the network; stored in the bundle's manifest."""

    channels: int = 3
    image_size: int = 128
    latent_dim: int = 128
    width: int = 32
    max_width: int = 256
    res_blocks: int = 1
    latent_channels: int = 0
    latent_stride: int = 8

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels is {self.channels}; expected 1 or 3")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"image_size is {self.image_size}; expected a multiple of 8, >= 16")
        for name in ("latent_dim", "width", "max_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected a positive integer")
        if self.res_blocks < 0 or self.latent_channels < 0:
            raise ValueError(
                f"res_blocks is {self.res_blocks} and latent_channels {self.latent_channels}; "
                "expected 0 or more"
            )
        if self.spatial and (
            self.latent_stride not in (2, 4, 8, 16, 32) or self.image_size % self.latent_stride
        ):
            raise ValueError(
                f"latent_stride is {self.latent_stride}; expected a power of 2 from 2 to 32 that "
                f"divides image_size {self.image_size}"
            )

    @property
    def spatial(self) -> bool:
        """Whether the latent is a grid of cells rather than one vector."""
        return self.latent_channels > 0

    @property
    def latent_size(self) -> int:
        """``D``: the length of ``mu``, ``logvar`` and ``z``."""
        return self.latent_channels * self.bottom**2 if self.spatial else self.latent_dim

    @property
    def levels(self) -> int:
        """Stride-2 stages: to 1/``latent_stride`` (spatial), or halving down to 4x4 (vector)."""
        if self.spatial:
            return self.latent_stride.bit_length() - 1
        levels, size = 0, self.image_size
        while size % 2 == 0 and size // 2 >= MIN_BOTTOM and levels < 6:
            levels, size = levels + 1, size // 2
        return levels

    @property
    def bottom(self) -> int:
        """Side of the deepest feature map."""
        return self.image_size >> self.levels

    def level_widths(self) -> list[int]:
        """Channels after each downsampling, shallow to deep."""
        return [min(self.width * 2**i, self.max_width) for i in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; keeps shape ``(B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(x + self.body(x))
        return out


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _res_blocks(channels: int, count: int) -> list[nn.Module]:
    return [ResBlock(channels) for _ in range(count)]


class Encoder(nn.Module):
    """``(B, C, H, W)`` in [0, 1] -> ``mu (B, D)``, ``logvar (B, D)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.level_widths()
        stem = max(widths[0] // 2, 8)
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, stem, 3, padding=1), nn.LeakyReLU(0.2)]
        c_in = stem
        for i, c_out in enumerate(widths):
            layers.append(_down(c_in, c_out))
            # The first, full-resolution-ish level is the costliest; blocks start one level deeper.
            layers += _res_blocks(c_out, cfg.res_blocks if i > 0 else 0)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.spatial = cfg.spatial
        self.head: nn.Module = (
            nn.Conv2d(c_in, 2 * cfg.latent_channels, 1)
            if cfg.spatial
            else nn.Linear(c_in * cfg.bottom * cfg.bottom, 2 * cfg.latent_dim)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)  # (B, C', b, b)
        if self.spatial:
            mu, logvar = self.head(h).chunk(2, dim=1)  # (B, k, b, b) each
            return mu.flatten(1), logvar.flatten(1)  # (B, D) each
        mu, logvar = self.head(h.flatten(1)).chunk(2, dim=1)  # (B, D) each
        return mu, logvar


class Decoder(nn.Module):
    """``z (B, D)`` -> reconstruction ``(B, C, H, W)`` in [0, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.level_widths()[::-1]
        self.bottom = cfg.bottom
        self.top_channels = widths[0]
        self.latent_channels = cfg.latent_channels
        self.head: nn.Module = (
            nn.Conv2d(cfg.latent_channels, widths[0], 1)
            if cfg.spatial
            else nn.Linear(cfg.latent_dim, widths[0] * cfg.bottom * cfg.bottom)
        )
        layers: list[nn.Module] = [nn.LeakyReLU(0.2)]
        outs = [*widths[1:], max(widths[-1] // 2, 8)]
        for i, (c_in, c_out) in enumerate(zip(widths, outs, strict=True)):
            layers += _res_blocks(c_in, cfg.res_blocks if i < len(widths) - 1 else 0)
            layers.append(_up(c_in, c_out))
        layers += [nn.Conv2d(outs[-1], cfg.channels, 3, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if self.latent_channels:
            grid = z.view(-1, self.latent_channels, self.bottom, self.bottom)  # (B, k, b, b)
            h = self.head(grid)  # (B, C', b, b)
        else:
            h = self.head(z).view(-1, self.top_channels, self.bottom, self.bottom)
        out: Tensor = self.features(h)  # (B, C, H, W)
        return out


class VAE(nn.Module):
    """Encoder, reparameterisation and decoder."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction from a sampled latent in training, from ``mu`` in eval mode."""
        mu, logvar = self.encoder(x)  # (B, D) each
        z = reparameterise(mu, logvar) if self.training else mu
        return self.decoder(z), mu, logvar


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    """Sample ``z = mu + sigma * eps`` differentiably."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
