"""Server options: one frozen dataclass, filled from flags with ``ANOMALY_*`` environment fallbacks.

A flag wins over its environment variable, which wins over the default. Every value is checked
with a message that names where it came from: ``Config 'ANOMALY_PORT' has value 'x'. Not a valid
port.``
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service.drift import DriftSettings
from service.preprocessing import DEFAULT_MAX_PIXELS
from service.runtime import DevicePolicy

ENV_PREFIX = "ANOMALY_"
DEVICES: tuple[DevicePolicy, ...] = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIB = 1024 * 1024


class ConfigError(ValueError):
    """An option with a value that cannot be used; the message names the option and the value."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``python -m service`` can be told; see ``--help`` for each option."""

    bundle: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9100
    device: DevicePolicy = "auto"
    threads: int = 0
    preprocess_workers: int = 2
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    batching: bool = True
    max_queue: int = 1024
    max_queue_per_client: int = 256
    max_request_images: int = 256
    stream_window: int = 64
    max_streams_per_connection: int = 100
    bdp_probe: bool = False
    max_connection_age: float = 300.0
    max_message_bytes: int = 64 * MIB
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token: str | None = field(default=None, repr=False)
    grace_period: float = 10.0
    watch_interval: float = 0.0
    drift_window: int = 128
    drift_ks_threshold: float = 0.0
    drift_latent_threshold: float = 0.0
    ready_file: Path | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for option in OPTIONS:
            value = getattr(self, option.name)
            if value is not None and option.check is not None:
                _checked(option, value, option.flag)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "Config '--tls-cert' and '--tls-key' go together: give both for TLS, or neither."
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "Config '--tls-client-ca' needs '--tls-cert' and '--tls-key': mutual TLS is TLS."
            )
        if self.max_queue_per_client > self.max_queue:
            raise ConfigError(
                f"Config '--max-queue-per-client' has value '{self.max_queue_per_client}'. It must "
                f"not exceed '--max-queue' ({self.max_queue})."
            )
        if self.max_request_images > self.max_queue_per_client:
            raise ConfigError(
                f"Config '--max-request-images' has value '{self.max_request_images}'. It must not "
                f"exceed '--max-queue-per-client' ({self.max_queue_per_client}), or such a request "
                "could never be queued."
            )

    @property
    def max_batch_delay(self) -> float:
        """Longest time the micro-batcher holds the oldest image for company, in seconds."""
        return self.max_batch_delay_ms / 1000.0 if self.batching else 0.0

    @property
    def drift(self) -> DriftSettings:
        """The drift window and thresholds (service/drift.py)."""
        return DriftSettings(
            self.drift_window, self.drift_ks_threshold, self.drift_latent_threshold
        )

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return self.tls_cert is not None


# --- parsing and checks ---------------------------------------------------------------------


def _error(option: Option, value: object, source: str, reason: ValueError) -> ConfigError:
    shown = "a value" if option.secret else f"value '{value}'"
    return ConfigError(f"Config '{source}' has {shown}. {reason}")


def _checked(option: Option, value: Any, source: str) -> None:
    assert option.check is not None
    try:
        option.check(value)
    except ValueError as exc:
        raise _error(option, value, source, exc) from None


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("Not a valid integer.") from None


def _float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("Not a valid number.") from None
    if not math.isfinite(value):
        raise ValueError("Not a finite number.")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("Not a valid bool (true/false, yes/no, on/off, 1/0).")


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("Not a valid path (empty).")
    return Path(text)


def _text(text: str) -> str:
    return text


PORT_REASON = "Not a valid port (0-65535; 0 picks a free one)."


