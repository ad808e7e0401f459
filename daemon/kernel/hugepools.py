"""hugetlb pools in sysfs: the kernel-wide pool of a page size and its per-node pools.

The kernel-wide pool is /sys/kernel/mm/hugepages/hugepages-<N>kB, a node's pool
/sys/devices/system/node/node<M>/hugepages/hugepages-<N>kB. A node's directory
has no resv_hugepages: reservations are counted kernel-wide only, so the
kernel-wide figure is reported for every node. Writing nr_hugepages makes the
kernel allocate or free pages and leaves the count it reached: fewer than
asked when memory is too fragmented for pages of that size.

Which pools exist (the page sizes, the nodes) is fixed while the kernel runs
and is looked up once (layout()); the counts are read anew every time, through
files kept open (sysfs.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memplug.common import memory
from memplug.common.sizes import format_size
from memplug.daemon.kernel.sysfs import ATTRIBUTES

NODE_SYSFS: Final = Path("/sys/devices/system/node")
COMPACT_ALL: Final = Path("/proc/sys/vm/compact_memory")


@dataclass(frozen=True)
class PoolCounts:
    """Pages of one pool (node None: kernel-wide); reserved is always kernel-wide."""

    page_size: int
    node: int | None
    total: int
    free: int
    reserved: int
    surplus: int


def pool_dir(page_size: int, node: int | None) -> Path:
    leaf = f"hugepages-{page_size // 1024}kB"
    if node is None:
        return memory.HUGEPAGES_SYSFS / leaf
    return NODE_SYSFS / f"node{node}" / "hugepages" / leaf


def describe(page_size: int, node: int | None) -> str:
    where = "kernel-wide" if node is None else f"on NUMA node {node}"
    return f"hugetlb {format_size(page_size)} pool {where}"


def read(page_size: int, node: int | None) -> PoolCounts:
    """The pool's counts now; FileNotFoundError if the kernel has no such pool."""
    base = pool_dir(page_size, node)

    def value(directory: Path, name: str) -> int:
        return ATTRIBUTES.read_int(directory / name)

    return PoolCounts(
        page_size=page_size,
        node=node,
        total=value(base, "nr_hugepages"),
        free=value(base, "free_hugepages"),
        reserved=value(pool_dir(page_size, None), "resv_hugepages"),
        surplus=value(base, "surplus_hugepages"),
    )


def set_total(page_size: int, node: int | None, pages: int) -> int:
    """Write nr_hugepages; returns the total the kernel reached (may fall short)."""
    path = pool_dir(page_size, node) / "nr_hugepages"
    path.write_text(str(max(0, pages)))
    return int(path.read_text())


def compact(node: int | None) -> None:
    """Ask the kernel to compact memory (of one node, or all) so huge pages can be found."""
    path = COMPACT_ALL if node is None else NODE_SYSFS / f"node{node}" / "compact"
    path.write_text("1")


@functools.cache
def layout() -> tuple[tuple[int, int | None], ...]:
    """(page size, node) of every pool, kernel-wide (None) before per node, by page size.

    Huge page sizes are registered at boot and nodes have their pools from the
    start, so this is looked up once per process.
    """
    return tuple(
        (page_size, node)
        for page_size in memory.huge_page_sizes()
        for node in (None, *nodes(page_size))
    )


def nodes(page_size: int) -> list[int]:
    """NUMA nodes that have a pool of page_size, ascending."""
    found = []
    if NODE_SYSFS.is_dir():
        for entry in NODE_SYSFS.iterdir():
            match = re.fullmatch(r"node(\d+)", entry.name)
            if match and pool_dir(page_size, int(match.group(1))).is_dir():
                found.append(int(match.group(1)))
    return sorted(found)
