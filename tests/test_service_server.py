"""The gRPC service (service/server.py, servicer.py, wire.py) on a real port with a real bundle."""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.client import Client, Result
from service.config import ServeConfig
from service.model_slot import LoadedModel, load_model
from service.preprocessing import load_image_file, preprocess, stack
from service.scoring import SCORE_NAMES
from service.server import ServerThread
from tests.service_helpers import (
    UNPARSEABLE,
    demo_test_images,
    png_bytes,
    random_pixels,
    raw_stream,
    raw_unary,
    scrape,
    serve_config,
    wait_until,
)

MAX_MESSAGE = 1024 * 1024
MAX_REQUEST_IMAGES = 64


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


@pytest.fixture(scope="module")
def server(trained_bundle: Path, model: LoadedModel) -> Iterator[ServerThread]:
    config = serve_config(
        trained_bundle, max_message_bytes=MAX_MESSAGE, max_request_images=MAX_REQUEST_IMAGES
    )
    with ServerThread(config, model=model) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", retries=0) as connected:
        yield connected


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.AnomalyDetectorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]


def scores_of(result: Result) -> tuple[float, ...]:
    assert result.scores is not None, result.error
    names = (*SCORE_NAMES, *(f"{n}_p_value" for n in SCORE_NAMES), "combined", "combined_p_value")
    return tuple(getattr(result.scores, name) for name in (*names, "threshold"))


