"""Operations recorded in the state store: intents, plugged sets, and the closes that failed.

An intent is written before an operation touches memory and closed with the
region's plugged set when it ends (engine-internal; crash recovery replays
what is left open). A store that refuses a write (state dir full) leaves
the intent open; it is remembered and closed by the region's next write or
by record_pending().
"""

from __future__ import annotations

import logging
import threading

from memplug.common.errors import MemplugError
from memplug.common.ranges import Range, RangeList
from memplug.daemon.engine.region import Region
from memplug.daemon.state.store import StateStore

log = logging.getLogger("memplug.engine")


class Journal:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        # Intents of finished operations whose closing write failed, by region.
        self._unrecorded: dict[str, set[int]] = {}

    def begin(
        self, region: Region, op: str, r: Range | RangeList, keep: tuple[Range, ...] = ()
    ) -> int:
        """Record the intent durably before memory is touched (crash recovery).

        A list of ranges is one intent holding every range of it.
        """
        try:
            if isinstance(r, RangeList):
                parts = r.ranges if len(r) > 1 else ()
                return self._store.begin(region.name, op, r.span, keep, parts)
            return self._store.begin(region.name, op, r, keep)
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r}: {op} of {r} was not started, nothing changed: "
                f"{exc.message}",
                region=region.name,
            ) from exc

    def finish(self, region: Region, intent: int | None, *, quiet: bool = False) -> None:
        """Record the region's plugged set and close the intent (and any left unclosed).

        If the store refuses, the intent stays open and is remembered, so that
        a later write closes it: an open unplug or discard intent would be
        replayed by a restart. quiet: a failure is logged, not raised (the
        caller is already raising the operation's own error).
        """
        with region.mutex:
            plugged = tuple(region.plugged)
        with self._lock:
            pending = sorted(self._unrecorded.get(region.name, ()))
        try:
            for old in pending:
                self._store.finish(old, region.name, plugged)
                with self._lock:
                    self._unrecorded.get(region.name, set()).discard(old)
            self._store.finish(intent, region.name, plugged)
        except MemplugError as exc:
            if intent is not None:
                with self._lock:
                    self._unrecorded.setdefault(region.name, set()).add(intent)
            if not quiet:
                raise
            log.warning("region %s: its state could not be recorded: %s", region.name, exc)

    def finish_done(self, region: Region, intent: int, op: str, r: Range | RangeList) -> None:
        """Record an unplug or discard that is done and cannot be undone (memory punched)."""
        try:
            self.finish(region, intent)
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r}: {op} of {r} was done but could not be recorded: "
                f"{exc.message}; memplugd records it as soon as it can (a restart before "
                f"then does the {op} again)",
                region=region.name,
            ) from exc

    def record_pending(self, regions: list[Region]) -> None:
        """Retry closing the intents of these regions whose closing write failed."""
        with self._lock:
            waiting = [r for r in regions if self._unrecorded.get(r.name)]
        for region in waiting:
            self.finish(region, None, quiet=True)

    def forget(self, name: str) -> None:
        """A deleted region's unclosed intents went with its record."""
        with self._lock:
            self._unrecorded.pop(name, None)
