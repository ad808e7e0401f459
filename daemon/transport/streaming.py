"""Runs a long engine call beside its RPC thread, relaying progress as a stream."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Generic, TypeVar

import grpc

from memplug.common.cancel import CancelToken
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


def _ignore_progress(done: int, total: int) -> None:
    pass


class _Done(Generic[T]):
    def __init__(self, value: T | None, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class OperationStreamer:
    """Runs long engine calls beside their RPC threads and relays their progress.

    coordinators: threads that run the calls, reused across calls (starting a
    thread per call cost a small plug more than its fallocate); the server
    gives as many as it has RPC threads, so one is always free for a call.
    inline_max_bytes: the engine's progress granularity. A call of at most
    that many bytes has no progress to relay and runs on the RPC thread itself.
    """

    def __init__(self, *, coordinators: int, inline_max_bytes: int) -> None:
        self.inline_max_bytes = inline_max_bytes
        self._coordinators = ThreadPoolExecutor(
            max_workers=coordinators, thread_name_prefix="memplug-op"
        )

    def stream(
        self,
        run: Callable[[ProgressCallback], T],
        token: CancelToken,
        *,
        length: int,
    ) -> Iterator[tuple[int, int] | T]:
        """Yield (done, total) tuples while run() works, then its result.

        length is the request's; 0 ("to the end of the region") is not known
        here, so such a call runs beside the RPC thread like a long one.
        run() executes on its own thread; if it raises, the exception is raised
        here, on the RPC thread, for translate() to turn into a status.
        """
        if 0 < length <= self.inline_max_bytes:
            # Work is reported a chunk at a time, so a call of one chunk has no
            # progress to relay: run it here and save two thread switches, a
            # third of a small plug's cost beyond its floor. Cancel still
            # reaches it through the token.
            yield run(_ignore_progress)
            return
        events: queue.SimpleQueue[tuple[int, int] | _Done[T]] = queue.SimpleQueue()
        last = 0.0

        def progress(done: int, total: int) -> None:
            # Filtered here, on the worker, so that the RPC thread wakes only to
            # send: every wake-up took the GIL from the workers between chunks.
            # The final message carries done == total: no need to send it twice.
            nonlocal last
            now = time.monotonic()
            if now - last >= MIN_INTERVAL and done < total and not token.cancelled:
                last = now
                events.put((done, total))

        def body() -> None:
            try:
                events.put(_Done(run(progress), None))
            except BaseException as exc:
                events.put(_Done(None, exc))

        finished = self._coordinators.submit(body)
        try:
            while True:
                event = events.get()
                if isinstance(event, _Done):
                    finished.result()
                    if event.error is not None:
                        raise event.error
                    yield event.value  # type: ignore[misc]
                    return
                yield event
        except GeneratorExit:
            # grpcio closes the stream when the client went away while a message was
            # on its way. The token is cancelled by then (token_for); wait for the
            # call's rollback so that the RPC ends, and is counted and logged, only
            # once the daemon has undone it, as when the cancel reaches run() itself.
            token.cancel("cancelled by the client")
            wait([finished])
            raise
