"""The Backing interface: an fd plus what its errors mean.

A backing knows how to allocate, populate and release byte ranges of its fd
and what an errno means for it (ENOSPC is an empty huge page pool for
hugetlb, a full filesystem for FILE). It never decides *what* to do: order,
locking, rollback and bookkeeping belong to the engine.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

from memplug.common import memory
from memplug.common.errors import FailedPrecondition, Internal, MemplugError, ResourceExhausted
from memplug.common.ranges import Range
from memplug.daemon.kernel import ops, toucher
from memplug.daemon.kernel.helper import OOM_KILLED

HUGE_ALIGN = 2 << 20
MAX_SPAN = 1 << 40  # the most one populate mapping covers
POLICY_CHUNK = 1 << 40  # mbind through mappings of at most 1 TiB

# errnos that mean "no memory to back this" during allocation or population
EXHAUSTION_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM, errno.EFAULT, errno.EDQUOT})


class BackingKind(enum.StrEnum):
    SHMEM = "shmem"
    HUGETLB = "hugetlb"
    FILE = "file"


@dataclass(frozen=True)
class MemPolicy:
    """A NUMA memory policy for the backing's pages: an MPOL_* mode over nodes."""

    mode: int
    nodes: tuple[int, ...]


class Backing(ABC):
    """An fd and what is known of it; frozen at creation, but for close().

    huge: map 2 MiB-aligned with MADV_HUGEPAGE (shmem THP).
    mpol: mbind() every mapping to this policy (NUMA placement).
    """

    kind: BackingKind
    # Whether memory that holders of the fd allocate is the region's memory, for
    # the quota to count: a memfd's pages are (reading a hole through a shared
    # mapping allocates one); a file's blocks are disk, and its page cache is
    # reclaimable.
    holders_allocate_memory: bool = True
    # Whether no holder of the fd can change its size (memfd seals).
    sealed_against_resize: bool = True

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
        # Held by close() and by readers that may run beside a delete (info,
        # status): an fd number must never be used after close, or reused.
        self._fd_lock = threading.Lock()
        self.fd = fd  # -1 once closed
        self.size: Final = size
        self.page_size: Final = page_size
        self.path: Final = path
        self.huge: Final = huge
        self.mpol: Final = mpol

    # ------------------------------------------------------------------ work on ranges

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(2) [offset, offset+length) on the daemon's own fd."""
        ops.fallocate(self.fd, offset, length)

    def map_span(self, span: Range) -> SpanMapping:
        """One mapping of span for populating its chunks (close it, or use `with`)."""
        if span.length > MAX_SPAN:  # beyond any address space: one mapping per chunk
            return SpanMapping(self, None, 0)
        return SpanMapping(self, self._mapped(span.offset, span.length), span.offset)

    def populate(self, offset: int, length: int, *, write: bool) -> None:
        """MADV_POPULATE_WRITE/READ of [offset, offset+length) through its own mapping."""
        with self._mapped(offset, length) as mapping:
            memory.populate(mapping.address, length, write=write)

    def _mapped(self, offset: int, length: int) -> ops.Mapping:
        mapping = ops.map_shared(self.fd, offset, length, align=HUGE_ALIGN if self.huge else 0)
        try:
            if self.huge:
                memory.madvise(mapping.address, length, memory.MADV_HUGEPAGE)
            if self.mpol is not None:
                ops.mbind(mapping.address, length, self.mpol.mode, list(self.mpol.nodes))
        except BaseException:
            mapping.close()
            raise
        return mapping

    def apply_policy(self) -> None:
        """Give the file's pages the NUMA policy (shmem keeps it per inode)."""
        if self.mpol is None:
            return
        for offset, length in ops.iter_chunks(0, self.size, POLICY_CHUNK):
            with ops.map_shared(self.fd, offset, length) as mapping:
                ops.mbind(mapping.address, length, self.mpol.mode, list(self.mpol.nodes))

    def zeroing(self, strategy: str) -> str:
        """Whether a plug by strategy zeroes the pages now or leaves it to first touch."""
        return "deferred" if strategy == "fallocate" else "done"

    def touch(self, offset: int, length: int) -> None:
        toucher.touch_in_helper(self.fd, offset, length, self.page_size)

    def release(self, offset: int, length: int) -> None:
        ops.punch_hole(self.fd, offset, length)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents that held data before a plug; its rollback leaves them alone."""
        return ops.data_extents(self.fd, offset, length)

    def allocated_bytes(self) -> int:
        """Bytes allocated now; 0 once the backing is closed (its region deleted)."""
        with self._fd_lock:
            return ops.allocated_bytes(self.fd) if self.fd >= 0 else 0

    def resized(self) -> tuple[int, str] | None:
        """(current size, why) if the fd's size is no longer the region's; None while it is.

        memfds are sealed against resizing, so only a file can change under the daemon.
        """
        return None

    # ------------------------------------------------------------------ hand-off

    def reopen(self, *, writable: bool) -> int:
        """A new open file description on the same memory, for one client.

        Read-only is the kernel's: an O_RDONLY fd cannot be mapped shared
        writable, mprotect cannot add PROT_WRITE to such a mapping, and write,
        fallocate and F_ADD_SEALS refuse it.
        """
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(f"/proc/self/fd/{self.fd}", flags)

    def seals(self) -> int:
        return ops.get_seals(self.fd) if self.kind is not BackingKind.FILE else 0

    # ------------------------------------------------------------------ errors

    @abstractmethod
    def exhausted(self, missing: int) -> ResourceExhausted:
        """The error for "could not back `missing` more bytes", worded for this backing."""

    def error_for(self, exc: OSError, missing: int) -> MemplugError:
        """The MemplugError an OSError from allocate/populate/release means here."""
        if exc.strerror == OOM_KILLED:
            return ResourceExhausted(
                "the daemon's memory cgroup limit was reached (its allocation helper was "
                "OOM-killed by the kernel)"
            )
        if exc.errno in EXHAUSTION_ERRNOS:
            return self.exhausted(missing)
        if exc.errno == errno.EPERM:
            return FailedPrecondition(
                f"the kernel refused ({exc.strerror}): a seal on the region's fd forbids it"
            )
        return Internal(f"unexpected kernel error: {exc.strerror}", errno=exc.errno)

    # ------------------------------------------------------------------ lifetime

    def describe(self) -> str:
        return self.kind.value

    def close(self) -> None:
        with self._fd_lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class SpanMapping:
    """A span of a backing mapped once, advised and mbind()ed once, for populating.

    Mapping and unmapping per chunk would serialize the workers (mmap and
    munmap wait for a running MADV_POPULATE on the same mm): the hugetlb
    plug ran at 0.66x the raw speed that way. One mapping lets disjoint
    chunks populate in parallel. A span beyond any address space (MAX_SPAN)
    is mapped per chunk instead.
    """

    def __init__(
        self, backing: Backing, mapping: ops.Mapping | None, offset: int, *, owned: bool = True
    ) -> None:
        """mapping maps the file from offset on (None: map per chunk); owned: close() unmaps it."""
        self._backing = backing
        self._mapping = mapping
        self._owned = owned
        # address of byte 0 of the file, were all of it mapped like this
        self._base = 0 if self._mapping is None else self._mapping.address - offset

    def populate_write(self, offset: int, length: int) -> None:
        """MADV_POPULATE_WRITE: allocates and zeroes [offset, offset+length)."""
        if self._mapping is None:
            self._backing.populate(offset, length, write=True)
        else:
            memory.populate(self._base + offset, length, write=True)

    def populate_read(self, offset: int, length: int) -> None:
        """MADV_POPULATE_READ: faults [offset, offset+length) in for reading."""
        if self._mapping is None:
            self._backing.populate(offset, length, write=False)
        else:
            memory.populate(self._base + offset, length, write=False)

    def close(self) -> None:
        if self._mapping is not None and self._owned:
            self._mapping.close()

    def __enter__(self) -> SpanMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
