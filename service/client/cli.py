"""``python -m service.client`` / ``anomaly-client``: score image files, or describe the model.

``score TARGET PATH...`` scores files and folders (recursively) in ScoreBatch calls with bounded
concurrency, or over one stream with ``--stream``; writes one row per image with ``--out``
(``.csv``, ``.jsonl``, or ``-`` for JSON Lines on stdout); prints a summary; exits 1 if any image
failed. ``info TARGET`` prints the ModelInfo as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from tqdm import tqdm

from service.client.channel import MAX_RETRIES
from service.client.client import Client, ImageInput
from service.client.rows import RowWriter, failure_row, result_row
from service.preprocessing import list_image_files

PROG = "anomaly-client"
TOKEN_ENV = "ANOMALY_TOKEN"
Row = dict[str, Any]


class UsageError(Exception):
    """Arguments that name nothing to score or files that cannot be used."""


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    return parse


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_RETRIES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of retries from 0 to {MAX_RETRIES} (gRPC makes at most "
            f"{MAX_RETRIES + 1} attempts of a call)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The client's argument parser."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "target",
        help="server address, e.g. localhost:50051; replicas: dns:///NAME:PORT (every address "
        "the name resolves to) or comma-separated IP:PORT; calls are spread round robin",
    )
    connection.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}; or use --token-file)"
    )
    connection.add_argument("--token-file", type=Path, help="read the bearer token from a file")
    connection.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    connection.add_argument("--ca", type=Path, help="PEM CA to verify the server (implies --tls)")
    connection.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    connection.add_argument("--key", type=Path, help="PEM private key of --cert")
    connection.add_argument(
        "--timeout",
        type=_positive(float),
        default=30.0,
        help="deadline of each call, its retries included, in seconds",
    )
    connection.add_argument(
        "--retries",
        type=_retries,
        default=MAX_RETRIES,
        help=f"retries of a call refused UNAVAILABLE or RESOURCE_EXHAUSTED, with backoff "
        f"(0 to {MAX_RETRIES})",
    )

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", parents=[connection], help="score image files and folders")
    score.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    score.add_argument("--stream", action="store_true", help="send all images over one stream")
    score.add_argument("--out", help="write rows to FILE.csv, FILE.jsonl, or '-' (stdout)")
    score.add_argument(
        "--batch-size", type=_positive(int), default=16, help="images per ScoreBatch call"
    )
    score.add_argument(
        "--concurrency", type=_positive(int), default=4, help="ScoreBatch calls in flight"
    )
    rule = score.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="flag combined scores at least this")
    rule.add_argument(
        "--target-rate", type=float, help="flag at the threshold for this false-alarm rate"
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands.add_parser("info", parents=[connection], help="describe the model being served")
    return parser


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _connect(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get(TOKEN_ENV)
    if args.token_file is not None:
        token = _read(args.token_file).decode("utf-8").strip()
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together")
    try:
        return Client(
            args.target,
            token=token,
            tls=args.tls,
            root_certificates=_read(args.ca) if args.ca else None,
            certificate_chain=_read(args.cert) if args.cert else None,
            private_key=_read(args.key) if args.key else None,
            timeout=args.timeout,
            retries=args.retries,
        )
    except ValueError as exc:  # a target that names no server
        raise UsageError(str(exc)) from exc


def collect_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (recursively)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(list_image_files(path, recursive=True))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    if not files:
        raise UsageError(f"no image files under {', '.join(map(str, paths))}")
    return files


@dataclass
class Tally:
    """Counts for the summary."""

    scored: int = 0
    anomalies: int = 0
    failures: int = 0

    def add(self, row: Row) -> None:
        """Count one row."""
        if row["error"] is not None:
            self.failures += 1
        else:
            self.scored += 1
            self.anomalies += bool(row["is_anomaly"])


def _call_failed(exc: grpc.RpcError) -> str:
    return f"call failed: {exc.code().name}: {exc.details()}"


def _score_chunk(client: Client, chunk: Sequence[Path], options: dict[str, Any]) -> list[Row]:
    rows: dict[str, Row] = {}
    images: list[ImageInput] = []
    ids: list[str] = []
    for path in chunk:
        try:
            images.append(path.read_bytes())
            ids.append(str(path))
        except OSError as exc:
            rows[str(path)] = failure_row(str(path), str(path), f"cannot read file: {exc}")
    if images:
        try:
            for result in client.score(images, ids=ids, **options):
                rows[result.id] = result_row(result.id, result)
        except grpc.RpcError as exc:
            for image_id in ids:
                rows[image_id] = failure_row(image_id, image_id, _call_failed(exc))
    return [rows[str(path)] for path in chunk]


def _score_batches(
    client: Client, files: Sequence[Path], args: argparse.Namespace, options: dict[str, Any]
) -> Iterator[Row]:
    chunks = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    with ThreadPoolExecutor(args.concurrency, thread_name_prefix="score") as pool:
        pending: deque[Future[list[Row]]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(_score_chunk, client, chunk, options))
            if len(pending) >= 2 * args.concurrency:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _score_stream(client: Client, files: Sequence[Path], options: dict[str, Any]) -> Iterator[Row]:
    unread: list[Row] = []

    def images() -> Iterator[tuple[str, ImageInput]]:
        for path in files:
            try:
                yield str(path), path.read_bytes()
            except OSError as exc:
                unread.append(failure_row(str(path), str(path), f"cannot read file: {exc}"))

    answered: set[str] = set()
    try:
        for result in client.score_stream(images(), timeout=None, **options):
            answered.add(result.id)
            yield result_row(result.id, result)
    except grpc.RpcError as exc:
        failed = {row["path"] for row in unread}
        for path in files:
            if str(path) not in answered and str(path) not in failed:
                yield failure_row(str(path), str(path), f"stream {_call_failed(exc)}")
    yield from unread


def _score(args: argparse.Namespace, out: TextIO) -> int:
    files = collect_files(args.paths)
    try:
        writer = RowWriter(args.out) if args.out else None
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    summary_to = sys.stderr if writer is not None and writer.to_stdout else out
    options: dict[str, Any] = {
        "threshold": args.threshold,
        "target_false_alarm_rate": args.target_rate,
    }
    tally = Tally()
    with _connect(args) as client:
        rows = (
            _score_stream(client, files, options)
            if args.stream
            else _score_batches(client, files, args, options)
        )
        progress = tqdm(total=len(files), unit="img", disable=True if args.no_progress else None)
        try:
            for row in rows:
                tally.add(row)
                if writer is not None:
                    writer.write(row)
                if row["error"] is not None:
                    progress.write(f"{row['path']}: {row['error']}", file=sys.stderr)
                progress.update()
        finally:
            progress.close()
            if writer is not None:
                writer.close()
    print(
        f"scored {tally.scored}, anomalies {tally.anomalies}, failures {tally.failures}",
        file=summary_to,
    )
    return 1 if tally.failures else 0


def _info(args: argparse.Namespace, out: TextIO) -> int:
    with _connect(args) as client:
        info = client.info()
    print(json_format.MessageToJson(info, preserving_proto_field_name=True), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args, sys.stdout)
        return _score(args, sys.stdout)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{PROG}: error: {args.target}: {_call_failed(exc)}", file=sys.stderr)
        return 1
