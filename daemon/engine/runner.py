"""Runs a Plan on the shared worker threads, with progress, cancel and deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from memplug.common.cancel import CancelToken
from memplug.common.errors import Cancelled, DeadlineExceeded
from memplug.daemon.engine.strategy import Plan

Work = Callable[[int, int], None]  # (offset, length) -> None; raises on failure
ProgressCallback = Callable[[int, int], None]  # (done_bytes, total_bytes)

_POLL = 0.05


class Runner:
    """A fixed pool of --threads workers shared by every operation of the daemon.

    The syscalls themselves run here, never on gRPC threads; ctypes releases
    the GIL so the workers really run in parallel.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memplug-worker")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self,
        plan: Plan,
        work: Work,
        token: CancelToken,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Run work over every chunk of the plan; raise the first real error.

        plan.threads workers pull the chunks from one queue, in the plan's
        order: a worker the scheduler holds back delays the end by at most the
        chunk it holds, where a fixed share per thread would wait for its
        whole share. On any failure the other workers stop before their next
        chunk and every worker has returned before this raises, so the caller
        can roll back without racing its own workers.
        """
        if plan.threads == 1:
            # One thread (every fallocate plug, any small plug): run it right here,
            # on the operation's own thread; the pool hop would only add latency
            # and make small plugs queue behind each other.
            self._run_inline(plan, work, token, progress)
            return
        stop = threading.Event()
        done = 0
        total = plan.total
        lock = threading.Lock()
        chunks = plan.chunks()

        def take() -> tuple[int, int] | None:
            """The next chunk, under the lock that also orders progress reports."""
            with lock:
                return next(chunks, None)

        def advance(n: int) -> None:
            nonlocal done
            with lock:  # report under the lock: a late thread must not report an older value
                done += n
                if progress is not None:
                    progress(done, total)

        def pull() -> None:
            while not stop.is_set():
                token.check()
                item = take()
                if item is None:
                    return
                work(*item)
                advance(item[1])

        futures: list[Future[None]] = [self._pool.submit(pull) for _ in range(plan.threads)]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=_POLL, return_when=FIRST_EXCEPTION)
                if any(f.exception() is not None for f in finished) or token.cancelled:
                    break
                if token.deadline is not None and (token.remaining() or 0.0) <= 0:
                    break
        finally:
            stop.set()
            for f in futures:
                f.cancel()
            wait(futures)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
        # A real failure (pool empty, disk full) explains more than the
        # cancellation it caused in the sibling workers.
        errors.sort(key=lambda e: isinstance(e, Cancelled | DeadlineExceeded))
        if errors:
            raise errors[0]  # type: ignore[misc]
        token.check()

    @staticmethod
    def _run_inline(
        plan: Plan, work: Work, token: CancelToken, progress: ProgressCallback | None
    ) -> None:
        done, total = 0, plan.total
        for offset, length in plan.chunks():
            token.check()
            work(offset, length)
            done += length
            if progress is not None:
                progress(done, total)
        token.check()
