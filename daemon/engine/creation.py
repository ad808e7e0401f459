"""CreateRegion's checks and the making of a region's backing (engine-internal).

Everything a request can get wrong is refused here, before any memory or
file exists: name, size, page size, block size, options. Then the backing
is made with its options (huge pages, NUMA policy) as constructor arguments,
or taken from the warm pool.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from pathlib import Path

from memplug.common import memory
from memplug.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemplugError,
    PermissionDenied,
    ResourceExhausted,
)
from memplug.common.sizes import MiB, format_size
from memplug.daemon.backings import (
    Backing,
    BackingKind,
    FileBacking,
    HugetlbBacking,
    ShmemBacking,
)
from memplug.daemon.engine.charging import checked_path, checked_peer_charging
from memplug.daemon.engine.placement import mem_policy
from memplug.daemon.engine.region import RegionOptions, RegionSpec
from memplug.daemon.engine.warmpool import WarmPool
from memplug.daemon.kernel import probe
from memplug.daemon.kernel.memfd import restrict_inode

DEFAULT_BLOCK_SIZE = 2 * MiB
MAX_REGION_SIZE = 1 << 56  # 64 PiB: far beyond any machine, well inside off_t


def creation_error(name: str, exc: OSError) -> MemplugError:
    """What a failed memfd_create/ftruncate/open means for CreateRegion."""
    what = f"cannot create region {name!r}: {exc.strerror}"
    if exc.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EFBIG):
        return ResourceExhausted(what, errno=exc.errno)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(what, errno=exc.errno)
    if exc.errno == errno.EINVAL:
        return InvalidArgument(what, errno=exc.errno)
    return Internal(what, errno=exc.errno)


def make_backing(
    spec: RegionSpec,
    *,
    allow_dirs: list[Path],
    pool: WarmPool,
    release_quota: Callable[[int], None],
) -> tuple[Backing, int, RegionOptions]:
    """The checked request's backing, block size and options; raises OSError as the kernel does.

    release_quota gives back the quota a warm-pool memfd held if it cannot be used.
    """
    if spec.backing is None:
        raise InvalidArgument("backing is required: shmem, hugetlb or file")
    options = _options(spec)
    if spec.backing is not BackingKind.FILE and spec.path:
        raise InvalidArgument("path is only for FILE regions")
    page_size = _page_size(spec)
    block_size = spec.block_size or max(DEFAULT_BLOCK_SIZE, page_size)
    if block_size & (block_size - 1) or block_size < page_size:
        raise InvalidArgument(
            f"block size {block_size} must be a power of two and at least the page size "
            f"({format_size(page_size)})"
        )
    mpol = mem_policy(options.placement)
    if spec.backing is BackingKind.FILE:
        if spec.size:
            _check_size(spec.size, block_size)
        file_backing = FileBacking.open(
            spec.path, spec.size, allow_dirs, spec.acl.owner_uid, mpol=mpol
        )
        try:
            _check_size(file_backing.size, block_size)
        except BaseException:
            file_backing.discard_file()
            file_backing.close()
            raise
        return file_backing, block_size, options
    _check_size(spec.size, block_size)
    pooled = _from_pool(spec, page_size, block_size, options, pool, release_quota)
    if pooled is not None:
        return pooled, block_size, dataclasses.replace(options, from_warm_pool=True)
    if spec.backing is BackingKind.HUGETLB:
        backing: Backing = HugetlbBacking.create(
            spec.name, spec.size, page_size, spec.acl.owner_uid, mpol=mpol
        )
    else:
        backing = ShmemBacking.create(
            spec.name, spec.size, spec.acl.owner_uid, huge=options.thp, mpol=mpol
        )
    return backing, block_size, options


def _from_pool(
    spec: RegionSpec,
    page_size: int,
    block_size: int,
    options: RegionOptions,
    pool: WarmPool,
    release_quota: Callable[[int], None],
) -> Backing | None:
    """A warm-pool memfd for a plain request of a pooled shape, given to its owner.

    Pool memfds were made with huge pages as their spec says (the same as the
    request's, or no match) and no NUMA policy (a request with one never matches).
    """
    if (
        options.placement.active
        or options.lock
        or options.charge_cgroup
        or options.charge_to_peer
        or spec.backing is None
    ):
        # (A pool memfd's memory is charged to the daemon's cgroup, not the requested one.)
        return None
    if block_size != max(DEFAULT_BLOCK_SIZE, page_size):
        return None
    backing = pool.take(spec.backing, spec.size, page_size, options.thp)
    if backing is not None:
        try:
            restrict_inode(backing.fd, spec.acl.owner_uid)
        except BaseException:
            release_quota(backing.size)
            backing.close()
            raise
    return backing


def _options(spec: RegionSpec) -> RegionOptions:
    options = _memory_options(spec)
    if spec.charge_to_peer:
        checked_peer_charging(spec.charge_cgroup)
        return dataclasses.replace(options, charge_to_peer=True)
    charge_cgroup = checked_path(spec.charge_cgroup)
    return dataclasses.replace(options, charge_cgroup=charge_cgroup) if charge_cgroup else options


def _memory_options(spec: RegionSpec) -> RegionOptions:
    placement = spec.placement.check(probe.numa_nodes())
    if spec.backing is not BackingKind.SHMEM:
        if spec.thp:
            raise InvalidArgument(
                "transparent huge pages are a SHMEM option: use HUGETLB for huge pages, "
                "or mount the FILE region's tmpfs with huge="
            )
        return RegionOptions(thp=False, placement=placement, lock=spec.lock)
    allowed = probe.shmem_thp_allowed()
    if spec.thp and not allowed:
        raise FailedPrecondition(
            f"transparent huge pages for shmem are off (shmem_enabled = "
            f"{probe.shmem_thp_mode()}); {probe.SHMEM_THP_HINT}"
        )
    thp = allowed if spec.thp is None else spec.thp
    return RegionOptions(thp=thp, placement=placement, lock=spec.lock)


def _check_size(size: int, block_size: int) -> None:
    if size <= 0:
        raise InvalidArgument("size must be > 0")
    if size > MAX_REGION_SIZE:
        raise InvalidArgument(f"size {size} is larger than {format_size(MAX_REGION_SIZE)}")
    if size % block_size:
        raise InvalidArgument(
            f"size {size} is not a multiple of the block size ({format_size(block_size)})"
        )


def _page_size(spec: RegionSpec) -> int:
    if spec.backing is not BackingKind.HUGETLB:
        if spec.page_size not in (0, memory.BASE_PAGE_SIZE):
            raise InvalidArgument(
                f"page size {spec.page_size} is not available for {spec.backing} regions "
                f"(only {memory.BASE_PAGE_SIZE}); use a HUGETLB region for huge pages"
            )
        return memory.BASE_PAGE_SIZE
    offered = memory.huge_page_sizes()
    page_size = spec.page_size or memory.default_huge_page_size() or 0
    if page_size not in offered:
        sizes = ", ".join(format_size(s) for s in offered) or "none"
        raise InvalidArgument(
            f"huge page size {format_size(page_size)} is not offered by this kernel "
            f"(it offers: {sizes})"
        )
    if not probe.has_memfd_hugetlb(page_size):
        raise FailedPrecondition(
            f"this kernel cannot create hugetlb memfds of {format_size(page_size)} pages"
        )
    return page_size
