"""gRPC server interceptors, one concern each."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from memplug.daemon import metrics
from memplug.daemon.transport.status import abandoned_code


def _code(context: grpc.ServicerContext, *, abandoned: bool = False) -> str:
    """The RPC's final status; abandoned: the handler never returned or raised.

    grpcio drops a streaming handler without setting a code when the client
    went away (cancel, disconnect, deadline) while a message was on its way,
    and a unary handler can return after its caller left: neither is OK.
    """
    code = context.code()  # type: ignore[attr-defined]  # grpcio >= 1.38; not in grpc-stubs
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code is not None:
        return str(code)
    if abandoned or not context.is_active():
        return abandoned_code(context).name
    return "OK"


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every RPC by method and final status code, and times it."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method.rsplit("/", 1)[-1]

        def done(context: grpc.ServicerContext, started: float, abandoned: bool = False) -> None:
            metrics.RPC_TOTAL.labels(rpc, _code(context, abandoned=abandoned)).inc()
            metrics.RPC_SECONDS.labels(rpc).observe(time.monotonic() - started)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    return inner(request, context)
                finally:
                    done(context, started)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.monotonic()
                finished = False
                try:
                    yield from inner_stream(request, context)
                    finished = True
                except Exception:
                    finished = True  # raised: the handler set its status (translate aborts)
                    raise
                finally:
                    # Not finished: grpcio closed the generator (GeneratorExit),
                    # the client having gone before a message could be sent.
                    done(context, started, abandoned=not finished)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
