"""How to do the work: the method per backing and how to slice it over threads (pure).

Rules, from measurements on a 2-vCPU VM (1 GiB, steady state; see docs/strategies.md):
- shmem and FILE (4 KiB pages): fallocate on one thread, 4.75 GB/s. More threads
  do not help (the inode lock serializes fallocate), and MADV_POPULATE_WRITE is
  slower (1.9 GB/s per thread) because it also builds page tables.
- hugetlb: MADV_POPULATE_WRITE, 12 GB/s per thread and scaling with threads;
  fallocate is single-threaded. Without MADV_POPULATE_* the fallback is fallocate.
- shmem with transparent huge pages: MADV_POPULATE_WRITE on 2 MiB-aligned
  MADV_HUGEPAGE mappings, in parallel: it reaches memory bandwidth.
- Threads as QEMU's touch_all_pages counts them: no more than one per 64 MiB.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from memplug.common.errors import FailedPrecondition
from memplug.common.ranges import Range
from memplug.common.sizes import MiB

MIN_BYTES_PER_THREAD = 64 * MiB
CHUNK_BYTES = 64 * MiB  # granularity of progress reports and cancellation


class Method(enum.StrEnum):
    FALLOCATE = "fallocate"
    POPULATE_WRITE = "populate-write"
    POPULATE_READ = "populate-read"
    TOUCH_READ = "touch-read"  # no MADV_POPULATE_*: read one byte per page in a helper


class Requested(enum.Enum):
    """What the caller asked for (the API's Strategy enum)."""

    AUTO = "auto"
    FALLOCATE = "fallocate"
    POPULATE_WRITE = "populate-write"


@dataclass(frozen=True)
class Plan:
    method: Method
    slices: tuple[tuple[Range, ...], ...]  # one tuple of pieces per worker thread
    chunk: int

    @property
    def threads(self) -> int:
        return len(self.slices)

    @property
    def total(self) -> int:
        return sum(r.length for s in self.slices for r in s)


def plug_method(
    *, hugetlb: bool, requested: Requested, has_populate: bool, thp: bool = False
) -> Method:
    if requested is Requested.FALLOCATE:
        return Method.FALLOCATE
    if requested is Requested.POPULATE_WRITE:
        if not has_populate:
            raise FailedPrecondition(
                "strategy populate-write needs MADV_POPULATE_WRITE (Linux >= 5.14), "
                "which this kernel lacks; use the automatic strategy"
            )
        return Method.POPULATE_WRITE
    # shmem THP: populate-write on a 2 MiB-aligned MADV_HUGEPAGE mapping allocates
    # and zeroes huge pages at memory bandwidth (28.6 GB/s measured); fallocate
    # gets small pages unless shmem_enabled=within_size, and defers the zeroing.
    if (hugetlb or thp) and has_populate:
        return Method.POPULATE_WRITE
    return Method.FALLOCATE


def populate_method(*, write: bool, has_populate: bool) -> Method:
    if not has_populate:
        return Method.TOUCH_READ
    return Method.POPULATE_WRITE if write else Method.POPULATE_READ


def thread_count(method: Method, total: int, max_threads: int) -> int:
    if method in (Method.FALLOCATE, Method.TOUCH_READ):
        return 1
    return max(1, min(max_threads, total // MIN_BYTES_PER_THREAD))


def make_plan(method: Method, work: list[Range], *, max_threads: int, align: int) -> Plan:
    """Split work into contiguous per-thread slices of near-equal size, cut at align."""
    total = sum(r.length for r in work)
    blocks = total // align
    threads = max(1, min(thread_count(method, total, max_threads), blocks))
    # Whole blocks per thread, the remainder one each to the first threads.
    base, extra = divmod(blocks, threads)
    quotas = [(base + (1 if i < extra else 0)) * align for i in range(threads)]
    slices: list[tuple[Range, ...]] = []
    current: list[Range] = []
    pieces = iter(work)
    r = next(pieces, None)
    offset, length = (r.offset, r.length) if r else (0, 0)
    for quota in quotas:
        room = quota
        while room:
            if not length:
                r = next(pieces)
                offset, length = r.offset, r.length
            take = min(length, room)
            current.append(Range(offset, take))
            offset, length, room = offset + take, length - take, room - take
        slices.append(tuple(current))
        current = []
    chunk = max(align, CHUNK_BYTES // align * align)
    return Plan(method, tuple(slices), chunk)
