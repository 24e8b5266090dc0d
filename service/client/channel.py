"""The client's gRPC channel: which replicas it reaches, how it spreads calls, how it retries.

Calls are spread over every healthy address of the target by round-robin balancing (a replica
whose health service says NOT_SERVING, such as one shutting down, is skipped), and retried by gRPC
itself (a ``retryPolicy`` in the channel's service config), within each call's one deadline, on
the codes the proto tells clients to retry: UNAVAILABLE (a replica starting, stopping or gone;
the retry goes to another one) and RESOURCE_EXHAUSTED (a full queue).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import grpc

SERVICE = "anomaly.v1.AnomalyDetector"
# gRPC makes at most 5 attempts of a call, whatever a service config asks (gRFC A6).
MAX_RETRIES = 4
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def channel_target(targets: str | Sequence[str]) -> str:
    """The gRPC target of one address or several.

    One address is used as given: ``host:port`` (resolved by DNS: every address of the name is a
    replica), ``dns:///name:port``, ``ipv4:...``, ``unix:...``. Several (a sequence, or one string
    of comma-separated ``host:port``) must be IP addresses of one family, and become an ``ipv4:``
    or ``ipv6:`` target that lists them all. ValueError says what is wrong.
    """
    if isinstance(targets, str):
        with_scheme = targets.startswith(SCHEMES)
        parts = [targets] if with_scheme else [part.strip() for part in targets.split(",")]
    else:
        parts = [str(part).strip() for part in targets]
    if not parts or any(not part for part in parts):
        raise ValueError(f"target {targets!r} names no server; expected host:port")
    if len(parts) == 1:
        return parts[0]
    families = {_ip_family(part) for part in parts}
    if len(families) != 1:
        raise ValueError(f"targets {parts} mix IPv4 and IPv6 addresses; give one family")
    family = families.pop()
    return f"{family}:{','.join(parts)}"


def _ip_family(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target {address!r} is not host:port")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"target {address!r}: several targets must be IP addresses; for host names give one "
            "dns:///name:port that resolves to every replica (a Kubernetes headless Service)"
        ) from None
    return f"ipv{ip.version}"


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}s"


def service_config(retries: int, backoff: float, max_backoff: float) -> str:
    """The channel's service config: round robin, and the retry policy (none for 0 retries)."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(
            f"retries is {retries}; expected 0 to {MAX_RETRIES} (gRPC makes at most "
            f"{MAX_RETRIES + 1} attempts of a call)"
        )
    if not 0 < backoff <= max_backoff:
        raise ValueError(
            f"backoff is {backoff} s and max_backoff {max_backoff} s; expected "
            "0 < backoff <= max_backoff"
        )
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        # Round robin skips replicas whose gRPC health is not SERVING: one that is shutting down
        # gets no new calls (gRFC A17; a server without the health service counts as healthy).
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": _duration(backoff),
                    "maxBackoff": _duration(max_backoff),
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRYABLE),
                },
            }
        ]
    return json.dumps(config)


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None,
    retries: int,
    backoff: float,
    max_backoff: float,
    max_message_bytes: int,
) -> grpc.Channel:
    """A channel to ``target`` (see :func:`channel_target`) with the client's service config."""
    backoff_ms, max_backoff_ms = round(backoff * 1000), round(max_backoff * 1000)
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", -1),
        ("grpc.service_config", service_config(retries, backoff, max_backoff)),
        ("grpc.enable_retries", 1),
        # gRPC keeps what a call sent until it can no longer be retried: up to the largest
        # message, so that a whole ScoreBatch stays retryable (the default is 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        # A replica that comes back (or up) is reconnected to as soon as calls would be retried.
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
    ]
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)
