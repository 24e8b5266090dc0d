"""Server options (service/config.py): flags over ANOMALY_* variables over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, ServeConfig, load_config
from service.drift import DriftSettings


def test_defaults_need_only_the_bundle() -> None:
    config = load_config(["--bundle", "b"], environ={})
    assert config == ServeConfig(bundle=Path("b"))
    assert (config.port, config.metrics_port, config.device) == (50051, 9100, "auto")
    assert config.max_batch_delay == pytest.approx(0.002)


def test_environment_fills_in_and_flags_win() -> None:
    env = {
        "ANOMALY_BUNDLE": "/models/b",
        "ANOMALY_PORT": "6000",
        "ANOMALY_METRICS_PORT": "0",
        "ANOMALY_DEVICE": "cpu",
        "ANOMALY_MAX_BATCH_DELAY_MS": "0.5",
        "ANOMALY_BATCHING": "off",
        "ANOMALY_LOG_LEVEL": "debug",
        "ANOMALY_DRIFT_WINDOW": "64",
        "ANOMALY_DRIFT_KS_THRESHOLD": "0.4",
    }
    config = load_config(["--port", "7000"], environ=env)
    assert config.bundle == Path("/models/b")
    assert config.port == 7000  # the flag wins over ANOMALY_PORT
    assert config.metrics_port == 0
    assert config.device == "cpu"
    assert config.max_batch_delay_ms == 0.5
    assert not config.batching and config.max_batch_delay == 0.0
    assert config.log_level == "DEBUG"
    assert config.drift == DriftSettings(64, 0.4, 0.0)
    assert load_config(["--batching"], environ=env).batching


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"ANOMALY_PORT": "x"}, "Config 'ANOMALY_PORT' has value 'x'. Not a valid port"),
        (["--port", "70000"], {}, "Config '--port' has value '70000'. Not a valid port"),
        (["--device", "tpu"], {}, "Config '--device' has value 'tpu'. Not one of auto, cpu, cuda"),
        (
            [],
            {"ANOMALY_BATCHING": "maybe"},
            "'ANOMALY_BATCHING' has value 'maybe'. Not a valid bool",
        ),
        (["--max-batch-size", "0"], {}, "'--max-batch-size' has value '0'. Must be at least 1"),
        (["--max-batch-delay-ms", "nan"], {}, "Not a finite number"),
        (["--threads", "two"], {}, "'--threads' has value 'two'. Not a valid integer"),
        (
            ["--tls-cert", "/nonexistent.pem"],
            {},
            "'--tls-cert' has value '/nonexistent.pem'. No such",
        ),
        (
            ["--max-request-images", "9", "--max-queue-per-client", "8"],
            {},
            "must not exceed '--max-queue-per-client'",
        ),
        (["--max-queue", "100"], {}, "'--max-queue-per-client' has value '256'. It must not"),
        (["--drift-window", "-1"], {}, "'--drift-window' has value '-1'. Must be at least 0"),
        (
            ["--drift-ks-threshold", "1"],
            {},
            "'--drift-ks-threshold' has value '1'. Must be at least 0 and less than 1",
        ),
        (
            [],
            {"ANOMALY_DRIFT_LATENT_THRESHOLD": "-2"},
            "'ANOMALY_DRIFT_LATENT_THRESHOLD' has value '-2'. Must be at least 0",
        ),
    ],
)
def test_bad_values_are_refused_naming_their_source(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(["--bundle", "b", *argv], environ=env)


def test_bundle_is_required() -> None:
    with pytest.raises(ConfigError, match=r"'--bundle' is required.*ANOMALY_BUNDLE"):
        load_config([], environ={})


def test_tls_options_go_together(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    with pytest.raises(ConfigError, match="'--tls-cert' and '--tls-key' go together"):
        load_config(["--bundle", "b", "--tls-cert", str(pem)], environ={})
    with pytest.raises(ConfigError, match="'--tls-client-ca' needs '--tls-cert'"):
        load_config(["--bundle", "b", "--tls-client-ca", str(pem)], environ={})
    config = load_config(
        ["--bundle", "b", "--tls-cert", str(pem), "--tls-key", str(pem)], environ={}
    )
    assert config.tls and config.tls_client_ca is None


def test_token_from_file_or_variable_and_never_echoed(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    config = load_config(["--bundle", "b", "--token-file", str(token_file)], environ={})
    assert config.token == "s3cret-token"
    assert "s3cret" not in repr(config)
    assert load_config(["--bundle", "b"], environ={"ANOMALY_TOKEN": "abc"}).token == "abc"
    with pytest.raises(ConfigError, match="once"):
        load_config(["--bundle", "b", "--token-file", str(token_file), "--token", "t"], environ={})
    with pytest.raises(ConfigError) as refused:
        load_config(["--bundle", "b", "--token", "has space"], environ={})
    assert "has space" not in str(refused.value)
    assert "Config '--token' has a value. Not a valid bearer token" in str(refused.value)


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"Config '--port' has value '-1'\. Not a valid port"):
        ServeConfig(bundle=Path("b"), port=-1)
