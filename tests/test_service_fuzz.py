"""A bounded fuzz of a real server: a few thousand hostile requests (bytes that do not parse,
mutated messages, broken and odd images, options at and past their limits), unary and streamed,
while a well-formed client calls beside them. Every answer must be the one the proto documents,
the well-formed client must never fail, and the server must score as before.

Deterministic (seeded): a failure names the case that caused it.
"""

from __future__ import annotations

import io
import logging
import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service._proto import anomaly_pb2 as pb
from service.client import Client
from service.model_slot import LoadedModel, load_model
from service.server import ServerThread
from tests.service_helpers import (
    UNPARSEABLE,
    png_bytes,
    random_pixels,
    raw_stream,
    raw_unary,
    serve_config,
)

SEED = 20_240_601
UNARY_CALLS = 2_000
STREAMS = 100
MESSAGES_PER_STREAM = 12
MAX_IMAGES = 8
MAX_MESSAGE = 256 * 1024
MAX_PIXELS = 200_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DOCUMENTED_IMAGE_CODES = {grpc.StatusCode.INVALID_ARGUMENT.value[0]}


# --- what a hostile client sends ---------------------------------------------------------------


def _image_file(rng: random.Random) -> bytes:
    size = (rng.randint(1, 48), rng.randint(1, 48))
    mode = rng.choice(["L", "RGB", "RGBA", "I", "F", "P", "1", "I;16"])
    array = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, size[::-1], np.uint8)
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    fmt = "TIFF" if mode in ("I", "F", "I;16") else rng.choice(["PNG", "BMP", "TIFF", "JPEG"])
    if fmt == "JPEG":
        image = image.convert("RGB")
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, cut, insert or repeat bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            out[at:at] = out[max(0, at - 16) : at]
    return bytes(out)


def _id(rng: random.Random, index: int) -> str:
    return rng.choice(
        [f"part-{index}", "", "\u00e9\u6f22\U0001f600", "x" * 300, "a'b\"c\n", f"{index}\x00"]
    )


def _image(rng: random.Random, index: int) -> pb.Image:
    image = pb.Image(id=_id(rng, index))
    kind = rng.randrange(8)
    if kind <= 2:
        image.encoded = _image_file(rng)
    elif kind == 3:
        image.encoded = _mutate(_image_file(rng), rng)
    elif kind == 4:
        image.encoded = rng.randbytes(rng.randint(0, 64))
    elif kind == 5:
        height, width = rng.randint(1, 40), rng.randint(1, 40)
        channels = rng.choice([1, 3, 4])
        image.raw.height, image.raw.width, image.raw.channels = height, width, channels
        image.raw.pixels = rng.randbytes(height * width * channels)
    elif kind == 6:
        height, width = rng.choice([0, 1, 7, 100_000, 2**32 - 1]), rng.randint(0, 9)
        image.raw.height, image.raw.width = height, width
        image.raw.channels = rng.choice([0, 1, 2, 3, 4, 5, 255])
        image.raw.pixels = rng.randbytes(rng.randint(0, 64))
    # kind 7: no data at all
    return image


