"""The daemon's quota: a cap on plugged bytes across all regions (--max-bytes).

Warm-pool memory counts as plugged, but never stands in a real request's
way: a plug that would not fit has the pool give memory back first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from memplug.common.errors import QuotaExceeded
from memplug.common.sizes import format_size


class Quota:
    def __init__(self, max_bytes: int | None) -> None:
        # Reentrant: a reserve() sheds pool memory, and the pool releases its
        # quota from inside that call.
        self._lock = threading.RLock()
        self._max_bytes = max_bytes
        self._used = 0

    @property
    def max_bytes(self) -> int | None:
        with self._lock:
            return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        with self._lock:
            self._max_bytes = value

    @property
    def used(self) -> int:
        """Bytes plugged (and held by the warm pool) now."""
        with self._lock:
            return self._used

    def reserve(
        self,
        region: str,
        nbytes: int,
        *,
        make_room: Callable[[int], object],
        outside_plugged: Callable[[], int] = lambda: 0,
    ) -> None:
        """Take nbytes for a plug of region, or raise QuotaExceeded.

        outside_plugged() gives the bytes holders of regions' fds allocated outside
        plugged blocks; memory like plugged memory, so it counts against the limit
        too. It is asked only where a limit is set: it costs an fstat per region.
        make_room(short) frees at least short bytes of pool memory if it can;
        shed and reserve happen under one hold of the lock, or the pool's
        refill thread would take the room back in between.
        """
        # Counted before the lock is taken: it takes each region's mutex, and
        # a delete holds its region's mutex while it returns quota here.
        outside = outside_plugged() if self._max_bytes is not None else 0
        with self._lock:
            limit = self._max_bytes
            if limit is None:
                self._used += nbytes
                return
            short = self._used + outside + nbytes - limit
            if short > 0:
                make_room(short)
            if self._used + outside + nbytes > limit:
                left = max(0, limit - self._used - outside)
                stray = (
                    f"; {format_size(outside)} of it is memory that holders of "
                    "regions' fds allocated outside plugged blocks (memplug status shows "
                    "which regions; an unplug of their unplugged blocks frees it)"
                    if outside
                    else ""
                )
                raise QuotaExceeded(
                    f"region {region!r}: plugging {format_size(nbytes)} more would exceed "
                    f"the daemon's quota of {format_size(limit)} "
                    f"({format_size(left)} left{stray}); unplug or delete regions, or raise "
                    "--max-bytes",
                    region=region,
                )
            self._used += nbytes

    def try_reserve(self, nbytes: int) -> bool:
        """Take nbytes if they fit (the warm pool's refill); never raises."""
        with self._lock:
            if self._max_bytes is not None and self._used + nbytes > self._max_bytes:
                return False
            self._used += nbytes
            return True

    def add(self, nbytes: int) -> None:
        """Count memory plugged already (restored regions), even past the limit."""
        with self._lock:
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes
