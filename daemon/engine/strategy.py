"""How to do the work: the strategy per backing and how to slice it over threads (pure).

Rules, from measurements on a 2-vCPU VM (1 GiB, steady state; see docs/strategies.md):
- shmem and FILE (4 KiB pages): fallocate on one thread, 4.75 GB/s. More threads
  do not help (the inode lock serializes fallocate), and MADV_POPULATE_WRITE is
  slower (1.9 GB/s per thread) because it also builds page tables.
- hugetlb: MADV_POPULATE_WRITE, 12 GB/s per thread and scaling with threads;
  fallocate is single-threaded. Without MADV_POPULATE_* the fallback is fallocate.
- shmem with transparent huge pages: MADV_POPULATE_WRITE on 2 MiB-aligned
  MADV_HUGEPAGE mappings, in parallel: it reaches memory bandwidth.
- Threads as QEMU's touch_all_pages counts them: no more than one per 64 MiB.
- The threads pull CHUNK_BYTES chunks, in address order, from one queue instead
  of each taking a fixed contiguous share: a thread that the scheduler (or the
  hypervisor) holds back costs one chunk, not half the plug.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from memplug.common.errors import FailedPrecondition, InvalidArgument
from memplug.common.ranges import Range
from memplug.common.sizes import MiB
from memplug.daemon.kernel.ops import iter_chunks

MIN_BYTES_PER_THREAD = 64 * MiB
CHUNK_BYTES = 64 * MiB  # granularity of progress reports and cancellation


class Strategy(enum.StrEnum):
    """How a plug or populate gets its memory: asked for, chosen, and reported.

    The API's Strategy enum names the ones a plug may ask for (AUTO, FALLOCATE,
    POPULATE_WRITE); the value is the name an operation's result reports.
    """

    AUTO = "auto"  # asked for only: the daemon chooses per backing
    FALLOCATE = "fallocate"  # fallocate(2)
    POPULATE_WRITE = "populate-write"  # madvise(MADV_POPULATE_WRITE)
    POPULATE_READ = "populate-read"  # madvise(MADV_POPULATE_READ)
    TOUCH_READ = "touch-read"  # no MADV_POPULATE_*: read one byte per page in a helper
    WARM_POOL = "warm-pool"  # reported only: a warm-pool memfd held the memory already
    NONE = "none"  # reported only: every block was plugged already


PLUG_REQUESTS: Final = (Strategy.AUTO, Strategy.FALLOCATE, Strategy.POPULATE_WRITE)


@dataclass(frozen=True)
class Plan:
    """The work of one operation: pieces cut into chunks that `threads` workers pull."""

    strategy: Strategy
    pieces: tuple[Range, ...]  # in the order the chunks are handed out
    threads: int
    chunk: int  # the unit a worker takes, reports progress for and checks cancel at

    @property
    def total(self) -> int:
        return sum(r.length for r in self.pieces)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of every chunk, in the order the workers take them."""
        for piece in self.pieces:
            yield from iter_chunks(piece.offset, piece.length, self.chunk)


def plug_strategy(
    *, hugetlb: bool, requested: Strategy, has_populate: bool, thp: bool = False
) -> Strategy:
    """The strategy a plug runs: what was asked for, or the fastest for the backing."""
    if requested not in PLUG_REQUESTS:
        raise InvalidArgument(
            f"a plug cannot ask for strategy {requested}: use auto, fallocate or populate-write"
        )
    if requested is Strategy.FALLOCATE:
        return Strategy.FALLOCATE
    if requested is Strategy.POPULATE_WRITE:
        if not has_populate:
            raise FailedPrecondition(
                "strategy populate-write needs MADV_POPULATE_WRITE (Linux >= 5.14), "
                "which this kernel lacks; use the automatic strategy"
            )
        return Strategy.POPULATE_WRITE
    # shmem THP: populate-write on a 2 MiB-aligned MADV_HUGEPAGE mapping allocates
    # and zeroes huge pages at memory bandwidth (28.6 GB/s measured); fallocate
    # gets small pages unless shmem_enabled=within_size, and defers the zeroing.
    if (hugetlb or thp) and has_populate:
        return Strategy.POPULATE_WRITE
    return Strategy.FALLOCATE


def populate_strategy(*, write: bool, has_populate: bool) -> Strategy:
    if not has_populate:
        return Strategy.TOUCH_READ
    return Strategy.POPULATE_WRITE if write else Strategy.POPULATE_READ


def thread_count(strategy: Strategy, total: int, max_threads: int) -> int:
    if strategy in (Strategy.FALLOCATE, Strategy.TOUCH_READ):
        return 1
    return max(1, min(max_threads, total // MIN_BYTES_PER_THREAD))


def make_plan(strategy: Strategy, work: list[Range], *, max_threads: int, align: int) -> Plan:
    """The work in address order, cut into chunks of whole blocks, and the threads to pull them.

    No thread gets a fixed share: each takes the next chunk when it is done
    with its last one, so threads slowed by other load do less and the plug
    ends when the work does (see docs/strategies.md for the measurements).
    """
    total = sum(r.length for r in work)
    blocks = total // align
    threads = max(1, min(thread_count(strategy, total, max_threads), blocks))
    chunk = max(align, CHUNK_BYTES // align * align)
    return Plan(strategy, tuple(r for r in work if r.length), threads, chunk)
