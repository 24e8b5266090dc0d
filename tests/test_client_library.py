"""The client library (service/client/client.py): inputs, results, retries, streaming."""

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


def test_unavailable_is_retried_with_backoff_until_the_server_is_up(
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
        with Client(f"127.0.0.1:{port}", retries=8, backoff=0.1, max_backoff=0.5) as client:
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
