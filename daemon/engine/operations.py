"""Plug, populate, unplug and discard: the work on a region's ranges (engine-internal).

RegionEngine finds the region and counts the call as running; everything
after that happens here, in a fixed order:

    range lock -> quota -> intent recorded -> work on the worker threads ->
    plugged set recorded (intent closed; journal.py) -> unlock

and on any failure during the work: roll back what this call did, then raise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memplug.common.cancel import CancelToken
from memplug.common.errors import FailedPrecondition, Internal, MemplugError, ResourceExhausted
from memplug.common.ranges import Range, RangeList, subtract
from memplug.common.sizes import format_size
from memplug.daemon.backings import BackingKind
from memplug.daemon.engine import charging, rollback
from memplug.daemon.engine.hugegrowth import HugePoolGrower
from memplug.daemon.engine.journal import Journal
from memplug.daemon.engine.placement import lock_ranges, placed, unlock_ranges
from memplug.daemon.engine.quota import Quota
from memplug.daemon.engine.region import Region, RegionInfo
from memplug.daemon.engine.runner import ProgressCallback, Runner, Work
from memplug.daemon.engine.strategy import (
    CHUNK_BYTES,
    Plan,
    Strategy,
    make_plan,
    plug_strategy,
    populate_strategy,
)
from memplug.daemon.kernel import memcg
from memplug.daemon.kernel.ops import iter_chunks

log = logging.getLogger("memplug.engine")


@dataclass(frozen=True)
class OpResult:
    """Outcome of Plug and Populate."""

    bytes: int
    seconds: float
    strategy: Strategy
    threads: int
    region: RegionInfo
    zeroing: str = ""  # plug: "done" or "deferred" (first touch zeroes)


@dataclass(frozen=True)
class RangeOutcome:
    """Outcome of Unplug and Discard."""

    bytes: int
    seconds: float
    region: RegionInfo


class Operations:
    def __init__(
        self,
        *,
        runner: Runner,
        journal: Journal,
        quota: Quota,
        make_room: Callable[[int], object],
        release_quota: Callable[[int], None],
        allocated_outside_plugged: Callable[[], int],
        threads: int,
        madv_populate: bool,
        memcg_check: bool,
        hugepages: HugePoolGrower,
    ) -> None:
        """make_room(n) sheds warm-pool memory for a plug; release_quota(n) gives quota back;
        allocated_outside_plugged() is what holders allocated outside plugged blocks, all
        regions (the quota counts it); hugepages grows a hugetlb region's pool for a plug
        (--hugetlb-budget)."""
        self._runner = runner
        self._journal = journal
        self._quota = quota
        self._make_room = make_room
        self._release_quota = release_quota
        self._allocated_outside_plugged = allocated_outside_plugged
        self._threads = threads
        self._madv_populate = madv_populate
        self._memcg_check = memcg_check
        self._hugepages = hugepages

    # ------------------------------------------------------------------ plug

    def plug(
        self,
        region: Region,
        offset: int,
        length: int,
        *,
        ranges: Sequence[tuple[int, int]] = (),
        requested: Strategy,
        threads: int,
        token: CancelToken,
        progress: ProgressCallback | None,
    ) -> OpResult:
        """Plug [offset, offset+length), or every range of a list as one plug of their union."""
        r = region.ranges_of(offset, length, ranges, "plug")
        backing = region.backing
        strategy = plug_strategy(
            hugetlb=backing.kind is BackingKind.HUGETLB,
            requested=requested,
            has_populate=self._madv_populate,
            thp=region.options.thp,
        )
        with region.locks.hold_all(r, token):
            with region.mutex:
                gaps = [g for part in r for g in region.plugged.gaps(part)]
                warm = [w for g in gaps for w in region.prebacked.intersection(g)]
            new = sum(g.length for g in gaps)
            if not new:
                if progress is not None:
                    progress(0, 0)
                return OpResult(0, 0.0, Strategy.NONE, 0, region.info(in_call=True))
            if warm:
                # Memory a warm-pool memfd already holds is plugged by bookkeeping.
                self._adopt_prebacked(region, warm)
                gaps = subtract(gaps, warm)
                if not gaps:
                    if progress is not None:
                        progress(new, new)
                    return OpResult(
                        new, 0.0, Strategy.WARM_POOL, 0, region.info(in_call=True), zeroing="done"
                    )
            fresh = sum(g.length for g in gaps)
            # Refusals first: a plug too big for the cgroup or the quota costs
            # no planning, no extent scan and no intent, whatever its size.
            charge = charging.plug_target(region, r, fresh, check=self._memcg_check)
            room = None if charge is not None else self._memcg_room(region, r, fresh)
            self._quota.reserve(
                region.name,
                fresh,
                make_room=self._make_room,
                outside_plugged=self._allocated_outside_plugged,
            )
            with region.mutex:
                region.reserved += fresh
            growth = None
            try:
                growth = self._hugepages.grow_for(region, fresh)
                plan = make_plan(
                    strategy, gaps, max_threads=self._thread_count(threads), align=region.block_size
                )
                before = backing.allocated_bytes()
                keep = [
                    Range(o, n) for g in gaps for o, n in backing.data_extents(g.offset, g.length)
                ]
                intent = self._journal.begin(region, "plug", r, tuple(keep))
            except BaseException:
                if growth is not None:
                    growth.end(failed=True)
                self._unreserve(region, fresh)
                raise
            started = time.monotonic()
            span = Range(gaps[0].offset, gaps[-1].end - gaps[0].offset)
            try:
                self._allocate(
                    region,
                    plan,
                    span,
                    isolate=room is not None,
                    charge=charge,
                    token=token,
                    progress=progress,
                )
                lock_ranges(region, gaps)
            except BaseException as exc:
                got = max(0, backing.allocated_bytes() - before)
                unlock_ranges(region, gaps)
                rollback.release_ranges(region, subtract(gaps, keep))
                growth.end(failed=True)
                self._unreserve(region, fresh)
                self._journal.finish(region, intent, quiet=True)
                raise rollback.failure(region, "plug", r, exc, missing=fresh - got) from exc
            seconds = time.monotonic() - started
            growth.end()
            with region.mutex:  # one hold: the bytes are never counted twice, nor missed
                for g in gaps:
                    region.plugged.add(g)
                region.reserved -= fresh
            try:
                self._journal.finish(region, intent)
            except MemplugError as exc:
                # Unrecorded, the plug did not happen: a restart would roll it
                # back (its intent is open), so roll it back now.
                with region.mutex:
                    for g in gaps:
                        region.plugged.remove(g)
                unlock_ranges(region, gaps)
                rollback.release_ranges(region, subtract(gaps, keep))
                growth.end(failed=True)
                self._release_quota(fresh)  # reserved went with plugged, above
                raise type(exc)(
                    f"region {region.name!r}: plug of {r} could not be recorded: "
                    f"{exc.message}; {rollback.UNDONE}",
                    region=region.name,
                ) from exc
        return OpResult(
            new,
            seconds,
            strategy,
            plan.threads,
            region.info(in_call=True),
            zeroing=backing.zeroing(strategy),
        )

    def _unreserve(self, region: Region, nbytes: int) -> None:
        """Give back a failed plug's quota (after its memory was released)."""
        with region.mutex:
            region.reserved -= nbytes
        self._release_quota(nbytes)

    def _thread_count(self, requested: int) -> int:
        """Threads for one operation: as asked (0: all), at most the daemon's workers.

        The runner queues one pull loop per thread of the plan, so an uncapped
        request (uint32) would cost memory in proportion to it, not to the workers.
        """
        return min(requested or self._threads, self._threads)

    def _allocate(
        self,
        region: Region,
        plan: Plan,
        span: Range,
        *,
        isolate: bool,
        charge: charging.ChargeTarget | None,
        token: CancelToken,
        progress: ProgressCallback | None,
    ) -> None:
        """Allocate every chunk of the plan with the syscall its strategy names.

        isolate: under a memcg limit the kernel OOM-kills instead of failing,
        so sacrificial helper processes make the call and the victim is never
        the daemon. charge: the region's pages belong to that cgroup, so only
        helpers placed in it may allocate them.
        """
        backing = region.backing
        match plan.strategy, isolate or charge is not None:
            case Strategy.FALLOCATE, False:  # fallocate(2) on the daemon's fd
                self._run(region, plan, backing.allocate, token, progress)
            case Strategy.POPULATE_WRITE, False:  # MADV_POPULATE_WRITE on one mapping of span
                with backing.map_span(span) as mapping:
                    self._run(region, plan, mapping.populate_write, token, progress)
            case Strategy.FALLOCATE, True:  # fallocate(2) in helper processes
                with charging.helpers(backing, charge) as helpers:
                    self._run(region, plan, helpers.allocate, token, progress)
            case Strategy.POPULATE_WRITE, True:  # MADV_POPULATE_WRITE in helper processes
                with charging.helpers(backing, charge) as helpers:
                    self._run(region, plan, helpers.populate_write, token, progress)
            case _:
                raise Internal(f"region {region.name!r}: a plug cannot run {plan.strategy}")

    def _run(
        self,
        region: Region,
        plan: Plan,
        work: Work,
        token: CancelToken,
        progress: ProgressCallback | None,
    ) -> None:
        """work(offset, length) for every chunk, on the worker threads, on the region's nodes."""
        self._runner.run(plan, placed(region, work), token, progress)

    def _adopt_prebacked(self, region: Region, warm: list[Range]) -> None:
        """Plug ranges whose memory is already allocated (quota was taken with the pool)."""
        lock_ranges(region, warm)
        with region.mutex:
            for w in warm:
                region.prebacked.remove(w)
                region.plugged.add(w)
        try:
            self._journal.finish(region, None)
        except BaseException:
            with region.mutex:
                for w in warm:
                    region.plugged.remove(w)
                    region.prebacked.add(w)
            unlock_ranges(region, warm)
            raise

    def _memcg_room(self, region: Region, r: Range | RangeList, new: int) -> memcg.Headroom | None:
        """The cgroup headroom a plug is charged against (None: no limit); refuse misfits.

        hugetlb pages are not charged to memcg (unless the cgroup v2 hierarchy
        is mounted with memory_hugetlb_accounting, which the check then misses).
        """
        if region.backing.kind is BackingKind.HUGETLB:
            return None
        room = memcg.headroom()
        if room is None:
            return None
        if new > room.bytes and self._memcg_check:
            raise ResourceExhausted(
                f"region {region.name!r}: plug of {r} needs {format_size(new)}, but the "
                f"daemon's {room.describe()} has {format_size(room.bytes)} left; raise the "
                "cgroup's memory limit or plug less",
                region=region.name,
            )
        return room

    # ------------------------------------------------------------------ populate

    def populate(
        self,
        region: Region,
        offset: int,
        length: int,
        *,
        write: bool,
        threads: int,
        token: CancelToken,
        progress: ProgressCallback | None,
    ) -> OpResult:
        r = region.range_of(offset, length, "populate")
        strategy = populate_strategy(write=write, has_populate=self._madv_populate)
        with region.locks.hold(r, token):
            self._require_plugged(region, "populate", r)
            plan = make_plan(
                strategy, [r], max_threads=self._thread_count(threads), align=region.block_size
            )
            backing = region.backing
            charge = charging.target(region, "populate", r)
            started = time.monotonic()
            try:
                match strategy:
                    case Strategy.POPULATE_WRITE | Strategy.POPULATE_READ if charge is not None:
                        # Pages it faults in (a file's page cache) are the cgroup's.
                        with charging.helpers(backing, charge) as helpers:
                            work = (
                                helpers.populate_write
                                if strategy is Strategy.POPULATE_WRITE
                                else helpers.populate_read
                            )
                            self._run(region, plan, work, token, progress)
                    case Strategy.TOUCH_READ:  # read one byte per page, in a helper
                        self._run(region, plan, backing.touch, token, progress)
                    case Strategy.POPULATE_WRITE:  # MADV_POPULATE_WRITE on one mapping of r
                        with backing.map_span(r) as mapping:
                            self._run(region, plan, mapping.populate_write, token, progress)
                    case Strategy.POPULATE_READ:  # MADV_POPULATE_READ on one mapping of r
                        with backing.map_span(r) as mapping:
                            self._run(region, plan, mapping.populate_read, token, progress)
                    case _:
                        raise Internal(f"region {region.name!r}: populate cannot run {strategy}")
            except BaseException as exc:
                raise rollback.populate_failure(region, r, exc) from exc
            seconds = time.monotonic() - started
        return OpResult(r.length, seconds, strategy, plan.threads, region.info(in_call=True))

    def _require_plugged(self, region: Region, op: str, r: Range) -> None:
        with region.mutex:
            gaps = region.plugged.gaps(r)
        if gaps:
            raise FailedPrecondition(
                f"region {region.name!r}: {op} of {r}: {format_size(sum(g.length for g in gaps))} "
                f"of it is unplugged (first at {gaps[0]}); plug it first",
                region=region.name,
            )

    # ------------------------------------------------------------------ unplug and discard

    def unplug(
        self,
        region: Region,
        offset: int,
        length: int,
        token: CancelToken,
        ranges: Sequence[tuple[int, int]] = (),
    ) -> RangeOutcome:
        """Punch the range (or each range of a list) and mark it unplugged, a chunk at a time.

        State is updated after each chunk, so whatever stops this midway
        leaves the record true: punched blocks are unplugged, the rest stay.
        """
        r = region.ranges_of(offset, length, ranges, "unplug")
        with region.locks.hold_all(r, token):
            started = time.monotonic()
            released = 0
            intent = self._journal.begin(region, "unplug", r)
            chunks = [c for part in r for c in iter_chunks(part.offset, part.length, CHUNK_BYTES)]
            try:
                for start, n in chunks:
                    piece = Range(start, n)
                    unlock_ranges(region, [piece])
                    try:
                        region.backing.release(start, n)
                    except OSError as exc:
                        err = region.backing.error_for(exc, 0)
                        raise type(err)(
                            f"region {region.name!r}: unplug of {r} failed at {piece}: "
                            f"{err.message}; {format_size(released)} before it were "
                            "unplugged",
                            region=region.name,
                        ) from exc
                    released += self._mark_unplugged(region, piece)
            except BaseException:
                self._journal.finish(region, intent, quiet=True)
                raise
            self._journal.finish_done(region, intent, "unplug", r)
            self._hugepages.settle()  # pages memplug added for this region, if free now
            seconds = time.monotonic() - started
        return RangeOutcome(released, seconds, region.info(in_call=True))

    def _mark_unplugged(self, region: Region, r: Range) -> int:
        """Forget r's blocks (punched already); returns the plugged bytes among them."""
        with region.mutex:
            was = sum(p.length for p in region.plugged.intersection(r))
            warm = sum(p.length for p in region.prebacked.intersection(r))
            region.plugged.remove(r)
            region.prebacked.remove(r)
        self._release_quota(was + warm)
        return was

    def discard(
        self,
        region: Region,
        offset: int,
        length: int,
        token: CancelToken,
        ranges: Sequence[tuple[int, int]] = (),
    ) -> RangeOutcome:
        """Zero plugged blocks and keep them backed: punch, then allocate again.

        Between the two calls another process could take the freed memory; a
        block that cannot be backed again is marked unplugged and reported, so
        no access to a "plugged" block can ever SIGBUS. The window is one block.
        A list of ranges is checked whole (every block plugged) before any is zeroed.
        """
        r = region.ranges_of(offset, length, ranges, "discard")
        with region.locks.hold_all(r, token):
            for part in r:
                self._require_plugged(region, "discard", part)
            started = time.monotonic()
            intent = self._journal.begin(region, "discard", r)
            try:
                # Each punched block is refilled at once: not a page to give back.
                with (
                    charging.allocator(region, "discard", r) as allocate,
                    self._hugepages.holding(region, region.block_size),
                ):
                    lost: list[Range] = []
                    cause: MemplugError | None = None
                    for part in r:
                        lost_here, cause_here = self._zero_blocks(region, part, allocate)
                        lost += lost_here
                        cause = cause or cause_here
                if region.lock_map is not None:
                    with region.mutex:
                        relock = [p for part in r for p in region.plugged.intersection(part)]
                    lock_ranges(region, relock)
            except BaseException:
                self._journal.finish(region, intent, quiet=True)
                raise
            self._journal.finish_done(region, intent, "discard", r)
            seconds = time.monotonic() - started
            if cause is not None:
                nbytes = len(lost) * region.block_size
                raise type(cause)(
                    f"region {region.name!r}: discard of {r}: contents dropped, but "
                    f"{format_size(nbytes)} could not be backed again ({cause.message}); "
                    f"those blocks are now unplugged, first at {lost[0]}: plug them again",
                    region=region.name,
                )
        return RangeOutcome(r.total, seconds, region.info(in_call=True))

    def _zero_blocks(
        self, region: Region, r: Range, allocate: Work
    ) -> tuple[list[Range], MemplugError | None]:
        """Punch and re-allocate each block; returns the blocks that lost their backing.

        allocate: fallocate in the daemon, or in a helper charging the region's cgroup.
        """
        backing = region.backing
        lost: list[Range] = []
        cause: MemplugError | None = None
        for block in range(r.offset, r.end, region.block_size):
            try:
                backing.release(block, region.block_size)
            except OSError as exc:
                err = backing.error_for(exc, 0)
                raise type(err)(
                    f"region {region.name!r}: discard of {r} failed at {block:#x}: {err.message}",
                    region=region.name,
                ) from exc
            try:
                allocate(block, region.block_size)
            except OSError as exc:
                backing.release(block, region.block_size)  # hugetlb keeps partial pages
                self._mark_unplugged(region, Range(block, region.block_size))
                lost.append(Range(block, region.block_size))
                cause = cause or backing.error_for(exc, region.block_size)
        return lost, cause
