"""Range, check_range, format_size, parse_size and IntervalSet (pure, no kernel)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memplug.common.errors import InvalidArgument, OutOfRange
from memplug.common.ranges import (
    MAX_RANGES,
    IntervalSet,
    Range,
    RangeList,
    check_range,
    check_ranges,
    subtract,
)
from memplug.common.sizes import GiB, KiB, MiB, format_size, parse_size

TiB = 1 << 40

# --------------------------------------------------------------------------- Range


def test_range_end_and_overlap() -> None:
    a = Range(4 * MiB, 2 * MiB)
    assert a.end == 6 * MiB
    assert a.overlaps(Range(5 * MiB, 4 * MiB))
    assert a.overlaps(Range(0, 5 * MiB))
    assert a.overlaps(Range(4 * MiB, 1))
    # Touching ranges share no byte.
    assert not a.overlaps(Range(6 * MiB, 2 * MiB))
    assert not a.overlaps(Range(2 * MiB, 2 * MiB))
    assert not a.overlaps(Range(64 * MiB, 2 * MiB))


def test_range_str_is_hex_offset_and_size() -> None:
    assert str(Range(0x200000, 4 * MiB)) == "[0x200000, +4 MiB)"


# --------------------------------------------------------------------------- check_range

SIZE = 64 * MiB
ALIGN = 2 * MiB


def test_check_range_accepts_aligned_ranges_inside_the_region() -> None:
    assert check_range(2 * MiB, 4 * MiB, size=SIZE, align=ALIGN, what="plug") == Range(
        2 * MiB, 4 * MiB
    )
    # The whole region, and the last block, are fine.
    assert check_range(0, SIZE, size=SIZE, align=ALIGN, what="plug") == Range(0, SIZE)
    assert check_range(SIZE - ALIGN, ALIGN, size=SIZE, align=ALIGN, what="plug") == Range(
        SIZE - ALIGN, ALIGN
    )


@pytest.mark.parametrize("length", [0, -ALIGN])
def test_check_range_rejects_empty_and_negative_lengths(length: int) -> None:
    with pytest.raises(InvalidArgument, match="length must be > 0"):
        check_range(0, length, size=SIZE, align=ALIGN, what="plug of 'vm'")


@pytest.mark.parametrize(
    ("offset", "length"),
    [(4096, ALIGN), (0, ALIGN + 4096), (1, ALIGN), (ALIGN, 1), (2**64 - 1, ALIGN)],
)
def test_check_range_rejects_misaligned_ranges(offset: int, length: int) -> None:
    with pytest.raises(InvalidArgument, match=r"multiples of the block size \(2 MiB\)") as info:
        check_range(offset, length, size=SIZE, align=ALIGN, what="plug of 'vm'")
    assert info.value.message.startswith("plug of 'vm':")


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE, ALIGN),  # starts at the end
        (SIZE - ALIGN, 2 * ALIGN),  # runs past the end
        (0, SIZE + ALIGN),
        (2**64 - ALIGN, ALIGN),  # an offset a C uint64 could hold, far past the end
        (ALIGN, 2**64 - ALIGN),  # offset + length wraps to 0 in 64 bits
        (2**63, 2**63),  # ... and so does this one
        (2**64 - ALIGN, 2**64 - ALIGN),
    ],
)
def test_check_range_rejects_ranges_past_the_end_even_when_they_wrap(
    offset: int, length: int
) -> None:
    with pytest.raises(OutOfRange, match="exceeds the region's size of 64 MiB"):
        check_range(offset, length, size=SIZE, align=ALIGN, what="plug")


def test_check_range_rejects_a_negative_offset() -> None:
    # The engine's API takes Python ints; a negative offset must never reach
    # fallocate (which would answer EINVAL, reported as an internal error).
    with pytest.raises((InvalidArgument, OutOfRange)):
        check_range(-ALIGN, ALIGN, size=SIZE, align=ALIGN, what="plug")


# --------------------------------------------------------------------------- format_size


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (4 * KiB, "4 KiB"),
        (1536, "1.5 KiB"),
        (2 * MiB, "2 MiB"),
        (1536 * MiB, "1536 MiB"),  # exact in MiB beats an inexact 1.5 GiB
        (GiB, "1 GiB"),
        (64 * GiB, "64 GiB"),
        (21 * GiB // 2, "10.5 GiB"),
        (3 * TiB, "3 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=2**64))
@example(1280)  # 1.25 KiB prints as 1.2 KiB
def test_format_size_is_exact_or_close(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB"}
    if "." not in number:
        # An integer form is exact: it reads back as n.
        assert parse_size(number + unit) == n
    else:
        scale = {"KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}[unit]
        assert abs(float(number) * scale - n) <= 0.0501 * scale  # .1f rounds by <= 0.05


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("1GiB", GiB),
        ("1gib", GiB),
        ("64MB", 64 * MiB),
        ("0x200000", 2 * MiB),
        ("0X200000", 2 * MiB),
        ("4096", 4096),
        ("4k", 4 * KiB),
        ("1T", TiB),
        ("1.5G", 3 * GiB // 2),
        (" 64m ", 64 * MiB),
        ("1_024", 1024),
        ("0", 0),
        ("100b", 100),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "G", "12Q", "1bk", "k1", "1..5M", "1e3", "0x", "0xZZ", "0x1G", "-1", "1.5"],
)
def test_parse_size_rejects_bad_input(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_parse_size_rejects_a_number_too_large_for_a_float() -> None:
    # float() of a 400-digit number is inf; inf bytes must be an InvalidArgument
    # like any other bad size, not an OverflowError escaping from int(inf).
    with pytest.raises(InvalidArgument):
        parse_size("1" * 400 + ".0")


@settings(deadline=None)
@given(st.text(alphabet="0123456789.xXkKmMgGtTiIbB_- ", max_size=12))
def test_parse_size_returns_bytes_or_raises_invalid_argument(text: str) -> None:
    try:
        value = parse_size(text)
    except InvalidArgument:
        return
    assert isinstance(value, int)
    assert value >= 0


# --------------------------------------------------------------------------- IntervalSet

UNIT = 4096
BASE = 1 << 40  # far from 0: nothing may assume small offsets
BLOCKS = 48


def runs(blocks: set[int]) -> list[Range]:
    """Maximal runs of consecutive block indices, as byte ranges."""
    out: list[Range] = []
    for b in sorted(blocks):
        if out and out[-1].end == BASE + b * UNIT:
            out[-1] = Range(out[-1].offset, out[-1].length + UNIT)
        else:
            out.append(Range(BASE + b * UNIT, UNIT))
    return out


def to_range(start: int, count: int) -> Range:
    return Range(BASE + start * UNIT, count * UNIT)


def blocks_of(start: int, count: int) -> set[int]:
    return set(range(start, start + count))


def check_invariants(s: IntervalSet, model: set[int]) -> None:
    ranges = list(s)
    assert all(r.length > 0 for r in ranges)
    for a, b in itertools.pairwise(ranges):
        assert a.end < b.offset, f"{a} and {b} are not sorted, disjoint and non-adjacent"
    assert ranges == runs(model)
    assert len(s) == len(ranges)
    assert s.total == len(model) * UNIT


block = st.integers(min_value=0, max_value=BLOCKS)
count = st.integers(min_value=0, max_value=16)
op = st.tuples(st.booleans(), block, count)


@settings(deadline=None, max_examples=300)
@given(st.lists(op, max_size=40), st.lists(st.tuples(block, count), max_size=10))
def test_interval_set_matches_a_set_of_blocks(
    ops: list[tuple[bool, int, int]], queries: list[tuple[int, int]]
) -> None:
    s = IntervalSet()
    model: set[int] = set()
    for is_add, start, n in ops:
        if is_add:
            s.add(to_range(start, n))
            model |= blocks_of(start, n)
        else:
            s.remove(to_range(start, n))
            model -= blocks_of(start, n)
        check_invariants(s, model)
    for start, n in queries:
        q = to_range(start, n)
        wanted = blocks_of(start, n)
        if n:
            assert s.intersection(q) == runs(model & wanted)
        assert s.gaps(q) == runs(wanted - model)
        assert s.covers(q) == (wanted <= model)


@settings(deadline=None)
@given(st.lists(st.tuples(block, count), max_size=12))
def test_interval_set_built_from_unordered_overlapping_ranges(
    pieces: list[tuple[int, int]],
) -> None:
    model: set[int] = set()
    for start, n in pieces:
        model |= blocks_of(start, n)
    s = IntervalSet(to_range(start, n) for start, n in pieces)
    check_invariants(s, model)


@settings(deadline=None)
@given(
    st.lists(st.tuples(block, count), max_size=10), st.lists(st.tuples(block, count), max_size=10)
)
def test_subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> None:
    have: set[int] = set()
    for start, n in ranges:
        have |= blocks_of(start, n)
    for start, n in holes:
        have -= blocks_of(start, n)
    got = subtract(
        [to_range(start, n) for start, n in ranges], [to_range(start, n) for start, n in holes]
    )
    assert got == runs(have)


def test_interval_set_examples() -> None:
    s = IntervalSet()
    s.add(Range(0, 2 * MiB))
    s.add(Range(4 * MiB, 2 * MiB))
    assert list(s) == [Range(0, 2 * MiB), Range(4 * MiB, 2 * MiB)]
    s.add(Range(2 * MiB, 2 * MiB))  # fills the gap: all three merge
    assert list(s) == [Range(0, 6 * MiB)]
    s.remove(Range(MiB, 2 * MiB))
    assert list(s) == [Range(0, MiB), Range(3 * MiB, 3 * MiB)]
    assert s.gaps(Range(0, 8 * MiB)) == [Range(MiB, 2 * MiB), Range(6 * MiB, 2 * MiB)]
    assert s.intersection(Range(0, 4 * MiB)) == [Range(0, MiB), Range(3 * MiB, MiB)]
    assert s.covers(Range(3 * MiB, 3 * MiB))
    assert not s.covers(Range(0, 2 * MiB))
    assert s.total == 4 * MiB


# --------------------------------------------------------------------------- lists of ranges


def in_region(pairs: list[tuple[int, int]], size: int = 64 * MiB) -> RangeList:
    """check_ranges for a region of size with 2 MiB blocks."""
    return check_ranges(pairs, size=size, align=2 * MiB, what="plug of 'vm0'")


def test_check_ranges_sorts_the_list_and_lets_ranges_touch() -> None:
    got = in_region([(8 * MiB, 2 * MiB), (0, 2 * MiB), (2 * MiB, 4 * MiB)])
    assert got == RangeList((Range(0, 2 * MiB), Range(2 * MiB, 4 * MiB), Range(8 * MiB, 2 * MiB)))
    assert got.total == 8 * MiB and got.span == Range(0, 10 * MiB)
    assert str(got) == "3 ranges of 8 MiB in [0x0, +10 MiB)"
    assert str(RangeList((Range(0, 2 * MiB),))) == str(Range(0, 2 * MiB))


@pytest.mark.parametrize(
    ("pairs", "error", "says"),
    [
        ([(0, 4 * MiB), (8 * MiB, 2 * MiB), (2 * MiB, 2 * MiB)], InvalidArgument, "ranges 0 and 2"),
        ([(4 * MiB, 2 * MiB), (4 * MiB, 2 * MiB)], InvalidArgument, "ranges 0 and 1 overlap"),
        ([(0, 2 * MiB), (3 * MiB, 2 * MiB)], InvalidArgument, "range 1: offset"),
        ([(0, 2 * MiB), (2 * MiB, 0)], InvalidArgument, "range 1: length must be > 0"),
        ([(0, 2 * MiB), (2 * MiB, 2 * MiB), (64 * MiB, 2 * MiB)], OutOfRange, "range 2: range"),
        ([], InvalidArgument, "the list of ranges is empty"),
    ],
)
def test_check_ranges_names_the_bad_range(
    pairs: list[tuple[int, int]], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        in_region(pairs)


def test_check_ranges_caps_the_count() -> None:
    pairs = [(i * 2 * MiB, 2 * MiB) for i in range(MAX_RANGES + 1)]
    size = (MAX_RANGES + 1) * 2 * MiB
    assert len(in_region(pairs[:MAX_RANGES], size)) == MAX_RANGES
    with pytest.raises(InvalidArgument, match=f"at most {MAX_RANGES}"):
        in_region(pairs, size)


@settings(deadline=None)  # a loaded machine stalls single examples
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), min_size=1, max_size=12))
def test_check_ranges_accepts_exactly_the_lists_of_disjoint_blocks(
    blocks: list[tuple[int, int]],
) -> None:
    pairs = [(start * 2 * MiB, n * 2 * MiB) for start, n in blocks]
    covered = [b for start, n in blocks for b in range(start, start + n)]
    disjoint = len(covered) == len(set(covered))
    inside = all(start + n <= 32 for start, n in blocks)
    try:
        got = in_region(pairs)
    except OutOfRange:
        assert not inside
        return
    except InvalidArgument:
        assert inside and not disjoint
        return
    assert inside and disjoint
    assert list(got) == sorted(Range(o, n) for o, n in pairs)
