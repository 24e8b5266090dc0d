"""Start-up refusals, SIGHUP reload and SIGTERM drain of ``python -m service`` as a real
subprocess, and what calls hear when the grace period runs out."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.client import Client
from service.model_slot import load_model
from service.runtime import cuda_device_count
from service.server import ServerThread
from service.server_process import ServerProcess
from tests.service_helpers import (
    png_bytes,
    random_pixels,
    sample,
    scrape,
    serve_config,
    serve_process,
    wait_until,
)


def refused_start(*args: str) -> tuple[int, str]:
    """Start the server with ``args`` expecting it to refuse: its exit status and output."""
    process = serve_process(*args)
    try:
        return process.wait(120), process.log
    finally:
        process.close()


def test_a_missing_bundle_is_refused_with_one_line(tmp_path: Path) -> None:
    status, output = refused_start("--bundle", str(tmp_path / "nowhere"))
    assert status == 1
    assert output.strip().splitlines() == [
        f"anomaly-serve: error: cannot serve bundle {tmp_path / 'nowhere'}: "
        f"bundle {tmp_path / 'nowhere'} does not exist"
    ]


def test_a_bad_option_is_refused_with_one_line(trained_bundle: Path) -> None:
    status, output = refused_start("--bundle", str(trained_bundle), "--max-queue", "lots")
    assert status == 2
    assert output.strip() == (
        "anomaly-serve: error: Config '--max-queue' has value 'lots'. Not a valid integer."
    )


def test_a_malformed_manifest_is_refused_with_one_line(
    trained_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["calibration"]["scores"] = list(manifest["calibration"]["scores"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    status, output = refused_start("--bundle", str(bundle))
    assert status == 1
    (line,) = output.strip().splitlines()
    assert line.startswith(
        f"anomaly-serve: error: cannot serve bundle {bundle}: manifest is malformed"
    )


@pytest.mark.skipif(cuda_device_count() > 0, reason="CUDA is usable here, so 'cuda' would start")
def test_device_cuda_fails_loudly_without_cuda(trained_bundle: Path) -> None:
    status, output = refused_start("--bundle", str(trained_bundle), "--device", "cuda")
    assert status == 1
    assert output.strip().startswith(
        "anomaly-serve: error: device 'cuda' was asked for but CUDA is not usable"
    )


@pytest.fixture
def served_copy(trained_bundle: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    process = serve_process("--bundle", str(bundle), "--grace-period", "20")
    try:
        yield process.wait_ready(), bundle
    finally:
        process.close()


def test_sighup_swaps_in_a_good_bundle_and_refuses_a_corrupt_one(
    served_copy: tuple[ServerProcess, Path],
) -> None:
    server, bundle = served_copy
    ready = json.loads(server.ready_file.read_text())
    assert ready["pid"] == server.pid and ready["port"] == server.port > 0
    assert ready["metrics_port"] == server.metrics_port > 0
    manifest_path = bundle / "manifest.json"
    with Client(server.target) as client:
        before = client.info()
        manifest = json.loads(manifest_path.read_text())
        manifest["model_version"] = "hot-reloaded"
        manifest_path.write_text(json.dumps(manifest))
        server.signal(signal.SIGHUP)
        wait_until(lambda: client.info().model_version == "hot-reloaded", "the reload")
        assert sample(server.metrics_port, "anomaly_model_reloads_total", result="success") == 1
        info_series = {
            labels: value
            for (name, labels), value in scrape(server.metrics_port).items()
            if name == "anomaly_model_info"
        }
        assert list(info_series.values()) == [1.0]
        assert ("model_version", "hot-reloaded") in next(iter(info_series))

        (bundle / "encoder.onnx").write_bytes(b"not a model")
        server.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                sample(server.metrics_port, "anomaly_model_reloads_total", result="failure") == 1
            ),
            "the refused reload to be counted",
        )
        manifest["calibration"]["scores"] = list(manifest["calibration"]["scores"])
        manifest_path.write_text(json.dumps(manifest))
        server.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                sample(server.metrics_port, "anomaly_model_reloads_total", result="failure") == 2
            ),
            "the malformed manifest to be refused and counted",
        )
        after = client.info()
        assert after.model_version == "hot-reloaded" and after.model_id == before.model_id
        assert client.score([random_pixels(0)])[0].ok  # the old model keeps serving
    assert server.log.count("reload refused, still serving model") == 2
    assert "manifest is malformed" in server.log and "Traceback" not in server.log
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_sigterm_under_load_answers_every_accepted_call(
    served_copy: tuple[ServerProcess, Path],
) -> None:
    server, _ = served_copy
    image = pb.Image(id="x", encoded=png_bytes(random_pixels(1)))
    request = pb.ScoreBatchRequest(
        images=[pb.Image(id=str(i), encoded=image.encoded) for i in range(4)]
    )
    unary: list[str] = []
    details: list[str] = []
    streamed: dict[str, object] = {}
    health_seen: list[int] = []
    serving = threading.Event()

    def call_in_a_loop() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(2_000):
                try:
                    reply = stub.ScoreBatch(request, timeout=30)
                except grpc.RpcError as exc:
                    unary.append(exc.code().name)
                    details.append(f"{exc.code().name}: {exc.details()}")
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return
                    continue
                scored = all(r.WhichOneof("outcome") == "scores" for r in reply.results)
                unary.append("OK" if scored and len(reply.results) == 4 else "INCOMPLETE")

    def stream() -> None:
        sent: list[str] = []

        def messages() -> Iterator[pb.ScoreStreamRequest]:
            for i in range(20_000):
                sent.append(f"s{i}")
                yield pb.ScoreStreamRequest(image=pb.Image(id=f"s{i}", encoded=image.encoded))
                threading.Event().wait(0.002)

        received: list[str] = []
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]
            try:
                for reply in stub.ScoreStream(messages(), timeout=60):
                    received.append(reply.result.id)
                streamed["code"] = "OK"
            except grpc.RpcError as exc:
                streamed["code"], streamed["details"] = exc.code().name, exc.details()
        streamed["received"], streamed["sent"] = received, sent

    def watch_health() -> None:
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            for reply in watch:
                health_seen.append(reply.status)
                serving.set()
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    watch.cancel()
                    return

    threads = [threading.Thread(target=f) for f in (call_in_a_loop, call_in_a_loop, stream)]
    watcher = threading.Thread(target=watch_health)
    watcher.start()
    assert serving.wait(30)
    for thread in threads:
        thread.start()
    wait_until(
        lambda: (sample(server.metrics_port, "anomaly_batch_size_images_sum") or 0) >= 40,
        "load on the server",
    )
    server.signal(signal.SIGTERM)
    for thread in [*threads, watcher]:
        thread.join(60)
    assert server.wait() == 0
    assert not server.ready_file.exists()  # removed as shutdown began
    assert health_seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    # The server answered every call it had accepted; the clients saw answers in full, or
    # refusals: UNAVAILABLE, or CANCELLED for a call that gRPC had received but not yet handed
    # to the service when it stopped (never started, so nothing was lost).
    assert "every accepted call was answered" in server.log
    assert "OK" in unary and set(unary) <= {"OK", "UNAVAILABLE", "CANCELLED"}, details
    received = streamed["received"]
    assert isinstance(received, list) and received
    assert received == streamed["sent"][: len(received)]  # type: ignore[index]
    assert streamed["code"] in ("OK", "UNAVAILABLE"), streamed
    if streamed["code"] == "UNAVAILABLE":
        assert f"the first {len(received)} images of this stream were answered" in str(
            streamed["details"]
        )
    assert "shutting down" in server.log and "stopped" in server.log


def test_calls_cut_at_the_end_of_the_grace_period_say_what_was_answered(
    trained_bundle: Path,
) -> None:
    # Batches of three, held 60 s for company: the fourth image of the stream and the unary call
    # wait in the queue until the grace period ends.
    config = serve_config(trained_bundle, max_batch_size=3, max_batch_delay_ms=60_000)
    running = ServerThread(config, model=load_model(trained_bundle, "cpu", threads=1))
    image = pb.Image(id="x", encoded=png_bytes(random_pixels(3)))
    answered: list[str] = []
    outcome: dict[str, grpc.RpcError] = {}
    done = threading.Event()

    def messages() -> Iterator[pb.ScoreStreamRequest]:
        for i in range(4):
            if i == 3:  # once a full batch of the first three was answered
                wait_until(lambda: len(answered) == 3, "the first three images answered")
            yield pb.ScoreStreamRequest(image=pb.Image(id=f"s{i}", encoded=image.encoded))
        done.wait(60)  # the stream stays open

    def stream(stub: pb_grpc.AnomalyDetectorStub) -> None:
        try:
            for reply in stub.ScoreStream(messages(), timeout=60):
                answered.append(reply.result.id)
        except grpc.RpcError as exc:
            outcome["stream"] = exc

    def unary(stub: pb_grpc.AnomalyDetectorStub) -> None:
        wait_until(lambda: len(answered) == 3, "the first three images answered")
        try:
            stub.ScoreBatch(pb.ScoreBatchRequest(images=[image]), timeout=60)
        except grpc.RpcError as exc:
            outcome["unary"] = exc

    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]
        threads = [threading.Thread(target=f, args=(stub,)) for f in (stream, unary)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: (
                running.server.metrics.registry.get_sample_value("anomaly_queue_depth_images") == 2
            ),
            "the fourth image and the unary call queued",
        )
        running.stop(grace=0.5)
        done.set()
        for thread in threads:
            thread.join(30)
    assert answered == ["s0", "s1", "s2"]
    cut, refused = outcome["stream"], outcome["unary"]
    assert cut.code() == grpc.StatusCode.UNAVAILABLE
    assert "the first 3 images of this stream were answered, resend the rest" in cut.details()
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.details()
