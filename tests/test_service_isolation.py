"""Isolation on a real server: whatever one call carries (an option, an image) can fail only that
call, even when its images share an ONNX Runtime batch with other calls' images; and a client
that never reads its replies cannot take the queue from the others.

The servers hold every batch for company (0.5 s, 1 s), so that calls sent at the same moment
share a batch and queued images stay queued while the test looks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.client import Client, Result
from service.model_slot import LoadedModel, load_model
from service.server import ServerThread
from tests.service_helpers import png_bytes, random_pixels, serve_config, wait_until

T = TypeVar("T")
TINY_RATES = [1e-17, 5e-324]


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


@pytest.fixture(scope="module")
def server(trained_bundle: Path, model: LoadedModel) -> Iterator[ServerThread]:
    config = serve_config(trained_bundle, max_batch_delay_ms=500, max_batch_size=64)
    with ServerThread(config, model=model) as running:
        yield running


def at_once(*calls: Callable[[], T]) -> list[T]:
    """Run the calls in threads released together; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return outcomes  # type: ignore[return-value]


def batches(server: ServerThread) -> float:
    value = server.server.metrics.registry.get_sample_value("anomaly_batch_size_images_count")
    return value or 0.0


def with_neighbours(
    server: ServerThread, image: bytes, call: Callable[[Client], list[Result]], neighbours: int
) -> tuple[list[Result], list[list[Result]]]:
    """``call`` on one client and ``neighbours`` plain calls of ``image`` on another, released
    together; they must have shared one batch. The results of ``call``, then of the others."""
    target = f"127.0.0.1:{server.port}"
    before = batches(server)
    with Client(target, retries=0) as own, Client(target, retries=0) as plain:
        calls: list[Callable[[], list[Result]]] = [
            partial(call, own),
            *[partial(plain.score, [image]) for _ in range(neighbours)],
        ]
        (result, *others) = at_once(*calls)
    assert batches(server) - before == 1  # the calls shared one batch
    return result, others


@pytest.mark.parametrize("rate", TINY_RATES)
def test_a_tiny_target_rate_is_served_and_fails_no_neighbour(
    server: ServerThread, model: LoadedModel, rate: float
) -> None:
    image = png_bytes(random_pixels(11))
    rated, neighbours = with_neighbours(
        server, image, lambda tiny: tiny.score([image], target_false_alarm_rate=rate), 4
    )
    assert rated[0].ok and rated[0].scores is not None
    expected = model.scorer.calibration.rule_for(target_false_alarm_rate=rate).threshold
    assert rated[0].scores.threshold == expected > model.scorer.calibration.rule.threshold
    for results in neighbours:
        assert results[0].ok, results[0].error
        assert results[0].scores is not None
        assert results[0].scores.threshold == model.scorer.calibration.rule.threshold


def test_posterior_means_go_only_to_the_call_that_asked_in_a_shared_batch(
    server: ServerThread,
) -> None:
    image = png_bytes(random_pixels(13))
    asked, neighbours = with_neighbours(
        server,
        image,
        lambda asking: asking.score([image, image], ids=["a", "b"], return_latent_mean=True),
        3,
    )
    assert all(r.latent_mean() is not None for r in asked)
    assert all(results[0].ok and results[0].latent_mean() is None for results in neighbours)


def test_a_stream_with_a_tiny_rate_fails_no_neighbouring_stream(server: ServerThread) -> None:
    image = pb.Image(id="x", encoded=png_bytes(random_pixels(12)))

    def stream(options: pb.ScoreOptions) -> list[pb.ScoreStreamResponse]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]
            messages = [pb.ScoreStreamRequest(image=image, options=options) for _ in range(3)]
            return list(stub.ScoreStream(iter(messages), timeout=30))

    outcomes = at_once(
        *[partial(stream, pb.ScoreOptions(target_false_alarm_rate=r)) for r in TINY_RATES],
        *[partial(stream, pb.ScoreOptions()) for _ in range(4)],
    )
    for replies in outcomes:
        assert [r.result.WhichOneof("outcome") for r in replies] == ["scores"] * 3


def test_a_client_that_never_reads_its_replies_cannot_starve_the_others(
    trained_bundle: Path, model: LoadedModel
) -> None:
    config = serve_config(
        trained_bundle,
        max_queue=40,
        max_queue_per_client=16,
        max_request_images=4,
        stream_window=16,
        max_batch_size=64,
        max_batch_delay_ms=1_000,
    )
    hold = threading.Event()
    message = pb.ScoreStreamRequest(image=pb.Image(id="h", encoded=png_bytes(random_pixels(13))))

    def flood() -> Iterator[pb.ScoreStreamRequest]:
        yield from [message] * 20
        hold.wait(60)  # the stream stays open, its replies unread

    with ServerThread(config, model=model) as running:
        registry = running.server.metrics.registry

        def held() -> float:
            return registry.get_sample_value("anomaly_queue_depth_images") or 0.0

        target = f"127.0.0.1:{running.port}"
        # A connection of its own (channels of one process with the same options share one).
        own = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=own) as hostile:
            stub = pb_grpc.AnomalyDetectorStub(hostile)  # type: ignore[no-untyped-call]
            floods = [stub.ScoreStream(flood(), timeout=60) for _ in range(8)]  # 160 images
            wait_until(lambda: held() >= 16, "the hostile client to fill its share")
            assert held() == 16  # its share, not the queue (of 40)
            image = png_bytes(random_pixels(14))
            with Client(target, retries=0) as polite:
                calls: list[Callable[[], list[Result]]] = [
                    *[lambda: polite.score([image] * 4) for _ in range(3)],
                    lambda: list(polite.score_stream([image] * 4)),
                ]
                for results in at_once(*calls):
                    assert [r.ok for r in results] == [True] * 4, results[0].error
            assert held() <= 16
            hold.set()
            for call in floods:
                call.cancel()
        wait_until(lambda: held() == 0, "every image of the cancelled streams given back")
