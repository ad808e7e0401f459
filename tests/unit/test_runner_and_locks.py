"""Runner (chunks pulled by worker threads), CancelToken and RangeLock, with fake work."""

from __future__ import annotations

import errno
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from memplug.common.cancel import CancelToken
from memplug.common.errors import Cancelled, DeadlineExceeded
from memplug.common.ranges import Range
from memplug.daemon.engine.rangelock import RangeLock
from memplug.daemon.engine.runner import Runner
from memplug.daemon.engine.strategy import Plan, Strategy

WAIT = 5.0  # upper bound for things that should happen at once


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner(4)
    yield r
    r.shutdown()


def plan_of(*pieces: Range, threads: int, chunk: int) -> Plan:
    return Plan(Strategy.POPULATE_WRITE, pieces, threads, chunk)


def even_plan(threads: int, per_thread: int, chunk: int) -> Plan:
    return plan_of(Range(0, threads * per_thread), threads=threads, chunk=chunk)


class Recorder:
    """Work that records the chunks it was given (thread-safe)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.chunks: list[tuple[int, int]] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, offset: int, length: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.chunks.append((offset, length))
            self.threads.add(threading.get_ident())


# --------------------------------------------------------------------------- Runner


def test_runner_runs_every_chunk_once(runner: Runner) -> None:
    plan = plan_of(
        Range(0, 100), Range(200, 30), Range(300, 25), Range(1000, 10), threads=3, chunk=10
    )
    work = Recorder(delay=0.001)
    runner.run(plan, work, CancelToken())
    expected = (
        [(o, 10) for o in range(0, 100, 10)]
        + [(200, 10), (210, 10), (220, 10)]
        + [(300, 10), (310, 10), (320, 5)]
        + [(1000, 10)]
    )
    assert sorted(work.chunks) == sorted(expected)
    assert len(work.chunks) == len(expected)
    assert len(work.threads) > 1, "the chunks did not run on several threads"


def test_runner_a_held_back_worker_leaves_its_chunks_to_the_others(runner: Runner) -> None:
    # The worker that takes the first chunk is held back (as a thread whose CPU
    # the scheduler gives to someone else): the other worker takes every other
    # chunk meanwhile, instead of leaving a fixed share of them for it.
    by_thread: dict[int, list[int]] = {}
    lock = threading.Lock()

    def work(offset: int, length: int) -> None:
        if offset == 0:
            time.sleep(0.5)
        else:
            time.sleep(0.001)
        with lock:
            by_thread.setdefault(threading.get_ident(), []).append(offset)

    runner.run(plan_of(Range(0, 20), threads=2, chunk=1), work, CancelToken())
    held = next(chunks for chunks in by_thread.values() if 0 in chunks)
    assert held == [0], f"the held-back worker still had chunks of its own to do: {held}"
    assert sorted(o for chunks in by_thread.values() for o in chunks) == list(range(20))


def test_runner_progress_is_monotone_and_reaches_total(runner: Runner) -> None:
    # Progress goes to a client's stream: it must never go backwards, and its
    # last report must be the total. Tiny chunks on 4 threads, with the GIL
    # switching threads as often as it can, interleave the workers' reports.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            plan = even_plan(4, 1000, chunk=1)
            seen: list[int] = []
            totals: set[int] = set()

            def progress(
                done: int, total: int, seen: list[int] = seen, totals: set[int] = totals
            ) -> None:
                seen.append(done)
                totals.add(total)

            runner.run(plan, lambda offset, length: None, CancelToken(), progress)
            assert totals == {4000}
            assert len(seen) == 4000
            backwards = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
            assert not backwards, f"progress went backwards: {backwards[:5]}"
            assert seen[-1] == 4000
    finally:
        sys.setswitchinterval(old)


def test_runner_raises_the_real_error_not_the_cancellation_it_caused(runner: Runner) -> None:
    failed = threading.Event()
    returned: list[str] = []

    def work(offset: int, length: int) -> None:
        if offset == 0:
            # The first chunk: gives up when it sees the chunk at 100 fail (as a
            # worker whose token was cancelled would), but only after a while.
            try:
                assert failed.wait(WAIT)
                time.sleep(0.3)
                raise Cancelled("cancelled because a sibling failed")
            finally:
                returned.append("chunk 0")
        if offset == 100:
            failed.set()
            raise OSError(errno.ENOSPC, "fallocate: No space left on device")
        time.sleep(0.001)

    plan = plan_of(Range(0, 1200), threads=3, chunk=10)
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        runner.run(plan, work, CancelToken())
    assert info.value.errno == errno.ENOSPC
    # Chunk 0 was still sleeping when chunk 100 failed: run() waited for it.
    assert returned == ["chunk 0"]
    assert time.monotonic() - t0 >= 0.3


def test_runner_stops_the_other_workers_after_an_error(runner: Runner) -> None:
    work = Recorder(delay=0.002)

    def failing(offset: int, length: int) -> None:
        if offset == 50:
            raise OSError(errno.EFAULT, "madvise: Bad address")
        work(offset, length)

    plan = plan_of(Range(0, 2000), threads=2, chunk=1)
    with pytest.raises(OSError, match="Bad address"):
        runner.run(plan, failing, CancelToken())
    done = len(work.chunks)
    time.sleep(0.05)
    assert len(work.chunks) == done, "a worker still ran after run() raised"
    assert done < 1000, "the other worker ran on long after a chunk had failed"


def test_runner_cancel(runner: Runner) -> None:
    token = CancelToken()
    work = Recorder(delay=0.005)
    timer = threading.Timer(0.1, token.cancel, args=("cancelled by the test",))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="cancelled by the test"):
            runner.run(even_plan(2, 1000, chunk=1), work, token)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 2.0
    assert 0 < len(work.chunks) < 2000


def test_runner_deadline(runner: Runner) -> None:
    token = CancelToken(deadline=time.monotonic() + 0.1)
    work = Recorder(delay=0.005)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        runner.run(even_plan(2, 1000, chunk=1), work, token)
    assert time.monotonic() - t0 < 2.0
    assert 0 < len(work.chunks) < 2000


def test_runner_cancelled_before_it_starts_runs_nothing(runner: Runner) -> None:
    token = CancelToken()
    token.cancel()
    work = Recorder()
    with pytest.raises(Cancelled):
        runner.run(even_plan(2, 10, chunk=1), work, token)
    assert work.chunks == []


# --------------------------------------------------------------------------- CancelToken


def test_cancel_token() -> None:
    token = CancelToken()
    token.check()
    assert not token.cancelled and token.remaining() is None
    token.cancel("first reason")
    token.cancel("second reason")
    assert token.cancelled
    with pytest.raises(Cancelled, match="first reason"):
        token.check()
    assert token.wait(10.0) is True


def test_cancel_token_deadline() -> None:
    token = CancelToken(deadline=time.monotonic() + 0.05)
    token.check()
    t0 = time.monotonic()
    assert token.wait(10.0) is False  # cut short by the deadline, not cancelled
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(DeadlineExceeded):
        token.check()


# --------------------------------------------------------------------------- RangeLock


def holder(
    lock: RangeLock, r: Range, token: CancelToken, release: threading.Event
) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """A thread that takes r, sets `got`, and holds it until `release` is set."""
    got = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with lock.hold(r, token):
                got.set()
                release.wait(WAIT)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got, errors


@pytest.fixture
def release_all() -> Iterator[Callable[[], threading.Event]]:
    events: list[threading.Event] = []

    def make() -> threading.Event:
        e = threading.Event()
        events.append(e)
        return e

    yield make
    for e in events:
        e.set()


def test_range_lock_serializes_overlapping_holders(
    release_all: Callable[[], threading.Event],
) -> None:
    lock = RangeLock()
    release1 = release_all()
    t1, got1, errors1 = holder(lock, Range(0, 10), CancelToken(), release1)
    assert got1.wait(WAIT)
    _, got2, errors2 = holder(lock, Range(5, 10), CancelToken(), release_all())
    assert not got2.wait(0.2), "an overlapping range was taken while held"
    release1.set()
    t1.join(WAIT)
    assert got2.wait(WAIT), "the waiter did not get the range once it was free"
    assert errors1 == errors2 == []


def test_range_lock_disjoint_ranges_are_held_together(
    release_all: Callable[[], threading.Event],
) -> None:
    lock = RangeLock()
    _, got1, _ = holder(lock, Range(0, 10), CancelToken(), release_all())
    assert got1.wait(WAIT)
    # Adjacent is disjoint: [0, 10) and [10, 20) share no byte.
    _, got2, _ = holder(lock, Range(10, 10), CancelToken(), release_all())
    _, got3, _ = holder(lock, Range(100, 10), CancelToken(), release_all())
    assert got2.wait(WAIT) and got3.wait(WAIT)
    assert lock.busy


def test_range_lock_takes_a_list_whole_or_waits(
    release_all: Callable[[], threading.Event],
) -> None:
    """A list is taken in one go once no range of it is held: never some of it while
    waiting for the rest, so two holders of interleaved lists cannot deadlock."""
    lock = RangeLock()
    release1 = release_all()
    t1, got1, _ = holder(lock, Range(50, 10), CancelToken(), release1)
    assert got1.wait(WAIT)
    got_list = threading.Event()
    release_list = release_all()

    def take_list() -> None:
        with lock.hold_all([Range(0, 10), Range(55, 10), Range(100, 10)], CancelToken()):
            got_list.set()
            release_list.wait(WAIT)

    threading.Thread(target=take_list, daemon=True).start()
    assert not got_list.wait(0.2), "a list was taken while one of its ranges was held"
    # Waiting, the list holds none of its ranges: the first one is free to others.
    _, got_first, _ = holder(lock, Range(0, 10), CancelToken(), release_first := release_all())
    assert got_first.wait(WAIT), "a waiting list held its other ranges"
    release1.set()
    t1.join(WAIT)
    release_first.set()
    assert got_list.wait(WAIT), "the list was not taken once all its ranges were free"
    _, got_gap, _ = holder(lock, Range(20, 10), CancelToken(), release_all())
    assert got_gap.wait(WAIT), "the gaps between a list's ranges were locked too"
    release_list.set()


@pytest.mark.parametrize("seed", range(20))
def test_range_lock_admits_two_lists_exactly_when_they_share_no_byte(seed: int) -> None:
    rng = random.Random(seed)
    blocks = rng.sample(range(64), 24)
    first = [Range(b * 10, 10) for b in blocks[:12]]
    second = [Range(b * 10, 10) for b in blocks[12:]]
    if seed % 2:  # make them share part of one block
        second.append(Range(first[0].offset + 5, 10))
    shared = any(a.overlaps(b) for a in first for b in second)
    assert shared == bool(seed % 2)
    lock = RangeLock()
    token = CancelToken(deadline=time.monotonic() + 0.2)
    with lock.hold_all(first, CancelToken()):
        if shared:
            with pytest.raises(DeadlineExceeded), lock.hold_all(second, token):
                pass
        else:
            with lock.hold_all(reversed(second), token):
                assert lock.busy
    assert not lock.busy


def test_range_lock_is_released_when_the_body_raises() -> None:
    lock = RangeLock()
    with pytest.raises(RuntimeError), lock.hold(Range(0, 10), CancelToken()):
        raise RuntimeError("boom")
    assert not lock.busy
    with lock.hold(Range(0, 10), CancelToken()):
        assert lock.busy


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_range_lock_waiter_gives_up(how: str, release_all: Callable[[], threading.Event]) -> None:
    lock = RangeLock()
    release1 = release_all()
    t1, got1, _ = holder(lock, Range(0, 10), CancelToken(), release1)
    assert got1.wait(WAIT)
    if how == "cancel":
        token = CancelToken()
        threading.Timer(0.1, token.cancel).start()
        expected: type[Exception] = Cancelled
    else:
        token = CancelToken(deadline=time.monotonic() + 0.1)
        expected = DeadlineExceeded
    t0 = time.monotonic()
    with pytest.raises(expected), lock.hold(Range(0, 20), token):
        pytest.fail("the waiter got a range that was held")
    assert time.monotonic() - t0 < 1.0
    # Giving up left nothing behind: once the holder goes, the lock is free.
    release1.set()
    t1.join(WAIT)
    assert not lock.busy