def tiff_32bit(dtype: type[np.int32] | type[np.float32]) -> bytes:
    """A TIFF of 32-bit samples (PIL mode "I" or "F")."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=dtype).reshape(8, 8)).save(buffer, format="TIFF")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds no pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_encoded_and_raw_images_round_trip(client: Client, model: LoadedModel) -> None:
    pixels = random_pixels(1)
    rgba = np.concatenate([pixels, np.full((*pixels.shape[:2], 1), 255, np.uint8)], axis=2)
    grey = pixels[:, :, 0]
    results = client.score(
        [png_bytes(pixels), pixels, rgba, png_bytes(grey), grey],
        ids=["png", "raw", "rgba", "grey-png", "grey-raw"],
    )
    assert [r.id for r in results] == ["png", "raw", "rgba", "grey-png", "grey-raw"]
    assert all(r.ok and r.model_id == model.model_id for r in results)
    # Lossless encodings and raw pixels are the same image: the same scores.
    assert scores_of(results[0]) == scores_of(results[1]) == scores_of(results[2])
    assert scores_of(results[3]) == scores_of(results[4])


def test_stream_replies_in_order_with_ids(client: Client) -> None:
    images: list[tuple[str, bytes]] = []
    for i in range(24):
        data = b"not an image" if i % 7 == 3 else png_bytes(random_pixels(i))
        images.append((f"part-{i:02d}", data))
    results = list(client.score_stream(images))
    assert [r.id for r in results] == [image_id for image_id, _ in images]
    assert [r.ok for r in results] == [i % 7 != 3 for i in range(24)]
    # Each reply belongs to its image: the same image scored alone gives the same scores.
    alone = client.score([images[5][1]], ids=["alone"])[0]
    assert scores_of(results[5]) == scores_of(alone)


def test_scores_are_identical_to_training_evaluate(
    client: Client, trained_bundle: Path, demo_data: Path
) -> None:
    from training.evaluate import run_evaluation

    _, evaluation = run_evaluation(trained_bundle, demo_data, device="cpu")
    paths = list(evaluation.test.paths)
    assert paths == demo_test_images(demo_data)
    results = client.score(paths)
    got = {
        name: np.array([getattr(r.scores, name) for r in results])
        for name in (*SCORE_NAMES, "combined")
    }
    for name, values in got.items():
        np.testing.assert_array_equal(values, evaluation.scores[name], err_msg=name)
    flags = np.array([r.is_anomaly for r in results])
    np.testing.assert_array_equal(flags, evaluation.is_anomaly)


def test_scores_are_those_of_the_scorer_on_the_same_batch(
    client: Client, model: LoadedModel, demo_data: Path
) -> None:
    paths = demo_test_images(demo_data)[:8]
    expected = model.scorer.score(stack([load_image_file(p, model.spec) for p in paths]))
    results = client.score(paths)
    for index, result in enumerate(results):
        assert result.scores is not None
        for name in SCORE_NAMES:
            assert getattr(result.scores, name) == expected.raw[name][index], name
            p_value = getattr(result.scores, f"{name}_p_value")
            assert p_value == expected.p_values[name][index], name
        assert result.scores.combined == expected.combined[index]
        assert result.scores.combined_p_value == expected.combined_p_value[index]
        assert result.scores.threshold == expected.threshold
        assert result.scores.is_anomaly == expected.is_anomaly[index]


def test_anomaly_maps_come_only_when_asked(client: Client, model: LoadedModel) -> None:
    pixels = random_pixels(3)
    plain, mapped = client.score([pixels]), client.score([pixels], return_anomaly_map=True)
    assert plain[0].anomaly_map() is None
    amap = mapped[0].anomaly_map()
    assert amap is not None and amap.shape == (model.spec.height, model.spec.width)
    expected = model.scorer.score(stack([_preprocessed(pixels, model)]), keep_maps=True).anomaly_map
    assert expected is not None
    np.testing.assert_array_equal(amap, expected[0])
    assert mapped[0].scores is not None
    # The map is the combined score at every pixel: on the scale of the combined score.
    assert np.all(np.isfinite(amap))
    assert float(amap.max()) <= mapped[0].scores.combined + 1.0


def test_latent_means_come_only_when_asked(client: Client, model: LoadedModel) -> None:
    pixels = [random_pixels(4), random_pixels(5)]
    plain = client.score(pixels)
    asked = client.score(pixels, return_latent_mean=True)
    streamed = list(client.score_stream(pixels, return_latent_mean=True))
    assert [r.latent_mean() for r in plain] == [None, None]
    for index, image in enumerate(pixels):
        expected = model.scorer.run_model(stack([_preprocessed(image, model)])).mu[0]
        assert expected.shape == (model.scorer.manifest.latent_dim,)
        for result in (asked[index], streamed[index]):
            mean = result.latent_mean()
            assert mean is not None
            np.testing.assert_array_equal(mean, expected)
            # Asking for the means changes no score.
            assert scores_of(result) == scores_of(plain[index])


def _preprocessed(pixels: npt.NDArray[np.uint8], model: LoadedModel) -> npt.NDArray[np.float32]:
    return preprocess(Image.fromarray(pixels), model.spec)


def test_decision_rule_overrides(client: Client, model: LoadedModel) -> None:
    pixels = random_pixels(4)
    default = client.score([pixels])[0].scores
    assert default is not None
    assert default.threshold == model.scorer.calibration.rule.threshold
    low = client.score([pixels], threshold=default.combined)[0].scores
    high = client.score([pixels], threshold=default.combined + 1.0)[0].scores
    assert low is not None and high is not None
    assert low.is_anomaly and not high.is_anomaly
    rated = client.score([pixels], target_false_alarm_rate=0.5)[0].scores
    assert rated is not None
    expected = model.scorer.calibration.rule_for(target_false_alarm_rate=0.5).threshold
    assert rated.threshold == expected


BAD_IMAGES = [
    (pb.Image(id="garbage", encoded=b"not an image"), "could not be decoded as PNG, JPEG"),
    (
        pb.Image(id="short", raw=pb.RawImage(pixels=b"\0" * 10, height=4, width=4, channels=1)),
        r"10 bytes of raw pixels; expected 4x4x1 = 16",
    ),
    (
        pb.Image(id="flat", raw=pb.RawImage(pixels=b"", height=0, width=4, channels=3)),
        "both must be at least 1",
    ),
    (pb.Image(id="bomb", encoded=png_header_only(100_000, 100_000)), "over the limit of"),
    (
        pb.Image(id="huge-raw", raw=pb.RawImage(pixels=b"", height=100_000, width=100_000)),
        "over the limit of",
    ),
    (
        pb.Image(
            id="two-channel", raw=pb.RawImage(pixels=b"\0" * 8, height=2, width=2, channels=2)
        ),
        r"2 channels; expected 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)",
    ),
    (pb.Image(id="empty"), "has no data; expected encoded bytes"),
    (pb.Image(id="tiff-i32", encoded=tiff_32bit(np.int32)), r"32-bit samples \(mode 'I'\)"),
    (pb.Image(id="tiff-f32", encoded=tiff_32bit(np.float32)), r"32-bit samples \(mode 'F'\)"),
]


@pytest.mark.parametrize(("image", "match"), BAD_IMAGES, ids=[i.id for i, _ in BAD_IMAGES])
def test_a_bad_image_fails_alone_naming_its_id(
    stub: pb_grpc.AnomalyDetectorStub, image: pb.Image, match: str
) -> None:
    good = pb.Image(id="good", encoded=png_bytes(random_pixels(5)))
    other = pb.Image(id="other", encoded=good.encoded)
    response = stub.ScoreBatch(pb.ScoreBatchRequest(images=[good, image, other]), timeout=30)
    first, bad, last = response.results
    assert first.WhichOneof("outcome") == "scores" and last.WhichOneof("outcome") == "scores"
    assert bad.id == image.id and bad.WhichOneof("outcome") == "error"
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"'{image.id}'" in bad.error.message
    assert re.search(match, bad.error.message), bad.error.message
    # In a stream too, and the stream goes on.
    replies = list(
        stub.ScoreStream(
            iter([pb.ScoreStreamRequest(image=image), pb.ScoreStreamRequest(image=good)]),
            timeout=30,
        )
    )
    assert [r.result.WhichOneof("outcome") for r in replies] == ["error", "scores"]
    assert replies[0].result.error.message == bad.error.message


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (pb.ScoreBatchRequest(), "no images; expected 1 to 64"),
        (
            pb.ScoreBatchRequest(
                images=[
                    pb.Image(
                        id=str(i), raw=pb.RawImage(pixels=b"\0", height=1, width=1, channels=1)
                    )
                    for i in range(MAX_REQUEST_IMAGES + 1)
                ]
            ),
            "65 images; this server takes at most 64",
        ),
        (
            pb.ScoreBatchRequest(images=[pb.Image(id="a"), pb.Image(id="b"), pb.Image(id="a")]),
            "image id 'a' appears more than once",
        ),
        (
            pb.ScoreBatchRequest(
                images=[pb.Image(id="a")], options=pb.ScoreOptions(threshold=float("nan"))
            ),
            "threshold is nan; expected a finite number",
        ),
        (
            pb.ScoreBatchRequest(
                images=[pb.Image(id="a")], options=pb.ScoreOptions(target_false_alarm_rate=1.0)
            ),
            "target_false_alarm_rate is 1.0; expected a number strictly between 0 and 1",
        ),
    ],
    ids=["empty", "too-many", "duplicate-ids", "nan-threshold", "rate-one"],
)
def test_malformed_requests_are_invalid_argument(
    stub: pb_grpc.AnomalyDetectorStub, request_: pb.ScoreBatchRequest, match: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ScoreBatch(request_, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in refused.value.details()


def test_bad_options_in_a_stream_fail_only_their_message(stub: pb_grpc.AnomalyDetectorStub) -> None:
    image = pb.Image(id="x", encoded=png_bytes(random_pixels(6)))
    replies = list(
        stub.ScoreStream(
            iter(
                [
                    pb.ScoreStreamRequest(
                        image=image, options=pb.ScoreOptions(target_false_alarm_rate=0)
                    ),
                    pb.ScoreStreamRequest(image=image),
                ]
            ),
            timeout=30,
        )
    )
    assert replies[0].result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image 'x': options.target_false_alarm_rate is 0.0" in replies[0].result.error.message
    assert replies[1].result.WhichOneof("outcome") == "scores"


@pytest.mark.parametrize("name", list(UNPARSEABLE))
def test_an_unparseable_request_is_invalid_argument_counted_and_logged_once(
    server: ServerThread, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = server.server.metrics.registry
    labels = {"method": "ScoreBatch", "code": "INVALID_ARGUMENT"}
    before = registry.get_sample_value("anomaly_requests_total", labels) or 0
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        caplog.at_level(logging.INFO),
        pytest.raises(grpc.RpcError) as refused,
    ):
        raw_unary(channel, "ScoreBatch")(UNPARSEABLE[name], timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert details.startswith("the request is not a valid anomaly.v1.ScoreBatchRequest message")
    assert "<class" not in details and "Unexpected" not in details
    wait_until(
        lambda: registry.get_sample_value("anomaly_requests_total", labels) == before + 1,
        "the call to be counted",
    )
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.exc_info is None and "not a valid anomaly.v1.ScoreBatchRequest" in line.getMessage()


def test_an_unparseable_stream_message_fails_alone_in_its_place(server: ServerThread) -> None:
    good = pb.ScoreStreamRequest(image=pb.Image(id="good", encoded=png_bytes(random_pixels(9))))
    messages = [good.SerializeToString(), *UNPARSEABLE.values(), good.SerializeToString()]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = [
            pb.ScoreStreamResponse.FromString(reply).result
            for reply in raw_stream(channel, "ScoreStream")(iter(messages), timeout=30)
        ]
    assert [r.WhichOneof("outcome") for r in replies] == ["scores", *["error"] * 4, "scores"]
    for position, reply in enumerate(replies[1:-1], start=2):
        assert reply.id == "" and reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.error.message.startswith(
            f"message {position} of this stream is not a valid anomaly.v1.ScoreStreamRequest"
        )


def test_an_oversize_message_is_resource_exhausted(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.score([b"\0" * (MAX_MESSAGE + 1)])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE) in refused.value.details()
    assert client.score([random_pixels(7)])[0].ok  # still serving


def test_concurrent_clients_with_bad_images_do_not_disturb_each_other(
    server: ServerThread, client: Client
) -> None:
    good = png_bytes(random_pixels(8))
    expected = scores_of(client.score([good])[0])
    failures: list[str] = []

    def worker(index: int) -> None:
        with Client(f"127.0.0.1:{server.port}", retries=0) as own:
            for _ in range(5):
                results = own.score([good, b"junk" * index, good], ids=["a", "b", "c"])
                if not (results[0].ok and results[2].ok and not results[1].ok):
                    failures.append(f"worker {index}: {results}")
                elif scores_of(results[0]) != expected:
                    failures.append(f"worker {index}: scores changed")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_model_info_describes_model_device_and_limits(client: Client, model: LoadedModel) -> None:
    info = client.info()
    manifest = model.scorer.manifest
    assert info.model_id == model.model_id and info.model_version == manifest.model_version
    assert info.execution_provider == "CPUExecutionProvider"
    assert (info.input.height, info.input.width) == (manifest.input.height, manifest.input.width)
    assert info.input.channels == manifest.input.channels
    assert info.input.color_mode == manifest.input.color_mode
    assert info.input.wide_sample_bits == manifest.input.wide_sample_bits == 16  # RGB images
    assert info.latent_dim == manifest.latent_dim
    grid = manifest.latent
    assert (info.latent_grid.channels, info.latent_grid.rows, info.latent_grid.columns) == (
        grid.channels,
        grid.rows,
        grid.columns,
    )
    assert info.latent_dim == grid.channels * grid.rows * grid.columns
    assert dict(info.combined_weights) == dict(manifest.calibration.weights)
    assert info.bundle_format_version == manifest.format_version == 11
    assert info.default_rule.threshold == manifest.calibration.rule.threshold
    assert info.default_rule.outliers_left_out == manifest.calibration.rule.outliers
    assert info.calibration_size == len(manifest.calibration.combined.values)
    assert info.local_window == manifest.calibration.local_window
    assert info.trained_at == manifest.created_at
    assert info.loaded_at.endswith("Z")
    assert info.limits.max_images_per_request == MAX_REQUEST_IMAGES
    assert info.limits.max_message_bytes == MAX_MESSAGE
    # Drift is watched by default, with thresholds set from the held-out set and the window.
    assert info.HasField("drift")
    defaults = ServeConfig(bundle=Path("b")).drift
    thresholds = defaults.for_model(info.calibration_size, model.latent_baseline)
    assert info.drift.window_size == defaults.window == 128
    assert info.drift.p_value_ks_threshold == thresholds.p_value_ks
    assert info.drift.latent_shift_threshold == thresholds.latent_shift
    assert info.drift.latent_dimensions == thresholds.latent_dimensions == info.latent_dim
    assert info.drift.latent_baseline_size == model.latent_baseline.count >= 2


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "anomaly.v1.AnomalyDetector"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = reflection.ServerReflectionInfo(iter([request]), timeout=10)
        names = {s.name for s in reply.list_services_response.service}
        assert {"anomaly.v1.AnomalyDetector", "grpc.health.v1.Health"} <= names


def test_metrics_count_a_known_workload(
    trained_bundle: Path, model: LoadedModel, demo_data: Path
) -> None:
    paths = demo_test_images(demo_data)[:10]
    combined = model.scorer.score(stack([load_image_file(p, model.spec) for p in paths])).combined
    threshold = float(np.sort(combined)[-3])  # exactly three images at or above it
    assert np.count_nonzero(combined >= threshold) == 3
    with (
        ServerThread(serve_config(trained_bundle), model=model) as running,
        Client(f"127.0.0.1:{running.port}", retries=0) as own,
    ):
        results = own.score(paths, threshold=threshold)
        assert sum(r.is_anomaly for r in results) == 3
        with pytest.raises(grpc.RpcError):
            own.score([])
        own.score([b"junk"])
        registry = running.server.metrics.registry
        # A call is counted as it ends on the server, which may be just after its client hears.
        wait_until(
            lambda: (
                registry.get_sample_value(
                    "anomaly_request_duration_seconds_count", {"method": "ScoreBatch"}
                )
                == 3
            ),
            "three calls counted",
        )
        samples = scrape(running.metrics_port)

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    model_labels = {"model_id": model.model_id, "model_version": model.model_version}
    assert value("anomaly_images_scored_total", **model_labels) == 10
    assert value("anomaly_images_flagged_total", **model_labels) == 3
    assert value("anomaly_image_errors_total", code="INVALID_ARGUMENT") == 1
    assert value("anomaly_requests_total", method="ScoreBatch", code="OK") == 2
    assert value("anomaly_requests_total", method="ScoreBatch", code="INVALID_ARGUMENT") == 1
    assert value("anomaly_request_duration_seconds_count", method="ScoreBatch") == 3
    for score in SCORE_NAMES:
        assert value("anomaly_score_count", score=score) == 10, score
    assert value("anomaly_combined_score_count") == 10
    assert value("anomaly_batch_size_images_sum") == 10
    assert value("anomaly_inference_duration_seconds_count") == value(
        "anomaly_batch_size_images_count"
    )
    assert value("anomaly_queue_wait_seconds_count") == 1
    assert value("anomaly_queue_depth_images") == 0
    assert value("anomaly_inflight_requests") == 0
    info_labels = {
        **model_labels,
        "provider": "CPUExecutionProvider",
        "requested_device": "cpu",
    }
    assert value("anomaly_model_info", **info_labels) == 1
