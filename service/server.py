"""The gRPC server: a factory that starts it (tests bind port 0 and read the bound ports), reload,
graceful stop, and a background-thread runner for synchronous callers.

One asyncio event loop serves every call. Decoding and resizing run on a small thread pool, and
ONNX Runtime runs in the micro-batcher's single inference thread; both release the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.admission import AdmissionControl
from service.batcher import MicroBatcher
from service.config import ServeConfig
from service.drift import DriftMonitor
from service.inference import RawBatch, make_run_batch
from service.interceptors import interceptors
from service.metrics import ServiceMetrics
from service.model_slot import LoadedModel, ModelSlot, load_model
from service.servicer import AnomalyDetectorServicer
from service.wire import Limits

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AnomalyDetector"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
T = TypeVar("T")
# Once accepted work is answered: time for refusals under way and health watches to end.
FINAL_GRACE = 0.5


class StartupError(RuntimeError):
    """The server could not start: a port that cannot be bound, an unreadable TLS file."""


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    try:
        key = config.tls_key.read_bytes()
        chain = config.tls_cert.read_bytes()
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise StartupError(f"cannot read TLS files: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _fingerprint(path: Path) -> tuple[object, ...]:
    """What changes when a bundle on disk is replaced (files rewritten or a symlink moved)."""
    try:
        resolved = path.resolve()
        if resolved.is_dir():
            entries = sorted(
                (p.name, p.stat().st_mtime_ns, p.stat().st_size)
                for p in resolved.iterdir()
                if p.is_file()
            )
            return (str(resolved), *entries)
        stat = resolved.stat()
        return (str(resolved), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return ("missing",)


def _connection_age(seconds: float) -> list[tuple[str, int]]:
    """gRPC's max connection age (it adds +-10% jitter); calls under way at that age finish."""
    if seconds == 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(seconds * 1000)))]


