"""Container health check: asks the server's gRPC health service whether it is SERVING.

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING while it loads or drains,
unreachable, timed out), as Docker's HEALTHCHECK expects. Stand-alone: needs only grpcio and
grpcio-health-checking, both dependencies of the service.

    python healthcheck.py                       # 127.0.0.1:$ANOMALY_PORT (default 50051)
    python healthcheck.py --address host:50051 --service anomaly.v1.AnomalyDetector

TLS: when the server serves TLS (ANOMALY_TLS_CERT is set) the check connects with TLS, trusting
ANOMALY_HEALTHCHECK_CA (default: the server's own certificate, right for a self-signed one); for
mutual TLS it presents ANOMALY_HEALTHCHECK_CLIENT_CERT and ANOMALY_HEALTHCHECK_CLIENT_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "anomaly.v1.AnomalyDetector"


def _channel(address: str, server_name: str | None) -> grpc.Channel:
    server_cert = os.environ.get("ANOMALY_TLS_CERT")
    if not server_cert:
        return grpc.insecure_channel(address)
    ca = Path(os.environ.get("ANOMALY_HEALTHCHECK_CA", server_cert)).read_bytes()
    client_cert = os.environ.get("ANOMALY_HEALTHCHECK_CLIENT_CERT")
    client_key = os.environ.get("ANOMALY_HEALTHCHECK_CLIENT_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str, timeout: float, server_name: str | None = None) -> str:
    """The serving status name the health service reports, or why there is none."""
    with _channel(address, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    """Check once; print the status; exit 0 only when SERVING."""
    port = os.environ.get("ANOMALY_PORT", "50051")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port of the server")
    parser.add_argument(
        "--service",
        default=SERVICE,
        help=f"service to ask about ('' for the whole server; default {SERVICE})",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a reply")
    parser.add_argument("--server-name", default=None, help="TLS name to expect from the server")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout, args.server_name)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
