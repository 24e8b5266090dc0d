"""Serving benchmark of issue #5: how close the gRPC service comes to ONNX Runtime itself.

    python bench/serve_bench.py --bundle DIR [--images DIR] [--soak SECONDS] [--json FILE]

In one run, on one bundle and one set of thread settings, it measures

1. in process, with no network: (i) ``Scorer.score`` on pre-decoded tensors and (ii) the same
   from the encoded bytes (decode, preprocess, ORT, scoring), at batch sizes 1, 8, 32 and 64;
2. the service (``python -m service`` started here on free loopback ports) under (a) 16 concurrent
   unary clients of one image per call, (b) one bidirectional stream with a window of images in
   flight, and (c) (a) again with micro-batching off; plus the latency of (a)'s calls at half of
   (a)'s throughput, and the server's peak RSS;
3. the ratios, printed next to their targets with PASS or FAIL;
4. with ``--compare-server-arg``, (a) and (b) again on a third server started with those flags too,
   in the same rounds, and the throughput ratios (the cost of a server option, e.g.
   ``--compare-server-arg=--drift-window=0`` for what watching drift costs).

See bench/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import inprocess, loadgen
from bench.images import ImageSet, add_arguments, chosen
from bench.report import (
    Compared,
    Figures,
    SoakResult,
    environment,
    load_average,
    render,
    to_json,
)
from bench.serverproc import MeasuredServer, ServerSettings, describe_argv
from service.bundle import load_bundle
from service.runtime import Scorer


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        prog="python bench/serve_bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser, max_images=128)
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds measured per service phase, over all rounds",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before each phase is measured"
    )
    parser.add_argument(
        "--inproc-duration",
        type=float,
        default=6.0,
        help="seconds measured per in-process figure, over all rounds",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="split every compared figure into this many windows, interleaved, so that load "
        "from other processes falls on all of them alike",
    )
    parser.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[1, 8, 32, 64], help="in-process batch sizes"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent unary clients")
    parser.add_argument("--window", type=int, default=64, help="images in flight on the stream")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="server's max batch size")
    parser.add_argument(
        "--max-batch-delay-ms", type=float, default=2.0, help="server's max batching delay"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for python -m service (repeatable), "
        "e.g. --server-arg=--preprocess-workers=1",
    )
    parser.add_argument(
        "--compare-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="also measure (a) and (b), in the same rounds, on a server started with this flag "
        "too (repeatable), and print the throughput ratios: the cost of a server option, e.g. "
        "--compare-server-arg=--drift-window=0",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run this long at saturation and check that server RSS grows <= 10%%",
    )
    parser.add_argument("--inprocess-only", action="store_true", help="measure part 1 only")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="write the figures here"
    )
    return parser


def say(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def _started(server: MeasuredServer) -> str:
    command = describe_argv(server.argv)
    say(f"  server pid {server.pid} (py-spy dump --pid {server.pid}): {command}")
    return command


def _settings(
    args: argparse.Namespace, *, batching: bool, compared: bool = False
) -> ServerSettings:
    return ServerSettings(
        bundle=args.bundle,
        device=args.device,
        threads=args.threads,
        max_batch_size=args.max_batch_size if batching else 1,
        max_batch_delay_ms=args.max_batch_delay_ms if batching else 0.0,
        batching=batching,
        stream_window=max(args.window, 1),
        extra_args=tuple(args.server_arg + (args.compare_server_arg if compared else [])),
    )


@dataclass
class ServicePhases:
    """The phases of part 2 that are compared with part 1, accumulated over the rounds."""

    unary: loadgen.Phase = field(default_factory=lambda: loadgen.Phase("unary"))
    stream: loadgen.Phase = field(default_factory=lambda: loadgen.Phase("stream"))
    unbatched: loadgen.Phase = field(default_factory=lambda: loadgen.Phase("unbatched"))
    compared_unary: loadgen.Phase = field(default_factory=lambda: loadgen.Phase("unary'"))
    compared_stream: loadgen.Phase = field(default_factory=lambda: loadgen.Phase("stream'"))


async def service_round(
    args: argparse.Namespace,
    batched: MeasuredServer,
    unbatched: MeasuredServer,
    compared: MeasuredServer | None,
    images: ImageSet,
    phases: ServicePhases,
) -> None:
    """One window of (2a), (2b) and (2c); of (a) and (b) on the compared server too, each right
    after its counterpart."""
    seconds = args.duration / args.rounds
    unary_requests = loadgen.batch_requests(images)

    async def unary(phase: loadgen.Phase, server: MeasuredServer) -> None:
        await loadgen.unary_concurrent(
            phase,
            server.target,
            unary_requests,
            server.snapshot,
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=seconds,
        )

    async def stream(phase: loadgen.Phase, server: MeasuredServer) -> None:
        await loadgen.stream_window(
            phase,
            server.target,
            loadgen.stream_requests(images),
            server.snapshot,
            window=args.window,
            warmup=args.warmup,
            duration=seconds,
        )

    await unary(phases.unary, batched)
    if compared is not None:
        await unary(phases.compared_unary, compared)
    await stream(phases.stream, batched)
    if compared is not None:
        await stream(phases.compared_stream, compared)
    await unary(phases.unbatched, unbatched)
    shown = [phases.unary, phases.stream, phases.unbatched]
    if compared is not None:
        shown += [phases.compared_unary, phases.compared_stream]
    for phase in shown:
        result = phase.result()
        say(
            f"    {phase.name:<10} {result.ips:7.1f} images/s so far, p99 {result.p99_ms:.0f} ms, "
            f"mean batch {result.mean_batch:.1f}"
        )


async def half_rate(
    args: argparse.Namespace, server: MeasuredServer, images: ImageSet, rate: float
) -> loadgen.LoadResult:
    """Latency of one-image ScoreBatch calls arriving at a fixed ``rate``."""
    phase = loadgen.Phase("half_rate")
    await loadgen.unary_fixed_rate(
        phase,
        server.target,
        loadgen.batch_requests(images),
        server.snapshot,
        rate=rate,
        warmup=args.warmup,
        duration=max(10.0, args.duration / args.rounds),
    )
    return phase.result()


async def run_soak(
    args: argparse.Namespace, server: MeasuredServer, images: ImageSet
) -> SoakResult:
    """Unary clients and a stream at once for ``--soak`` seconds; RSS sampled throughout."""
    warmup = min(30.0, max(args.warmup, 0.1 * args.soak))
    say(
        f"soak: {args.soak:g} s at saturation (unary x{args.concurrency} + one stream), "
        f"RSS baseline after {warmup:g} s"
    )
    start = server.rss.samples[-1][0] if server.rss.samples else 0.0
    unary, stream = loadgen.Phase("soak_unary"), loadgen.Phase("soak_stream")
    await asyncio.gather(
        loadgen.unary_concurrent(
            unary,
            server.target,
            loadgen.batch_requests(images),
            server.snapshot,
            concurrency=args.concurrency,
            warmup=warmup,
            duration=args.soak,
        ),
        loadgen.stream_window(
            stream,
            server.target,
            loadgen.stream_requests(images),
            server.snapshot,
            window=args.window,
            warmup=warmup,
            duration=args.soak,
        ),
    )
    t0 = start + warmup
    t1 = t0 + args.soak
    tenth = args.soak / 10.0
    baseline = server.rss.between(t0, t0 + tenth)
    final = server.rss.between(t1 - tenth, t1 + 1.0)
    window = [(t, rss) for t, rss in server.rss.samples if t0 <= t < t1]
    slope = _slope(window) * 60.0 / (1024 * 1024)
    return SoakResult(
        seconds=args.soak,
        images=unary.images + stream.images,
        baseline_rss=int(statistics.median(baseline)),
        final_rss=int(statistics.median(final)),
        peak_rss=server.peak_rss(),
        slope_mib_per_min=slope,
    )


def _slope(points: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, bytes per second."""
    if len(points) < 2:
        return 0.0
    xs = [t for t, _ in points]
    ys = [float(rss) for _, rss in points]
    return statistics.linear_regression(xs, ys).slope


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; return 0 (targets missed are reported, not failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("duration", "inproc_duration", "rounds", "concurrency", "window"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.soak < 0:
        parser.error("--warmup and --soak must not be negative")
    load_before = load_average()
    bundle = load_bundle(args.bundle)
    images = chosen(args, bundle)
    say(f"images: {images.describe()}")
    say(f"load average: {load_before}")
    scorer = Scorer(bundle, device=args.device, threads=args.threads or None)
    provider = scorer.provider
    bench = inprocess.InProcessBench(scorer, images, args.batch_sizes)
    if args.inprocess_only:
        bench.run(args.inproc_duration)
        for row in bench.rows():
            print(
                f"batch {row.batch_size:>3}: (i) {row.tensor_ips:.1f}/s (ii) {row.png_ips:.1f}/s "
                f"(ii)/(i) {row.png_ips / row.tensor_ips:.3f}"
            )
        return 0

    say("starting the servers, with and without micro-batching")
    commands: list[str] = []
    phases = ServicePhases()
    with contextlib.ExitStack() as servers:
        batched = servers.enter_context(MeasuredServer(_settings(args, batching=True)))
        unbatched = servers.enter_context(MeasuredServer(_settings(args, batching=False)))
        commands += [_started(batched), _started(unbatched)]
        compared = None
        if args.compare_server_arg:
            variant = _settings(args, batching=True, compared=True)
            compared = servers.enter_context(MeasuredServer(variant))
            commands.append(_started(compared))
        for index in range(args.rounds):
            say(f"round {index + 1} of {args.rounds}: in process on {provider}")
            bench.run(args.inproc_duration / args.rounds)
            for row in bench.rows():
                say(
                    f"    batch {row.batch_size:>3}: (i) {row.tensor_ips:7.1f}/s  "
                    f"(ii) {row.png_ips:7.1f}/s so far"
                )
            say(f"round {index + 1} of {args.rounds}: the service, (a), (b) and (c)")
            asyncio.run(service_round(args, batched, unbatched, compared, images, phases))
        unary = phases.unary.result()
        rate = max(1.0, unary.ips / 2.0)
        say(f"latency at half load: unary calls at a fixed {rate:.1f}/s")
        half = asyncio.run(half_rate(args, batched, images, rate))
        say(f"    p50 {half.p50_ms:.0f} ms, p99 {half.p99_ms:.0f} ms")
        peak_batched, peak_unbatched = batched.peak_rss(), unbatched.peak_rss()
    rows = bench.rows()
    del bench, scorer
    gc.collect()
    soak = None
    if args.soak > 0:
        with MeasuredServer(_settings(args, batching=True)) as server:
            commands.append(_started(server))
            soak = asyncio.run(run_soak(args, server, images))

    settings = {
        key: getattr(args, key)
        for key in (
            "threads",
            "max_batch_size",
            "max_batch_delay_ms",
            "concurrency",
            "window",
            "duration",
            "warmup",
            "inproc_duration",
            "rounds",
            "device",
        )
    }
    settings["bundle"] = str(args.bundle)
    figures = Figures(
        environment=environment(),
        settings=settings,
        images=images.describe(),
        provider=provider,
        load_before=load_before,
        load_after=load_average(),
        inprocess=rows,
        unary=unary,
        stream=phases.stream.result(),
        half_rate=half,
        unbatched=phases.unbatched.result(),
        peak_rss_batched=peak_batched,
        peak_rss_unbatched=peak_unbatched,
        server_commands=commands,
        soak=soak,
        compared=None
        if compared is None
        else Compared(
            tuple(args.compare_server_arg),
            phases.compared_unary.result(),
            phases.compared_stream.result(),
        ),
    )
    print(render(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(figures), indent=2) + "\n", encoding="utf-8")
        say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
