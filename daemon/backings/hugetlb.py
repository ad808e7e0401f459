"""HUGETLB: a sealed memfd on hugetlbfs, drawing from the pool of one page size."""

from __future__ import annotations

from memplug.common import memory
from memplug.common.errors import Internal, PoolExhausted
from memplug.common.ranges import Range
from memplug.common.sizes import format_size
from memplug.daemon.backings.base import MAX_SPAN, Backing, BackingKind, MemPolicy, SpanMapping
from memplug.daemon.kernel import ops
from memplug.daemon.kernel.memfd import create_memfd


class HugetlbBacking(Backing):
    """The populate mapping is made once, at the first plug or populate, and kept to close().

    mmap and munmap of a populated 1 GiB span cost ~0.4 ms of a ~50 ms plug,
    and munmap takes the daemon's mm lock for writing, stalling the populates
    of every other region meanwhile. Keeping the mapping costs one page-table
    entry per huge page; hugetlb pages do not count in the daemon's RSS (nor
    in the OOM killer's choice), unlike shmem's, which are mapped per call.
    """

    kind = BackingKind.HUGETLB

    def __init__(
        self,
        fd: int,
        size: int,
        page_size: int,
        path: str = "",
        *,
        huge: bool = False,
        mpol: MemPolicy | None = None,
    ) -> None:
        super().__init__(fd, size, page_size, path, huge=huge, mpol=mpol)
        self._work_map: ops.Mapping | None = None  # under _fd_lock

    def map_span(self, span: Range) -> SpanMapping:
        if self.size > MAX_SPAN:
            return super().map_span(span)
        with self._fd_lock:
            if self.fd < 0:
                raise Internal(f"{self.describe()} region used after it was closed")
            if self._work_map is None:
                self._work_map = self._mapped(0, self.size)
            return SpanMapping(self, self._work_map, 0, owned=False)

    def close(self) -> None:
        with self._fd_lock:
            if self._work_map is not None:
                self._work_map.close()
                self._work_map = None
        super().close()

    @classmethod
    def create(
        cls, name: str, size: int, page_size: int, owner_uid: int, *, mpol: MemPolicy | None = None
    ) -> HugetlbBacking:
        fd = create_memfd(name, size, owner_uid, ops.huge_page_flag(page_size))
        return cls(fd, size, page_size, mpol=mpol)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        # hugetlbfs reports the whole file as data: SEEK_DATA tells nothing. By
        # contract unplugged blocks hold no data, so a rollback frees them all.
        return []

    def exhausted(self, missing: int) -> PoolExhausted:
        pages = -(-missing // self.page_size)
        try:
            pool = memory.huge_pool(self.page_size)
            state = f"the pool has {pool.free} free of {pool.total}"
        except OSError:
            state = "the pool's state is unreadable"
        return PoolExhausted(
            f"hugetlb {format_size(self.page_size)} pool exhausted: {pages} more pages "
            f"({format_size(missing)}) needed, {state}; grow it with "
            f"/sys/kernel/mm/hugepages/hugepages-{self.page_size // 1024}kB/nr_hugepages"
        )

    def apply_policy(self) -> None:
        # hugetlbfs keeps no per-file policy: every populate mapping is mbind()ed
        # and fallocate runs under the worker thread's policy instead.
        pass

    def zeroing(self, strategy: str) -> str:
        return "done"  # huge pages are zeroed when allocated, by either method

    def describe(self) -> str:
        return f"hugetlb {format_size(self.page_size)}"
