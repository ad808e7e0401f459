"""A region's memory charged to the cgroup its creator named (engine-internal).

The kernel charges a page to the memory cgroup of the task that allocates it.
A region created with charge_cgroup is therefore plugged, populated and
re-backed after a discard only by helper processes placed in that cgroup
(kernel/helper.py, kernel/cgroup.py): the consumer is billed, the daemon's
own cgroup is not. A region created with charge_to_peer learns its cgroups
at its first attach (bind_first_attacher), from the attaching process
itself; until then nothing may allocate for it. The cgroup's limit is
checked before a plug (limit - usage along its ancestors) because reaching
it OOM-kills instead of failing; if the check loses a race, the victim is
the helper, never the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from memplug.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from memplug.common.ranges import Range, RangeList
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind
from memplug.daemon.engine.region import Region, RegionOptions
from memplug.daemon.engine.runner import Work
from memplug.daemon.kernel import cgroup
from memplug.daemon.kernel.helper import HelperPool

__all__ = [
    "ChargeTarget",
    "FirstAttacher",
    "ProcessCgroups",
    "allocator",
    "bind_first_attacher",
    "checked_path",
    "checked_peer_charging",
    "helpers",
    "plug_target",
    "target",
]

ChargeTarget = cgroup.ChargeTarget
ProcessCgroups = cgroup.ProcessCgroups
# Reads the cgroups of the process attaching a region (the fd socket's peer);
# raises cgroup.CgroupError when it cannot.
FirstAttacher = Callable[[], ProcessCgroups]


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


def checked_peer_charging(charge_cgroup: str) -> None:
    """CreateRegion's check of charge_to_peer: alone, and on a machine with a memory controller."""
    if charge_cgroup:
        raise InvalidArgument(
            "charge_cgroup and charge_to_peer exclude each other: name the cgroup to "
            "charge, or let the region be charged to the process that first attaches it"
        )
    if cgroup.controller("memory") is None:
        raise FailedPrecondition(
            "charge_to_peer: no memory cgroup controller is mounted (neither a cgroup v1 "
            "'memory' hierarchy nor a cgroup2 mount offering 'memory')"
        )


def bind_first_attacher(region: Region, first_attacher: FirstAttacher) -> RegionOptions:
    """The region's options charged to the attaching process's cgroups, which must exist.

    The peer names nothing: its cgroups are what the kernel says it is in.
    """
    try:
        found = first_attacher()
        cgroup.target(found.memory, found.hugetlb)
    except cgroup.CgroupError as exc:
        raise FailedPrecondition(
            f"region {region.name!r} is charged to the process that first attaches it "
            f"(charge_to_peer), but this attacher's cgroups cannot be used: {exc}; the "
            "attach is refused and the region still waits for its first attacher",
            region=region.name,
        ) from exc
    return dataclasses.replace(
        region.options,
        charge_cgroup=found.memory,
        # Recorded only where it differs: "" means the memory cgroup's path.
        charge_hugetlb_cgroup="" if found.hugetlb in ("", found.memory) else found.hugetlb,
    )


def target(region: Region, op: str, r: Range | RangeList) -> ChargeTarget | None:
    """Where the region's memory is charged now; None: the daemon's own cgroup.

    The cgroup may have been removed since the region was made (its pod ended):
    that is the caller's FAILED_PRECONDITION, named, before anything is allocated.
    A charge_to_peer region nobody has attached yet has no cgroup to charge,
    and charging the daemon instead would bill the wrong party without a word.
    """
    options = region.options
    if options.awaiting_peer:
        raise FailedPrecondition(
            f"region {region.name!r}: {op} of {r} refused: the region is charged to the "
            "process that first attaches it (charge_to_peer), and none has attached it "
            f"yet; attach it first (memplug exec -r {region.name}:sparse -- ..., or redeem a "
            f"ticket on the fd socket), then {op} it",
            region=region.name,
        )
    path = options.charge_cgroup
    if not path:
        return None
    try:
        return cgroup.target(path, options.charge_hugetlb_cgroup)
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
    charged = f"its charge cgroup {found.path}"
    if backing.kind is BackingKind.HUGETLB:
        room = cgroup.hugetlb_headroom(found, backing.page_size)
        if found.hugetlb_dir is not None and found.hugetlb is not None:
            where = found.hugetlb_dir.relative_to(found.hugetlb.mount).as_posix()
            charged = f"its hugetlb charge cgroup /{where.lstrip('.')}"
    else:
        room = cgroup.memory_headroom(found)
    if room is not None and new > room.bytes:
        raise ResourceExhausted(
            f"region {region.name!r}: plug of {r} needs {format_size(new)}, but "
            f"{charged} has {format_size(room.bytes)} left under the "
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
