"""A real Prometheus for the deploy tests: Debian's server on loopback with the project's own scrape
config and rules (deploy/prometheus/prometheus.yml with three edits only: the target addresses,
free loopback ports, and 1-second scrape and evaluation intervals, so that tests take seconds),
and its HTTP API."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
JOB = "anomaly-service"
PROMETHEUS_BIN = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS_BIN is None,
    reason="prometheus not installed: run `make deploy-tools` (Debian package prometheus; "
    "needs root and apt-get)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    diagnose: Callable[[], str] = str,
) -> None:
    """Poll ``check`` until it holds; fail with ``diagnose()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


@dataclass(frozen=True)
class Prometheus:
    """The HTTP API of the Prometheus under test."""

    url: str

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.get("/api/v1/query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that gives at most one series."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def equals(self, expr: str, expected: float) -> Callable[[], bool]:
        """A check for wait_for: the query gives ``expected`` now."""
        return lambda: self.value(expr) == expected

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


def prometheus_config(metrics_port: int, prometheus_port: int) -> str:
    """deploy/prometheus/prometheus.yml pointed at loopback, scraping every second."""
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    for old, new in (
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("scrape_timeout: 10s", "scrape_timeout: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        (f"- {JOB}:9100", f"- 127.0.0.1:{metrics_port}"),
        ("- localhost:9090", f"- 127.0.0.1:{prometheus_port}"),
    ):
        assert text.count(old) == 1, f"prometheus.yml changed: {old!r} expected once"
        text = text.replace(old, new)
    return text


def stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int | None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.exists() else ""


def start_prometheus(folder: Path, metrics_port: int) -> tuple[subprocess.Popen[bytes], Prometheus]:
    """Prometheus scraping the service's metrics port with the project's config and rules, its
    files in ``folder``; ready. Stop the process with :func:`stop`."""
    assert PROMETHEUS_BIN is not None, "mark the test with needs_prometheus"
    port = free_port()
    shutil.copytree(DEPLOY / "prometheus" / "rules", folder / "rules")
    config = folder / "prometheus.yml"
    config.write_text(prometheus_config(metrics_port, port), encoding="utf-8")
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS_BIN,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_for("Prometheus", prom.ready, 60, lambda: log_tail(log))
    except BaseException:
        stop(process, signal.SIGTERM, 10)
        raise
    return process, prom
