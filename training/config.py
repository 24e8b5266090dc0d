"""The typed, frozen configuration of a fit: the one declaration of every training option.

Each field of :class:`FitConfig` carries its command-line help in its metadata; the ``fit`` and
``benchmark`` commands build their flags from these fields (:func:`add_fit_arguments`) and read
them back with :meth:`FitConfig.from_namespace`, so an option is declared once. The model's own
constraints are checked once, by :class:`training.model.VAEConfig`, which the FitConfig builds.
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from service.preprocessing import ResizeMethod
from service.scoring import SCORE_NAMES
from training.errors import ConfigError
from training.kernels import CPU_KERNELS_FLAG, DEFAULT_CPU_KERNELS, CpuKernels
from training.model import VAEConfig

ColorChoice = Literal["auto", "L", "RGB"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
Aspect = Literal["auto", "square"]


def _option(
    help: str, group: str, *, flag: str | None = None, metavar: str | None = None
) -> dict[str, Any]:
    return {"help": help, "group": group, "flag": flag, "metavar": metavar}


@dataclass(frozen=True)
class FitConfig:
    """Every choice of a fit; the defaults are the recommended settings for any product line."""

    # Input.
    image_size: int = field(
        default=256,
        metadata=_option(
            "model input of about this many pixels squared, in the images' aspect ratio (see "
            "--aspect); never larger than the images",
            "input",
        ),
    )
    aspect: Aspect = field(
        default="auto",
        metadata=_option(
            "auto: the input keeps the median aspect ratio of the training images (sides "
            "rounded to multiples of 8) and every image is resized to it; square: every image "
            "is resized to a square",
            "input",
        ),
    )
    color_mode: ColorChoice = field(
        default="auto", metadata=_option("auto: greyscale if every image is, else RGB", "input")
    )
    resize: ResizeMethod = field(default="bilinear", metadata=_option("resampling filter", "input"))
    # Model: the defaults are VAEConfig's, so that the two cannot disagree.
    width: int = field(
        default=VAEConfig.width, metadata=_option("channels of the VAE's first level", "model")
    )
    max_width: int = field(
        default=VAEConfig.max_width, metadata=_option("most channels of a VAE level", "model")
    )
    res_blocks: int = field(
        default=VAEConfig.res_blocks, metadata=_option("residual blocks per level", "model")
    )
    latent_channels: int = field(
        default=VAEConfig.latent_channels,
        metadata=_option("latent channels per cell of the latent grid", "model"),
    )
    latent_stride: int = field(
        default=VAEConfig.latent_stride,
        metadata=_option("input pixels per latent cell, along each side", "model"),
    )
    head_width: int = field(
        default=VAEConfig.head_width,
        metadata=_option("channels of the defect head's first level", "model"),
    )
    head_count: int = field(
        default=VAEConfig.head_count,
        metadata=_option(
            "defect heads learning side by side from their own starting weights; the bundle's "
            "map is their mean probability (each costs a head's share of a training step and "
            'of scoring: see "Two narrow heads" in docs/quality-history.md)',
            "model",
        ),
    )
    coarse_factor: int = field(
        default=VAEConfig.coarse_factor,
        metadata=_option(
            "the coarse VAE sees whole images downsampled by this factor (2, 4 or 8), in "
            "cells of 8 of its pixels; input sides must be multiples of 8 times it, at most "
            "32 (past that its input is padded to whole cells)",
            "model",
        ),
    )
    coarse_width: int = field(
        default=VAEConfig.coarse_width,
        metadata=_option("channels of the coarse VAE's first level", "model"),
    )
    beta: float = field(
        default=1.0, metadata=_option("weight of the KL term (1: the ELBO)", "model")
    )
    # Training budget and optimisation: a budget in steps, so the same data and seed give the
    # same model on a quiet or a busy machine.
    crop_size: int = field(
        default=96,
        metadata=_option("side of the square training crops (multiple of 8)", "training"),
    )
    epochs: int = field(
        default=250,
        metadata=_option(
            "passes over the training images (one crop of each per pass); capped by --max-steps",
            "training",
        ),
    )
    max_steps: int = field(
        default=2500, metadata=_option("most optimiser steps, whatever the data size", "training")
    )
    coarse_max_steps: int = field(
        default=2500,
        metadata=_option(
            "most optimiser steps of the coarse VAE, never more than the local model's (1250 "
            "halves its training time: see docs/quality-history.md)",
            "training",
        ),
    )
    batch_size: int = field(default=16, metadata=_option("crops per step", "training"))
    head_share: float = field(
        default=1.0,
        metadata=_option(
            "share of each step's crops the defect head learns from (its full-resolution "
            "layers are the costliest part of a step: 0.5 saves about a quarter of it)",
            "training",
        ),
    )
    learning_rate: float = field(default=2e-3, metadata=_option("peak learning rate", "training"))
    weight_decay: float = field(default=1e-5, metadata=_option("AdamW weight decay", "training"))
    corruption: float = field(
        default=0.5,
        metadata=_option(
            "share of training crops given a synthetic defect to repair and to segment",
            "training",
        ),
    )
    encoder_denoises: bool = field(
        default=True,
        metadata=_option(
            "train the encoder on corrupted crops too, so that the local model repairs defects "
            "and its error and defect head see them (off: clean crops only; the latent then "
            "describes defects, latent_distance gains and the verdicts lose)",
            "training",
        ),
    )
    shaded_defects: bool = field(
        default=False,
        metadata=_option(
            "add regions of the part's own surface darkened or brightened to the synthetic "
            "defects (a quarter of them), which the VAEs learn to repair and the defect head to "
            "find: the head then finds areas gone dark; image AUROC +0.007 over four datasets "
            "and three seeds, but not the default: on bottle the head then reads a 10%% change "
            "of the whole part's light as a defect (check the fit's lighting line; see "
            '"Shaded regions" in docs/quality-history.md)',
            "training",
        ),
    )
    jitter: float = field(
        default=0.1,
        metadata=_option(
            "largest random change of brightness and contrast of a training crop, so that "
            "lighting changes are not defects (0: none)",
            "training",
        ),
    )
    time_limit_minutes: float | None = field(
        default=None,
        metadata=_option(
            "optional wall-clock budget; the schedule anneals to whichever budget ends first "
            "(the model then depends on the machine's speed)",
            "training",
            flag="--time-limit",
            metavar="MINUTES",
        ),
    )
    holdout_fraction: float = field(
        default=0.2,
        metadata=_option("share of the images held out for calibration and validation", "training"),
    )
    min_holdout: int = field(default=4, metadata=_option("fewest held-out images", "training"))
    seed: int = field(default=0, metadata=_option("random seed", "training"))
    device: Device = field(default="auto", metadata=_option("where torch trains", "training"))
    precision: Precision = field(
        default="fp32",
        metadata=_option(
            "arithmetic of the training's networks: bf16 is bfloat16 mixed precision (weights, "
            "updates and losses in float32), whose training steps take about 0.6 of the time "
            "on a CPU with Intel AMX; over six development fits its models' image AUROC was "
            "0.005 lower on average, two of them 0.03-0.04 lower (see docs/quality-history.md); "
            "AMX needs --cpu-kernels native; auto is bf16 on such a CPU with native kernels "
            "and fp32 elsewhere (CUDA included). The bundle's graphs are float32 either way",
            "training",
        ),
    )
    threads: int | None = field(default=None, metadata=_option("CPU threads of torch", "training"))
    cpu_kernels: CpuKernels = field(
        default=DEFAULT_CPU_KERNELS,
        metadata=_option(
            "instruction set of the CPU kernels (torch, oneDNN, MKL, numpy, OpenBLAS): avx2 holds "
            "them to AVX2 on a CPU with AVX-512, so that every x86 CPU trains the same model from "
            "the same command and seed (on this project's AMD CPU it is also the faster); native "
            "lets them use the CPU's widest set, which trains other weights there (and may be "
            "faster on Intel CPUs with AVX-512). Set before numpy and torch load: the command "
            "line does it; a Python caller calls training.kernels.hold_cpu_kernels first",
            "training",
            flag=CPU_KERNELS_FLAG,  # the flag the command line's pre-parser reads too
        ),
    )
    # Decision: None takes the default window and score weights (training.calibrate).
    target_false_alarm_rate: float = field(
        default=0.01, metadata=_option("false-alarm rate of the default threshold", "decision")
    )
    local_window: int | None = field(
        default=None,
        metadata=_option(
            "side of the window of the local scores in pixels (default: the shorter image side "
            "/ 32)",
            "decision",
        ),
    )
    weights: Mapping[str, float] | None = field(
        default=None,
        metadata=_option(
            "combined-score weights, e.g. defect_probability=1,local_error=1 (default: "
            "defect_probability, local_error, latent_distance and coarse_error, 1 each)",
            "decision",
            metavar="NAME=W,...",
        ),
    )
    # Data handling and output.
    skip_bad_images: bool = field(
        default=False,
        metadata=_option("skip and count unreadable images instead of stopping", "output"),
    )
    model_version: str = field(default="1", metadata=_option("human version string", "output"))
    progress: bool = field(default=True, metadata=_option("show a progress bar", "output"))

    def __post_init__(self) -> None:
        for name in (
            "image_size", "crop_size", "epochs", "max_steps", "coarse_max_steps", "batch_size",
            "head_width", "head_count",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"option {name} has value {value!r}; expected an integer >= 1")
        hints = typing.get_type_hints(FitConfig)
        for f in fields(self):
            choices = _literal_choices(hints[f.name])
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"option {f.name} has value {getattr(self, f.name)!r}; expected one of "
                    f"{list(choices)}"
                )
        if self.min_holdout < 2:
            raise ConfigError(f"option min_holdout has value {self.min_holdout}; expected >= 2")
        try:
            model = self.model_config(channels=1)
        except ValueError as exc:
            raise ConfigError(f"model options: {exc}") from exc
        if not model.coarse_factor:
            raise ConfigError("option coarse_factor has value 0; expected 2, 4 or 8")
        if self.crop_size % model.crop_multiple:
            raise ConfigError(
                f"option crop_size has value {self.crop_size}; expected a multiple of "
                f"{model.crop_multiple}"
            )
        if self.image_size % model.size_multiple:
            raise ConfigError(
                f"option image_size has value {self.image_size}; expected a multiple of "
                f"{model.size_multiple}"
            )
        _check_open_unit("holdout_fraction", self.holdout_fraction)
        _check_open_unit("target_false_alarm_rate", self.target_false_alarm_rate)
        for name, low, high in (("corruption", 0.0, 1.0), ("jitter", 0.0, 0.5)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(
                    f"option {name} has value {value!r}; expected a number in [{low}, {high}]"
                )
        if not (math.isfinite(self.head_share) and 0 < self.head_share <= 1):
            raise ConfigError(
                f"option head_share has value {self.head_share!r}; expected a number in (0, 1]"
            )
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
                f"option time_limit has value {self.time_limit_minutes!r}; expected minutes > 0"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"option threads has value {self.threads!r}; expected >= 1")
        if self.local_window is not None and self.local_window < 1:
            raise ConfigError(
                f"option local_window has value {self.local_window!r}; expected an integer >= 1"
            )
        if self.weights is not None:
            _check_weights(self.weights)

    def model_config(self, *, channels: int) -> VAEConfig:
        """The network configuration these options describe, for ``channels`` input channels."""
        return VAEConfig(
            channels=channels,
            width=self.width,
            max_width=self.max_width,
            res_blocks=self.res_blocks,
            latent_channels=self.latent_channels,
            latent_stride=self.latent_stride,
            head_width=self.head_width,
            head_count=self.head_count,
            coarse_factor=self.coarse_factor,
            coarse_width=self.coarse_width,
        )

    def steps_for(self, n_train: int) -> int:
        """The step budget for ``n_train`` training images: ``epochs`` passes, at most max_steps."""
        per_pass = max(1, math.ceil(n_train / self.batch_size))
        return min(self.epochs * per_pass, self.max_steps)

    def coarse_steps_for(self, n_train: int) -> int:
        """The coarse VAE's step budget: the local model's, at most coarse_max_steps."""
        return min(self.steps_for(n_train), self.coarse_max_steps)

    def head_batch(self) -> int:
        """Crops per step that the defect head learns from: head_share of a batch, at least 1."""
        return max(1, round(self.head_share * self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written into the manifest's training section."""
        data = asdict(self)
        data["weights"] = dict(self.weights) if self.weights is not None else None
        return data

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> FitConfig:
        """The FitConfig of the flags that :func:`add_fit_arguments` added."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        if values["weights"] is not None:
            values["weights"] = parse_weights(values["weights"])
        return cls(**values)


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per FitConfig field, in groups, with its default and help."""
    groups: dict[str, Any] = {}
    hints = typing.get_type_hints(FitConfig)
    for f in fields(FitConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or parser.add_argument_group(meta["group"])
        groups[meta["group"]] = group
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kind = hints[f.name]
        options: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": default}
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if kind is bool:
            # A flag on by default reads --X / --no-X, each with the option's own help.
            action = argparse.BooleanOptionalAction if default else "store_true"
            group.add_argument(flag, action=action, **options)
            continue
        choices = _literal_choices(kind)
        if choices:
            options["choices"] = choices
        elif f.name != "weights":
            options["type"] = _scalar_type(kind)
        group.add_argument(flag, **options)


def _literal_choices(kind: Any) -> tuple[str, ...] | None:
    if typing.get_origin(kind) is Literal:
        return tuple(typing.get_args(kind))
    return None


def _scalar_type(kind: Any) -> type:
    """``int``, ``float`` or ``str`` for a field typed as one of them, optionally ``| None``."""
    options = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    (scalar,) = options
    if scalar not in (int, float, str):
        raise TypeError(f"no command-line type for {kind!r}")
    return scalar  # type: ignore[no-any-return]


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


def _check_open_unit(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ConfigError(f"option {name} has value {value!r}; expected a number in (0, 1)")
