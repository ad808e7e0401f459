"""Range locks: operations on overlapping ranges of a region serialize."""

from __future__ import annotations

import threading
from collections.abc import Iterator
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
        with self._cond:
            while any(r.overlaps(h) for h in self._held):
                token.check()
                self._cond.wait(_POLL)
            token.check()
            self._held.append(r)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(r)
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._held)
