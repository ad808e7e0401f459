"""SHMEM: a sealed memfd on the kernel's internal tmpfs, 4 KiB pages."""

from __future__ import annotations

from memplug.common import memory
from memplug.common.errors import ResourceExhausted
from memplug.common.sizes import format_size
from memplug.daemon.backings.base import Backing, BackingKind, MemPolicy
from memplug.daemon.kernel.memfd import create_memfd


class ShmemBacking(Backing):
    kind = BackingKind.SHMEM

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        owner_uid: int,
        *,
        huge: bool = False,
        mpol: MemPolicy | None = None,
    ) -> ShmemBacking:
        fd = create_memfd(name, size, owner_uid)
        return cls(fd, size, memory.BASE_PAGE_SIZE, huge=huge, mpol=mpol)

    def exhausted(self, missing: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"shmem: the kernel could not allocate {format_size(missing)} more "
            "(out of memory, or a memory limit reached)"
        )
