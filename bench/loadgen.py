"""Part 2: load on the service over loopback, from this process, on grpc.aio.

Requests are serialised once up front and sent as bytes, and replies are parsed only to check
that every image was scored, so the load generator costs the shared CPU as little as a gRPC client
can. Latency is measured per image, from the moment it was sent (or, at a fixed rate, from the
moment it was due, so that a late client does not hide queueing) to the moment its reply arrived.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from bench.images import ImageSet
from service._proto import anomaly_pb2 as pb

SERVICE = "/anomaly.v1.AnomalyDetector/"
SCORE_BATCH = SERVICE + "ScoreBatch"
SCORE_STREAM = SERVICE + "ScoreStream"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass
class Recorder:
    """One measured window ``[start, stop)`` (perf_counter seconds) of one phase.

    Throughput counts the images whose reply arrived inside the window; latency is taken over the
    images sent inside it, whenever their reply came (the load runs on until they are answered),
    so that slow replies near the end of the window are not left out.
    """

    start: float
    stop: float
    images: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    def record(self, sent: float, done: float, ok: bool, error: str = "") -> None:
        if ok and self.start <= sent < self.stop:
            self.latencies.append(done - sent)
        if not self.start <= done < self.stop:
            return
        if ok:
            self.images += 1
        else:
            self.errors += 1
            self.first_error = self.first_error or error


@dataclass(frozen=True)
class Snapshot:
    """Counters of the server at one moment: CPU time and its batching metrics."""

    cpu_seconds: float
    batches: float  # ONNX Runtime batches run so far
    batched_images: float  # images in those batches
    inference_seconds: float  # time spent in those batches


Probe = Callable[[], Snapshot]


@dataclass(frozen=True)
class LoadResult:
    """What one load phase measured, over all its windows."""

    name: str
    images: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cores: float  # CPU seconds of the server per wall second
    client_cores: float  # the same for this process (the load generator)
    mean_batch: float  # images per ONNX Runtime batch in the server
    inference_busy: float  # share of the time the server's inference thread ran a batch
    offered_ips: float | None = None  # fixed-rate phases: the rate asked for
    first_error: str = ""

    @property
    def ips(self) -> float:
        """Images scored per second."""
        return self.images / self.seconds


@dataclass
class Phase:
    """One kind of load, measured in one or more windows whose figures add up.

    Several short windows interleaved with the other phases (and with the in-process figures)
    make the ratios between them robust to load that comes and goes on a shared machine.
    """

    name: str
    offered_ips: float | None = None
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    batches: float = 0.0
    batched_images: float = 0.0
    inference_seconds: float = 0.0

    def add(
        self, window: Recorder, first: tuple[Snapshot, float], last: tuple[Snapshot, float]
    ) -> None:
        """Add one window and the server's counters (and this process's CPU) at its ends."""
        (s0, c0), (s1, c1) = first, last
        self.images += window.images
        self.errors += window.errors
        self.seconds += window.stop - window.start
        self.latencies += window.latencies
        self.first_error = self.first_error or window.first_error
        self.server_cpu += s1.cpu_seconds - s0.cpu_seconds
        self.client_cpu += c1 - c0
        self.batches += s1.batches - s0.batches
        self.batched_images += s1.batched_images - s0.batched_images
        self.inference_seconds += s1.inference_seconds - s0.inference_seconds

    def result(self) -> LoadResult:
        """The phase's figures."""
        seconds = self.seconds or math.nan
        return LoadResult(
            name=self.name,
            images=self.images,
            errors=self.errors,
            seconds=self.seconds,
            p50_ms=1000.0 * _percentile(self.latencies, 50),
            p99_ms=1000.0 * _percentile(self.latencies, 99),
            server_cores=self.server_cpu / seconds,
            client_cores=self.client_cpu / seconds,
            mean_batch=self.batched_images / self.batches if self.batches else math.nan,
            inference_busy=self.inference_seconds / seconds,
            offered_ips=self.offered_ips,
            first_error=self.first_error,
        )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[index]


def batch_requests(images: ImageSet) -> list[bytes]:
    """One serialised ScoreBatchRequest per image (one image per call)."""
    return [
        pb.ScoreBatchRequest(images=[pb.Image(id=name, encoded=data)]).SerializeToString()
        for name, data in zip(images.names, images.encoded, strict=True)
    ]


def stream_requests(images: ImageSet) -> list[bytes]:
    """One serialised ScoreStreamRequest per image."""
    return [
        pb.ScoreStreamRequest(image=pb.Image(id=name, encoded=data)).SerializeToString()
        for name, data in zip(images.names, images.encoded, strict=True)
    ]