class AnomalyServer:
    """A started server. Build it with :func:`create_server`; end it with :meth:`stop`."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        server: grpc.aio.Server,
        port: int,
        metrics_port: int,
        metrics: ServiceMetrics,
        models: ModelSlot,
        batcher: MicroBatcher[LoadedModel, RawBatch],
        servicer: AnomalyDetectorServicer,
        health_servicer: health.aio.HealthServicer,
        decode_pool: ThreadPoolExecutor,
        metrics_http: WSGIServer,
    ) -> None:
        self.config = config
        self.port = port
        self.metrics_port = metrics_port
        self.metrics = metrics
        self.models = models
        self._server = server
        self._batcher = batcher
        self._servicer = servicer
        self._health = health_servicer
        self._pool = decode_pool
        self._metrics_http = metrics_http
        self._watcher: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        if config.watch_interval > 0:
            # The state being served is taken now, so that no change after start-up is missed.
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(config.watch_interval, _fingerprint(config.bundle)),
                name="bundle-watcher",
            )

    async def reload(self) -> bool:
        """Load, self-test and swap in the bundle at the configured path; False if refused."""
        return await self.models.reload()

    async def _watch(self, interval: float, last: tuple[object, ...]) -> None:
        path = self.config.bundle
        while True:
            await asyncio.sleep(interval)
            current = await asyncio.to_thread(_fingerprint, path)
            if current != last:
                last = current
                log.info("bundle %s changed on disk", path)
                await self.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, new work refused, accepted work answered within
        ``grace`` seconds (default: the configured grace period), then everything closed."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._stop(self.config.grace_period if grace is None else grace)
            )
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        log.info("shutting down: health NOT_SERVING, finishing accepted work (grace %.1f s)", grace)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._health.enter_graceful_shutdown()
        # New calls are answered UNAVAILABLE by the servicer itself from here on: a call that
        # gRPC has received but not yet handed over when the server stops would be cancelled.
        self._servicer.drain()
        unanswered = await self._servicer.active.wait_idle(grace)
        if unanswered:
            # The work still queued fails, and so each call ends UNAVAILABLE on its own terms: a
            # stream says how many of its images were answered (the proto's promise), rather
            # than gRPC's bare "Cancelling all calls" at server.stop().
            log.warning("grace period over: ending %d calls not yet answered", unanswered)
            await self._batcher.close()
            await self._servicer.active.wait_idle(FINAL_GRACE)
        else:
            log.info("every accepted call was answered")
        # Clients that watch health (the project's client does) stop sending here once they see
        # NOT_SERVING. Until gRPC stops, the calls that still come are refused UNAVAILABLE by the
        # servicer, and retried elsewhere, rather than cancelled by server.stop().
        notice = min(FINAL_GRACE, grace) - (loop.time() - started)
        if notice > 0:
            await asyncio.sleep(notice)
        remaining = max(0.0, grace - (loop.time() - started))
        await self._server.stop(min(remaining, FINAL_GRACE))
        if self._watcher is not None:
            self._watcher.cancel()
        await self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._metrics_http.shutdown)
        self._metrics_http.server_close()
        log.info("stopped")


async def create_server(
    config: ServeConfig,
    *,
    model: LoadedModel | None = None,
    registry: CollectorRegistry | None = None,
) -> AnomalyServer:
    """Start serving ``config.bundle`` (or an already loaded ``model``) and return the server.

    Ports may be 0; the bound ones are ``server.port`` and ``server.metrics_port``. Metrics go to
    ``registry`` (a fresh one by default). Raises BundleError or DeviceError for a model that
    cannot be served and :class:`StartupError` for a port or TLS file that cannot be used.
    """
    metrics = ServiceMetrics(registry if registry is not None else CollectorRegistry())
    if model is None:
        model = await asyncio.to_thread(load_model, config.bundle, config.device, config.threads)
    drift = DriftMonitor(config.drift, metrics)
    models = ModelSlot(
        model,
        metrics,
        drift,
        bundle_path=config.bundle,
        device=config.device,
        threads=config.threads,
    )
    batcher: MicroBatcher[LoadedModel, RawBatch] = MicroBatcher(
        make_run_batch(metrics, drift),
        metrics,
        max_batch_size=config.max_batch_size,
        max_delay=config.max_batch_delay,
        coalesce=config.batching,
    )
    admission = AdmissionControl(
        metrics, capacity=config.max_queue, per_client=config.max_queue_per_client
    )
    limits = Limits(config.max_request_images, config.max_image_pixels, config.max_message_bytes)
    pool = ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="decode")
    servicer = AnomalyDetectorServicer(
        models,
        batcher,
        admission,
        pool,
        metrics,
        limits=limits,
        drift=config.drift,
        decode_workers=config.preprocess_workers,
        stream_window=config.stream_window,
    )
    server = grpc.aio.server(
        interceptors=interceptors(metrics, config.token),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            # What one connection can make the server hold: its calls, and the bytes they send
            # ahead of what the server reads (see --bdp-probe).
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.http2.bdp_probe", int(config.bdp_probe)),
            *_connection_age(config.max_connection_age),
        ],
    )
    pb_grpc.add_AnomalyDetectorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    try:
        if config.tls:
            port = server.add_secure_port(address, _server_credentials(config))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        pool.shutdown(wait=False)
        raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from exc
    try:
        metrics_http, _ = start_http_server(
            config.metrics_port, addr=config.host, registry=metrics.registry
        )
    except OSError as exc:
        pool.shutdown(wait=False)
        raise StartupError(
            f"cannot listen for metrics on {config.host}:{config.metrics_port}: {exc}"
        ) from exc
    batcher.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, SERVING)
    return AnomalyServer(
        config,
        server=server,
        port=int(port),
        metrics_port=int(metrics_http.server_port),
        metrics=metrics,
        models=models,
        batcher=batcher,
        servicer=servicer,
        health_servicer=health_servicer,
        decode_pool=pool,
        metrics_http=metrics_http,
    )


class ServerThread:
    """A server on its own event loop in a background thread, driven synchronously.

    For tests and benchmarks: ``with ServerThread(config) as running: ... running.port``.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        model: LoadedModel | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="anomaly-server", daemon=True
        )
        self._thread.start()
        try:
            self.server = self._call(create_server(config, model=model, registry=registry))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coroutine: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    @property
    def metrics_port(self) -> int:
        """The bound metrics port."""
        return self.server.metrics_port

    def reload(self) -> bool:
        """Reload the bundle (as SIGHUP does); False if it was refused."""
        return self._call(self.server.reload())

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully and end the thread."""
        if self._thread.is_alive():
            self._call(self.server.stop(grace))
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
