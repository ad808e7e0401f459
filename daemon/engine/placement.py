"""A region's options applied to the kernel: NUMA placement, mlock, and THP's mapping.

Huge pages (THP) and the NUMA policy are given to the backing when it is
made (mem_policy); what lives outside the backing is applied here: the
shmem inode's policy, the mlocked mapping, and the workers' CPUs and policy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from memplug.common.ranges import Range
from memplug.daemon.backings import MemPolicy
from memplug.daemon.engine.region import Placement, Region
from memplug.daemon.kernel import ops, probe

MPOL_MODES = {
    "bind": ops.MPOL_BIND,
    "preferred": ops.MPOL_PREFERRED,
    "interleave": ops.MPOL_INTERLEAVE,
}


def mem_policy(placement: Placement) -> MemPolicy | None:
    """The backing's NUMA memory policy for a region's placement (None: the default)."""
    if not placement.active:
        return None
    return MemPolicy(MPOL_MODES[placement.policy], placement.nodes)


def apply_region_options(region: Region) -> None:
    """Apply the region's options to the kernel: the file's NUMA policy, the mlocks."""
    region.backing.apply_policy()
    if region.options.lock:
        region.lock_map = ops.map_shared(region.backing.fd, 0, region.size)
        with region.mutex:
            plugged = list(region.plugged)
        lock_ranges(region, plugged)


def release_region(region: Region | None) -> None:
    if region is not None and region.lock_map is not None:
        region.lock_map.close()  # munmap drops the locks
        region.lock_map = None


def lock_ranges(region: Region, ranges: list[Range]) -> None:
    if region.lock_map is None:
        return
    for r in ranges:
        ops.mlock(region.lock_map.address + r.offset, r.length)


def unlock_ranges(region: Region, ranges: list[Range]) -> None:
    if region.lock_map is None:
        return
    for r in ranges:
        with contextlib.suppress(OSError):
            ops.munlock(region.lock_map.address + r.offset, r.length)


def placed(region: Region, work: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """Run work on the region's NUMA nodes: their CPUs and, for fallocate, their memory."""
    placement = region.options.placement
    if not placement.active:
        return work
    cpus = {c for node in placement.nodes for c in probe.node_cpus(node)}
    mode = MPOL_MODES[placement.policy]

    def run(offset: int, length: int) -> None:
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus & saved or saved)
        ops.set_mempolicy(mode, list(placement.nodes))
        try:
            work(offset, length)
        finally:
            ops.set_mempolicy(ops.MPOL_DEFAULT, [])
            os.sched_setaffinity(0, saved)

    return run
