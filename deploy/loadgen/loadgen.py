"""Traffic generator: plays an inspection line against the anomaly service, for live dashboards.

Sends images from an MVTec-layout folder (``good/`` folders hold normal images, every other
folder defective ones) as ScoreBatch calls at a steady rate. Most images are normal; a share is
defective, raised during periodic "defect episodes" so that the anomaly-rate panel has something
to show; a small share is deliberately undecodable, to exercise the error panels. Ends after
``--duration`` seconds (0: runs until SIGTERM/SIGINT) and prints a JSON summary of what it sent
and what the server answered.

    python deploy/loadgen/loadgen.py --target localhost:50051 --images .demo/data/test --rate 5

Uses only the generated gRPC stubs of the installed service package, so it runs in the service's
container image (see docker-compose.yml).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc

log = logging.getLogger("loadgen")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class Pool:
    """The images to draw from: encoded bytes of normal and of defective parts."""

    good: list[bytes]
    defective: list[bytes]

    @classmethod
    def from_folder(cls, root: Path) -> Pool:
        """Every image under ``root``; those in a folder named ``good`` are the normal ones."""
        good: list[bytes] = []
        defective: list[bytes] = []
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or "ground_truth" in path.parts:
                continue
            (good if "good" in path.relative_to(root).parts else defective).append(
                path.read_bytes()
            )
        if not good:
            raise SystemExit(f"loadgen: no normal images (a 'good' folder) under {root}")
        return cls(good, defective)


@dataclass
class Tally:
    """What was sent and what came back."""

    calls: Counter[str] = field(default_factory=Counter)
    images_sent: int = 0
    scored: int = 0
    flagged: int = 0
    image_errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        """JSON-ready totals."""
        return {
            "calls": dict(self.calls),
            "images_sent": self.images_sent,
            "scored": self.scored,
            "flagged": self.flagged,
            "anomaly_rate": self.flagged / self.scored if self.scored else None,
            "image_errors": dict(self.image_errors),
        }


@dataclass(frozen=True)
class Profile:
    """How the line behaves: base defect share, periodic episodes, undecodable share."""

    defect_share: float
    episode_every: float
    episode_length: float
    episode_defect_share: float
    bad_share: float

    def defect_share_at(self, elapsed: float) -> float:
        """Share of defective images at ``elapsed`` seconds since the start."""
        if self.episode_every > 0 and elapsed % self.episode_every >= (
            self.episode_every - self.episode_length
        ):
            return self.episode_defect_share
        return self.defect_share


def make_batch(
    pool: Pool, profile: Profile, elapsed: float, size: int, rng: random.Random, serial: int
) -> list[pb.Image]:
    """``size`` images drawn according to the profile, with unique ids."""
    share = profile.defect_share_at(elapsed)
    images = []
    for i in range(size):
        image_id = f"part-{serial:08d}-{i:03d}"
        draw = rng.random()
        if draw < profile.bad_share:
            images.append(pb.Image(id=image_id, encoded=b"not an image"))
        elif pool.defective and draw < profile.bad_share + share:
            images.append(pb.Image(id=image_id, encoded=rng.choice(pool.defective)))
        else:
            images.append(pb.Image(id=image_id, encoded=rng.choice(pool.good)))
    return images


def run(args: argparse.Namespace, stop: threading.Event) -> Tally:
    """Send batches at ``args.rate`` images/s until ``stop`` is set or the duration is over."""
    pool = Pool.from_folder(args.images)
    profile = Profile(
        args.defect_share,
        args.episode_every,
        args.episode_length,
        args.episode_defect_share,
        args.bad_share,
    )
    log.info(
        "loadgen: %d normal and %d defective images; %.1f images/s to %s",
        len(pool.good),
        len(pool.defective),
        args.rate,
        args.target,
    )
    rng = random.Random(args.seed)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    tally = Tally()
    interval = args.batch / args.rate
    start = time.monotonic()
    next_send = start
    serial = 0
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.AnomalyDetectorStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if args.duration and elapsed >= args.duration:
                break
            images = make_batch(pool, profile, elapsed, args.batch, rng, serial)
            serial += 1
            request = pb.ScoreBatchRequest(images=images)
            try:
                reply = stub.ScoreBatch(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                tally.calls[exc.code().name] += 1
                if exc.code() not in RETRIED:
                    log.warning("loadgen: call failed: %s %s", exc.code().name, exc.details())
                stop.wait(min(5.0, interval * 4))  # back off, then carry on
            else:
                tally.calls["OK"] += 1
                tally.images_sent += len(images)
                for result in reply.results:
                    if result.HasField("scores"):
                        tally.scored += 1
                        tally.flagged += int(result.scores.is_anomaly)
                    else:
                        tally.image_errors[_status_code(result.error.code).name] += 1
            next_send += interval
            stop.wait(max(0.0, next_send - time.monotonic()))
    return tally


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get("LOADGEN_TARGET", "localhost:50051"))
    p.add_argument("--images", type=Path, required=True, help="folder of images (MVTec layout)")
    p.add_argument("--rate", type=float, default=5.0, help="images per second")
    p.add_argument("--batch", type=int, default=4, help="images per ScoreBatch call")
    p.add_argument("--defect-share", type=float, default=0.01, help="defective share, normally")
    p.add_argument("--episode-every", type=float, default=600.0, help="seconds; 0: no episodes")
    p.add_argument("--episode-length", type=float, default=120.0, help="seconds")
    p.add_argument("--episode-defect-share", type=float, default=0.3)
    p.add_argument("--bad-share", type=float, default=0.005, help="share of undecodable images")
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until stopped")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token", default=os.environ.get("ANOMALY_TOKEN"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run until done or signalled; print the summary as JSON on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.batch < 1:
        raise SystemExit("loadgen: --rate must be positive and --batch at least 1")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tally = run(args, stop)
    print(json.dumps(tally.summary(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
