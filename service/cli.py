"""``python -m service`` / ``anomaly-serve``: load, self-test and serve a bundle until signalled.

SIGHUP reloads the bundle (a bad one is refused and the old one keeps serving); SIGTERM or SIGINT
stop gracefully: health NOT_SERVING, new work refused, accepted work answered within the grace
period, exit 0. A bundle, device or port that cannot be used ends the process at once with a
one-line message and a non-zero status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from prometheus_client import REGISTRY

from service.bundle import BundleError
from service.config import ConfigError, ServeConfig, load_config
from service.model_slot import LoadedModel, load_model
from service.runtime import DeviceError
from service.server import StartupError, create_server
from service.server_process import Ready, write_ready_file

log = logging.getLogger("service")
PROG = "anomaly-serve"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


async def serve(config: ServeConfig, model: LoadedModel) -> int:
    """Serve until SIGTERM or SIGINT, reloading on SIGHUP; return the exit status."""
    loop = asyncio.get_running_loop()
    server = await create_server(config, model=model, registry=REGISTRY)
    security = "TLS" if config.tls else "plaintext"
    if config.tls_client_ca:
        security = "mutual TLS"
    log.info(
        "serving %s on %s:%d (%s, %s), metrics on %s:%d/metrics",
        model.describe(),
        config.host,
        server.port,
        security,
        "bearer token required" if config.token else "no token",
        config.host,
        server.metrics_port,
    )
    if config.ready_file is not None:
        ready = Ready(os.getpid(), config.host, server.port, server.metrics_port)
        try:
            write_ready_file(config.ready_file, ready)
        except OSError as exc:
            await server.stop(0)
            raise StartupError(f"cannot write the ready file {config.ready_file}: {exc}") from exc
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_stop(signum: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s: already shutting down", signum.name)
        stop.set()

    def on_hup() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    if config.ready_file is not None:
        config.ready_file.unlink(missing_ok=True)
    await server.stop(config.grace_period)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        model = load_model(config.bundle, config.device, config.threads)
    except BundleError as exc:
        return _fail(f"cannot serve bundle {config.bundle}: {exc}")
    except DeviceError as exc:
        return _fail(str(exc))
    try:
        return asyncio.run(serve(config, model))
    except StartupError as exc:
        return _fail(str(exc))
