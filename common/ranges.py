"""Byte ranges and sets of them (pure, no I/O)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memplug.common.errors import InvalidArgument, OutOfRange
from memplug.common.sizes import format_size


@dataclass(frozen=True, order=True)
class Range:
    """[offset, offset + length), in bytes."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, other: Range) -> bool:
        return self.offset < other.end and other.offset < self.end

    def __str__(self) -> str:
        return f"[{self.offset:#x}, +{format_size(self.length)})"


def check_range(offset: int, length: int, *, size: int, align: int, what: str) -> Range:
    """Validate a request range against a region of `size` with `align`-sized blocks."""
    if length <= 0:
        raise InvalidArgument(f"{what}: length must be > 0")
    if offset < 0:
        raise InvalidArgument(f"{what}: offset must be >= 0")
    if offset % align or length % align:
        raise InvalidArgument(
            f"{what}: offset {offset:#x} and length {length:#x} must be multiples "
            f"of the block size ({format_size(align)})"
        )
    if offset >= size or length > size - offset:
        raise OutOfRange(
            f"{what}: range [{offset:#x}, {offset + length:#x}) exceeds the region's "
            f"size of {format_size(size)} ({size:#x})"
        )
    return Range(offset, length)


class IntervalSet:
    """A set of bytes kept as sorted, disjoint, non-adjacent ranges.

    Size-independent: a 1 TiB region costs nothing until it fragments.
    Not thread-safe; the owner holds a lock.
    """

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for r in ranges:
            self.add(r)

    def __iter__(self) -> Iterator[Range]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield Range(start, end - start)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def add(self, r: Range) -> None:
        if r.length <= 0:
            return
        start, end = r.offset, r.end
        # First interval that ends at or after start (adjacent ones merge too).
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, r: Range) -> None:
        if r.length <= 0:
            return
        start, end = r.offset, r.end
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        if self._starts[lo] < start:
            keep_starts.append(self._starts[lo])
            keep_ends.append(start)
        if self._ends[hi - 1] > end:
            keep_starts.append(end)
            keep_ends.append(self._ends[hi - 1])
        self._starts[lo:hi] = keep_starts
        self._ends[lo:hi] = keep_ends

    def intersection(self, r: Range) -> list[Range]:
        """Parts of r inside the set, in order."""
        out = []
        i = bisect.bisect_right(self._ends, r.offset)
        while i < len(self._starts) and self._starts[i] < r.end:
            s, e = max(self._starts[i], r.offset), min(self._ends[i], r.end)
            out.append(Range(s, e - s))
            i += 1
        return out

    def gaps(self, r: Range) -> list[Range]:
        """Parts of r outside the set, in order."""
        out = []
        pos = r.offset
        for inside in self.intersection(r):
            if inside.offset > pos:
                out.append(Range(pos, inside.offset - pos))
            pos = inside.end
        if pos < r.end:
            out.append(Range(pos, r.end - pos))
        return out

    def covers(self, r: Range) -> bool:
        return not self.gaps(r)


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> list[Range]:
    """ranges minus holes, both given in any order."""
    remaining = IntervalSet(ranges)
    for h in holes:
        remaining.remove(h)
    return list(remaining)
