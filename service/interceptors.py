"""Server interceptors for the AnomalyDetector service: call metrics, bearer-token auth, and
requests whose bytes do not parse.

They apply to ``/anomaly.v1.AnomalyDetector/*`` only: the health service stays open (probes carry
no token) and so does reflection (it reveals only the public contract).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service._proto import anomaly_pb2 as pb
from service.metrics import ServiceMetrics
from service.wire import Unparseable, lenient

SERVICE = pb.DESCRIPTOR.services_by_name["AnomalyDetector"]
SERVICE_PREFIX = f"/{SERVICE.full_name}/"
log = logging.getLogger(__name__)
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def _method(details: grpc.HandlerCallDetails) -> str | None:
    """Short method name of an AnomalyDetector call, None for other services."""
    full: str = details.method
    return full[len(SERVICE_PREFIX) :] if full.startswith(SERVICE_PREFIX) else None


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return default


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts calls by method and status code, tracks calls in flight, times unary calls.

    Stream latency is per message and recorded by the servicer.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Wrap the AnomalyDetector handler with accounting."""
        handler = await continuation(handler_call_details)
        method = _method(handler_call_details)
        if method is None or handler is None:
            return handler
        metrics = self._metrics
        requests = metrics.requests
        duration = metrics.request_duration.labels(method)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                metrics.inflight.inc()
                started = time.perf_counter()
                code = "UNKNOWN"
                try:
                    response = await behavior(request, context)
                    code = _code_name(context, "OK")
                    return response
                except BaseException as exc:
                    code = _failure_code(exc, context)
                    raise
                finally:
                    duration.observe(time.perf_counter() - started)
                    metrics.inflight.dec()
                    requests.labels(method, code).inc()

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.stream_stream is not None:
            stream_behavior = handler.stream_stream

            async def stream(
                request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                metrics.inflight.inc()
                code = "UNKNOWN"
                try:
                    responses = stream_behavior(request_iterator, context)
                    if inspect.isasyncgen(responses):
                        async for response in responses:
                            yield response
                    else:  # a coroutine that writes with context.write (or aborts)
                        await responses
                    code = _code_name(context, "OK")
                except BaseException as exc:
                    code = _failure_code(exc, context)
                    raise
                finally:
                    metrics.inflight.dec()
                    requests.labels(method, code).inc()

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _failure_code(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return _code_name(context, "UNKNOWN")  # context.abort sets the code before raising


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses AnomalyDetector calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Pass authorized calls on; answer the others UNAUTHENTICATED without running them."""
        handler = await continuation(handler_call_details)
        if handler is None or _method(handler_call_details) is None:
            return handler
        if self._authorized(handler_call_details):
            return handler
        message = "this server needs metadata 'authorization: Bearer <token>' with a valid token"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ParseInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers requests whose bytes do not parse INVALID_ARGUMENT, with one log line.

    gRPC would answer them UNKNOWN ("Unexpected <class 'DecodeError'>") and log a traceback. The
    handler's deserializer returns an :class:`~service.wire.Unparseable` instead of raising: a
    unary call is answered here; a stream message reaches the servicer, which answers it in its
    place in the stream.
    """

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Make the AnomalyDetector handler's deserializer lenient."""
        handler = await continuation(handler_call_details)
        method = _method(handler_call_details)
        if method is None or handler is None or handler.request_deserializer is None:
            return handler
        request_type = SERVICE.methods_by_name[method].input_type.full_name
        parse = lenient(handler.request_deserializer, request_type)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Unparseable):
                problem = request.describe()
                log.warning("%s from %s: the request is %s", method, context.peer(), problem)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is {problem}")
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )


def interceptors(metrics: ServiceMetrics, token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors, outermost first: metrics see refused calls too, and even a call
    refused for its token gets its bytes parsed leniently."""
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if token:
        chain.append(BearerTokenInterceptor(token))
    chain.append(ParseInterceptor())
    return chain
