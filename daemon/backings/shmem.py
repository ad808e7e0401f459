"""SHMEM: a sealed memfd on the kernel's internal tmpfs, 4 KiB pages."""

from __future__ import annotations

import os

from memplug.common import memory
from memplug.common.errors import FailedPrecondition, ResourceExhausted
from memplug.common.sizes import format_size
from memplug.daemon.backings.base import Backing, BackingKind
from memplug.daemon.kernel import ops, probe

# Nobody holding the fd may resize it (shrinking SIGBUSes every other mapper)
# or add seals (F_SEAL_WRITE/FUTURE_WRITE would make our punch-hole fail).
REGION_SEALS = ops.F_SEAL_SHRINK | ops.F_SEAL_GROW | ops.F_SEAL_SEAL


def create_memfd(name: str, size: int, owner_uid: int, extra_flags: int = 0) -> int:
    """memfd_create + ftruncate + owner + seals, closing the fd if any step fails.

    A memfd inode is created with mode 0777: anyone handed even a read-only fd
    could reopen /proc/self/fd/N read-write. Mode 0600 and the region owner
    as the inode's owner leave that reopen to the owner (and root) alone.
    """
    flags = ops.MFD_CLOEXEC | ops.MFD_ALLOW_SEALING | extra_flags
    if probe.has_memfd_noexec_seal():
        flags |= ops.MFD_NOEXEC_SEAL
    fd = ops.memfd_create(f"memplug:{name}", flags)
    try:
        os.ftruncate(fd, size)
        restrict_inode(fd, owner_uid)
        ops.add_seals(fd, REGION_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict_inode(fd: int, owner_uid: int) -> None:
    # chmod first: once the inode is someone else's, that would need CAP_FOWNER.
    os.fchmod(fd, 0o600)
    if owner_uid != os.geteuid():
        try:
            os.fchown(fd, owner_uid, -1)
        except PermissionError:
            raise FailedPrecondition(
                f"memplugd cannot make uid {owner_uid} the region's owner: it needs "
                "CAP_CHOWN (run it as root, or with AmbientCapabilities=CAP_CHOWN)"
            ) from None


class ShmemBacking(Backing):
    kind = BackingKind.SHMEM

    @classmethod
    def create(cls, name: str, size: int, owner_uid: int) -> ShmemBacking:
        return cls(create_memfd(name, size, owner_uid), size, memory.BASE_PAGE_SIZE)

    def exhausted(self, missing: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"shmem: the kernel could not allocate {format_size(missing)} more "
            "(out of memory, or a memory limit reached)"
        )
