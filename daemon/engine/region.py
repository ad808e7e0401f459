"""A region: a backing fd, its frozen configuration, and which blocks are plugged."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from memplug.common.errors import InvalidArgument, OutOfRange
from memplug.common.ranges import IntervalSet, Range, RangeList, check_range, check_ranges
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind
from memplug.daemon.engine.rangelock import RangeLock
from memplug.daemon.kernel.ops import Mapping as Mapping_
from memplug.daemon.state.records import Access, Acl, Placement, RegionOptions, RegionRecord

# The region's configuration types are the ones its record keeps (state/records.py).
__all__ = [
    "Access",
    "Acl",
    "Placement",
    "Region",
    "RegionInfo",
    "RegionOptions",
    "RegionSpec",
    "check_labels",
    "check_name",
]

log = logging.getLogger("memplug.engine")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,252}")
MAX_LABELS = 64
MAX_LABEL_VALUE = 1024


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid region name {name!r}: use 1-63 characters of a-z, 0-9, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return name


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}); at most {MAX_LABELS}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"invalid label key {key!r}: 1-253 characters of A-Z, a-z, 0-9, '.', '_', "
                "'/' and '-', starting with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE or "\0" in value:
            raise InvalidArgument(
                f"label {key!r}: value must be at most {MAX_LABEL_VALUE} characters, no NUL"
            )
    return dict(labels)


@dataclass(frozen=True)
class RegionSpec:
    """What CreateRegion asks for, before defaults are applied."""

    name: str
    size: int
    backing: BackingKind | None
    page_size: int = 0
    block_size: int = 0
    path: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    acl: Acl = field(default_factory=Acl)
    thp: bool | None = None  # None: when the kernel allows it (SHMEM)
    placement: Placement = field(default_factory=Placement)
    lock: bool = False
    charge_cgroup: str = ""  # "": the daemon's own memory cgroup
    charge_to_peer: bool = False  # charged to the cgroups of its first attacher


@dataclass(frozen=True)
class RegionInfo:
    """A snapshot of a region, as the API reports it."""

    name: str
    size: int
    backing: BackingKind
    page_size: int
    block_size: int
    path: str
    labels: Mapping[str, str]
    plugged: tuple[Range, ...]
    plugged_bytes: int
    allocated_bytes: int
    created_at: float
    acl: Acl
    options: RegionOptions
    operations_running: int
    # Bytes the kernel allocated to the region outside its plugged blocks (by
    # holders of its fd), counted by the quota; 0 for FILE regions (disk).
    allocated_outside_plugged: int = 0
    damage: str = ""  # why the region cannot be used any more ("": it can)


class Region:
    """Configuration is frozen at creation; only the plugged set changes.

    `plugged` is guarded by `mutex` (held briefly, never across syscalls);
    work on ranges is serialized by `locks` (held for the whole operation).
    """

    def __init__(
        self,
        name: str,
        backing: Backing,
        block_size: int,
        labels: Mapping[str, str],
        created_at: float,
        acl: Acl,
        options: RegionOptions | None = None,
    ) -> None:
        self.name = name
        self.acl = acl
        self.options = options or RegionOptions()
        self.lock_map: Mapping_ | None = None  # whole-region mapping holding mlocks
        self.backing = backing
        self.block_size = block_size
        self.labels = dict(labels)
        self.created_at = created_at
        self.plugged = IntervalSet()
        # Unplugged ranges whose memory is allocated anyway (a warm-pool memfd):
        # plugging them is bookkeeping. Counted by the quota like plugged bytes.
        self.prebacked = IntervalSet()
        self.mutex = threading.Lock()
        self.locks = RangeLock()
        self.active = 0  # operations in flight; guarded by the engine's lock
        # Bytes running plugs reserved in the quota and are allocating, not yet
        # in `plugged`: not allocated outside plugged blocks. Guarded by mutex.
        self.reserved = 0
        # Why the region is damaged (its file resized from outside); guarded by mutex.
        self.damage: str | None = None

    @property
    def size(self) -> int:
        return self.backing.size

    def range_of(self, offset: int, length: int, op: str) -> Range:
        """The request's range, checked against this region's size and block size.

        length 0 means "to the end of the region", so that a caller can name the
        whole region (or its tail) without asking for its size first; an offset
        at or past the end then leaves nothing and is out of range.
        """
        what = f"{op} of {self.name!r}"
        if length == 0:
            if offset >= self.size:
                raise OutOfRange(
                    f"{what}: offset {offset:#x} is at or past the end of the region "
                    f"({format_size(self.size)}, {self.size:#x}): nothing left to the end"
                )
            length = self.size - offset
        return check_range(offset, length, size=self.size, align=self.block_size, what=what)

    def ranges_of(
        self, offset: int, length: int, pairs: Sequence[tuple[int, int]], op: str
    ) -> RangeList:
        """The request's ranges: offset and length (see range_of), or a list of them.

        A list replaces offset and length, which must then be 0: a request that
        sets both is ambiguous, and guessing would plug memory nobody asked for.
        """
        if not pairs:
            return RangeList((self.range_of(offset, length, op),))
        what = f"{op} of {self.name!r}"
        if offset or length:
            raise InvalidArgument(
                f"{what}: give either offset and length or a list of ranges, not both "
                f"(offset {offset:#x}, length {length:#x} and {len(pairs)} ranges)"
            )
        return check_ranges(pairs, size=self.size, align=self.block_size, what=what)

    def detect_damage(self) -> int:
        """Compare the backing with the region; mark the region damaged if it changed.

        Plugged blocks that are no longer inside the file are forgotten (they
        are gone: touching them raises SIGBUS). Returns the bytes forgotten,
        whose quota the caller gives back.
        """
        found = self.backing.resized()
        if found is None:
            return 0
        now, why = found
        inside = Range(0, min(self.size, now) // self.block_size * self.block_size)
        with self.mutex:
            if self.damage is None:
                log.warning("region %s is damaged: %s", self.name, why)
            self.damage = why
            gone = [p for p in self.plugged if p.end > inside.end]
            lost = 0
            for p in gone:
                cut = Range(max(p.offset, inside.end), p.end - max(p.offset, inside.end))
                self.plugged.remove(cut)
                lost += cut.length
        return lost

    def allocated_outside_plugged(self, allocated: int | None = None) -> int:
        """Bytes holders allocated outside the plugged blocks (0 where it is not memory)."""
        if not self.backing.holders_allocate_memory:
            return 0
        if allocated is None:
            allocated = self.backing.allocated_bytes()
        with self.mutex:
            counted = self.plugged.total + self.prebacked.total + self.reserved
        return max(0, allocated - counted)

    def label_match(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())

    def record(self) -> RegionRecord:
        """What the store keeps of this region (its JSON form is the store's business)."""
        with self.mutex:
            plugged = tuple(self.plugged)
        return RegionRecord(
            name=self.name,
            size=self.size,
            backing=self.backing.kind.value,
            page_size=self.backing.page_size,
            block_size=self.block_size,
            path=self.backing.path,
            labels=dict(self.labels),
            acl=self.acl,
            created_at=self.created_at,
            plugged=plugged,
            options=self.options,
        )

    def info(self, *, in_call: bool = False) -> RegionInfo:
        """A snapshot; in_call: taken by a running call for its own result, which
        then describes the region as that call leaves it (not counting itself)."""
        with self.mutex:
            plugged = tuple(self.plugged)
            damage = self.damage or ""
        allocated = self.backing.allocated_bytes()
        return RegionInfo(
            name=self.name,
            size=self.size,
            backing=self.backing.kind,
            page_size=self.backing.page_size,
            block_size=self.block_size,
            path=self.backing.path,
            labels=dict(self.labels),
            plugged=plugged,
            plugged_bytes=sum(p.length for p in plugged),
            allocated_bytes=allocated,
            created_at=self.created_at,
            acl=self.acl,
            options=self.options,
            # Written under the engine's lock; a snapshot needs no lock to read it.
            operations_running=max(0, self.active - in_call),
            allocated_outside_plugged=self.allocated_outside_plugged(allocated),
            damage=damage,
        )
