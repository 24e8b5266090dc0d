"""The AnomalyDetector servicer: validate, preprocess off the loop, hand to the batcher, reply.

Follows the error model of ``protos/anomaly/v1/anomaly.proto``: request-level problems abort the
call; an image that cannot be scored gets an ImageError in its result and its neighbours are
scored as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import numpy as np

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.admission import AdmissionControl, QueueFullError, Ticket
from service.batcher import (
    BatcherClosedError,
    DeadlineExpiredError,
    FloatArray,
    MicroBatcher,
    Part,
)
from service.drift import DriftSettings
from service.inference import RawBatch, ScoreParams, count_scored, score_rows
from service.metrics import ServiceMetrics
from service.model_slot import LoadedModel, ModelSlot
from service.scoring import DecisionRule, ScoreBatch
from service.wire import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    Limits,
    Unparseable,
    check_batch,
    decode_into,
    empty_rows,
    error_result,
    model_info,
    score_params,
    scored_results,
)

log = logging.getLogger(__name__)

Batcher = MicroBatcher[LoadedModel, RawBatch]
SHUTTING_DOWN = "the server is shutting down; send this work to another replica"


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` (``context.abort`` raises; this tells the type checker)."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _cut(answered: int) -> str:
    """Why a stream ends at shutdown, and how many of its images were answered."""
    return (
        f"{SHUTTING_DOWN}: the first {answered} images of this stream were answered, "
        "resend the rest"
    )


@dataclass(frozen=True)
class _StreamEnd:
    drained: bool


@dataclass(frozen=True)
class _Pending:
    """A stream message read: its result to come, and the room it holds until its reply is sent."""

    result: asyncio.Future[pb.ImageResult]
    ticket: Ticket | None
    received: float

    def discard(self) -> None:
        """Not to be answered: stop the work and give back the room."""
        self.result.cancel()
        if self.ticket is not None:
            self.ticket.release()


class ActiveCalls:
    """Counts the scoring calls being served, so that shutdown can wait until they are answered."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """A call starts."""
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        """A call has been answered (or ended otherwise)."""
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every call to end; the number still running."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self.count


class AnomalyDetectorServicer(pb_grpc.AnomalyDetectorServicer):
    """Serves ScoreBatch, ScoreStream and GetModelInfo on the model in ``models``."""

    def __init__(
        self,
        models: ModelSlot,
        batcher: Batcher,
        admission: AdmissionControl,
        decode_pool: Executor,
        metrics: ServiceMetrics,
        *,
        limits: Limits,
        drift: DriftSettings,
        decode_workers: int,
        stream_window: int,
    ) -> None:
        self._models = models
        self._batcher = batcher
        self._admission = admission
        self._pool = decode_pool
        self._metrics = metrics
        self._limits = limits
        self._drift = drift
        self._workers = decode_workers
        self._window = stream_window
        self._draining = False
        self._readers: set[asyncio.Task[Any]] = set()
        self.active = ActiveCalls()
        self._stream_latency = metrics.request_duration.labels("ScoreStream")

    def drain(self) -> None:
        """Refuse new calls; streams stop reading, answer what they read, end UNAVAILABLE."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()

    def _count_error(self, code: grpc.StatusCode) -> None:
        self._metrics.image_errors.labels(code.name).inc()

    def _finish(
        self,
        model: LoadedModel,
        parts: Sequence[Part[RawBatch]],
        rule: DecisionRule,
        params: ScoreParams,
    ) -> list[ScoreBatch]:
        """This call's scores from its rows of the batches, with its own options; counted."""
        scored = score_rows(model, parts, rule, params)
        count_scored(self._metrics, model, scored)
        return scored

    async def _decode(
        self, images: Sequence[pb.Image], model: LoadedModel
    ) -> tuple[FloatArray, dict[int, str]]:
        """Preprocess images into one batch on the decode pool, in up to ``workers`` chunks."""
        loop = asyncio.get_running_loop()
        count = len(images)
        rows = empty_rows(count, model.spec)
        pixels = self._limits.max_image_pixels
        chunks = min(self._workers, count)
        if chunks == 1:  # one image (every stream message): no split, no gather
            found = [
                await loop.run_in_executor(
                    self._pool, decode_into, images, model.spec, rows, pixels
                )
            ]
            bounds = [0, count]
        else:
            bounds = [count * i // chunks for i in range(chunks + 1)]
            found = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._pool, decode_into, images[a:b], model.spec, rows[a:b], pixels
                    )
                    for a, b in itertools.pairwise(bounds)
                )
            )
        errors = {
            a + index: message
            for a, part in zip(bounds[:-1], found, strict=True)
            for index, message in part.items()
        }
        if errors:  # the caller gives their room in the queue back
            keep = np.ones(len(images), dtype=bool)
            keep[list(errors)] = False
            rows = rows[keep]
        return rows, errors

    async def ScoreBatch(  # noqa: N802 (gRPC method name)
        self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreBatchResponse:
        """Score the request's images as one job; results in request order."""
        if self._draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        self.active.begin()
        try:
            return await self._score_batch(request, context)
        finally:
            self.active.end()

    async def _score_batch(
        self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreBatchResponse:
        images = request.images
        model = self._models.current
        try:
            check_batch(images, self._limits.max_images_per_request)
            params = score_params(request.options)
            rule = params.rule(model.calibration)
        except ValueError as exc:
            await abort(context, INVALID_ARGUMENT, str(exc))
        try:
            ticket = self._admission.admit(context.peer(), len(images))
        except QueueFullError as exc:
            await abort(context, RESOURCE_EXHAUSTED, str(exc))
        with ticket:
            rows, errors = await self._decode(images, model)
            ticket.release(len(errors))  # images that failed to decode hold no room
            scored: list[ScoreBatch] = []
            if rows.shape[0]:
                try:
                    parts = await self._batcher.submit(model, rows, deadline=_deadline(context))
                except DeadlineExpiredError as exc:
                    await abort(context, DEADLINE_EXCEEDED, f"not scored: {exc}")
                except BatcherClosedError:
                    await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                except Exception as exc:  # logged by the batcher
                    await abort(context, grpc.StatusCode.INTERNAL, f"scoring failed: {exc}")
                try:
                    scored = self._finish(model, parts, rule, params)
                except Exception as exc:  # a fault of this call's own scoring: it alone fails
                    log.exception("scoring a call's rows failed")
                    await abort(context, grpc.StatusCode.INTERNAL, f"scoring failed: {exc}")
        ids = (image.id for index, image in enumerate(images) if index not in errors)
        scored_images = iter(scored_results(ids, scored, model.model_id))
        results = []
        for index, image in enumerate(images):
            if index in errors:
                self._count_error(INVALID_ARGUMENT)
                results.append(error_result(image.id, INVALID_ARGUMENT, errors[index]))
            else:
                results.append(next(scored_images))
        return pb.ScoreBatchResponse(results=results)

    async def _score_message(
        self, message: pb.ScoreStreamRequest | Unparseable, position: int, deadline: float | None
    ) -> pb.ImageResult:
        """Score one stream message; image-level failures become its ImageError."""
        if isinstance(message, Unparseable):
            problem = f"message {position} of this stream is {message.describe()}"
            log.warning("ScoreStream: %s", problem)
            return self._image_error("", INVALID_ARGUMENT, f"{problem}; its image id is unknown")
        image = message.image
        model = self._models.current
        try:
            params = score_params(message.options)
            rule = params.rule(model.calibration)
        except ValueError as exc:
            return self._image_error(image.id, INVALID_ARGUMENT, f"image {image.id!r}: {exc}")
        rows, errors = await self._decode([image], model)
        if errors:
            return self._image_error(image.id, INVALID_ARGUMENT, errors[0])
        try:
            parts = await self._batcher.submit(model, rows, deadline=deadline)
        except DeadlineExpiredError as exc:
            return self._image_error(
                image.id, DEADLINE_EXCEEDED, f"image {image.id!r} was not scored: {exc}"
            )
        scored = self._finish(model, parts, rule, params)
        return scored_results([image.id], scored, model.model_id)[0]

    def _image_error(self, image_id: str, code: grpc.StatusCode, message: str) -> pb.ImageResult:
        self._count_error(code)
        return error_result(image_id, code, message)

    async def ScoreStream(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.ScoreStreamRequest | Unparseable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Score each message as it arrives, up to ``stream_window`` in flight; reply in order.

        Each message read holds room in the queue (against this client's share) until its reply
        has been handed to gRPC: a client that does not read its replies stops being read once
        its window is full, and holds no more than its share of the queue.
        """
        if self._draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        deadline = _deadline(context)
        client = context.peer()
        window = asyncio.Semaphore(self._window)
        pending: asyncio.Queue[_Pending | _StreamEnd] = asyncio.Queue()

        def admitted(message: pb.ScoreStreamRequest | Unparseable, position: int) -> _Pending:
            received = time.perf_counter()
            try:
                ticket = self._admission.admit(client, 1)
            except QueueFullError as exc:
                image_id = "" if isinstance(message, Unparseable) else message.image.id
                refused = loop.create_future()
                refused.set_result(
                    self._image_error(image_id, RESOURCE_EXHAUSTED, f"image {image_id!r}: {exc}")
                )
                return _Pending(refused, None, received)
            task = loop.create_task(self._score_message(message, position, deadline))
            return _Pending(task, ticket, received)

        async def read() -> None:
            # A message is either not read at all or queued for an answer: drain() cancels
            # this task only at an await, and none lies between reading and queueing.
            drained = False
            try:
                for position in itertools.count(1):
                    await window.acquire()
                    try:
                        message = await anext(request_iterator)
                    except StopAsyncIteration:
                        break
                    pending.put_nowait(admitted(message, position))
            except asyncio.CancelledError:
                if not self._draining:
                    raise
                drained = True
            finally:
                pending.put_nowait(_StreamEnd(drained))

        reader = loop.create_task(read(), name="stream-reader")
        self._readers.add(reader)
        answered = 0
        item: _Pending | _StreamEnd | None = None
        self.active.begin()
        try:
            while not isinstance(item := await pending.get(), _StreamEnd):
                try:
                    result = await item.result
                except BatcherClosedError:  # the grace period ran out
                    await abort(context, grpc.StatusCode.UNAVAILABLE, _cut(answered))
                except Exception as exc:  # logged by the batcher
                    await abort(context, grpc.StatusCode.INTERNAL, f"scoring failed: {exc}")
                yield pb.ScoreStreamResponse(result=result)
                item.discard()  # the reply is with gRPC: its room goes back to the queue
                self._stream_latency.observe(time.perf_counter() - item.received)
                window.release()
                answered += 1
            await reader
            if item.drained:
                await abort(context, grpc.StatusCode.UNAVAILABLE, _cut(answered))
        finally:
            self.active.end()
            self._readers.discard(reader)
            reader.cancel()
            if isinstance(item, _Pending):
                item.discard()
            while not pending.empty():
                leftover = pending.get_nowait()
                if isinstance(leftover, _Pending):
                    leftover.discard()

    async def GetModelInfo(  # noqa: N802 (gRPC method name)
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describe the model in service, this server's limits and its drift settings."""
        return model_info(self._models.current, self._limits, self._drift)
