"""FitConfig (training/config.py): one declaration of every option, its flags and its checks."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from typing import Any

import pytest

from service.scoring import SCORE_NAMES
from training.cli import build_parser, main
from training.config import FitConfig, parse_weights
from training.errors import ConfigError
from training.model import VAEConfig

COMMANDS = ("fit", "benchmark")
POSITIONAL = {"fit": ["data", "--out", "bundle"], "benchmark": ["a", "b", "--out", "suite"]}
# A value other than the default for every option, as flags and as the FitConfig field.
NON_DEFAULT: dict[str, tuple[list[str], Any]] = {
    "image_size": (["--image-size", "64"], 64),
    "aspect": (["--aspect", "square"], "square"),
    "color_mode": (["--color-mode", "L"], "L"),
    "resize": (["--resize", "nearest"], "nearest"),
    "width": (["--width", "24"], 24),
    "max_width": (["--max-width", "64"], 64),
    "res_blocks": (["--res-blocks", "2"], 2),
    "latent_channels": (["--latent-channels", "4"], 4),
    "latent_stride": (["--latent-stride", "16"], 16),
    "head_width": (["--head-width", "12"], 12),
    "head_count": (["--head-count", "1"], 1),
    "coarse_factor": (["--coarse-factor", "2"], 2),
    "coarse_width": (["--coarse-width", "16"], 16),
    "beta": (["--beta", "0.5"], 0.5),
    "crop_size": (["--crop-size", "64"], 64),
    "epochs": (["--epochs", "3"], 3),
    "max_steps": (["--max-steps", "50"], 50),
    "coarse_max_steps": (["--coarse-max-steps", "40"], 40),
    "batch_size": (["--batch-size", "4"], 4),
    "head_share": (["--head-share", "0.5"], 0.5),
    "learning_rate": (["--learning-rate", "1e-3"], 1e-3),
    "weight_decay": (["--weight-decay", "0"], 0.0),
    "corruption": (["--corruption", "0.25"], 0.25),
    "encoder_denoises": (["--no-encoder-denoises"], False),
    "shaded_defects": (["--shaded-defects"], True),
    "jitter": (["--jitter", "0.2"], 0.2),
    "time_limit_minutes": (["--time-limit", "2.5"], 2.5),
    "holdout_fraction": (["--holdout-fraction", "0.3"], 0.3),
    "min_holdout": (["--min-holdout", "3"], 3),
    "seed": (["--seed", "7"], 7),
    "device": (["--device", "cpu"], "cpu"),
    "precision": (["--precision", "bf16"], "bf16"),
    "threads": (["--threads", "2"], 2),
    "cpu_kernels": (["--cpu-kernels", "native"], "native"),
    "target_false_alarm_rate": (["--target-false-alarm-rate", "0.05"], 0.05),
    "local_window": (["--local-window", "6"], 6),
    "weights": (
        ["--weights", "defect_probability=1, latent_distance=0.5"],
        {"defect_probability": 1.0, "latent_distance": 0.5},
    ),
    "skip_bad_images": (["--skip-bad-images"], True),
    "model_version": (["--model-version", "2b"], "2b"),
    "progress": (["--no-progress"], False),
}


def _flag(name: str) -> str:
    """The flag of a FitConfig field as the help shows it."""
    field = next(f for f in fields(FitConfig) if f.name == name)
    if field.type in (bool, "bool") and field.default:
        return "--no-" + name.replace("_", "-")
    return field.metadata["flag"] or "--" + name.replace("_", "-")


def _parse(command: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *POSITIONAL[command], *flags])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_flag_in_the_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    lines = re.findall(r"^\s+(--[\w-]+)(?:, (--[\w-]+))?", capsys.readouterr().out, re.MULTILINE)
    shown = {flag for line in lines for flag in line if flag}
    missing = [f.name for f in fields(FitConfig) if _flag(f.name) not in shown]
    assert missing == []


def test_the_table_of_this_test_covers_every_option() -> None:
    assert set(NON_DEFAULT) == {f.name for f in fields(FitConfig)}
    assert all(_flag(name) == flags[0] for name, (flags, _) in NON_DEFAULT.items())


@pytest.mark.parametrize("name", [f.name for f in fields(FitConfig) if f.type in (bool, "bool")])
def test_a_switch_on_by_default_has_both_spellings_and_the_last_one_wins(name: str) -> None:
    on = "--" + name.replace("_", "-")
    off = "--no-" + name.replace("_", "-")
    if not getattr(FitConfig(), name):
        with pytest.raises(SystemExit):
            _parse("fit", off)
        return
    assert getattr(FitConfig.from_namespace(_parse("fit", off)), name) is False
    assert getattr(FitConfig.from_namespace(_parse("fit", off, on)), name) is True
    assert getattr(FitConfig.from_namespace(_parse("fit", on, off)), name) is False


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flags_give_the_default_config(command: str) -> None:
    assert FitConfig.from_namespace(_parse(command)) == FitConfig()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_reaches_the_config(command: str) -> None:
    flags = [arg for option, _ in NON_DEFAULT.values() for arg in option]
    config = FitConfig.from_namespace(_parse(command, *flags))
    default = FitConfig()
    for name, (_, expected) in NON_DEFAULT.items():
        value = getattr(config, name)
        assert value == expected, name
        assert value != getattr(default, name), f"{name}: the test value is the default"


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"image_size": 30}, "image_size has value 30"),
    ({"image_size": 0}, "image_size has value 0"),
    ({"crop_size": 20}, "crop_size"),
    ({"crop_size": 64, "latent_stride": 16, "image_size": 40}, "image_size has value 40"),
    ({"epochs": 0}, "epochs"),
    ({"max_steps": 0}, "max_steps"),
    ({"coarse_max_steps": 0}, "coarse_max_steps"),
    ({"head_share": 0.0}, "head_share has value 0.0; expected a number in \\(0, 1\\]"),
    ({"head_share": 1.5}, "head_share"),
    ({"head_share": float("nan")}, "head_share"),
    ({"batch_size": 0}, "batch_size"),
    ({"width": 0}, "width"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"latent_stride": 6}, "latent_stride"),
    ({"head_width": -1}, "head_width"),
    ({"head_count": 0}, "head_count has value 0"),
    ({"coarse_factor": 3}, "coarse_factor is 3"),
    ({"coarse_factor": 0}, "coarse_factor has value 0"),
    ({"coarse_width": 0}, "coarse_width"),
    ({"image_size": 48}, "image_size has value 48; expected a multiple of 32"),
    ({"holdout_fraction": 1.5}, "holdout_fraction"),
    ({"min_holdout": 1}, "min_holdout"),
    ({"beta": 0.0}, "beta"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"corruption": 2.0}, "corruption"),
    ({"jitter": 0.9}, "jitter"),
    ({"jitter": float("nan")}, "jitter"),
    ({"time_limit_minutes": 0.0}, "time_limit"),
    ({"threads": 0}, "threads"),
    ({"target_false_alarm_rate": 0.0}, "target_false_alarm_rate"),
    ({"local_window": 0}, "local_window"),
    ({"weights": {"recon": 1.0}}, "weights"),
    ({"weights": {"kl": 0.0}}, "weights"),
    ({"color_mode": "CMYK"}, "color_mode"),
    ({"resize": "cubic"}, "resize"),
    ({"aspect": "wide"}, "aspect"),
    ({"device": "gpu"}, "device"),
]


@pytest.mark.parametrize(
    ("options", "message"),
    BAD_VALUES,
    ids=[",".join(f"{k}={v}" for k, v in options.items()) for options, _ in BAD_VALUES],
)
def test_bad_values_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FitConfig(**options)


def test_model_constraints_are_checked_by_the_model_config() -> None:
    with pytest.raises(ConfigError, match="model options: latent_stride is 6"):
        FitConfig(latent_stride=6)
    model = FitConfig(width=8, latent_channels=3, head_width=4).model_config(channels=1)
    assert (model.channels, model.width, model.latent_channels, model.head_width) == (1, 8, 3, 4)


def test_steps_for_is_epochs_of_batches_capped_at_max_steps() -> None:
    config = FitConfig(epochs=3, batch_size=8, max_steps=100)
    assert [config.steps_for(n) for n in (1, 8, 9, 16, 19)] == [3, 3, 6, 6, 9]
    assert FitConfig(epochs=3, batch_size=8, max_steps=7).steps_for(19) == 7
    # The defaults: 250 passes, at most 2500 steps of 16 crops.
    assert FitConfig().steps_for(80) == 250 * 5 == 1250
    assert FitConfig().steps_for(1000) == 2500


def test_the_coarse_vae_gets_at_most_coarse_max_steps_and_never_more_than_the_local_model() -> None:
    config = FitConfig(epochs=3, batch_size=8, max_steps=100, coarse_max_steps=5)
    assert [config.coarse_steps_for(n) for n in (1, 8, 9, 19)] == [3, 3, 5, 5]
    assert FitConfig(max_steps=20).coarse_steps_for(1000) == 20
    assert FitConfig().coarse_steps_for(1000) == 2500
    assert FitConfig(coarse_max_steps=1250).coarse_steps_for(1000) == 1250


def test_the_head_learns_from_a_share_of_each_batch_and_at_least_one_crop() -> None:
    assert FitConfig().head_batch() == 16
    assert FitConfig(head_share=0.5).head_batch() == 8
    assert FitConfig(batch_size=5, head_share=0.5).head_batch() == 2
    assert FitConfig(batch_size=16, head_share=1.0).head_batch() == 16
    assert FitConfig(batch_size=4, head_share=0.01).head_batch() == 1


def test_parse_weights() -> None:
    assert parse_weights("local_error=1, kl=0.5") == {"local_error": 1.0, "kl": 0.5}
    assert parse_weights("defect_probability=2,latent_distance=1") == {
        "defect_probability": 2.0,
        "latent_distance": 1.0,
    }
    for bad in ("local_error", "kl=x", "foo=1", "kl=0", "kl=-1", ""):
        with pytest.raises(ConfigError, match="weights"):
            parse_weights(bad)


def test_the_weights_example_in_the_help_is_valid() -> None:
    field = next(f for f in fields(FitConfig) if f.name == "weights")
    example = re.search(r"e\.g\. (\S+)", field.metadata["help"])
    assert example is not None
    assert set(parse_weights(example.group(1))) <= set(SCORE_NAMES)


def test_to_dict_is_json_ready() -> None:
    config = FitConfig(weights={"kl": 1.0}, time_limit_minutes=2.0)
    data = config.to_dict()
    assert data["weights"] == {"kl": 1.0} and type(data["weights"]) is dict
    assert {f.name for f in fields(FitConfig)} == set(data)
    assert FitConfig(**data) == config


def test_model_defaults_are_the_networks_defaults() -> None:
    assert FitConfig().model_config(channels=VAEConfig.channels) == VAEConfig()
    # The default's coarse factor, whose padding tests/test_training_fit.py fits.
    assert FitConfig().coarse_factor == 8
