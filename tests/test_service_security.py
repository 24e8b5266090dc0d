"""TLS, mutual TLS and the bearer token: the right client is served, the wrong one refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.client import Client
from service.model_slot import LoadedModel, load_model
from service.server import ServerThread
from tests.service_helpers import (
    UNPARSEABLE,
    Certs,
    random_pixels,
    raw_unary,
    serve_config,
    wait_until,
    write_certs,
)

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return write_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


@pytest.fixture(scope="module")
def tls_server(trained_bundle: Path, model: LoadedModel, certs: Certs) -> Iterator[ServerThread]:
    config = serve_config(
        trained_bundle, tls_cert=certs.server_cert, tls_key=certs.server_key, token=TOKEN
    )
    with ServerThread(config, model=model) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(trained_bundle: Path, model: LoadedModel, certs: Certs) -> Iterator[ServerThread]:
    config = serve_config(
        trained_bundle,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )
    with ServerThread(config, model=model) as running:
        yield running


def refusal(client: Client) -> grpc.StatusCode:
    with client, pytest.raises(grpc.RpcError) as refused:
        client.info(timeout=10)
    code: grpc.StatusCode = refused.value.code()
    return code


def test_tls_with_the_token_is_served(tls_server: ServerThread, certs: Certs) -> None:
    with Client(
        f"localhost:{tls_server.port}", root_certificates=certs.ca.read_bytes(), token=TOKEN
    ) as client:
        assert client.info().execution_provider == "CPUExecutionProvider"
        assert client.score([random_pixels(0)])[0].ok
        assert all(r.ok for r in client.score_stream([random_pixels(1), random_pixels(2)]))


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_a_missing_or_wrong_token_is_unauthenticated(
    tls_server: ServerThread, certs: Certs, token: str | None
) -> None:
    ca = certs.ca.read_bytes()
    target = f"localhost:{tls_server.port}"
    assert (
        refusal(Client(target, root_certificates=ca, token=token, retries=0))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    with (
        Client(target, root_certificates=ca, token=token, retries=0) as client,
        pytest.raises(grpc.RpcError) as refused,
    ):
        list(client.score_stream([random_pixels(0)]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in refused.value.details()
    registry = tls_server.server.metrics.registry
    labels = {"method": "ScoreStream", "code": "UNAUTHENTICATED"}
    # The call is counted as it ends on the server, just after the client hears of it.
    wait_until(
        lambda: (registry.get_sample_value("anomaly_requests_total", labels) or 0) >= 1,
        "the refused stream to be counted",
    )


def test_unparseable_bytes_without_a_token_are_unauthenticated(
    tls_server: ServerThread, certs: Certs
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(f"localhost:{tls_server.port}", credentials) as channel:
        for body in UNPARSEABLE.values():
            with pytest.raises(grpc.RpcError) as refused:
                raw_unary(channel, "ScoreBatch")(body, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_without_a_token(tls_server: ServerThread, certs: Certs) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(f"localhost:{tls_server.port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_or_an_untrusted_server_certificate_is_refused(
    tls_server: ServerThread, certs: Certs
) -> None:
    target = f"localhost:{tls_server.port}"
    assert refusal(Client(target, token=TOKEN, retries=0)) == grpc.StatusCode.UNAVAILABLE
    # The rogue certificate is no CA of the server's certificate.
    wrong_ca = certs.rogue_cert.read_bytes()
    assert (
        refusal(Client(target, root_certificates=wrong_ca, token=TOKEN, retries=0))
        == grpc.StatusCode.UNAVAILABLE
    )


def test_mutual_tls_serves_a_client_certificate_of_its_ca(
    mtls_server: ServerThread, certs: Certs
) -> None:
    with Client(
        f"localhost:{mtls_server.port}",
        root_certificates=certs.ca.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes(),
        private_key=certs.client_key.read_bytes(),
    ) as client:
        assert client.info().model_id


@pytest.mark.parametrize("which", ["none", "rogue"])
def test_mutual_tls_refuses_other_clients(
    mtls_server: ServerThread, certs: Certs, which: str
) -> None:
    chain = key = None
    if which == "rogue":
        chain, key = certs.rogue_cert.read_bytes(), certs.rogue_key.read_bytes()
    client = Client(
        f"localhost:{mtls_server.port}",
        root_certificates=certs.ca.read_bytes(),
        certificate_chain=chain,
        private_key=key,
        retries=0,
    )
    assert refusal(client) == grpc.StatusCode.UNAVAILABLE
