"""The service under test: ``python -m service`` started by the project's one harness
(service/server_process.py) on free loopback ports, watched for memory and CPU.

Started with the benchmark's thread and batching settings, ready once it has written its ready
file, sampled for resident memory (in a thread, and the kernel's high-water mark) and CPU time,
and stopped with SIGTERM as an orchestrator would stop it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import Snapshot
from service.server_process import ServerProcess

HOST = "127.0.0.1"
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

    def args(self) -> list[str]:
        """The arguments of ``python -m service`` with these settings, on free loopback ports."""
        return [
            "--bundle", str(self.bundle),
            "--host", HOST,
            "--port", "0",
            "--metrics-port", "0",
            "--device", self.device,
            "--threads", str(self.threads),
            "--max-batch-size", str(self.max_batch_size),
            "--max-batch-delay-ms", f"{self.max_batch_delay_ms:g}",
            "--batching" if self.batching else "--no-batching",
            "--stream-window", str(self.stream_window),
            "--log-level", "WARNING",
            *self.extra_args,
        ]  # fmt: skip


@dataclass
class RssSamples:
    """Resident set size of the server over time: ``(seconds since start, bytes)``."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def between(self, start: float, stop: float) -> list[int]:
        """RSS values sampled in ``[start, stop)`` seconds."""
        return [rss for t, rss in self.samples if start <= t < stop]


class MeasuredServer:
    """A running ``python -m service`` watched for memory and CPU; a context manager (SIGTERM on
    exit)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.server = ServerProcess(settings.args())
        self.argv = self.server.argv
        self.process = psutil.Process(self.server.pid)
        self.started = time.monotonic()
        self.rss = RssSamples()
        self._peak_rss = 0
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()
        self.exit_code: int | None = None
        try:
            self.server.wait_ready()
        except BaseException:
            self.stop()
            self.server.close()
            raise

    @property
    def target(self) -> str:
        """The gRPC address to dial."""
        return self.server.target

    @property
    def pid(self) -> int:
        """The server's process id (for py-spy and the like)."""
        return self.server.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote to stdout and stderr."""
        return "\n".join(self.server.log.splitlines()[-lines:])

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
        url = f"http://{HOST}:{self.server.metrics_port}/metrics"
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
            if self.server.process.poll() is None:
                self._peak_rss = self.peak_rss()  # /proc is gone once it exits
            self.exit_code = self.server.stop(timeout)
            self._stop_sampling.set()
            self._sampler.join()
        return self.exit_code

    def __enter__(self) -> MeasuredServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.server.close()


def describe_argv(argv: Sequence[str]) -> str:
    """The command line as one would type it (the interpreter shown as ``python``)."""
    return " ".join(["python", *argv[1:]])
