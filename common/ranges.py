"""Byte ranges and sets of them (pure, no I/O)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
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


MAX_RANGES = 4096  # ranges in one call: bounds the intent, the lock and the error scan


@dataclass(frozen=True)
class RangeList:
    """The ranges of one call, ascending and disjoint (one, or a client's list)."""

    ranges: tuple[Range, ...]

    def __iter__(self) -> Iterator[Range]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    @property
    def span(self) -> Range:
        """From the first byte of the first range to the end of the last."""
        first, last = self.ranges[0], self.ranges[-1]
        return Range(first.offset, last.end - first.offset)

    @property
    def total(self) -> int:
        return sum(r.length for r in self.ranges)

    def __str__(self) -> str:
        if len(self.ranges) == 1:
            return str(self.ranges[0])
        return f"{len(self.ranges)} ranges of {format_size(self.total)} in {self.span}"


def check_count(count: int, *, what: str) -> None:
    """Refuse a list of more than MAX_RANGES ranges, before looking at any of them."""
    if count > MAX_RANGES:
        raise InvalidArgument(
            f"{what}: {count} ranges in one call, at most {MAX_RANGES}: split the list "
            "into several calls"
        )


def check_ranges(
    pairs: Sequence[tuple[int, int]], *, size: int, align: int, what: str
) -> RangeList:
    """Validate a list of (offset, length), each as check_range does, none overlapping.

    Errors name the index of the range at fault in the list as given.
    """
    if not pairs:
        raise InvalidArgument(f"{what}: the list of ranges is empty")
    check_count(len(pairs), what=what)
    checked = [
        (check_range(offset, length, size=size, align=align, what=f"{what}: range {i}"), i)
        for i, (offset, length) in enumerate(pairs)
    ]
    checked.sort(key=lambda pair: pair[0].offset)  # ints: a dataclass compare is slow
    for (a, i), (b, j) in itertools.pairwise(checked):
        if a.overlaps(b):
            first, second = sorted((i, j))
            raise InvalidArgument(
                f"{what}: ranges {first} and {second} overlap ({a} and {b}); list each block once"
            )
    return RangeList(tuple(r for r, _ in checked))


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
