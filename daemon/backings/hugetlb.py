"""HUGETLB: a sealed memfd on hugetlbfs, drawing from the pool of one page size."""

from __future__ import annotations

from memplug.common import memory
from memplug.common.errors import PoolExhausted
from memplug.common.sizes import format_size
from memplug.daemon.backings.base import Backing, BackingKind, MemPolicy
from memplug.daemon.kernel import ops
from memplug.daemon.kernel.memfd import create_memfd


class HugetlbBacking(Backing):
    kind = BackingKind.HUGETLB

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
