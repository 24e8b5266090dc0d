"""The client library (service/client/): inputs, results, retries within one deadline,
streaming, targets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client import Client
from service.client.channel import channel_target
from service.client.client import to_image
from service.model_slot import LoadedModel, load_model
from service.server import ServerThread
from tests.service_helpers import png_bytes, random_pixels, serve_config


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


@pytest.fixture(scope="module")
def server(trained_bundle: Path, model: LoadedModel) -> Iterator[ServerThread]:
    with ServerThread(serve_config(trained_bundle), model=model) as running:
        yield running


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_images_go_on_the_wire_as_paths_bytes_or_arrays(tmp_path: Path) -> None:
    pixels = random_pixels(0, size=6)
    path = tmp_path / "part.png"
    path.write_bytes(png_bytes(pixels))
    assert to_image(path, "p").encoded == path.read_bytes()
    assert to_image(str(path), "p").encoded == path.read_bytes()
    assert to_image(b"abc", "b").encoded == b"abc"
    raw = to_image(pixels, "a").raw
    assert (raw.height, raw.width, raw.channels) == (6, 6, 3) and raw.pixels == pixels.tobytes()
    assert to_image(pixels[:, :, 0], "g").raw.channels == 1
    assert to_image(pixels[:, ::2], "strided").raw.pixels == pixels[:, ::2].tobytes()
    with pytest.raises(ValueError, match=r"array of float32 .* expected uint8"):
        to_image(np.zeros((4, 4), np.float32), "f")


def test_score_names_results_by_path_or_position(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(random_pixels(1)))
    with Client(f"127.0.0.1:{server.port}") as client:
        results = client.score([path, png_bytes(random_pixels(2)), random_pixels(3)])
        assert [r.id for r in results] == [str(path), "1", "2"]
        assert all(r.ok and r.error_code is None for r in results)
        failed = client.score([b"junk"], ids=["mine"])[0]
        assert failed.id == "mine" and not failed.ok and not failed.is_anomaly
        assert failed.error_code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="2 ids for 1 images"):
            client.score([b"x"], ids=["a", "b"])
        with pytest.raises(ValueError, match="not both"):
            client.score([b"x"], threshold=1.0, target_false_alarm_rate=0.1)


def test_stream_takes_a_lazy_iterator_of_images_or_pairs(server: ServerThread) -> None:
    produced: list[int] = []

    def images() -> Iterator[tuple[str, bytes]]:
        for i in range(10):
            produced.append(i)
            yield f"img-{i}", png_bytes(random_pixels(i))

    with Client(f"127.0.0.1:{server.port}") as client:
        ids = [r.id for r in client.score_stream(images(), return_anomaly_map=True)]
        assert ids == [f"img-{i}" for i in range(10)]
        assert produced == list(range(10))
        first = next(iter(client.score_stream([random_pixels(0)], return_anomaly_map=True)))
        amap = first.anomaly_map()
        assert amap is not None and amap.dtype == np.float32


def test_unavailable_is_retried_within_the_deadline_until_the_server_is_up(
    trained_bundle: Path, model: LoadedModel
) -> None:
    port = free_port()
    started: list[float] = []

    def start_late() -> None:
        time.sleep(0.5)
        started.append(time.monotonic())
        holder.append(ServerThread(serve_config(trained_bundle, port=port), model=model))

    holder: list[ServerThread] = []
    starter = threading.Thread(target=start_late)
    asked = time.monotonic()
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", backoff=1.0, max_backoff=2.0) as client:
            info = client.info(timeout=5)
            answered = time.monotonic()
        starter.join()
        assert info.model_id == model.model_id
        assert asked < started[0] < answered  # only a retry after start-up could succeed
    finally:
        starter.join()
        for running in holder:
            running.stop()


def test_without_retries_unavailable_is_raised(trained_bundle: Path) -> None:
    with Client(f"127.0.0.1:{free_port()}", retries=0) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.info(timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def held_queue(trained_bundle: Path, model: LoadedModel) -> Iterator[ServerThread]:
    """A server whose queue of 4 images a call of 4 fills for the 0.3 s its batch is held."""
    config = serve_config(
        trained_bundle,
        max_queue=4,
        max_queue_per_client=4,
        max_request_images=4,
        max_batch_size=64,
        max_batch_delay_ms=300,
    )
    with ServerThread(config, model=model) as running:
        yield running


def fill_queue(server: ServerThread) -> threading.Thread:
    """A call from another client that holds the whole queue until its batch runs."""

    def call() -> None:
        with Client(f"127.0.0.1:{server.port}", retries=0) as other:
            assert all(r.ok for r in other.score([random_pixels(i) for i in range(4)]))

    holder = threading.Thread(target=call)
    holder.start()
    registry = server.server.metrics.registry
    deadline = time.monotonic() + 10
    while registry.get_sample_value("anomaly_queue_depth_images") != 4:
        assert time.monotonic() < deadline, "the queue did not fill"
        time.sleep(0.01)
    return holder


def test_resource_exhausted_is_retried_until_there_is_room(held_queue: ServerThread) -> None:
    target = f"127.0.0.1:{held_queue.port}"
    holder = fill_queue(held_queue)
    with Client(target, retries=0) as impatient, pytest.raises(grpc.RpcError) as refused:
        impatient.score([random_pixels(9)])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Backoffs of up to 1 s, 2 s, ...: some retry comes after the batch ran and frees the queue.
    with Client(target, backoff=1.0, max_backoff=2.0) as patient:
        assert patient.score([random_pixels(9)])[0].ok
    holder.join()


def test_a_call_refused_until_its_deadline_fails_at_that_deadline(
    held_queue: ServerThread,
) -> None:
    holder = fill_queue(held_queue)
    with Client(f"127.0.0.1:{held_queue.port}", backoff=0.05, max_backoff=0.05) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            client.score([random_pixels(9)], timeout=0.2)
        elapsed = time.monotonic() - started
    # One deadline for every attempt: not 5 attempts of 0.2 s each.
    assert refused.value.code() in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert elapsed < 0.6
    holder.join()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"retries": -1}, "retries is -1; expected 0 to 4"),
        ({"retries": 5}, "retries is 5; expected 0 to 4"),
        ({"backoff": 0.0}, "expected 0 < backoff <= max_backoff"),
        ({"backoff": 6.0}, "expected 0 < backoff <= max_backoff"),
    ],
)
def test_bad_retry_settings_are_refused(options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Client("127.0.0.1:1", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///anomaly-service-headless:50051", "dns:///anomaly-service-headless:50051"),
        ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        (["10.0.0.1:50051", "10.0.0.2:50052"], "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_targets_name_one_server_or_several_replicas(
    target: str | list[str], expected: str
) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("a.example:1,b.example:1", "several targets must be IP addresses; for host names"),
        ("10.0.0.1:1,[::1]:1", "mix IPv4 and IPv6"),
        ("10.0.0.1:1,", "names no server"),
        ("10.0.0.1,10.0.0.2", "is not host:port"),
    ],
)
def test_targets_that_name_no_server_are_refused(target: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        channel_target(target)
