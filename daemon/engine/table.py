"""The regions the daemon holds, by name, and the calls running on each (engine-internal).

A call finds its region through operation(), which counts it as running until
it ends: a busy region cannot be deleted, and shutdown cancels and waits for
every running call. Names being created are held too, so two CreateRegion
calls cannot both make a region of one name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from memplug.common.cancel import CancelToken
from memplug.common.errors import AlreadyExists, Cancelled, FailedPrecondition, NotFound
from memplug.daemon.backings import FileBacking
from memplug.daemon.engine.region import Region

log = logging.getLogger("memplug.engine")


class RegionTable:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._regions: dict[str, Region] = {}
        self._creating: set[str] = set()
        self._running: set[CancelToken] = set()
        self._closing = False
        self._lost: dict[str, str] = {}  # regions a restart could not bring back, and why

    def regions(self) -> list[Region]:
        """Every region, by name."""
        with self._lock:
            return sorted(self._regions.values(), key=lambda r: r.name)

    def get(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
        return region

    def _not_found(self, name: str) -> NotFound:
        lost = self._lost.get(name)
        if lost is not None:
            return NotFound(f"region {name!r} was lost when memplugd restarted: {lost}")
        return NotFound(f"no region named {name!r}")

    @contextmanager
    def operation(self, name: str, token: CancelToken) -> Iterator[Region]:
        """Find the region and count the operation as in flight until it ends."""
        with self._lock:
            if self._closing:
                raise Cancelled("the daemon is shutting down")
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
            region.active += 1
            self._running.add(token)
        try:
            yield region
        finally:
            with self._lock:
                region.active -= 1
                self._running.discard(token)
                self._lock.notify_all()

    # ------------------------------------------------------------------ changes

    @contextmanager
    def creating(self, name: str) -> Iterator[None]:
        """Hold the name while its region is made; refuse a name in use."""
        with self._lock:
            if self._closing:
                raise Cancelled("the daemon is shutting down")
            if name in self._regions or name in self._creating:
                raise AlreadyExists(f"a region named {name!r} already exists")
            self._creating.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._creating.discard(name)
                self._lock.notify_all()  # pause() waits for creations too

    def check_file_unused(self, backing: FileBacking) -> None:
        with self._lock:
            for other in self._regions.values():
                if (
                    isinstance(other.backing, FileBacking)
                    and other.backing.identity == backing.identity
                ):
                    raise AlreadyExists(f"{backing.path} already backs region {other.name!r}")

    def add(self, region: Region) -> None:
        with self._lock:
            self._regions[region.name] = region
            self._lost.pop(region.name, None)

    def remove_idle(self, name: str, *, before: Callable[[str], None]) -> Region:
        """Take the region out, unless a call is running on it.

        before(name) runs first, under the lock (no call can start meanwhile);
        if it raises, the region stays.
        """
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
            if region.active:
                raise FailedPrecondition(
                    f"region {name!r} is busy: {region.active} operation(s) still running; "
                    "cancel them or wait, then delete"
                )
            before(name)
            del self._regions[name]
        return region

    def restored(self, regions: list[Region], lost: dict[str, str]) -> None:
        """Install what a restart brought back, and remember why the rest was lost."""
        with self._lock:
            for region in regions:
                self._regions[region.name] = region
            self._lost.update(lost)

    def pause(self, timeout: float, why: str) -> list[Region]:
        """Refuse new calls, cancel the running ones and wait for them (they roll
        back); every region is kept, for resume() or close()."""
        with self._lock:
            self._closing = True
            for token in self._running:
                token.cancel(f"cancelled: {why}")
            deadline = time.monotonic() + timeout
            while any(r.active for r in self._regions.values()) or self._creating:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FailedPrecondition(
                        f"operations still running after {timeout:.0f}s; try again"
                    )
                self._lock.wait(left)
            return sorted(self._regions.values(), key=lambda r: r.name)

    def resume(self) -> None:
        """Accept calls again after pause()."""
        with self._lock:
            self._closing = False

    def close(self, timeout: float) -> list[Region]:
        """Refuse new calls, cancel the running ones, wait for them; returns every region."""
        with self._lock:
            self._closing = True
            for token in self._running:
                token.cancel("cancelled: the daemon is shutting down")
            deadline = time.monotonic() + timeout
            while any(r.active for r in self._regions.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("shutdown: operations still running after %.0fs", timeout)
                    break
                self._lock.wait(left)
            regions = list(self._regions.values())
            self._regions.clear()
        return regions
