"""Range locks: operations on overlapping ranges of a region serialize."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from memplug.common.cancel import CancelToken
from memplug.common.ranges import Range

_POLL = 0.05  # how often a waiter re-checks its cancel token and deadline


class RangeLock:
    """Exclusive locks on byte ranges; disjoint ranges are held at the same time.

    Waiters are admitted in no particular order; a waiter gives up when its
    token is cancelled or its deadline passes (the token raises).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[Range] = []

    @contextmanager
    def hold(self, r: Range, token: CancelToken) -> Iterator[None]:
        with self.hold_all([r], token):
            yield

    @contextmanager
    def hold_all(self, ranges: Iterable[Range], token: CancelToken) -> Iterator[None]:
        """Hold several ranges, taken together once none is held by anyone else.

        All or none at a time: a call never holds some of its ranges while it
        waits for the others, so two calls with interleaved lists cannot deadlock.
        """
        wanted = list(ranges)
        with self._cond:
            while any(r.overlaps(h) for r in wanted for h in self._held):
                token.check()
                self._cond.wait(_POLL)
            token.check()
            self._held.extend(wanted)
        try:
            yield
        finally:
            with self._cond:
                for r in wanted:
                    self._held.remove(r)
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._held)
