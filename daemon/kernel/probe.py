"""What this kernel can do, probed once and cached.

Like QEMU's memfd probe: a feature is offered only after it was seen to work.
MEMPLUG_DISABLE_MADV_POPULATE=1 makes the probe report MADV_POPULATE_* as
missing, so that tests (and operators chasing a kernel bug) can run the
fallback paths on a kernel that has them.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memplug.daemon.kernel import ops

HUGEPAGES_SYSFS: Final = Path("/sys/kernel/mm/hugepages")
BASE_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


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


@functools.cache
def has_madv_populate() -> bool:
    """True if MADV_POPULATE_READ/WRITE work (Linux >= 5.14)."""
    if os.environ.get("MEMPLUG_DISABLE_MADV_POPULATE") == "1":
        return False
    fd = ops.memfd_create("memplug-probe", ops.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, BASE_PAGE_SIZE)
        with ops.map_shared(fd, 0, BASE_PAGE_SIZE) as mapping:
            try:
                ops.populate(mapping.address, BASE_PAGE_SIZE, write=True)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return False
                raise
    finally:
        os.close(fd)
    return True


@functools.cache
def has_memfd_noexec_seal() -> bool:
    """True if memfd_create accepts MFD_NOEXEC_SEAL (Linux >= 6.3)."""
    try:
        fd = ops.memfd_create("memplug-probe", ops.MFD_CLOEXEC | ops.MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


@functools.cache
def has_memfd_hugetlb(page_size: int) -> bool:
    """True if a hugetlb memfd of page_size can be created (even with an empty pool)."""
    try:
        fd = ops.memfd_create("memplug-probe", ops.MFD_CLOEXEC | ops.huge_page_flag(page_size))
    except OSError:
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------- THP and NUMA

THP_SYSFS: Final = Path("/sys/kernel/mm/transparent_hugepage")
THP_SHMEM_MODES: Final = ("always", "within_size", "advise", "force")


def _selected(path: Path) -> str | None:
    """The [bracketed] choice of a sysfs multiple-choice file."""
    try:
        match = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def shmem_thp_mode() -> str:
    """Effective shmem THP mode for 2 MiB pages: the per-size knob unless it says inherit."""
    per_size = _selected(THP_SYSFS / "hugepages-2048kB" / "shmem_enabled")
    if per_size is not None and per_size != "inherit":
        return per_size
    return _selected(THP_SYSFS / "shmem_enabled") or "unsupported"


def shmem_thp_allowed() -> bool:
    return shmem_thp_mode() in THP_SHMEM_MODES


SHMEM_THP_HINT: Final = (
    "allow them with: echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled "
    "(or within_size; the per-size knob hugepages-2048kB/shmem_enabled overrides it)"
)


def _cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def numa_nodes() -> list[int]:
    """Online NUMA nodes ([0] where the kernel has no NUMA support)."""
    try:
        return _cpulist(Path("/sys/devices/system/node/online").read_text())
    except OSError:
        return [0]


def node_cpus(node: int) -> list[int]:
    try:
        return _cpulist(Path(f"/sys/devices/system/node/node{node}/cpulist").read_text())
    except OSError:
        return sorted(os.sched_getaffinity(0))
