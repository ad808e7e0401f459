"""The strategy rules and the slicing of work over threads (pure)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memplug.common.errors import FailedPrecondition
from memplug.common.ranges import Range
from memplug.common.sizes import GiB, KiB, MiB
from memplug.daemon.engine.strategy import (
    CHUNK_BYTES,
    MIN_BYTES_PER_THREAD,
    Plan,
    Strategy,
    make_plan,
    plug_strategy,
    populate_strategy,
)

# --------------------------------------------------------------------------- strategies


@pytest.mark.parametrize(
    ("hugetlb", "requested", "has_populate", "strategy"),
    [
        # AUTO: hugetlb populates (scales with threads) when it can, else fallocates.
        (True, Strategy.AUTO, True, Strategy.POPULATE_WRITE),
        (True, Strategy.AUTO, False, Strategy.FALLOCATE),
        # AUTO: shmem and FILE always fallocate (faster than populating 4 KiB pages).
        (False, Strategy.AUTO, True, Strategy.FALLOCATE),
        (False, Strategy.AUTO, False, Strategy.FALLOCATE),
        # What the caller asks for wins.
        (True, Strategy.FALLOCATE, True, Strategy.FALLOCATE),
        (False, Strategy.FALLOCATE, True, Strategy.FALLOCATE),
        (True, Strategy.FALLOCATE, False, Strategy.FALLOCATE),
        (False, Strategy.POPULATE_WRITE, True, Strategy.POPULATE_WRITE),
        (True, Strategy.POPULATE_WRITE, True, Strategy.POPULATE_WRITE),
    ],
)
def test_plug_strategy(
    hugetlb: bool, requested: Strategy, has_populate: bool, strategy: Strategy
) -> None:
    assert (
        plug_strategy(hugetlb=hugetlb, requested=requested, has_populate=has_populate) is strategy
    )


@pytest.mark.parametrize("hugetlb", [True, False])
def test_populate_write_requested_without_madvise_support_is_a_failed_precondition(
    hugetlb: bool,
) -> None:
    with pytest.raises(FailedPrecondition, match="MADV_POPULATE_WRITE"):
        plug_strategy(hugetlb=hugetlb, requested=Strategy.POPULATE_WRITE, has_populate=False)


@pytest.mark.parametrize(
    ("write", "has_populate", "strategy"),
    [
        (True, True, Strategy.POPULATE_WRITE),
        (False, True, Strategy.POPULATE_READ),
        (True, False, Strategy.TOUCH_READ),
        (False, False, Strategy.TOUCH_READ),
    ],
)
def test_populate_strategy(write: bool, has_populate: bool, strategy: Strategy) -> None:
    assert populate_strategy(write=write, has_populate=has_populate) is strategy


def test_strategy_values_are_the_strategy_names_the_api_reports() -> None:
    assert [m.value for m in Strategy] == [
        "auto",
        "fallocate",
        "populate-write",
        "populate-read",
        "touch-read",
        "warm-pool",
        "none",
    ]


# --------------------------------------------------------------------------- make_plan

ALIGNS = [4 * KiB, 2 * MiB, 64 * MiB, 128 * MiB, GiB]


@st.composite
def work_lists(draw: st.DrawFn) -> tuple[int, list[Range]]:
    """(align, sorted disjoint aligned ranges), as the gaps of a region would be."""
    align = draw(st.sampled_from(ALIGNS))
    limit = max(1, (16 * GiB) // align)  # blocks in a 16 GiB region
    n = draw(st.integers(min_value=1, max_value=6))
    cuts = sorted(draw(st.sets(st.integers(0, min(limit, 4096)), min_size=2, max_size=2 * n)))
    if len(cuts) % 2:
        cuts.pop()
    work = [Range(a * align, (b - a) * align) for a, b in zip(cuts[::2], cuts[1::2], strict=True)]
    return align, work


def merged(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for r in ranges:
        if out and out[-1].end == r.offset:
            out[-1] = Range(out[-1].offset, out[-1].length + r.length)
        else:
            out.append(r)
    return out


def check_plan(plan: Plan, work: list[Range], align: int) -> None:
    # Every piece is aligned and nonempty.
    for p in plan.pieces:
        assert p.length > 0
        assert p.offset % align == 0 and p.length % align == 0, f"{p} not cut at {align}"
    # The chunks, in the order the workers take them, are exactly the work in
    # address order: each byte once, nothing else, each chunk whole blocks.
    chunks = [Range(o, n) for o, n in plan.chunks()]
    for c in chunks:
        assert 0 < c.length <= plan.chunk
        assert c.offset % align == 0 and c.length % align == 0, f"chunk {c} not cut at {align}"
    assert merged(chunks) == merged(work)
    assert plan.total == sum(r.length for r in work)
    # The chunk (progress and cancel granularity) is a multiple of align.
    assert plan.chunk >= align and plan.chunk % align == 0
    assert plan.chunk == max(align, CHUNK_BYTES)


@settings(deadline=None)
@given(work_lists(), st.integers(min_value=1, max_value=64))
@example((GiB, [Range(0, 5 * GiB)]), 4)
@example((2 * MiB, [Range(0, 145 * 2 * MiB)]), 3)
def test_make_plan_populate_splits_over_threads(
    align_work: tuple[int, list[Range]], max_threads: int
) -> None:
    align, work = align_work
    plan = make_plan(Strategy.POPULATE_WRITE, work, max_threads=max_threads, align=align)
    check_plan(plan, work, align)
    total = plan.total
    # One thread per 64 MiB at most, no more than asked, at least one; and no
    # more than there are blocks to hand out (a thread cannot take half a block).
    wanted = max(1, min(max_threads, total // MIN_BYTES_PER_THREAD, total // align))
    assert plan.threads == wanted, (
        f"{total // align} blocks of {align} over max {max_threads} threads: "
        f"got {plan.threads} threads"
    )
    # Enough chunks that no thread is left without one.
    assert len(list(plan.chunks())) >= plan.threads


@pytest.mark.parametrize("strategy", [Strategy.FALLOCATE, Strategy.TOUCH_READ])
@settings(deadline=None)
@given(align_work=work_lists(), max_threads=st.integers(min_value=1, max_value=64))
def test_make_plan_fallocate_and_touch_use_one_thread(
    strategy: Strategy, align_work: tuple[int, list[Range]], max_threads: int
) -> None:
    align, work = align_work
    plan = make_plan(strategy, work, max_threads=max_threads, align=align)
    check_plan(plan, work, align)
    assert plan.threads == 1
    assert plan.strategy is strategy


@pytest.mark.parametrize(
    ("total", "max_threads", "threads"),
    [
        (64 * MiB, 16, 1),
        (127 * MiB + MiB, 16, 2),
        (GiB, 2, 2),
        (GiB, 16, 16),
        (GiB, 64, 16),
        (32 * MiB, 8, 1),
        (2 * MiB, 1, 1),
    ],
)
def test_make_plan_thread_count_examples(total: int, max_threads: int, threads: int) -> None:
    plan = make_plan(
        Strategy.POPULATE_WRITE, [Range(0, total)], max_threads=max_threads, align=2 * MiB
    )
    assert plan.threads == threads
    check_plan(plan, [Range(0, total)], 2 * MiB)


def test_make_plan_cuts_huge_page_blocks_whole() -> None:
    # 5 blocks of 1 GiB over 4 threads: 5 chunks of one block, pulled by 4 threads.
    plan = make_plan(Strategy.POPULATE_WRITE, [Range(0, 5 * GiB)], max_threads=4, align=GiB)
    assert plan.threads == 4
    assert list(plan.chunks()) == [(i * GiB, GiB) for i in range(5)]


def test_make_plan_hands_out_chunks_in_address_order() -> None:
    # Two gaps of a 1 GiB hugetlb region on 2 threads: 64 MiB chunks in address
    # order, one queue for both threads (not one contiguous half per thread).
    work = [Range(0, 512 * MiB), Range(640 * MiB, 384 * MiB)]
    plan = make_plan(Strategy.POPULATE_WRITE, work, max_threads=2, align=2 * MiB)
    assert plan.threads == 2
    offsets = [o for o, _ in plan.chunks()]
    assert offsets == [*range(0, 512 * MiB, 64 * MiB), *range(640 * MiB, GiB, 64 * MiB)]