def _port_number(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(PORT_REASON) from None


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(PORT_REASON)


def _at_least(minimum: float) -> Callable[[float], None]:
    def check(value: float) -> None:
        if value < minimum:
            raise ValueError(f"Must be at least {minimum:g}.")

    return check


def _below_one(value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError("Must be at least 0 and less than 1.")


def _one_of(choices: Sequence[str]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"Not one of {', '.join(choices)}.")

    return check


def _existing_file(value: Path) -> None:
    if not value.is_file():
        raise ValueError("No such file.")


def _token(value: str) -> None:
    if not value or any(c.isspace() for c in value) or not value.isprintable():
        raise ValueError("Not a valid bearer token (printable, no spaces, not empty).")


def _host(value: str) -> None:
    if not value.strip():
        raise ValueError("Not a valid listen address (empty).")


@dataclass(frozen=True)
class Option:
    """One option: its dataclass field, flag, parser and check."""

    name: str
    parse: Callable[[str], Any]
    help: str
    check: Callable[[Any], None] | None = None
    metavar: str | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable."""
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("bundle", _path, "bundle directory (or .tar.gz archive) to serve", metavar="DIR"),
    Option("host", _text, "listen address of the gRPC and metrics ports", _host),
    Option("port", _port_number, "gRPC port (0 picks a free one)", _port),
    Option(
        "metrics_port", _port_number, "Prometheus /metrics HTTP port (0 picks a free one)", _port
    ),
    Option(
        "device", _text, "ONNX Runtime device policy", _one_of(DEVICES), metavar="|".join(DEVICES)
    ),
    Option("threads", _int, "ONNX Runtime intra-op threads (0: its default)", _at_least(0)),
    Option("preprocess_workers", _int, "threads decoding and resizing images", _at_least(1)),
    Option("max_batch_size", _int, "most images in one ONNX Runtime batch", _at_least(1)),
    Option(
        "max_batch_delay_ms",
        _float,
        "longest wait for a batch to fill, in milliseconds (0: no wait)",
        _at_least(0),
    ),
    Option(
        "batching",
        _bool,
        "coalesce images of concurrent calls into shared batches (--no-batching: each call's "
        "images form batches of their own, with no delay)",
    ),
    Option(
        "max_queue",
        _int,
        "most images the server holds for calls: being decoded, waiting for inference, scored, "
        "or (streams) waiting for their reply to be sent",
        _at_least(1),
    ),
    Option(
        "max_queue_per_client",
        _int,
        "most of those one client connection may hold, so that a slow or hostile client cannot "
        "take the queue (or memory) from the others",
        _at_least(1),
    ),
    Option("max_request_images", _int, "most images in one ScoreBatch call", _at_least(1)),
    Option(
        "stream_window",
        _int,
        "most images of one stream read and not yet answered (they count against the client's "
        "share of the queue until their replies are sent)",
        _at_least(1),
    ),
    Option(
        "max_streams_per_connection",
        _int,
        "most calls one client connection may have open at once (HTTP/2 concurrent streams; "
        "a client's further calls wait for a free one)",
        _at_least(1),
    ),
    Option(
        "bdp_probe",
        _bool,
        "let gRPC grow each connection's receive windows to the bandwidth-delay product: faster "
        "over long, fast links, but a client that sends more than the server reads then makes "
        "it buffer megabytes; off, each stream reads at most 64 KiB ahead",
    ),
    Option(
        "max_connection_age",
        _float,
        "seconds after which the server asks a client to reconnect (HTTP/2 GOAWAY; calls under "
        "way finish), so that clients re-resolve and spread onto new replicas (0: never)",
        _at_least(0),
    ),
    Option("max_message_bytes", _int, "largest request message, in bytes", _at_least(1024)),
    Option("max_image_pixels", _int, "most pixels (height x width) of one image", _at_least(1)),
    Option("tls_cert", _path, "PEM certificate chain: serve TLS", _existing_file, "FILE"),
    Option("tls_key", _path, "PEM private key of --tls-cert", _existing_file, "FILE"),
    Option(
        "tls_client_ca",
        _path,
        "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        _existing_file,
        "FILE",
    ),
    Option(
        "token",
        _text,
        "bearer token every AnomalyDetector call must carry (prefer ANOMALY_TOKEN or "
        "--token-file: flags are visible to other users in the process list)",
        _token,
        secret=True,
    ),
    Option("grace_period", _float, "seconds to finish accepted work on shutdown", _at_least(0)),
    Option(
        "watch_interval",
        _float,
        "seconds between checks of the bundle directory for changes (0: reload on SIGHUP only)",
        _at_least(0),
    ),
    Option(
        "drift_window",
        _int,
        "images in the rolling window of recent images whose p-values and posterior means are "
        "watched for drift of normal (the anomaly_drift_* metrics; 0: off)",
        _at_least(0),
    ),
    Option(
        "drift_ks_threshold",
        _float,
        "Kolmogorov-Smirnov distance of the window's combined p-values from uniform above which "
        "the window is not normal (0: the level normal traffic exceeds with a 0.1%% chance for "
        "the model's calibration size and the window)",
        _below_one,
    ),
    Option(
        "drift_latent_threshold",
        _float,
        "shift of the window's mean posterior mean, RMS over latent dimensions in held-out "
        "standard deviations, above which the window is not normal (0: as for "
        "--drift-ks-threshold)",
        _at_least(0),
    ),
    Option(
        "ready_file",
        _path,
        'once serving, write {"pid", "host", "port", "metrics_port"} (the bound ports) to this '
        "file as JSON, for harnesses; it is removed when shutdown begins",
        metavar="FILE",
    ),
    Option("log_level", lambda text: text.upper(), "logging level", _one_of(LOG_LEVELS)),
)
_BY_NAME = {option.name: option for option in OPTIONS}
_DEFAULTS = {f.name: f.default for f in fields(ServeConfig)}
TOKEN_FILE_ENV = ENV_PREFIX + "TOKEN_FILE"


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """The server's argument parser; every flag also reads its ``ANOMALY_*`` variable."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an anomaly-detection bundle over gRPC with ONNX Runtime.",
        epilog="Every option can also be set by its environment variable (shown in brackets); "
        "a flag wins over its variable.",
    )
    for option in OPTIONS:
        default = _DEFAULTS[option.name]
        shown = "required" if option.name == "bundle" else f"default: {default}"
        help_text = f"{option.help} [{option.env}; {shown}]"
        if option.parse is _bool:
            parser.add_argument(
                option.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(option.flag, metavar=option.metavar, default=None, help=help_text)
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help=f"read the bearer token from this file [{TOKEN_FILE_ENV}]",
    )
    return parser


def _from_source(option: Option, value: str, source: str) -> Any:
    try:
        parsed = option.parse(value)
        if option.check is not None:
            option.check(parsed)
    except ValueError as exc:
        raise _error(option, value, source, exc) from None
    return parsed


def _read_token_file(text: str, source: str) -> str:
    try:
        return Path(text).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config '{source}' has value '{text}'. Cannot read it: {exc}") from None


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServeConfig:
    """Parse flags (``argv``, default ``sys.argv[1:]``) over environment variables over defaults."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for option in OPTIONS:
        flag_value = args[option.name]
        if isinstance(flag_value, bool):
            values[option.name] = flag_value
        elif flag_value is not None:
            values[option.name] = _from_source(option, flag_value, option.flag)
        elif option.env in env:
            values[option.name] = _from_source(option, env[option.env], option.env)
    token_file, token_file_source = args["token_file"], "--token-file"
    if token_file is None and TOKEN_FILE_ENV in env:
        token_file, token_file_source = env[TOKEN_FILE_ENV], TOKEN_FILE_ENV
    if token_file is not None:
        if "token" in values:
            raise ConfigError("Config: give the bearer token once, directly or as a file.")
        values["token"] = _from_source(
            _BY_NAME["token"], _read_token_file(token_file, token_file_source), token_file_source
        )
    if "bundle" not in values:
        raise ConfigError(
            f"Config '{_BY_NAME['bundle'].flag}' is required: the bundle directory to serve "
            f"(or set {_BY_NAME['bundle'].env})."
        )
    return ServeConfig(**values)
