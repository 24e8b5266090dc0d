"""The networks: a fully convolutional VAE and the defect head. Pure ``nn.Module``s, no training.

VAE. The encoder is a stride-1 stem and ``levels`` stride-2 downsamplings (residual blocks from
the second level on) to a grid of cells, one per ``latent_stride x latent_stride`` pixels; a 1x1
convolution gives ``latent_channels`` posterior means and log-variances per cell. The decoder
mirrors it with transposed convolutions and ends in a sigmoid, so reconstructions live in the
[0, 1] pixel range of the input. Nothing depends on the image size: the model is trained on crops
and applied to whole images, and each cell describes only its neighbourhood, so fine detail
survives while the KL term still limits how much a cell can say.

Coarse VAE. The same VAE at an eighth of the resolution (``coarse_factor``), with no defect
head, trained on whole images rather than crops: each of its cells describes a
``coarse_factor * 8``-pixel square, and it sees the whole part at once, so it cannot redraw a
defect that covers much of the image (a broken bottle neck, a dark region of a solar cell) the
way the local model, which learns every neighbourhood on its own, can. Its reconstruction error
is the ``coarse_error`` score.

Defect head. A small U-Net that reads the input beside its reconstruction and gives a per-pixel
anomaly logit (DRAEM, Zavrtanik et al., 2021): it learns, from synthetic defects, which
differences between an image and its reconstruction are defects and which are the ordinary
imperfections of the reconstruction. With ``head_count`` above 1, that many heads learn side by
side from their own starting weights (:class:`DefectHeads`) and the exported map is their mean
probability: what a head learns about real defects from synthetic ones depends on where it
started, and a mean depends less on any one start.

The exported graphs (:class:`FlatEncoder`, :class:`FlatDecoder`, :class:`ProbabilityHead`,
:class:`CoarseGraph`) hold
only the inference path at one input size, with the latent flattened to ``(N, D)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

STRIDES = (2, 4, 8, 16, 32)
COARSE_FACTORS = (2, 4, 8)
COARSE_STRIDE = 8  # the coarse VAE's pixels per latent cell, at its own resolution
# Input sides are multiples of the coarse VAE's cell up to this many pixels; a coarser cell's
# input is padded to whole cells instead (:func:`pad_to_cells`), so that the coarse factor does
# not coarsen the input sizes a frame of another shape can have.
COARSE_CELL_LIMIT = 32


@dataclass(frozen=True)
class VAEConfig:
    """Everything that rebuilds the networks; stored in the bundle's manifest."""

    channels: int = 3
    width: int = 16
    max_width: int = 128
    res_blocks: int = 1
    latent_channels: int = 8
    latent_stride: int = 8
    head_width: int = 4  # 0: no defect head
    head_count: int = 2  # defect heads learning side by side; the bundle's map is their mean
    coarse_factor: int = 8  # 0: no coarse VAE (the coarse VAE itself)
    coarse_width: int = 32

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels is {self.channels}; expected 1 or 3")
        for name in ("width", "max_width", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected an integer >= 1")
        if self.head_count < 1:
            raise ValueError(f"head_count is {self.head_count}; expected an integer >= 1")
        if self.res_blocks < 0 or self.head_width < 0:
            raise ValueError(
                f"res_blocks is {self.res_blocks} and head_width {self.head_width}; "
                "expected integers >= 0"
            )
        if self.coarse_factor and self.coarse_factor not in COARSE_FACTORS:
            raise ValueError(
                f"coarse_factor is {self.coarse_factor}; expected one of {list(COARSE_FACTORS)}"
            )
        if self.coarse_width < 1:
            raise ValueError(f"coarse_width is {self.coarse_width}; expected an integer >= 1")
        if self.latent_stride not in STRIDES:
            raise ValueError(
                f"latent_stride is {self.latent_stride}; expected one of {list(STRIDES)}"
            )

    @property
    def levels(self) -> int:
        """Stride-2 stages from the input to the latent grid."""
        return self.latent_stride.bit_length() - 1

    @property
    def crop_multiple(self) -> int:
        """Training crops' sides must be multiples of this: the latent stride, and the head's 8."""
        return max(self.latent_stride, HEAD_STRIDE if self.head_width else 1)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: the crop multiple, and the coarse VAE's cell
        up to ``COARSE_CELL_LIMIT`` pixels."""
        return max(self.crop_multiple, min(self.coarse_factor * COARSE_STRIDE, COARSE_CELL_LIMIT))

    def coarse(self) -> VAEConfig:
        """The coarse VAE's configuration (it has no head and no coarse VAE of its own)."""
        if not self.coarse_factor:
            raise ValueError("this configuration has no coarse VAE")
        return VAEConfig(
            channels=self.channels,
            width=self.coarse_width,
            max_width=self.max_width,
            res_blocks=self.res_blocks,
            latent_channels=self.latent_channels,
            latent_stride=COARSE_STRIDE,
            head_width=0,
            coarse_factor=0,
        )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent cells ``(rows, columns)`` of a ``height x width`` input."""
        m = self.size_multiple
        if height < m or width < m or height % m or width % m:
            raise ValueError(f"input {height}x{width}: each side must be a multiple of {m}")
        return height // self.latent_stride, width // self.latent_stride

    def latent_size(self, height: int, width: int) -> int:
        """``D``, the length of the flattened ``mu``, ``logvar`` and ``z`` of one image."""
        rows, columns = self.grid(height, width)
        return self.latent_channels * rows * columns

    def level_widths(self) -> list[int]:
        """Channels after each downsampling, shallow to deep."""
        return [min(self.width * 2**i, self.max_width) for i in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution, batch norm, activation; kernel 3 keeps the size, kernel 4 stride 2 halves it."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        _act(),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """Transposed convolution doubling the size, batch norm, activation."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        _act(),
    )


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; keeps shape ``(B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            _act(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = _act()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(x + self.body(x))
        return out


class Encoder(nn.Module):
    """``(B, C, H, W)`` in [0, 1] -> ``mu``, ``logvar``, each ``(B, k, H/s, W/s)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.level_widths()
        stem = max(widths[0] // 2, 8)
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, stem, 3, padding=1), _act()]
        c_in = stem
        for i, c_out in enumerate(widths):
            layers.append(_conv(c_in, c_out, kernel=4, stride=2))
            # The first level runs at half resolution, the costliest; blocks start one deeper.
            layers += [ResBlock(c_out) for _ in range(cfg.res_blocks if i > 0 else 0)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 2 * cfg.latent_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.features(x)).chunk(2, dim=1)  # (B, k, h, w) each
        return mu, logvar


class Decoder(nn.Module):
    """``z (B, k, h, w)`` -> reconstruction ``(B, C, h*s, w*s)`` in [0, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.level_widths()[::-1]
        outs = [*widths[1:], max(widths[-1] // 2, 8)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, widths[0], 1), _act()]
        for i, (c_in, c_out) in enumerate(zip(widths, outs, strict=True)):
            layers += [ResBlock(c_in) for _ in range(cfg.res_blocks if i < len(widths) - 1 else 0)]
            layers.append(_up(c_in, c_out))
        layers += [nn.Conv2d(outs[-1], cfg.channels, 3, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = self.features(z)
        return out


HEAD_STRIDE = 8  # the defect head's U-Net halves the size three times


class DefectHead(nn.Module):
    """``(image, recon)``, each ``(B, C, H, W)`` -> per-pixel anomaly logits ``(B, 1, H, W)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        w = cfg.head_width
        # Input: the image, its reconstruction and their squared difference.
        self.down = nn.ModuleList(
            [
                nn.Sequential(_conv(3 * cfg.channels, w), _conv(w, w)),
                nn.Sequential(_conv(w, 2 * w, 4, 2), _conv(2 * w, 2 * w)),
                nn.Sequential(_conv(2 * w, 4 * w, 4, 2), _conv(4 * w, 4 * w)),
                nn.Sequential(_conv(4 * w, 8 * w, 4, 2), _conv(8 * w, 8 * w)),
            ]
        )
        self.up = nn.ModuleList([_up(8 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w)])
        self.merge = nn.ModuleList([_conv(8 * w, 4 * w), _conv(4 * w, 2 * w), _conv(2 * w, w)])
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        h = torch.cat([image, recon, (image - recon).pow(2)], dim=1)
        skips: list[Tensor] = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1], strict=True):
            h = merge(torch.cat([up(h), skip], dim=1))
        logits: Tensor = self.out(h)
        return logits


class DefectHeads(nn.Module):
    """``cfg.head_count`` defect heads, each from its own starting weights:
    ``(image, recon)`` -> each head's logits side by side, ``(B, head_count, H, W)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.members = nn.ModuleList(DefectHead(cfg) for _ in range(cfg.head_count))

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        return torch.cat([member(image, recon) for member in self.members], dim=1)


def build_head(cfg: VAEConfig) -> DefectHead | DefectHeads | None:
    """The model's defect head: none at ``head_width`` 0, one :class:`DefectHead` (whose weights
    and graph are those of bundles made before ``head_count`` existed), or several."""
    if not cfg.head_width:
        return None
    return DefectHead(cfg) if cfg.head_count == 1 else DefectHeads(cfg)


class VAE(nn.Module):
    """Encoder, reparameterisation, decoder, and (when configured) the defect head and the
    coarse VAE, trained apart on whole images downsampled by ``cfg.coarse_factor``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.head = build_head(cfg)
        self.coarse = VAE(cfg.coarse()) if cfg.coarse_factor else None

    def own_parameters(self) -> list[nn.Parameter]:
        """The encoder's, decoder's and head's parameters: not the coarse VAE's."""
        parts = [self.encoder, self.decoder, *([self.head] if self.head is not None else [])]
        return [p for part in parts for p in part.parameters()]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction from a sampled latent in training, from ``mu`` in eval mode."""
        mu, logvar = self.encoder(x)
        z = reparameterise(mu, logvar) if self.training else mu
        return self.decoder(z), mu, logvar


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    """Sample ``z = mu + sigma * eps`` differentiably."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class FlatEncoder(nn.Module):
    """The exported encoder: ``image (N, C, H, W)`` -> ``mu``, ``logvar`` flattened to ``(N, D)``.

    ``D`` is ordered channel-major, then row, then column: ``mu.view(N, k, rows, columns)``.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(image)
        return mu.flatten(1), logvar.flatten(1)


class FlatDecoder(nn.Module):
    """The exported decoder: ``z (N, D)`` -> ``recon (N, C, H, W)`` at one input size."""

    def __init__(self, decoder: Decoder, latent_channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.shape = (latent_channels, *grid)

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = self.decoder(z.view(-1, *self.shape))
        return out


class ProbabilityHead(nn.Module):
    """The exported defect head: ``(image, recon)`` -> anomaly probability ``(N, H, W)``, the
    mean of the heads' probabilities where there are several."""

    def __init__(self, head: DefectHead | DefectHeads) -> None:
        super().__init__()
        self.head = head
        self.single = isinstance(head, DefectHead)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        probability = torch.sigmoid(self.head(image, recon))
        if self.single:
            return probability.squeeze(1)
        return probability.mean(dim=1)


def downsample(images: Tensor, factor: int) -> Tensor:
    """The coarse VAE's input: the mean of each ``factor x factor`` square of pixels."""
    return nn.functional.avg_pool2d(images, factor)


def cell_padding(height: int, width: int) -> tuple[int, int]:
    """Rows and columns that extend a coarse VAE input of ``height x width`` pixels to whole cells
    of ``COARSE_STRIDE`` pixels."""
    return -height % COARSE_STRIDE, -width % COARSE_STRIDE


def pad_to_cells(small: Tensor, padding: tuple[int, int]) -> Tensor:
    """The coarse VAE's input ``(N, C, h, w)`` extended below by ``padding[0]`` rows and to the
    right by ``padding[1]`` columns (:func:`cell_padding`), each a copy of the last one."""
    rows, columns = padding
    # Concatenated copies rather than a replicate pad: the exporter writes that pad with
    # reversed slices, which its constant folding warns about.
    if rows:
        small = torch.cat([small, small[:, :, -1:, :].expand(-1, -1, rows, -1)], dim=2)
    if columns:
        small = torch.cat([small, small[:, :, :, -1:].expand(-1, -1, -1, columns)], dim=3)
    return small


class CoarseGraph(nn.Module):
    """The exported coarse VAE for ``size = (H, W)`` inputs: ``image (N, C, H, W)`` -> its
    downsampled input and the coarse VAE's reconstruction of it from the posterior mean, each
    ``(N, C, H/f, W/f)``. The VAE reads the downsampled input padded to whole cells
    (:func:`pad_to_cells`), and its reconstruction of the padding is cut off."""

    def __init__(self, coarse: VAE, factor: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.coarse = coarse
        self.factor = factor
        # Python ints fixed per input size: the traced graph holds no shape arithmetic.
        self.small = (size[0] // factor, size[1] // factor)
        self.padding = cell_padding(*self.small)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        small = downsample(image, self.factor)
        mu, _ = self.coarse.encoder(pad_to_cells(small, self.padding))
        recon: Tensor = self.coarse.decoder(mu)
        if any(self.padding):
            recon = recon.narrow(2, 0, self.small[0]).narrow(3, 0, self.small[1])
        return small, recon