def _batch_reply_error(reply: bytes) -> str:
    results = pb.ScoreBatchResponse.FromString(reply).results
    if len(results) != 1:
        return f"{len(results)} results for 1 image"
    return _result_error(results[0])


def _result_error(result: pb.ImageResult) -> str:
    if result.WhichOneof("outcome") == "scores":
        return ""
    return f"{result.error.code}: {result.error.message}"


def _mark(probe: Probe) -> tuple[Snapshot, float]:
    times = psutil.Process().cpu_times()
    return probe(), float(times.user + times.system)


async def _windowed(
    phase: Phase,
    warmup: float,
    duration: float,
    probe: Probe,
    body: Callable[[Recorder], Coroutine[Any, Any, None]],
) -> None:
    """Run ``body`` (which loads until the window's stop), probing at the window's ends."""
    now = time.perf_counter()
    recorder = Recorder(start=now + warmup, stop=now + warmup + duration)
    marks: list[tuple[Snapshot, float]] = []

    async def marker() -> None:
        await asyncio.sleep(max(0.0, recorder.start - time.perf_counter()))
        marks.append(await asyncio.to_thread(_mark, probe))  # the probe blocks (HTTP scrape)
        await asyncio.sleep(max(0.0, recorder.stop - time.perf_counter()))
        marks.append(await asyncio.to_thread(_mark, probe))

    marking = asyncio.create_task(marker())
    await body(recorder)
    await marking
    phase.add(recorder, marks[0], marks[1])


async def unary_concurrent(
    phase: Phase,
    target: str,
    requests: Sequence[bytes],
    probe: Probe,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
) -> None:
    """``concurrency`` callers on one channel, each sending one image per ScoreBatch call."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(SCORE_BATCH)  # bytes in, bytes out

        async def caller(recorder: Recorder, first: int) -> None:
            index = first
            while time.perf_counter() < recorder.stop:
                request = requests[index % len(requests)]
                index += concurrency
                sent = time.perf_counter()
                try:
                    reply = await call(request)
                except grpc.aio.AioRpcError as exc:
                    recorder.record(sent, time.perf_counter(), False, f"{exc.code()}: {exc}")
                    continue
                error = _batch_reply_error(reply)
                recorder.record(sent, time.perf_counter(), not error, error)

        async def body(recorder: Recorder) -> None:
            await asyncio.gather(*(caller(recorder, i) for i in range(concurrency)))

        await _windowed(phase, warmup, duration, probe, body)


async def unary_fixed_rate(
    phase: Phase,
    target: str,
    requests: Sequence[bytes],
    probe: Probe,
    *,
    rate: float,
    warmup: float,
    duration: float,
    max_outstanding: int = 1024,
) -> None:
    """One-image ScoreBatch calls started at a fixed rate (a line camera), whatever the replies."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(SCORE_BATCH)

        async def one(recorder: Recorder, request: bytes, due: float) -> None:
            try:
                reply = await call(request)
            except grpc.aio.AioRpcError as exc:
                recorder.record(due, time.perf_counter(), False, f"{exc.code()}: {exc}")
                return
            error = _batch_reply_error(reply)
            recorder.record(due, time.perf_counter(), not error, error)

        async def body(recorder: Recorder) -> None:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / rate
            first_due = time.perf_counter()
            index = 0
            while True:
                due = first_due + index * interval
                if due >= recorder.stop:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= max_outstanding:
                    recorder.record(due, time.perf_counter(), False, "client: too many in flight")
                else:
                    task = asyncio.create_task(one(recorder, requests[index % len(requests)], due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                index += 1
            if tasks:
                await asyncio.wait(tasks)

        phase.offered_ips = rate
        await _windowed(phase, warmup, duration, probe, body)


async def stream_window(
    phase: Phase,
    target: str,
    requests: Sequence[bytes],
    probe: Probe,
    *,
    window: int,
    warmup: float,
    duration: float,
) -> None:
    """One ScoreStream call keeping up to ``window`` images in flight."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stream = channel.stream_stream(SCORE_STREAM)

        async def body(recorder: Recorder) -> None:
            call = stream()
            room = asyncio.Semaphore(window)
            sent_at: deque[float] = deque()

            async def writer() -> None:
                index = 0
                while time.perf_counter() < recorder.stop:
                    await room.acquire()
                    sent_at.append(time.perf_counter())
                    await call.write(requests[index % len(requests)])
                    index += 1
                await call.done_writing()

            async def reader() -> None:
                while True:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        return
                    done = time.perf_counter()
                    sent = sent_at.popleft()
                    room.release()
                    error = _result_error(pb.ScoreStreamResponse.FromString(reply).result)
                    recorder.record(sent, done, not error, error)

            await asyncio.gather(writer(), reader())

        await _windowed(phase, warmup, duration, probe, body)
