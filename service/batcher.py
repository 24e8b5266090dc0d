"""Micro-batcher: coalesces the images of concurrent calls and streams into ONNX Runtime batches.

An asyncio component on the server's event loop. Calls submit their preprocessed images as one
job (having admitted them first: service/admission.py bounds what the queue holds). The batcher
forms a batch when the device is free:
it waits up to ``max_delay`` after the oldest queued image for up to ``max_batch_size`` images,
drops jobs whose call was cancelled or whose deadline has passed, and runs the batch in its single
inference thread (one inference at a time per device) while the loop keeps accepting work.
A job larger than the room left in a batch is split across batches; its caller gets the parts in
order. Jobs are pinned to the model they were preprocessed for, and a batch never mixes models, so
a hot reload never feeds an old call's images to a new model with a different input spec.

The batcher knows nothing of requests' options: a batch's output is computed from its images alone,
and each caller gets :class:`Part` s of it (the output and its rows) to finish with its own options,
in its own task. When a batch of several jobs fails, each job is run again alone, so that an error
reaches only the job whose images cause it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
ModelT = TypeVar("ModelT")
OutputT = TypeVar("OutputT")


class DeadlineExpiredError(Exception):
    """A job's deadline passed while it waited in the queue; it was not computed."""


class BatcherClosedError(Exception):
    """The batcher shut down before the job was computed."""


# Runs the model on one batch ``(N, C, H, W)``, in the inference thread: the batch's output.
RunBatch = Callable[[ModelT, FloatArray], OutputT]


@dataclass(frozen=True)
class Part(Generic[OutputT]):
    """Rows ``start:stop`` of a batch's output: the share of one job (read it, never write it)."""

    output: OutputT
    start: int
    stop: int

    @property
    def count(self) -> int:
        """Number of images of the part."""
        return self.stop - self.start


