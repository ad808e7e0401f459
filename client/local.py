"""Populate memory in the caller's own process: mappings the daemon cannot reach.

A daemon can plug shared memory for everyone, but private mappings
(anonymous memory, MAP_PRIVATE hugetlb: configurations 1 and 2 of the
MADV_POPULATE thread) belong to one process, which must fault them in
itself. The work is cut into chunks that up to `threads` threads take in
turn (ctypes releases the GIL during madvise); a CancelToken stops it between
chunks, as it stops the daemon's own workers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from memplug.common import memory
from memplug.common.cancel import CancelToken
from memplug.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    MemplugError,
    PoolExhausted,
    ResourceExhausted,
)
from memplug.common.ranges import Range
from memplug.common.sizes import MiB, format_size

ProgressCallback = Callable[[int, int], None]  # (done_bytes, total_bytes)

# Large enough that a call's overhead vanishes, small enough that threads
# share the work evenly and a cancel is seen within milliseconds.
CHUNK_BYTES = 64 * MiB


def mapping_address(m: mmap.mmap) -> int | None:
    """Start address of a writable mmap object; None for a read-only one."""
    try:
        view = ctypes.c_char.from_buffer(m)
    except TypeError:
        return None
    address = ctypes.addressof(view)
    del view  # release the buffer export so the mmap can still be closed
    return address


def populate_mapping(
    m: mmap.mmap,
    ranges: Iterable[tuple[int, int]] | None = None,
    *,
    write: bool = True,
    threads: int = 0,
    page_size: int = memory.BASE_PAGE_SIZE,
    hugetlb: bool = False,
    token: CancelToken | None = None,
    progress: ProgressCallback | None = None,
) -> int:
    """Fault in the page tables of (parts of) mapping m; returns the bytes populated.

    Writable mappings are populated on up to `threads` threads with the GIL
    released; read-only ones on this thread through mmap.madvise.
    """
    if not memory.has_madv_populate():
        raise FailedPrecondition("this kernel lacks MADV_POPULATE_READ/WRITE (Linux >= 5.14)")
    work_ranges = [Range(o, n) for o, n in (ranges if ranges is not None else [(0, len(m))])]
    for r in work_ranges:
        if r.offset % page_size or r.length % page_size or r.end > len(m):
            raise InvalidArgument(f"range {r} is not page-aligned inside the {len(m)}-byte mapping")
    if not work_ranges:
        return 0
    address = mapping_address(m)
    if address is None and write:
        raise InvalidArgument("cannot populate a read-only mapping for writing")
    advice = memory.MADV_POPULATE_WRITE if write else memory.MADV_POPULATE_READ

    def work(offset: int, length: int) -> None:
        if address is not None:
            memory.madvise(address + offset, length, advice)
        else:
            m.madvise(advice, offset, length)

    total = sum(r.length for r in work_ranges)
    chunk = max(page_size, CHUNK_BYTES // page_size * page_size)
    workers = max(1, min(threads or os.cpu_count() or 1, -(-total // chunk)))
    try:
        _run_chunks(
            work, _chunks(work_ranges, chunk), workers, token or CancelToken(), progress, total
        )
    except OSError as exc:
        raise _translate(exc, total, hugetlb=hugetlb, page_size=page_size) from exc
    return total


def _chunks(ranges: list[Range], chunk: int) -> Iterator[tuple[int, int]]:
    for r in ranges:
        for offset in range(r.offset, r.end, chunk):
            yield offset, min(chunk, r.end - offset)


def _run_chunks(
    work: Callable[[int, int], None],
    chunks: Iterator[tuple[int, int]],
    workers: int,
    token: CancelToken,
    progress: ProgressCallback | None,
    total: int,
) -> None:
    """Each worker takes the next chunk until none is left or one fails; the first error wins."""
    lock = threading.Lock()
    failed = threading.Event()
    done = 0

    def worker() -> None:
        nonlocal done
        while not failed.is_set():
            with lock:
                piece = next(chunks, None)
            if piece is None:
                return
            try:
                token.check()
                work(*piece)
            except BaseException:
                failed.set()
                raise
            with lock:
                done += piece[1]
                if progress is not None:
                    progress(done, total)

    if workers == 1:
        worker()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="memplug-populate") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise errors[0]


def _translate(exc: OSError, total: int, *, hugetlb: bool, page_size: int) -> MemplugError:
    if exc.errno in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC):
        if hugetlb:
            pool = memory.huge_pool(page_size)
            return PoolExhausted(
                f"hugetlb {format_size(page_size)} pool exhausted while populating "
                f"{format_size(total)}: the pool has {pool.free} free of {pool.total}"
            )
        return ResourceExhausted(f"out of memory while populating {format_size(total)}")
    if exc.errno == errno.EINVAL:
        return FailedPrecondition(f"the kernel refused to populate this mapping: {exc.strerror}")
    return MemplugError(f"populate failed: {exc.strerror}", errno=exc.errno)


class PrivateMemory:
    """Anonymous private memory (optionally hugetlb) of this process, populated up front.

    with PrivateMemory(1 << 30, hugetlb=True) as mem:
        mem.view[0:4] = b"data"
    """

    def __init__(
        self,
        size: int,
        *,
        hugetlb: bool = False,
        page_size: int = 0,
        populate: bool = True,
        threads: int = 0,
    ) -> None:
        self.page_size = (
            (page_size or memory.default_huge_page_size() or 0)
            if hugetlb
            else memory.BASE_PAGE_SIZE
        )
        if hugetlb and self.page_size not in memory.huge_page_sizes():
            raise InvalidArgument(f"huge page size {page_size} is not offered by this kernel")
        if size <= 0 or size % self.page_size:
            raise InvalidArgument(f"size must be a positive multiple of {self.page_size}")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if hugetlb:
            flags |= memory.MAP_HUGETLB | (
                (self.page_size.bit_length() - 1) << memory.MAP_HUGE_SHIFT
            )
        try:
            self.mmap = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if hugetlb and exc.errno == errno.ENOMEM:
                raise _translate(exc, size, hugetlb=True, page_size=self.page_size) from exc
            raise
        self.size = size
        self.hugetlb = hugetlb
        if populate:
            try:
                populate_mapping(
                    self.mmap,
                    write=True,
                    threads=threads,
                    page_size=self.page_size,
                    hugetlb=hugetlb,
                )
            except BaseException:
                self.mmap.close()
                raise
        self.view = memoryview(self.mmap)

    def close(self) -> None:
        self.view.release()
        self.mmap.close()

    def __enter__(self) -> PrivateMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
