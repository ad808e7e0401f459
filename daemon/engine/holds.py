"""Holds on regions: while one lasts, Unplug, Discard and Delete are refused (engine-internal).

A VMM hand-over (`memplug vm-update`) holds the region from before the new
VMM maps it until the old one has exited: an unplug or delete in between would
take guest RAM from under both. A hold has a holder (who), a reason (why, for
people) and an expiry on the wall clock, so a holder that dies cannot pin the
region forever, and the deadline means the same after a restart. Holds are
written to the state store before the call answers.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from memplug.common.errors import FailedPrecondition, InvalidArgument
from memplug.daemon.state.records import HoldRecord
from memplug.daemon.state.store import StateStore

MAX_HOLDER = 128
MAX_REASON = 256
MAX_TTL = 86400.0  # a day: longer would outlive any hand-over and look like a leak


def _check_text(what: str, value: str, limit: int, *, empty_ok: bool) -> str:
    if not value and not empty_ok:
        raise InvalidArgument(f"the hold's {what} is empty: name who holds the region")
    if len(value) > limit:
        raise InvalidArgument(f"the hold's {what} is {len(value)} characters long; at most {limit}")
    if not value.isprintable():
        raise InvalidArgument(f"the hold's {what} {value!r} has unprintable characters")
    return value


def _when(expires_at: float) -> str:
    if expires_at == float("inf"):
        return "until released"
    stamp = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"until {stamp} (in {max(0.0, expires_at - time.time()):.0f} s)"


class Holds:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._holds: dict[str, dict[str, HoldRecord]] = {}

    def load(self) -> None:
        """Take the holds the store remembers (start-up); expired ones are dropped."""
        now = time.time()
        with self._lock:
            for hold in self._store.load_holds():
                if hold.expires_at > now:
                    self._holds.setdefault(hold.region, {})[hold.holder] = hold

    def hold(self, region: str, holder: str, reason: str, ttl: float) -> HoldRecord:
        holder = _check_text("holder", holder, MAX_HOLDER, empty_ok=False)
        reason = _check_text("reason", reason, MAX_REASON, empty_ok=True)
        if not 0 < ttl <= MAX_TTL:  # also refuses NaN
            raise InvalidArgument(
                f"ttl_seconds {ttl} is out of range: more than 0, at most {MAX_TTL:.0f}"
            )
        record = HoldRecord(region, holder, reason, time.time() + ttl)
        with self._lock:
            self._store.put_hold(record)  # durable before the caller relies on it
            self._holds.setdefault(region, {})[holder] = record
        return record

    def release(self, region: str, holder: str) -> bool:
        with self._lock:
            held = self._holds.get(region, {})
            if holder not in held:
                return False
            self._store.delete_hold(region, holder)
            record = held.pop(holder)
            if not held:
                del self._holds[region]
        return record.expires_at > time.time()

    def check(self, region: str, verb: str) -> None:
        """Raise FailedPrecondition naming the holders if the region is held."""
        now = time.time()
        with self._lock:
            live = [h for h in self._holds.get(region, {}).values() if h.expires_at > now]
        if not live:
            return
        who = "; ".join(
            f"{h.holder!r}" + (f" ({h.reason})" if h.reason else "") + f" {_when(h.expires_at)}"
            for h in live
        )
        first = live[0].holder
        raise FailedPrecondition(
            f"cannot {verb} region {region!r}: it is held by {who}; wait for the holder to "
            f"finish, or release the hold with `memplug release {region} --holder '{first}'`",
            region=region,
        )

    def forget(self, region: str) -> None:
        """The region was deleted: its (expired) holds go with it (the store drops them too)."""
        with self._lock:
            self._holds.pop(region, None)
