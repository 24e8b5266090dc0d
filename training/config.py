"""The typed, frozen configuration of a fit; filled from CLI flags and written into the manifest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from service.preprocessing import ResizeMethod
from service.scoring import SCORE_NAMES
from training.errors import ConfigError

ColorChoice = Literal["auto", "L", "RGB"]
Device = Literal["auto", "cpu", "cuda"]
Augment = Literal["none", "flip", "shift", "flip+shift"]

COLOR_CHOICES: tuple[ColorChoice, ...] = ("auto", "L", "RGB")
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
AUGMENTS: tuple[Augment, ...] = ("none", "flip", "shift", "flip+shift")
RESIZE_METHODS: tuple[ResizeMethod, ...] = ("bilinear", "bicubic", "nearest", "lanczos", "box")


@dataclass(frozen=True)
class FitConfig:
    """Every choice of a fit; the defaults are the recommended settings for any product line."""

    # Input: images are resized to image_size x image_size; "auto" colour keeps RGB unless every
    # training image is greyscale.
    image_size: int = 64
    color_mode: ColorChoice = "auto"
    resize: ResizeMethod = "bilinear"
    # Model: by default a spatial latent of latent_channels per latent_stride x latent_stride
    # cell (sharp reconstructions); latent_channels=0 gives a vector latent of latent_dim.
    latent_channels: int = 8
    latent_stride: int = 8
    latent_dim: int = 128
    width: int = 32
    max_width: int = 128
    res_blocks: int = 1
    # 1 is the true ELBO: the decoder's pixel noise is calibrated (see training.loss).
    beta: float = 1.0
    # Optimisation. The learning rate warms up and anneals over whichever runs out first, the
    # epochs or the time budget, so a CPU run ends on time with a fully annealed model.
    epochs: int = 300
    time_limit_minutes: float | None = 12.0
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 40
    augment: Augment = "none"
    # Share of training inputs given a synthetic defect to repair (a denoising VAE): the model
    # learns to reconstruct the normal part under a defect, so defects leave large errors.
    corruption: float = 0.5
    # Data split: the held-out normal images serve early stopping and calibration.
    holdout_fraction: float = 0.2
    min_holdout: int = 4
    seed: int = 0
    device: Device = "auto"
    threads: int | None = None
    # Calibration and decision: None chooses the local window and score weights on synthetic
    # anomalies pasted into held-out normal images.
    target_false_alarm_rate: float = 0.01
    local_window: int | None = None
    weights: Mapping[str, float] | None = field(default=None)
    # Data handling and output.
    skip_bad_images: bool = False
    model_version: str = "1"
    progress: bool = True

    def __post_init__(self) -> None:
        positive_ints = ("image_size", "latent_dim", "width", "max_width", "epochs", "batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"option {name} has value {value!r}; expected an integer >= 1")
        if self.image_size < 16 or self.image_size % 8:
            raise ConfigError(
                f"option image_size has value {self.image_size}; expected a multiple of 8, >= 16"
            )
        _check_choice("color_mode", self.color_mode, COLOR_CHOICES)
        _check_choice("resize", self.resize, RESIZE_METHODS)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("device", self.device, DEVICES)
        if self.res_blocks < 0 or self.latent_channels < 0:
            raise ConfigError(
                f"options res_blocks={self.res_blocks}, latent_channels={self.latent_channels}; "
                "expected integers >= 0"
            )
        if self.patience < 1 or self.min_holdout < 2:
            raise ConfigError(
                f"options patience={self.patience}, min_holdout={self.min_holdout}; "
                "expected >= 1 and >= 2"
            )
        if self.latent_channels and (
            self.latent_stride not in (2, 4, 8, 16, 32) or self.image_size % self.latent_stride
        ):
            raise ConfigError(
                f"option latent_stride has value {self.latent_stride}; expected a power of 2 "
                f"from 2 to 32 that divides image_size {self.image_size}"
            )
        _check_open_unit("holdout_fraction", self.holdout_fraction)
        if not (math.isfinite(self.corruption) and 0.0 <= self.corruption <= 1.0):
            raise ConfigError(
                f"option corruption has value {self.corruption!r}; expected a number in [0, 1]"
            )
        _check_open_unit("target_false_alarm_rate", self.target_false_alarm_rate)
        for name in ("beta", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"option {name} has value {value!r}; expected a number > 0")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(
                f"option weight_decay has value {self.weight_decay!r}; expected a number >= 0"
            )
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise ConfigError(
                f"option time_limit_minutes has value {self.time_limit_minutes!r}; expected > 0"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"option threads has value {self.threads!r}; expected >= 1")
        if self.local_window is not None and self.local_window < 1:
            raise ConfigError(
                f"option local_window has value {self.local_window!r}; expected an integer >= 1"
            )
        if self.weights is not None:
            _check_weights(self.weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written into the manifest's training section."""
        data = asdict(self)
        data["weights"] = dict(self.weights) if self.weights is not None else None
        return data


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``name=value,name=value`` (score names from the scoring module) into weights."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value) if sep else math.nan
        except ValueError:
            weights[name.strip()] = math.nan
    _check_weights(weights, text)
    return weights


def _check_weights(weights: Mapping[str, float], text: str | None = None) -> None:
    shown = text if text is not None else dict(weights)
    unknown = set(weights) - set(SCORE_NAMES)
    bad = [name for name, w in weights.items() if not math.isfinite(w) or w < 0]
    if unknown or bad or not any(w > 0 for w in weights.values()):
        raise ConfigError(
            f"option weights has value {shown!r}; expected name=value pairs with names among "
            f"{', '.join(SCORE_NAMES)}, values >= 0 and at least one > 0"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"option {name} has value {value!r}; expected one of {list(choices)}")


def _check_open_unit(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ConfigError(f"option {name} has value {value!r}; expected a number in (0, 1)")
