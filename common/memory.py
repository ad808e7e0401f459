"""Memory a process holds: page sizes, huge-page pools, and prefaulting a mapping.

The daemon populates the regions it holds and a client populates its own
private mappings with the same calls, so they live here, below both. The
facts are read from /proc and /sys each time (pools change); the
MADV_POPULATE probe runs once.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memplug.common import libc

# madvise(2)
MADV_POPULATE_READ: Final = 22  # Linux 5.14; Python 3.11's mmap module lacks them
MADV_POPULATE_WRITE: Final = 23
MADV_HUGEPAGE: Final = 14

# mmap(2)
MAP_NORESERVE: Final = 0x4000
MAP_HUGETLB: Final = 0x40000
MAP_HUGE_SHIFT: Final = 26

BASE_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
HUGEPAGES_SYSFS: Final = Path("/sys/kernel/mm/hugepages")

_ADVICE_NAMES: Final = {
    MADV_POPULATE_READ: "MADV_POPULATE_READ",
    MADV_POPULATE_WRITE: "MADV_POPULATE_WRITE",
    MADV_HUGEPAGE: "MADV_HUGEPAGE",
}


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) with the GIL released; OSError(errno, "madvise(ADVICE): reason")."""
    if libc.madvise(address, length, advice) != 0:
        err = libc.errno()
        step = f"madvise({_ADVICE_NAMES.get(advice, advice)})"
        raise OSError(err, f"{step}: {os.strerror(err)}")


def populate(address: int, length: int, *, write: bool) -> None:
    """Fault in page tables (and backing pages) without SIGBUS: errors return EFAULT etc."""
    madvise(address, length, MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)


@functools.cache
def has_madv_populate() -> bool:
    """True if this kernel has MADV_POPULATE_READ/WRITE (Linux >= 5.14)."""
    prot = 0x1 | 0x2  # PROT_READ | PROT_WRITE
    flags = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
    address = libc.mmap(None, BASE_PAGE_SIZE, prot, flags, -1, 0)
    if address is None or address == libc.MAP_FAILED:
        err = libc.errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    try:
        populate(int(address), BASE_PAGE_SIZE, write=True)
    except OSError:
        return False  # EINVAL: an advice this kernel does not know
    finally:
        libc.munmap(address, BASE_PAGE_SIZE)
    return True


@dataclass(frozen=True)
class HugePool:
    """One hugetlb pool, as /sys/kernel/mm/hugepages/hugepages-<N>kB reports it."""

    page_size: int
    total: int
    free: int
    reserved: int
    surplus: int
    overcommit: int


def huge_page_sizes() -> list[int]:
    """Huge page sizes the kernel offers pools for, ascending."""
    sizes = []
    if HUGEPAGES_SYSFS.is_dir():
        for entry in HUGEPAGES_SYSFS.iterdir():
            match = re.fullmatch(r"hugepages-(\d+)kB", entry.name)
            if match:
                sizes.append(int(match.group(1)) * 1024)
    return sorted(sizes)


def default_huge_page_size() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def huge_pool(page_size: int) -> HugePool:
    """Current state of the pool of page_size; FileNotFoundError if there is none."""
    base = HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB"

    def read(name: str) -> int:
        return int((base / name).read_text())

    return HugePool(
        page_size=page_size,
        total=read("nr_hugepages"),
        free=read("free_hugepages"),
        reserved=read("resv_hugepages"),
        surplus=read("surplus_hugepages"),
        overcommit=read("nr_overcommit_hugepages"),
    )


def huge_pools() -> list[HugePool]:
    """Every pool the kernel offers that can be read now, by ascending page size."""
    pools = []
    for size in huge_page_sizes():
        try:
            pools.append(huge_pool(size))
        except OSError:
            continue
    return pools
