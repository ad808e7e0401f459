"""The RPC wrapper: every servicer method answers errors through translate().

The class -> code table itself is memplug.common.status; a contract test checks
that each RPC is wrapped and that every error class maps to a code other than
INTERNAL.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn, TypeVar

import grpc

from memplug.common.errors import Internal, MemplugError
from memplug.common.status import ERROR_CLASS_KEY, code_for

log = logging.getLogger("memplug.rpc")

INTERNAL_MESSAGE: Final = "internal error in memplugd (a bug: its log has the details)"


def abort(context: grpc.ServicerContext, exc: MemplugError) -> NoReturn:
    context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
    context.abort(code_for(exc), exc.message)
    raise AssertionError("unreachable: context.abort raises")


_F = TypeVar("_F", bound=Callable[..., Any])


def abandoned_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of an RPC whose client went away before its answer was sent.

    grpcio then closes a streaming handler at its pending message
    (GeneratorExit) and sets no code; the client saw CANCELLED or
    DEADLINE_EXCEEDED.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _fields(rpc: str, request: Any, code: str, t0: float) -> dict[str, object]:
    fields: dict[str, object] = {"rpc": rpc}
    for attr, key in (("name", "region"), ("offset", "offset"), ("length", "length")):
        value = getattr(request, attr, None)
        if value not in (None, ""):
            fields[key] = value
    ranges = getattr(request, "ranges", None)
    if ranges:  # a multi-range call: its count, not the list (up to 4096 ranges)
        fields["ranges"] = len(ranges)
    fields["status"] = code
    fields["duration_ms"] = round((time.monotonic() - t0) * 1e3, 3)
    return fields


def _fail(
    rpc: str, request: Any, context: grpc.ServicerContext, exc: Exception, t0: float
) -> NoReturn:
    if isinstance(exc, MemplugError) and not isinstance(exc, Internal):
        fields = _fields(rpc, request, code_for(exc).name, t0)
        log.warning("rpc failed", extra={"fields": {**fields, "error": exc.message}})
        abort(context, exc)
    log.error("rpc failed", exc_info=exc, extra={"fields": _fields(rpc, request, "INTERNAL", t0)})
    context.set_trailing_metadata(((ERROR_CLASS_KEY, "Internal"),))
    context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("unreachable")


def translate(rpc: str, *, streaming: bool = False, read: bool = False) -> Callable[[_F], _F]:
    """Wrap a servicer method: log it, and turn exceptions into status codes.

    streaming=True: the method yields messages with a `result` field, set on the
    last one only (Progress).
    read=True: the method changes nothing; its successful calls are logged at
    DEBUG. Monitors poll reads many times a second, and a log line costs a call
    about 0.15 ms of the daemon's CPU: INFO keeps what changed something. A
    failed read is still a WARNING.
    """
    ok_level = logging.DEBUG if read else logging.INFO

    def wrap(method: _F) -> _F:
        if streaming:

            @functools.wraps(method)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                t0 = time.monotonic()
                answered = False
                try:
                    for message in method(self, request, context):
                        answered = message.HasField("result")
                        yield message
                except GeneratorExit:
                    # The client went away with a message on its way. The call's
                    # outcome is what the daemon did: done once it had its result
                    # (a cancel crossing it changes nothing), cancelled before.
                    if answered:
                        log.info("rpc", extra={"fields": _fields(rpc, request, "OK", t0)})
                    else:
                        fields = _fields(rpc, request, abandoned_code(context).name, t0)
                        gone = "the client went away before the answer was sent"
                        log.warning("rpc failed", extra={"fields": {**fields, "error": gone}})
                    raise
                except Exception as exc:
                    if _aborted(exc):
                        raise
                    _fail(rpc, request, context, exc, t0)
                if log.isEnabledFor(ok_level):
                    log.log(ok_level, "rpc", extra={"fields": _fields(rpc, request, "OK", t0)})

            stream.__memplug_translated__ = True  # type: ignore[attr-defined]
            return stream  # type: ignore[return-value]

        @functools.wraps(method)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.monotonic()
            try:
                response = method(self, request, context)
            except Exception as exc:
                if _aborted(exc):
                    raise
                _fail(rpc, request, context, exc, t0)
            if log.isEnabledFor(ok_level):
                log.log(ok_level, "rpc", extra={"fields": _fields(rpc, request, "OK", t0)})
            return response

        unary.__memplug_translated__ = True  # type: ignore[attr-defined]
        return unary  # type: ignore[return-value]

    return wrap


def _aborted(exc: Exception) -> bool:
    # context.abort() raises a bare Exception subclass private to grpc; let it through.
    return type(exc).__module__.startswith("grpc")
