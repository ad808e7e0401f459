"""Syscalls on fds and mappings: ints and fds in, OSError(errno, "step: reason") out.

Nothing here knows about regions or gRPC; the engine and the backings decide
what an errno means (ENOSPC from a hugetlb fallocate is an empty pool, from a
tmpfs one a full filesystem).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from memplug.common import libc
from memplug.common.memory import MAP_NORESERVE

# fallocate(2)
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

# memfd_create(2)
MFD_CLOEXEC: Final = 0x0001
MFD_ALLOW_SEALING: Final = 0x0002
MFD_HUGETLB: Final = 0x0004
MFD_NOEXEC_SEAL: Final = 0x0008  # Linux 6.3
MFD_HUGE_SHIFT: Final = 26

# fcntl(2) seals
F_ADD_SEALS: Final = 1033
F_GET_SEALS: Final = 1034
F_SEAL_SEAL: Final = 0x0001
F_SEAL_SHRINK: Final = 0x0002
F_SEAL_GROW: Final = 0x0004
F_SEAL_WRITE: Final = 0x0008
F_SEAL_FUTURE_WRITE: Final = 0x0010
F_SEAL_EXEC: Final = 0x0020

# mmap(2)
PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")

# openat2(2)
SYS_openat2: Final = 437  # the same number on every architecture (new syscall table)
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_BENEATH: Final = 0x08

SEEK_DATA: Final = 3
SEEK_HOLE: Final = 4


def _fail(step: str, err: int | None = None) -> OSError:
    err = libc.errno() if err is None else err
    return OSError(err, f"{step}: {os.strerror(err)}")


# --------------------------------------------------------------------------- memfd and seals


def memfd_create(name: str, flags: int) -> int:
    fd = libc.memfd_create(name.encode(), flags)
    if fd < 0:
        raise _fail("memfd_create")
    return int(fd)


def huge_page_flag(page_size: int) -> int:
    """MFD_HUGETLB plus the encoded page size (log2 in bits 26..31)."""
    return MFD_HUGETLB | ((page_size.bit_length() - 1) << MFD_HUGE_SHIFT)


def add_seals(fd: int, seals: int) -> None:
    import fcntl

    try:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except OSError as exc:
        raise _fail("fcntl(F_ADD_SEALS)", exc.errno) from exc


def get_seals(fd: int) -> int:
    import fcntl

    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as exc:
        raise _fail("fcntl(F_GET_SEALS)", exc.errno) from exc


# --------------------------------------------------------------------------- allocation


def fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate backing for [offset, offset+length) without changing the size."""
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _fail("fallocate")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the backing of [offset, offset+length); it reads back as zeros."""
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _fail("fallocate(PUNCH_HOLE)")


def allocated_bytes(fd: int) -> int:
    """Bytes the filesystem has allocated to the file, as st_blocks counts them."""
    return os.fstat(fd).st_blocks * 512


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """Extents of [offset, offset+length) that SEEK_DATA reports as data.

    On shmem, fallocated-but-never-written pages count as holes (they hold
    zeros, so losing them loses nothing); on hugetlbfs everything is data.
    """
    end = offset + length
    extents: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: no data at or after pos
                break
            raise _fail("lseek(SEEK_DATA)", exc.errno) from exc
        if start >= end:
            break
        stop = min(os.lseek(fd, start, SEEK_HOLE), end)
        extents.append((start, stop - start))
        pos = stop
    return extents


# --------------------------------------------------------------------------- mappings


@dataclass
class Mapping:
    """A MAP_SHARED mapping of part of a file, unmapped by close()."""

    address: int
    length: int

    def close(self) -> None:
        if self.length:
            if libc.munmap(self.address, self.length) != 0:
                raise _fail("munmap")
            self.length = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_shared(
    fd: int, offset: int, length: int, *, writable: bool = True, align: int = 0
) -> Mapping:
    """Map [offset, offset+length) of fd shared, without reserving huge pages.

    MAP_NORESERVE matters for hugetlb: without it the kernel reserves pages for
    the whole mapping at mmap time and a sparse region larger than the pool
    cannot be mapped at all. align (a power of two) places the mapping at an
    address that is a multiple of it: transparent huge pages need 2 MiB.
    """
    prot = PROT_READ | (PROT_WRITE if writable else 0)
    if align <= PAGE_SIZE:
        address = libc.mmap(None, length, prot, MAP_SHARED | MAP_NORESERVE, fd, offset)
        if address is None or address == libc.MAP_FAILED:
            raise _fail("mmap")
        return Mapping(int(address), length)
    # Reserve length + align of address space, map the file at the aligned
    # address inside it, then give back the slack on both sides.
    span = length + align
    base = libc.mmap(None, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if base is None or base == libc.MAP_FAILED:
        raise _fail("mmap(reserve)")
    start = (int(base) + align - 1) & ~(align - 1)
    address = libc.mmap(start, length, prot, MAP_SHARED | MAP_NORESERVE | MAP_FIXED, fd, offset)
    if address is None or address == libc.MAP_FAILED:
        err = _fail("mmap(MAP_FIXED)")
        libc.munmap(base, span)
        raise err
    if start > int(base):
        libc.munmap(base, start - int(base))
    tail = start + length
    if tail < int(base) + span:
        libc.munmap(tail, int(base) + span - tail)
    return Mapping(start, length)


def mlock(address: int, length: int) -> None:
    """Lock (and fault in) the pages of [address, address+length)."""
    if libc.mlock(address, length) != 0:
        raise _fail("mlock")


def munlock(address: int, length: int) -> None:
    if libc.munlock(address, length) != 0:
        raise _fail("munlock")


# --------------------------------------------------------------------------- NUMA

MPOL_DEFAULT: Final = 0
MPOL_PREFERRED: Final = 1
MPOL_BIND: Final = 2
MPOL_INTERLEAVE: Final = 3
MPOL_F_ADDR: Final = 1 << 1
_NUMA_SYSCALLS: Final = {  # (mbind, set_mempolicy, get_mempolicy)
    "x86_64": (237, 238, 239),
    "aarch64": (235, 237, 236),
}
_MAX_NODES: Final = 1024


def _numa_numbers() -> tuple[int, int, int]:
    machine = os.uname().machine
    if machine not in _NUMA_SYSCALLS:
        raise OSError(38, f"NUMA syscalls: unknown architecture {machine}")  # ENOSYS
    return _NUMA_SYSCALLS[machine]


def _nodemask(nodes: list[int]) -> ctypes.Array[ctypes.c_ulong]:
    mask = (ctypes.c_ulong * (_MAX_NODES // 64))()
    for node in nodes:
        mask[node // 64] |= 1 << (node % 64)
    return mask


def mbind(address: int, length: int, mode: int, nodes: list[int]) -> None:
    """Set the memory policy of a mapping (for shmem: of the file's pages)."""
    number = _numa_numbers()[0]
    mask = _nodemask(nodes) if nodes else None
    maxnode = _MAX_NODES + 1 if nodes else 0
    if libc.syscall(
        libc.c_long(number), libc.c_void_p(address), libc.c_size_t(length),
        libc.c_int(mode), mask, libc.c_long(maxnode), libc.c_int(0),
    ) != 0:  # fmt: skip
        raise _fail("mbind")


def set_mempolicy(mode: int, nodes: list[int]) -> None:
    """Set the calling thread's memory policy (fallocate allocates by it)."""
    number = _numa_numbers()[1]
    mask = _nodemask(nodes) if nodes else None
    maxnode = _MAX_NODES + 1 if nodes else 0
    if libc.syscall(libc.c_long(number), libc.c_int(mode), mask, libc.c_long(maxnode)) != 0:
        raise _fail("set_mempolicy")


def get_mempolicy(address: int) -> tuple[int, list[int]]:
    """(mode, nodes) of the policy governing the page at address."""
    number = _numa_numbers()[2]
    mode = ctypes.c_int(0)
    mask = _nodemask([])
    if libc.syscall(
        libc.c_long(number), ctypes.byref(mode), mask, libc.c_long(_MAX_NODES + 1),
        libc.c_void_p(address), libc.c_long(MPOL_F_ADDR),
    ) != 0:  # fmt: skip
        raise _fail("get_mempolicy")
    nodes = [i for i in range(_MAX_NODES) if mask[i // 64] >> (i % 64) & 1]
    return mode.value, nodes


# --------------------------------------------------------------------------- paths


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2): open path relative to dirfd under the resolve restrictions."""
    how = struct.pack("QQQ", flags, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = libc.syscall(
        libc.c_long(SYS_openat2),
        libc.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        buf,
        libc.c_size_t(len(how)),
    )
    if fd < 0:
        raise _fail("openat2")
    return int(fd)


def open_beneath(dirfd: int, path: str, flags: int, mode: int = 0o600) -> int:
    """Open path so that no symlink, '..' or magic link resolves outside dirfd.

    Uses RESOLVE_BENEATH, so the check and the open are one atomic kernel
    step: a symlink swapped in between cannot redirect it.
    """
    # openat2 rejects a mode (EINVAL) unless the call can create the file.
    # (O_TMPFILE contains O_DIRECTORY's bit: test for all of it.)
    creates = flags & os.O_CREAT or (flags & os.O_TMPFILE) == os.O_TMPFILE
    mode = mode if creates else 0
    return openat2(dirfd, path, flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)


def iter_chunks(offset: int, length: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Split [offset, offset+length) into consecutive pieces of at most chunk bytes."""
    end = offset + length
    while offset < end:
        step = min(chunk, end - offset)
        yield offset, step
        offset += step
