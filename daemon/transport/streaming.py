"""Runs a long engine call beside its RPC thread, relaying progress as a stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import grpc

from memplug.daemon.engine.cancel import CancelToken
from memplug.daemon.engine.runner import ProgressCallback

T = TypeVar("T")

MIN_INTERVAL = 0.05  # seconds between two progress messages, at most 20 a second


def token_for(context: grpc.ServicerContext) -> CancelToken:
    """A token cancelled when the RPC ends early (client cancel, disconnect, deadline)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    token = CancelToken(deadline)
    # Called when the RPC terminates for any reason; after success it is a no-op.
    context.add_callback(lambda: token.cancel("cancelled by the client"))
    return token


class _Done(Generic[T]):
    def __init__(self, value: T | None, error: BaseException | None) -> None:
        self.value = value
        self.error = error


def stream_operation(
    run: Callable[[ProgressCallback], T],
    token: CancelToken,
) -> Iterator[tuple[int, int] | T]:
    """Yield (done, total) tuples while run() works, then its result.

    run() executes on its own thread; if it raises, the exception is raised
    here, on the RPC thread, for translate() to turn into a status.
    """
    events: queue.SimpleQueue[tuple[int, int] | _Done[T]] = queue.SimpleQueue()

    def body() -> None:
        try:
            events.put(_Done(run(lambda done, total: events.put((done, total))), None))
        except BaseException as exc:
            events.put(_Done(None, exc))

    worker = threading.Thread(target=body, name="memplug-op", daemon=True)
    worker.start()
    last = 0.0
    while True:
        event = events.get()
        if isinstance(event, _Done):
            worker.join()
            if event.error is not None:
                raise event.error
            yield event.value  # type: ignore[misc]
            return
        now = time.monotonic()
        if now - last >= MIN_INTERVAL and not token.cancelled:
            last = now
            yield event
