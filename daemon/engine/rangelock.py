"""Range locks: operations on overlapping ranges of a region serialize."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from memplug.common.cancel import CancelToken
from memplug.common.ranges import Range

_POLL = 0.05  # how often a waiter re-checks its cancel token and deadline


def _overlap(a: tuple[Range, ...], b: tuple[Range, ...]) -> bool:
    """Whether two ascending lists of disjoint ranges share a byte: one merge pass."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i].overlaps(b[j]):
            return True
        # The range that ends first cannot reach the other list's next range.
        if a[i].end <= b[j].end:
            i += 1
        else:
            j += 1
    return False


class RangeLock:
    """Exclusive locks on byte ranges; disjoint ranges are held at the same time.

    Waiters are admitted in no particular order; a waiter gives up when its
    token is cancelled or its deadline passes (the token raises).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # Each holder's ranges, ascending: checking a list of n ranges against a
        # holder of m costs n + m, not n * m (lists run to 4096 ranges).
        self._held: list[tuple[Range, ...]] = []

    @contextmanager
    def hold(self, r: Range, token: CancelToken) -> Iterator[None]:
        with self.hold_all([r], token):
            yield

    @contextmanager
    def hold_all(self, ranges: Iterable[Range], token: CancelToken) -> Iterator[None]:
        """Hold several disjoint ranges, taken together once none is held by anyone else.

        All or none at a time: a call never holds some of its ranges while it
        waits for the others, so two calls with interleaved lists cannot deadlock.
        """
        wanted = tuple(sorted(ranges, key=lambda r: r.offset))
        with self._cond:
            while any(_overlap(wanted, held) for held in self._held):
                token.check()
                self._cond.wait(_POLL)
            token.check()
            self._held.append(wanted)
        try:
            yield
        finally:
            with self._cond:
                # By identity: comparing other holders' ranges would cost their length.
                self._held = [held for held in self._held if held is not wanted]
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._held)
