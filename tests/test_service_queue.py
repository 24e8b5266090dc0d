"""Admission control on a real server: a full queue refuses work; expired or cancelled work is
never computed. The server holds batches for seconds (a long batching delay) so that the queue
state is known while the test acts, with no timing assumption beyond "seconds > 0.3 s"."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.model_slot import load_model
from service.server import ServerThread
from tests.service_helpers import png_bytes, random_pixels, serve_config, wait_until

QUEUE = 4
HOLD_MS = 2_000  # a batch waits this long for company unless 64 images arrive


@pytest.fixture(scope="module")
def server(trained_bundle: Path) -> Iterator[ServerThread]:
    config = serve_config(
        trained_bundle,
        max_queue=QUEUE,
        max_queue_per_client=QUEUE,
        max_request_images=QUEUE,
        max_batch_size=64,
        max_batch_delay_ms=HOLD_MS,
    )
    with ServerThread(config, model=load_model(trained_bundle, "cpu", threads=1)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.AnomalyDetectorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]


def batch(*ids: str) -> pb.ScoreBatchRequest:
    data = png_bytes(random_pixels(0))
    return pb.ScoreBatchRequest(images=[pb.Image(id=i, encoded=data) for i in ids])


def gauge(server: ServerThread, name: str) -> float:
    value = server.server.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def scored(server: ServerThread) -> float:
    return gauge(server, "anomaly_batch_size_images_sum")


def test_a_full_queue_refuses_a_batch_whole_and_a_stream_image_alone(
    server: ServerThread, stub: pb_grpc.AnomalyDetectorStub
) -> None:
    held: list[pb.ScoreBatchResponse] = []
    first = threading.Thread(target=lambda: held.append(stub.ScoreBatch(batch("a", "b", "c"))))
    first.start()
    wait_until(lambda: gauge(server, "anomaly_queue_depth_images") == 3, "3 queued images")

    with pytest.raises(grpc.RpcError) as refused:
        stub.ScoreBatch(batch("d", "e"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full: 3 of 4 images waiting, no room for 2 more" in refused.value.details()

    image = pb.Image(id="s", encoded=png_bytes(random_pixels(1)))
    messages = [pb.ScoreStreamRequest(image=image), pb.ScoreStreamRequest(image=image)]
    replies = [r.result for r in stub.ScoreStream(iter(messages), timeout=60)]
    assert replies[0].WhichOneof("outcome") == "scores"  # took the last place
    assert replies[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "image 's'" in replies[1].error.message and "queue is full" in replies[1].error.message

    first.join()
    assert [r.id for r in held[0].results] == ["a", "b", "c"]
    assert all(r.WhichOneof("outcome") == "scores" for r in held[0].results)
    assert stub.ScoreBatch(batch("after"), timeout=30).results[0].WhichOneof("outcome") == "scores"


def test_work_past_its_deadline_is_not_computed(
    server: ServerThread, stub: pb_grpc.AnomalyDetectorStub
) -> None:
    before = scored(server)
    with pytest.raises(grpc.RpcError) as late:
        stub.ScoreBatch(batch("late-1", "late-2"), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stub.ScoreBatch(batch("on-time"), timeout=30)  # forms a batch after the late call's deadline
    assert scored(server) - before == 1  # only the on-time image reached the model
    assert gauge(server, "anomaly_queue_depth_images") == 0


def test_a_cancelled_stream_is_not_computed(
    server: ServerThread, stub: pb_grpc.AnomalyDetectorStub
) -> None:
    before = scored(server)
    image = pb.Image(id="c", encoded=png_bytes(random_pixels(2)))
    sent = threading.Event()

    def messages() -> Iterator[pb.ScoreStreamRequest]:
        yield pb.ScoreStreamRequest(image=image)
        sent.set()
        threading.Event().wait(30)  # keep the stream open until it is cancelled

    call = stub.ScoreStream(messages(), timeout=60)
    sent.wait(10)
    wait_until(lambda: gauge(server, "anomaly_queue_depth_images") == 1, "the image queued")
    call.cancel()
    wait_until(lambda: gauge(server, "anomaly_inflight_requests") == 0, "the call to end")
    stub.ScoreBatch(batch("next"), timeout=30)
    assert scored(server) - before == 1