def _options(rng: random.Random) -> pb.ScoreOptions:
    options = pb.ScoreOptions(return_anomaly_map=rng.random() < 0.2)
    kind = rng.randrange(3)
    if kind == 1:
        options.threshold = rng.choice(
            [0.0, -0.0, 1.5, -3.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
        )
    elif kind == 2:
        options.target_false_alarm_rate = rng.choice(
            [0.5, 0.01, 1e-17, 5e-324, 1 - 1e-16, 0.0, 1.0, -0.5, 2.0, math.nan, math.inf]
        )
    return options


def batch_body(rng: random.Random) -> bytes:
    """A ScoreBatch request body: usually a message, sometimes mutated or no message at all."""
    count = rng.choice([0, 1, 1, 2, 3, MAX_IMAGES, MAX_IMAGES + 1])
    images = [_image(rng, i) for i in range(count)]
    if count > 1 and rng.random() < 0.1:
        images[-1].id = images[0].id
    body: bytes = pb.ScoreBatchRequest(images=images, options=_options(rng)).SerializeToString()
    roll = rng.random()
    if roll < 0.15:
        return _mutate(body, rng)
    if roll < 0.2:
        garbage: list[bytes] = [*UNPARSEABLE.values(), rng.randbytes(rng.randint(0, 40))]
        return rng.choice(garbage)
    return body


def stream_body(rng: random.Random, index: int) -> bytes:
    """A ScoreStream message body, or bytes that are none."""
    message = pb.ScoreStreamRequest(image=_image(rng, index), options=_options(rng))
    body: bytes = message.SerializeToString()
    roll = rng.random()
    if roll < 0.1:
        return _mutate(body, rng)
    if roll < 0.15:
        garbage: list[bytes] = list(UNPARSEABLE.values())
        return rng.choice(garbage)
    return body


# --- what the proto says the answers are ---------------------------------------------------------


def options_problem(options: pb.ScoreOptions) -> bool:
    """Options out of range (an INVALID_ARGUMENT)."""
    decision = options.WhichOneof("decision")
    if decision == "threshold":
        return not math.isfinite(options.threshold)
    if decision == "target_false_alarm_rate":
        return not 0.0 < options.target_false_alarm_rate < 1.0
    return False


def expected_threshold(model: LoadedModel, options: pb.ScoreOptions) -> float:
    return model.calibration.rule_for(
        threshold=options.threshold if options.HasField("threshold") else None,
        target_false_alarm_rate=options.target_false_alarm_rate
        if options.HasField("target_false_alarm_rate")
        else None,
    ).threshold


@dataclass
class Checker:
    """Checks answers against the documented ones; collects what differs."""

    model: LoadedModel
    problems: list[str]

    def fail(self, case: str, what: str) -> None:
        self.problems.append(f"{case}: {what}")

    def result(
        self, case: str, result: pb.ImageResult, image: pb.Image, options: pb.ScoreOptions
    ) -> None:
        if result.id != image.id:
            self.fail(case, f"result id {result.id!r} for image {image.id!r}")
        if result.WhichOneof("outcome") == "error":
            if result.error.code not in DOCUMENTED_IMAGE_CODES:
                self.fail(case, f"image error code {result.error.code}: {result.error.message}")
            if repr(image.id) not in result.error.message:
                self.fail(case, f"image error does not name {image.id!r}: {result.error.message}")
            return
        scores = result.scores
        if result.model_id != self.model.model_id:
            self.fail(case, f"model id {result.model_id!r}")
        values = [
            getattr(scores, f.name) for f in scores.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE
        ]
        if not all(math.isfinite(v) for v in values):
            self.fail(case, f"non-finite scores {scores}")
        p_values = [v for f, v in scores.ListFields() if f.name.endswith("_p_value")]
        if not all(0 < p <= 1 for p in p_values):
            self.fail(case, f"p-values {p_values}")
        if scores.threshold != expected_threshold(self.model, options):
            self.fail(case, f"threshold {scores.threshold} for options {options}")
        if scores.is_anomaly != (scores.combined >= scores.threshold):
            self.fail(case, "the verdict is not combined >= threshold")
        if scores.HasField("anomaly_map") != options.return_anomaly_map:
            self.fail(case, "an anomaly map that was not asked for, or none that was")

    def batch(self, case: str, body: bytes, call: grpc.UnaryUnaryMultiCallable) -> None:
        try:
            request: pb.ScoreBatchRequest | None = pb.ScoreBatchRequest.FromString(body)
        except Exception:
            request = None
        try:
            reply = pb.ScoreBatchResponse.FromString(call(body, timeout=60))
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if "Unexpected" in details or "<class" in details or not details:
                self.fail(case, f"{code.name} with Python internals: {details!r}")
            if request is None:
                if code != INVALID or "is not a valid anomaly.v1.ScoreBatchRequest" not in details:
                    self.fail(case, f"unparseable bytes answered {code.name}: {details}")
            elif code != INVALID or not self.invalid(request):
                self.fail(case, f"{code.name} ({details}) for a request the proto accepts")
            return
        if request is None or self.invalid(request):
            self.fail(case, "accepted a request the proto refuses")
            return
        if len(reply.results) != len(request.images):
            self.fail(case, f"{len(reply.results)} results for {len(request.images)} images")
            return
        for result, image in zip(reply.results, request.images, strict=True):
            self.result(case, result, image, request.options)

    @staticmethod
    def invalid(request: pb.ScoreBatchRequest) -> bool:
        ids = [image.id for image in request.images]
        return (
            not 1 <= len(ids) <= MAX_IMAGES
            or len(set(ids)) != len(ids)
            or options_problem(request.options)
        )

    def stream(self, case: str, bodies: list[bytes], call: grpc.StreamStreamMultiCallable) -> None:
        try:
            replies = [
                pb.ScoreStreamResponse.FromString(reply).result
                for reply in call(iter(bodies), timeout=60)
            ]
        except grpc.RpcError as exc:
            self.fail(case, f"the stream failed {exc.code().name}: {exc.details()}")
            return
        if len(replies) != len(bodies):
            self.fail(case, f"{len(replies)} replies for {len(bodies)} messages")
            return
        for position, (result, body) in enumerate(zip(replies, bodies, strict=True), start=1):
            where = f"{case} message {position}"
            try:
                message = pb.ScoreStreamRequest.FromString(body)
            except Exception:
                prefix = f"message {position} of this stream is not a valid"
                if result.id or result.error.code != INVALID.value[0]:
                    self.fail(where, f"unparseable message answered {result}")
                elif not result.error.message.startswith(prefix):
                    self.fail(where, f"unparseable message answered {result.error.message!r}")
                continue
            if options_problem(message.options):
                if result.error.code != INVALID.value[0] or repr(message.image.id) not in (
                    result.error.message
                ):
                    self.fail(where, f"bad options answered {result}")
                continue
            self.result(where, result, message.image, message.options)


# --- the run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> LoadedModel:
    return load_model(trained_bundle, "cpu", threads=1)


# PIL warns about the corrupt TIFFs it is sent, and decodes them or refuses them as it should.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
def test_every_hostile_request_gets_its_documented_answer_and_fails_no_one_else(
    trained_bundle: Path, model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    config = serve_config(
        trained_bundle,
        max_request_images=MAX_IMAGES,
        max_message_bytes=MAX_MESSAGE,
        max_image_pixels=MAX_PIXELS,
    )
    good = png_bytes(random_pixels(42))
    problems: list[str] = []
    checker = Checker(model, problems)
    stop = threading.Event()
    polite_calls = 0
    caplog.set_level(logging.WARNING)
    with ServerThread(config, model=model) as running:
        target = f"127.0.0.1:{running.port}"

        def polite() -> None:
            nonlocal polite_calls
            with Client(target, retries=0) as client:
                expected = client.score([good])[0].scores
                polite_calls += 1
                while not stop.is_set():
                    batch = client.score([good, good], ids=["a", "b"])
                    streamed = list(client.score_stream([good, good]))
                    polite_calls += 1
                    for result in [*batch, *streamed]:
                        if not result.ok or result.scores != expected:
                            problems.append(f"the well-formed client got {result}")

        def fuzz_unary(worker: int) -> None:
            rng = random.Random(SEED + worker)
            with grpc.insecure_channel(target) as channel:
                call = raw_unary(channel, "ScoreBatch")
                for index in range(worker, UNARY_CALLS, 4):
                    checker.batch(f"unary case {index}", batch_body(rng), call)

        def fuzz_streams(worker: int) -> None:
            rng = random.Random(SEED + 100 + worker)
            with grpc.insecure_channel(target) as channel:
                call = raw_stream(channel, "ScoreStream")
                for index in range(worker, STREAMS, 2):
                    bodies = [stream_body(rng, i) for i in range(MESSAGES_PER_STREAM)]
                    checker.stream(f"stream case {index}", bodies, call)

        with ThreadPoolExecutor(7) as pool:
            well_formed = pool.submit(polite)
            fuzzing = [pool.submit(fuzz_unary, w) for w in range(4)]
            fuzzing += [pool.submit(fuzz_streams, w) for w in range(2)]
            for future in fuzzing:
                future.result()
            stop.set()
            well_formed.result()

        with Client(target, retries=0) as client:
            assert client.score([good])[0].scores == client.score([good])[0].scores
        registry = running.server.metrics.registry
        counted = {
            sample.labels["code"]: sample.value
            for family in registry.collect()
            if family.name == "anomaly_requests"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["method"] == "ScoreBatch"
        }
        held = registry.get_sample_value("anomaly_queue_depth_images")

    assert problems == [], "\n".join(problems[:20])
    assert polite_calls > 1
    # Every unary call counted, under a documented code (the well-formed client's too: one
    # reference call, then one per round, and the final two).
    assert set(counted) <= {"OK", "INVALID_ARGUMENT"}, counted
    assert sum(counted.values()) == UNARY_CALLS + polite_calls + 2
    assert held == 0
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == [], tracebacks[:3]
