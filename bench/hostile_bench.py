"""Clients that never read their replies, against a well-behaved one: what they cost.

    python bench/hostile_bench.py --bundle DIR [--images DIR] [--streams 50] [--per-stream 300]

Starts ``python -m service`` (default settings), then one hostile client opens ``--streams``
ScoreStream calls on one channel and writes ``--per-stream`` images on each without ever reading a
reply, while a well-behaved client on its own channel makes one-image ScoreBatch calls and runs a
stream that reads its replies, for ``--duration`` seconds. Prints the server's resident memory
before, at its peak and the growth, and what the well-behaved client got, by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench import loadgen
from bench.images import ImageSet, add_arguments, chosen
from bench.serverproc import MeasuredServer, ServerSettings
from service._proto import anomaly_pb2 as pb
from service.bundle import load_bundle

MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        prog="python bench/hostile_bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser, max_images=64)
    parser.add_argument("--streams", type=int, default=50, help="hostile streams on one channel")
    parser.add_argument(
        "--per-stream", type=int, default=300, help="images each hostile stream writes"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of hostile load")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--read-replies",
        action="store_true",
        help="the control: the same streams, reading their replies (a heavy, polite client)",
    )
    return parser


async def hostile(
    target: str, requests: list[bytes], streams: int, per_stream: int, read: bool
) -> int:
    """Write ``per_stream`` images on each of ``streams`` streams, never reading the replies
    (``read``: reading them, the control); the images written."""
    written = 0
    # A connection of its own, as another process would have (channels of one process with the
    # same options share one).
    options = [*loadgen.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        open_stream = channel.stream_stream(loadgen.SCORE_STREAM)
        calls = [open_stream() for _ in range(streams)]

        async def write(call: grpc.aio.StreamStreamCall, first: int) -> None:
            nonlocal written
            for index in range(first, first + per_stream):
                await call.write(requests[index % len(requests)])
                written += 1

        async def drain(call: grpc.aio.StreamStreamCall) -> None:
            while await call.read() is not grpc.aio.EOF:
                pass

        try:
            readers = [drain(call) for call in calls] if read else []
            await asyncio.gather(*(write(call, i) for i, call in enumerate(calls)), *readers)
            await asyncio.Event().wait()  # hold the streams open until cancelled
        finally:
            for call in calls:
                call.cancel()
    return written


first_errors: dict[str, str] = {}


def _outcome(result: pb.ImageResult) -> str:
    if result.WhichOneof("outcome") == "scores":
        return "OK"
    name: str = next(c.name for c in grpc.StatusCode if c.value[0] == result.error.code)
    first_errors.setdefault(name, result.error.message)
    return name


async def well_behaved(target: str, images: ImageSet, seconds: float) -> collections.Counter[str]:
    """One-image ScoreBatch calls one after another, and a stream that reads; outcomes by code."""
    outcomes: collections.Counter[str] = collections.Counter()
    batch = loadgen.batch_requests(images)
    stream = loadgen.stream_requests(images)
    stop = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target, options=loadgen.CHANNEL_OPTIONS) as channel:
        unary = channel.unary_unary(loadgen.SCORE_BATCH)
        open_stream = channel.stream_stream(loadgen.SCORE_STREAM)

        async def calls() -> None:
            index = 0
            while time.perf_counter() < stop:
                try:
                    reply = pb.ScoreBatchResponse.FromString(
                        await unary(batch[index % len(batch)], timeout=10)
                    )
                    outcomes[f"unary image {_outcome(reply.results[0])}"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[f"unary {exc.code().name}"] += 1
                    first_errors.setdefault(exc.code().name, exc.details() or "")
                index += 1

        async def streams() -> None:
            while time.perf_counter() < stop:
                call = open_stream(iter(stream[:8]), timeout=10)
                try:
                    async for reply in call:
                        result = pb.ScoreStreamResponse.FromString(reply).result
                        outcomes[f"stream image {_outcome(result)}"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[f"stream {exc.code().name}"] += 1

        await asyncio.gather(calls(), streams())
    return outcomes


async def run(args: argparse.Namespace) -> None:
    """Start the server, load it, print the figures."""
    bundle = load_bundle(args.bundle)
    images = chosen(args, bundle)
    settings = ServerSettings(
        bundle=args.bundle,
        device="cpu",
        threads=args.threads,
        max_batch_size=32,
        max_batch_delay_ms=2.0,
        batching=True,
        stream_window=64,
    )
    print(f"images: {images.describe()}", file=sys.stderr)
    with MeasuredServer(settings) as server:
        await well_behaved(server.target, images, 2.0)  # warm up
        await asyncio.sleep(1.0)
        baseline = server.process.memory_info().rss
        started = time.monotonic() - server.started
        attack = asyncio.create_task(
            hostile(
                server.target,
                loadgen.stream_requests(images),
                args.streams,
                args.per_stream,
                args.read_replies,
            )
        )
        await asyncio.sleep(2.0)  # the hostile streams fill what they can
        outcomes = await well_behaved(server.target, images, args.duration)
        attack.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attack
        peak = max(server.rss.between(started, time.monotonic() - server.started) or [baseline])
    print(
        f"{'polite' if args.read_replies else 'hostile'} client: {args.streams} streams x "
        f"{args.per_stream} images, replies {'read' if args.read_replies else 'never read'}\n"
        f"server RSS: {baseline / MIB:.0f} MiB before, {peak / MIB:.0f} MiB at peak "
        f"(+{(peak - baseline) / MIB:.0f} MiB)\n"
        "well-behaved client meanwhile: "
        + ", ".join(f"{key} {count}" for key, count in sorted(outcomes.items()))
    )
    for code, message in first_errors.items():
        print(f"  first {code}: {message}")


def main() -> None:
    """Entry point."""
    asyncio.run(run(build_parser().parse_args()))


if __name__ == "__main__":
    main()
