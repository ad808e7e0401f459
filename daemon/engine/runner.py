"""Runs a Plan on the shared worker threads, with progress, cancel and deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from memplug.common.cancel import CancelToken
from memplug.common.errors import Cancelled, DeadlineExceeded
from memplug.common.ranges import Range
from memplug.daemon.engine.strategy import Plan
from memplug.daemon.kernel.ops import iter_chunks

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

        On any failure the other slices stop at their next chunk boundary and
        every worker has returned before this raises, so the caller can roll
        back without racing its own workers.
        """
        if len(plan.slices) == 1:
            # One slice (every fallocate plug, any small plug): run it right here,
            # on the operation's own thread; the pool hop would only add latency
            # and make small plugs queue behind each other.
            self._run_inline(plan, work, token, progress)
            return
        stop = threading.Event()
        done = 0
        total = plan.total
        lock = threading.Lock()

        def advance(n: int) -> None:
            nonlocal done
            with lock:  # report under the lock: a late thread must not report an older value
                done += n
                if progress is not None:
                    progress(done, total)

        def run_slice(pieces: tuple[Range, ...]) -> None:
            for piece in pieces:
                for offset, length in iter_chunks(piece.offset, piece.length, plan.chunk):
                    if stop.is_set():
                        return
                    token.check()
                    work(offset, length)
                    advance(length)

        futures: list[Future[None]] = [self._pool.submit(run_slice, s) for s in plan.slices]
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
        # cancellation it caused in the sibling slices.
        errors.sort(key=lambda e: isinstance(e, Cancelled | DeadlineExceeded))
        if errors:
            raise errors[0]  # type: ignore[misc]
        token.check()

    @staticmethod
    def _run_inline(
        plan: Plan, work: Work, token: CancelToken, progress: ProgressCallback | None
    ) -> None:
        done, total = 0, plan.total
        for piece in plan.slices[0]:
            for offset, length in iter_chunks(piece.offset, piece.length, plan.chunk):
                token.check()
                work(offset, length)
                done += length
                if progress is not None:
                    progress(done, total)
        token.check()
