"""``python -m service`` in a subprocess: the one way the demo, the benchmarks and the tests start
the server.

The server is started with ``--ready-file``: once it serves, it writes the ports it bound (port 0
picks free ones) to that file as JSON, so readiness and ports come from a machine-readable signal,
never from a log line. Its stdout and stderr go to a log file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

READY_TIMEOUT = 120.0


class ServerStartError(RuntimeError):
    """The server exited, or did not get ready, before serving; the message holds its log."""


@dataclass(frozen=True)
class Ready:
    """What a serving server writes to its ready file."""

    pid: int
    host: str
    port: int
    metrics_port: int

    def to_json(self) -> str:
        """The file's contents."""
        return json.dumps(
            {
                "pid": self.pid,
                "host": self.host,
                "port": self.port,
                "metrics_port": self.metrics_port,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Ready:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        return cls(
            int(data["pid"]), str(data["host"]), int(data["port"]), int(data["metrics_port"])
        )


def write_ready_file(path: Path, ready: Ready) -> None:
    """Write ``ready`` to ``path`` atomically: a reader sees no file or the whole of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(ready.to_json(), encoding="utf-8")
    partial.replace(path)


class ServerProcess:
    """A started ``python -m service ARGS``; :meth:`wait_ready` before use, or use as a context
    manager (which waits, and stops the server with SIGTERM on exit)."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="anomaly-serve-")
        folder = Path(self._folder.name)
        self.ready_file = folder / "ready.json"
        self.log_path = log if log is not None else folder / "server.log"
        self.argv = [sys.executable, "-m", "service", *args, "--ready-file", str(self.ready_file)]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
            )
        self.ready: Ready | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    @property
    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _ready(self) -> Ready:
        if self.ready is None:
            raise RuntimeError("the server is not ready yet: call wait_ready() first")
        return self.ready

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self._ready().port

    @property
    def metrics_port(self) -> int:
        """The bound metrics port."""
        return self._ready().metrics_port

    @property
    def target(self) -> str:
        """The gRPC address to dial (a wildcard listen address is dialled on loopback)."""
        host = self._ready().host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        return f"{host}:{self.port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        """Wait for the ready file; ServerStartError if the server exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"the server exited with status {self.process.returncode} before serving:\n"
                    f"$ {' '.join(self.argv)}\n{self.log[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"the server was not serving after {timeout:.0f} s:\n{self.log[-3000:]}"
                )
            time.sleep(0.05)
        self.ready = Ready.from_json(self.ready_file.read_text(encoding="utf-8"))
        return self

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the server."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the server to exit; its exit status."""
        return self.process.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for a graceful exit (SIGKILL past ``timeout``); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """Kill the server if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.close()

    def close(self) -> None:
        """Kill the server if it still runs and remove its temporary folder."""
        self.kill()
        self._folder.cleanup()
