"""StateStore: the interface the engine writes through, and its records.

MUST hold for every implementation:
- each method returns only after its change is durable (committed);
- a crash at any point leaves the store as it was before or after a call,
  never in between;
- an intent is written before an operation touches memory and removed in the
  same transaction that records the operation's outcome, so an intent found at
  start-up marks exactly the ranges a crash may have left half-done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from memplug.common.ranges import Range
from memplug.daemon.state.records import HoldRecord, RegionOptions, RegionRecord

__all__ = ["HoldRecord", "Intent", "MemoryStore", "PoolKey", "RegionRecord", "StateStore"]

# A hugetlb pool: (page size, NUMA node), node None for the kernel-wide pool.
PoolKey = tuple[int, int | None]


@dataclass(frozen=True)
class Intent:
    """An operation in flight: op is "plug", "unplug" or "discard"."""

    id: int
    region: str
    op: str
    range: Range  # one call's range; for a list, from its first byte to its last
    keep: tuple[Range, ...] = field(default=())  # plug: data that predates it
    ranges: tuple[Range, ...] = field(default=())  # a call's list of ranges; (): range alone

    @property
    def parts(self) -> tuple[Range, ...]:
        """The ranges the operation works on (a list's gaps are not part of it)."""
        return self.ranges or (self.range,)


class StateStore(Protocol):
    def load(self) -> tuple[list[RegionRecord], list[Intent]]: ...

    def put_region(self, record: RegionRecord) -> None: ...

    def delete_region(self, name: str) -> None: ...

    def put_options(self, name: str, options: RegionOptions) -> None:
        """Replace a region's options (charge_to_peer's cgroups, found at its first attach)."""
        ...

    def mark_gone(self, name: str, reason: str) -> None:
        """Keep the record, flagged as lost, and drop its intents."""
        ...

    def begin(
        self,
        region: str,
        op: str,
        r: Range,
        keep: tuple[Range, ...] = (),
        ranges: tuple[Range, ...] = (),
    ) -> int:
        """Record an intent; returns its id. ranges: the list of a multi-range call, r its span."""
        ...

    def finish(self, intent: int | None, region: str, plugged: tuple[Range, ...]) -> None:
        """Record a region's plugged set and drop the intent, in one transaction."""
        ...

    def load_hugetlb_added(self) -> dict[PoolKey, int]:
        """Pages the daemon added to each hugetlb pool and has not given back."""
        ...

    def put_hugetlb_added(self, pool: PoolKey, pages: int) -> None: ...

    def load_holds(self) -> list[HoldRecord]: ...

    def put_hold(self, hold: HoldRecord) -> None:
        """Record a hold, replacing the same holder's hold on the region."""
        ...

    def delete_hold(self, region: str, holder: str) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Keeps nothing across processes: for engines that need no persistence (tests)."""

    def __init__(self) -> None:
        self._regions: dict[str, RegionRecord] = {}
        self._intents: dict[int, Intent] = {}
        self._holds: dict[tuple[str, str], HoldRecord] = {}
        self._next = 1
        self._hugetlb_added: dict[PoolKey, int] = {}

    def load(self) -> tuple[list[RegionRecord], list[Intent]]:
        return list(self._regions.values()), list(self._intents.values())

    def put_region(self, record: RegionRecord) -> None:
        self._regions[record.name] = record

    def put_options(self, name: str, options: RegionOptions) -> None:
        if name in self._regions:
            self._regions[name] = dataclasses.replace(self._regions[name], options=options)

    def delete_region(self, name: str) -> None:
        self._regions.pop(name, None)
        for key in [k for k in self._holds if k[0] == name]:
            del self._holds[key]
        for i in [i for i, it in self._intents.items() if it.region == name]:
            del self._intents[i]

    def mark_gone(self, name: str, reason: str) -> None:
        if name in self._regions:
            self._regions[name] = dataclasses.replace(self._regions[name], gone=reason)
        for i in [i for i, it in self._intents.items() if it.region == name]:
            del self._intents[i]

    def begin(
        self,
        region: str,
        op: str,
        r: Range,
        keep: tuple[Range, ...] = (),
        ranges: tuple[Range, ...] = (),
    ) -> int:
        ident, self._next = self._next, self._next + 1
        self._intents[ident] = Intent(ident, region, op, r, keep, ranges)
        return ident

    def finish(self, intent: int | None, region: str, plugged: tuple[Range, ...]) -> None:
        if region in self._regions:
            self._regions[region] = dataclasses.replace(self._regions[region], plugged=plugged)
        if intent is not None:
            self._intents.pop(intent, None)

    def load_hugetlb_added(self) -> dict[PoolKey, int]:
        return dict(self._hugetlb_added)

    def put_hugetlb_added(self, pool: PoolKey, pages: int) -> None:
        self._hugetlb_added[pool] = pages

    def load_holds(self) -> list[HoldRecord]:
        return list(self._holds.values())

    def put_hold(self, hold: HoldRecord) -> None:
        self._holds[(hold.region, hold.holder)] = hold

    def delete_hold(self, region: str, holder: str) -> None:
        self._holds.pop((region, holder), None)

    def close(self) -> None:
        pass
