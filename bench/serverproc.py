"""The service under test: ``python -m service`` in a subprocess on free loopback ports.

Started with the benchmark's thread and batching settings, checked ready with the gRPC health
service, watched for memory (resident set size, sampled in a thread, and the kernel's high-water
mark) and CPU time, and stopped with SIGTERM as an orchestrator would stop it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import Snapshot

HOST = "127.0.0.1"
READY_TIMEOUT = 120.0
SAMPLE_INTERVAL = 0.25
# Histograms of the service (service/metrics.py) that tell how it batches.
BATCH_METRIC = "anomaly_batch_size_images"
INFERENCE_METRIC = "anomaly_inference_duration_seconds"


@dataclass(frozen=True)
class ServerSettings:
    """The flags the server is started with (see ``python -m service --help``)."""

    bundle: Path
    device: str
    threads: int
    max_batch_size: int
    max_batch_delay_ms: float
    batching: bool
    stream_window: int
    extra_args: tuple[str, ...] = ()

    def argv(self, port: int, metrics_port: int) -> list[str]:
        """The command line of ``python -m service`` with these settings."""
        return [
            sys.executable,
            "-m",
            "service",
            "--bundle",
            str(self.bundle),
            "--host",
            HOST,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--device",
            self.device,
            "--threads",
            str(self.threads),
            "--max-batch-size",
            str(self.max_batch_size),
            "--max-batch-delay-ms",
            f"{self.max_batch_delay_ms:g}",
            "--batching" if self.batching else "--no-batching",
            "--stream-window",
            str(self.stream_window),
            "--log-level",
            "WARNING",
            *self.extra_args,
        ]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RssSamples:
    """Resident set size of the server over time: ``(seconds since start, bytes)``."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def between(self, start: float, stop: float) -> list[int]:
        """RSS values sampled in ``[start, stop)`` seconds."""
        return [rss for t, rss in self.samples if start <= t < stop]


class ServerProcess:
    """A running ``python -m service``; use as a context manager (SIGTERM on exit)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port, self.metrics_port = free_ports(2)
        self.argv = settings.argv(self.port, self.metrics_port)
        self._log = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 (closed in __exit__)
        self._popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self._popen.pid)
        self.started = time.monotonic()
        self.rss = RssSamples()
        self._peak_rss = 0
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()
        self.exit_code: int | None = None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def target(self) -> str:
        """The gRPC address to dial."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id (for py-spy and the like)."""
        return self._popen.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote to stdout and stderr."""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self._popen.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with status {self._popen.returncode} before serving:"
                        f"\n$ {' '.join(self.argv)}\n{self.log_tail()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the server was not SERVING after {READY_TIMEOUT:.0f} s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.2)

    def _sample(self) -> None:
        while not self._stop_sampling.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self._peak_rss = max(self._peak_rss, rss)
            self.rss.samples.append((time.monotonic() - self.started, rss))
            self._stop_sampling.wait(SAMPLE_INTERVAL)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server has used so far."""
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples without labels (and summed over labels), by name."""
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5.0) as reply:
                text = reply.read().decode("utf-8")
        except OSError:
            return {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + float(sample.value)
        return samples

    def snapshot(self) -> Snapshot:
        """CPU time and batching counters now (NaN where the server has no such metric)."""
        cpu = self.cpu_seconds()
        samples = self.metrics()
        return Snapshot(
            cpu_seconds=cpu,
            batches=samples.get(BATCH_METRIC + "_count", math.nan),
            batched_images=samples.get(BATCH_METRIC + "_sum", math.nan),
            inference_seconds=samples.get(INFERENCE_METRIC + "_sum", math.nan),
        )

    def peak_rss(self) -> int:
        """Peak resident set size: the kernel's high-water mark where readable, else sampled."""
        status = Path(f"/proc/{self.pid}/status")
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return max(self._peak_rss, int(line.split()[1]) * 1024)
        return self._peak_rss

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit (SIGKILL past ``timeout``); the exit status."""
        if self.exit_code is None:
            if self._popen.poll() is None:
                self._peak_rss = self.peak_rss()  # /proc is gone once it exits
                self._popen.send_signal(signal.SIGTERM)
                try:
                    self._popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait()
            self._stop_sampling.set()
            self._sampler.join()
            self.exit_code = self._popen.returncode
        return self.exit_code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self._log.close()


def describe_argv(argv: Sequence[str]) -> str:
    """The command line as one would type it (the interpreter shown as ``python``)."""
    return " ".join(["python", *argv[1:]])
