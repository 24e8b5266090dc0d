"""One client over several replicas on loopback: calls spread over them, a replica that stops
mid-run loses no image (unary calls are retried elsewhere, a cut stream resumes elsewhere), and
the servers' max connection age makes clients reconnect (and so re-resolve) every so often."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.client import Client, ImageInput
from service.model_slot import LoadedModel, load_model
from service.server import ServerThread
from tests.service_helpers import random_pixels, serve_config


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


@pytest.fixture
def replicas(trained_bundle: Path, model: LoadedModel) -> Iterator[list[ServerThread]]:
    servers = [
        ServerThread(serve_config(trained_bundle, grace_period=5.0), model=model) for _ in range(2)
    ]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def targets(servers: list[ServerThread]) -> str:
    return ",".join(f"127.0.0.1:{server.port}" for server in servers)


def scored(server: ServerThread) -> float:
    registry = server.server.metrics.registry
    return registry.get_sample_value("anomaly_batch_size_images_sum") or 0.0


def inflight(server: ServerThread) -> float:
    return server.server.metrics.registry.get_sample_value("anomaly_inflight_requests") or 0.0


def test_calls_are_spread_over_every_replica(replicas: list[ServerThread]) -> None:
    with Client(targets(replicas)) as client:
        for index in range(40):
            assert client.score([random_pixels(index)])[0].ok
    shares = [scored(server) for server in replicas]
    assert sum(shares) == 40 and min(shares) >= 12, shares  # round robin: about 20 each


def test_a_replica_that_stops_mid_run_loses_no_unary_call(replicas: list[ServerThread]) -> None:
    first, second = replicas
    outcomes: list[bool] = []
    with Client(targets(replicas), backoff=0.2, max_backoff=1.0) as client:
        stopper = threading.Thread(target=first.stop)
        for index in range(60):
            if index == 15:
                stopper.start()  # graceful: accepted calls answered, new ones refused
            outcomes.append(all(r.ok for r in client.score([random_pixels(index)] * 2)))
        stopper.join()
    assert outcomes == [True] * 60
    assert scored(first) > 0 and scored(second) > 0
    assert scored(first) + scored(second) == 120  # every image scored once


def test_a_stream_cut_by_a_stopping_replica_resumes_on_another(
    replicas: list[ServerThread],
) -> None:
    count = 80

    def images() -> Iterator[tuple[str, ImageInput]]:
        for index in range(count):
            time.sleep(0.01)
            yield f"img-{index}", random_pixels(index % 7)

    ids: list[str] = []
    stoppers: list[threading.Thread] = []
    with Client(targets(replicas)) as client:
        for result in client.score_stream(images()):
            assert result.ok, result.error
            ids.append(result.id)
            if len(ids) == 10:
                (serving,) = [s for s in replicas if inflight(s) == 1]
                stoppers.append(threading.Thread(target=serving.stop))
                stoppers[0].start()
    stoppers[0].join()
    assert ids == [f"img-{index}" for index in range(count)]  # each once, in order
    assert all(scored(server) > 0 for server in replicas)


def test_the_max_connection_age_makes_clients_reconnect(
    trained_bundle: Path, model: LoadedModel
) -> None:
    config = serve_config(trained_bundle, max_connection_age=0.3)
    this = psutil.Process()
    with ServerThread(config, model=model) as running:
        ports: set[int] = set()
        with Client(f"127.0.0.1:{running.port}") as client:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert client.score([random_pixels(0)])[0].ok
                ports |= {
                    c.laddr.port
                    for c in this.net_connections(kind="tcp")
                    if c.raddr and c.raddr.port == running.port
                }
    # Each connection was closed at its age and a new one opened: the client came back from new
    # ports (to whichever replicas its name resolves to by then), every call answered.
    assert len(ports) >= 3, ports