@dataclass(eq=False)
class _Job(Generic[ModelT, OutputT]):
    model: ModelT
    images: FloatArray
    deadline: float | None
    future: asyncio.Future[list[Part[OutputT]]]
    enqueued: float
    taken: int = 0
    delivered: int = 0
    parts: list[Part[OutputT]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def waiting(self) -> int:
        return self.size - self.taken


@dataclass(frozen=True)
class _Slice(Generic[ModelT, OutputT]):
    job: _Job[ModelT, OutputT]
    start: int
    stop: int


class MicroBatcher(Generic[ModelT, OutputT]):
    """Bounded queue of images plus the loop that turns it into batches; see the module doc."""

    def __init__(
        self,
        run_batch: RunBatch[ModelT, OutputT],
        metrics: ServiceMetrics,
        *,
        max_batch_size: int,
        max_delay: float,
        coalesce: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_delay < 0:
            raise ValueError(
                f"batcher needs max_batch_size >= 1 and max_delay >= 0; got {max_batch_size}, "
                f"{max_delay}"
            )
        self._run_batch = run_batch
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay if coalesce else 0.0
        self.coalesce = coalesce
        self._jobs: deque[_Job[ModelT, OutputT]] = deque()
        self._queued = 0  # images submitted and waiting for a batch
        self._in_flight: list[_Slice[ModelT, OutputT]] = []
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Images waiting for inference."""
        return self._queued

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def close(self) -> None:
        """Stop the loop; jobs not yet computed fail with :class:`BatcherClosedError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        closed = BatcherClosedError("the server is shutting down")
        for job in [*self._jobs, *(s.job for s in self._in_flight)]:
            if not job.future.done():
                job.future.set_exception(closed)
        self._jobs.clear()
        self._in_flight = []
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown)
            self._executor = None

    async def submit(
        self, model: ModelT, images: FloatArray, *, deadline: float | None = None
    ) -> list[Part[OutputT]]:
        """Queue preprocessed images ``(k, C, H, W)`` and wait for their share of the batches.

        ``deadline`` is on the event loop's clock (``loop.time()``). Raises
        :class:`DeadlineExpiredError` when it passes before inference,
        :class:`BatcherClosedError` when the batcher stops first, or the inference error.
        """
        if self._task is None:
            raise BatcherClosedError("the batcher is not running")
        if images.shape[0] < 1:
            raise ValueError("cannot submit a job of no images")
        loop = asyncio.get_running_loop()
        job: _Job[ModelT, OutputT] = _Job(
            model, images, deadline, loop.create_future(), loop.time()
        )
        self._jobs.append(job)
        self._queued += job.size
        self._nonempty.set()
        if self._queued >= self.max_batch_size:
            self._full.set()
        # Cancelling the caller cancels this future, and the job is dropped before inference.
        return await job.future

    # --- the batching loop ------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._nonempty.wait()
            if self.max_delay > 0 and self._queued < self.max_batch_size:
                self._full.clear()
                wait = self._jobs[0].enqueued + self.max_delay - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
            batch = self._take(loop.time())
            if not self._jobs:
                self._nonempty.clear()
            if batch:
                await self._execute(batch)

    def _drop(self, job: _Job[ModelT, OutputT]) -> None:
        self._jobs.popleft()
        self._queued -= job.waiting

    def _take(self, now: float) -> list[_Slice[ModelT, OutputT]]:
        """Take up to ``max_batch_size`` images of one model from the head of the queue."""
        batch: list[_Slice[ModelT, OutputT]] = []
        room = self.max_batch_size
        while self._jobs and room > 0:
            job = self._jobs[0]
            if job.future.done():  # the call was cancelled, or an earlier part failed
                self._drop(job)
                continue
            if job.deadline is not None and now >= job.deadline:
                self._drop(job)
                job.future.set_exception(
                    DeadlineExpiredError(
                        f"the deadline passed after {now - job.enqueued:.3f} s queued"
                    )
                )
                continue
            if batch and (job.model is not batch[0].job.model or not self.coalesce):
                break
            count = min(room, job.waiting)
            if job.taken == 0:
                self._metrics.queue_wait.observe(now - job.enqueued)
            batch.append(_Slice(job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            self._queued -= count
            if job.waiting == 0:
                self._jobs.popleft()
        return batch

    async def _execute(self, batch: list[_Slice[ModelT, OutputT]]) -> None:
        self._in_flight = batch
        try:
            await self._run(batch)
        finally:
            self._in_flight = []

    async def _run(self, batch: list[_Slice[ModelT, OutputT]]) -> None:
        """Run one batch and hand each job its part; a failure reaches only the failing job."""
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(self._executor, self._infer, batch)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("inference failed on a batch of %d images", _images(batch))
                for piece in batch:
                    _fail(piece.job, exc)
                return
            log.warning(
                "inference failed on a batch of %d images of %d jobs (%s: %s); running each "
                "job alone",
                _images(batch),
                len(batch),
                type(exc).__name__,
                exc,
            )
            for piece in batch:
                if not piece.job.future.done():
                    await self._run([piece])
            return
        start = 0
        for piece in batch:
            job = piece.job
            stop = start + piece.stop - piece.start
            if not job.future.done():
                job.parts.append(Part(output, start, stop))
                job.delivered += stop - start
                if job.delivered == job.size:
                    job.future.set_result(job.parts)
            start = stop

    def _infer(self, batch: Sequence[_Slice[ModelT, OutputT]]) -> OutputT:
        """Runs in the inference thread: assemble the batch, run the model on it, time it."""
        views = [piece.job.images[piece.start : piece.stop] for piece in batch]
        x = views[0] if len(views) == 1 else np.concatenate(views)
        started = time.perf_counter()
        output = self._run_batch(batch[0].job.model, x)
        self._metrics.inference_duration.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(x.shape[0])
        return output


def _fail(job: _Job[ModelT, OutputT], exc: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def _images(batch: Sequence[_Slice[ModelT, OutputT]]) -> int:
    return sum(piece.stop - piece.start for piece in batch)
