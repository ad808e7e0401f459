"""A region's memory charged to the cgroup its creator named (engine-internal).

The kernel charges a page to the memory cgroup of the task that allocates it.
A region created with charge_cgroup is therefore plugged, populated and
re-backed after a discard only by helper processes placed in that cgroup
(kernel/helper.py, kernel/cgroup.py): the consumer is billed, the daemon's
own cgroup is not. The cgroup's limit is checked before a plug (limit - usage
along its ancestors) because reaching it OOM-kills instead of failing; if the
check loses a race, the victim is the helper, never the daemon.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from memplug.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from memplug.common.ranges import Range, RangeList
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind
from memplug.daemon.engine.region import Region
from memplug.daemon.engine.runner import Work
from memplug.daemon.kernel import cgroup
from memplug.daemon.kernel.helper import HelperPool

__all__ = ["ChargeTarget", "allocator", "checked_path", "helpers", "plug_target", "target"]

ChargeTarget = cgroup.ChargeTarget


def checked_path(path: str) -> str:
    """CreateRegion's check: "" (the daemon's cgroup) or the normalised path of an existing one."""
    if not path:
        return ""
    try:
        return cgroup.target(path).path
    except cgroup.BadCgroupPath as exc:
        raise InvalidArgument(f"charge_cgroup: {exc}") from exc
    except cgroup.CgroupError as exc:
        raise FailedPrecondition(f"charge_cgroup: {exc}") from exc


def target(region: Region, op: str, r: Range | RangeList) -> ChargeTarget | None:
    """Where the region's memory is charged now; None: the daemon's own cgroup.

    The cgroup may have been removed since the region was made (its pod ended):
    that is the caller's FAILED_PRECONDITION, named, before anything is allocated.
    """
    path = region.options.charge_cgroup
    if not path:
        return None
    try:
        return cgroup.target(path)
    except cgroup.CgroupError as exc:
        raise FailedPrecondition(
            f"region {region.name!r}: {op} of {r} cannot charge memory cgroup {path}: {exc}",
            region=region.name,
        ) from exc


def plug_target(
    region: Region, r: Range | RangeList, new: int, *, check: bool
) -> ChargeTarget | None:
    """target() for a plug of `new` bytes, refused when the cgroup has no room for them.

    shmem and file pages count against the memory controller; hugetlb pages
    against the hugetlb controller's limit for their page size (where the
    cgroup exists there). check=False (MEMPLUG_MEMCG_CHECK=0) lets the plug
    run into the limit, which the helper's OOM kill then reports.
    """
    found = target(region, "plug", r)
    if found is None or not check:
        return found
    backing = region.backing
    if backing.kind is BackingKind.HUGETLB:
        room = cgroup.hugetlb_headroom(found, backing.page_size)
    else:
        room = cgroup.memory_headroom(found)
    if room is not None and new > room.bytes:
        raise ResourceExhausted(
            f"region {region.name!r}: plug of {r} needs {format_size(new)}, but its charge "
            f"cgroup {found.path} has {format_size(room.bytes)} left under the "
            f"{room.describe()}: {format_size(new - room.bytes)} ({new - room.bytes} bytes) "
            "missing; raise that cgroup's limit or plug less",
            region=region.name,
        )
    return found


def helpers(backing: Backing, charge: ChargeTarget | None) -> HelperPool:
    """Allocation helpers for the backing, each placed in the charge target's cgroups."""
    if charge is None:
        return HelperPool(backing.fd)
    return HelperPool(backing.fd, charge.procs_files(hugetlb=backing.kind is BackingKind.HUGETLB))


@contextlib.contextmanager
def allocator(region: Region, op: str, r: Range | RangeList) -> Iterator[Work]:
    """fallocate for the region's memory, charged where the region's pages belong."""
    charge = target(region, op, r)
    if charge is None:
        yield region.backing.allocate
        return
    with helpers(region.backing, charge) as pool:
        pool.get()  # joins the cgroup now: a discard must not punch a block it cannot refill
        yield pool.allocate
