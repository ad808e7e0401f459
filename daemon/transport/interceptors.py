"""gRPC server interceptors, one concern each."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from memplug.daemon import metrics
from memplug.daemon.transport.status import abandoned_code


def _code(context: grpc.ServicerContext, *, abandoned: bool = False, answered: bool = False) -> str:
    """The RPC's final status; abandoned: the handler never returned or raised.

    grpcio drops a streaming handler without setting a code when the client
    went away (cancel, disconnect, deadline) while a message was on its way,
    and a unary handler can return after its caller left: neither is OK.
    answered: a stream produced its result (the work is done); a client that
    leaves after that changes nothing, and the call is OK.
    """
    code = context.code()  # type: ignore[attr-defined]  # grpcio >= 1.38; not in grpc-stubs
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code is not None:
        return str(code)
    if abandoned or not (answered or context.is_active()):
        return abandoned_code(context).name
    return "OK"


def _carries_result(message: Any) -> bool:
    """A memplug Progress with its result (the last message); other streams have none."""
    try:
        return bool(message.HasField("result"))
    except (AttributeError, ValueError):  # health's Watch, reflection: no result field
        return False


def close_abandoned(stream: Generator[Any, None, None]) -> None:
    """End a streaming handler whose RPC ended while it waited at a message.

    grpcio stops iterating a handler whose client went away and leaves the
    generator to the garbage collector, which may find it much later: until
    then the call is neither counted nor logged. Closing it raises
    GeneratorExit at its pending message, which counts, logs and (for a plug)
    waits for the rollback; that wait is why it runs on a thread of its own,
    never on grpcio's callback thread.
    """
    if inspect.getgeneratorstate(stream) != inspect.GEN_SUSPENDED:
        return  # not started, running or finished: nothing waits at a message

    def close() -> None:
        with contextlib.suppress(ValueError):  # resumed meanwhile: it ends by itself
            stream.close()

    threading.Thread(target=close, name="memplug-abandoned", daemon=True).start()


@functools.cache
def _rpc_counter(rpc: str, code: str) -> Counter:
    # A labelled child is looked up under the metric's lock, with its label
    # values checked, on every labels(); it never changes, so keep it.
    return metrics.RPC_TOTAL.labels(rpc, code)


@functools.cache
def _rpc_timer(rpc: str) -> Histogram:
    return metrics.RPC_SECONDS.labels(rpc)


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

        def done(
            context: grpc.ServicerContext,
            started: float,
            *,
            abandoned: bool = False,
            answered: bool = False,
        ) -> None:
            code = _code(context, abandoned=abandoned, answered=answered)
            _rpc_counter(rpc, code).inc()
            _rpc_timer(rpc).observe(time.monotonic() - started)

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
                calls = counted_stream(request, context)
                context.add_callback(lambda: close_abandoned(calls))
                return calls

            def counted_stream(
                request: Any, context: grpc.ServicerContext
            ) -> Generator[Any, None, None]:
                started = time.monotonic()
                finished = answered = False
                try:
                    for message in inner_stream(request, context):
                        # The result comes last: the work is done, whether or
                        # not the client stays to read it.
                        answered = _carries_result(message)
                        yield message
                    finished = True
                except Exception:
                    finished = True  # raised: the handler set its status (translate aborts)
                    raise
                finally:
                    # Not finished: grpcio closed the generator (GeneratorExit),
                    # the client having gone before a message could be sent.
                    done(context, started, abandoned=not (finished or answered), answered=answered)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
