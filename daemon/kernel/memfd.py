"""Sealed memfds for regions: create, size, restrict, seal - one utility, one place.

Every step that fails raises OSError(errno, "step: reason") naming the step,
and the fd is closed before the error leaves: a half-made memfd never escapes.
"""

from __future__ import annotations

import os
from typing import Final

from memplug.common.errors import FailedPrecondition
from memplug.daemon.kernel import ops, probe

# Nobody holding the fd may resize it (shrinking SIGBUSes every other mapper)
# or add seals (F_SEAL_WRITE/FUTURE_WRITE would make our punch-hole fail).
REGION_SEALS: Final = ops.F_SEAL_SHRINK | ops.F_SEAL_GROW | ops.F_SEAL_SEAL


def create_memfd(name: str, size: int, owner_uid: int, extra_flags: int = 0) -> int:
    """memfd_create + ftruncate + owner + seals, closing the fd if any step fails.

    extra_flags: MFD_HUGETLB and its page size (ops.huge_page_flag) for hugetlbfs.
    """
    flags = ops.MFD_CLOEXEC | ops.MFD_ALLOW_SEALING | extra_flags
    if probe.has_memfd_noexec_seal():
        flags |= ops.MFD_NOEXEC_SEAL
    fd = ops.memfd_create(f"memplug:{name}", flags)
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise OSError(exc.errno, f"ftruncate: {exc.strerror}") from exc
        restrict_inode(fd, owner_uid)
        ops.add_seals(fd, REGION_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict_inode(fd: int, owner_uid: int) -> None:
    """Mode 0600, owned by the region's owner: only they (and root) may reopen it.

    A memfd inode is created with mode 0777: anyone handed even a read-only fd
    could reopen /proc/self/fd/N read-write. Mode 0600 and the region owner
    as the inode's owner leave that reopen to the owner (and root) alone.
    """
    # chmod first: once the inode is someone else's, that would need CAP_FOWNER.
    try:
        os.fchmod(fd, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, f"fchmod: {exc.strerror}") from exc
    if owner_uid != os.geteuid():
        try:
            os.fchown(fd, owner_uid, -1)
        except PermissionError:
            raise FailedPrecondition(
                f"memplugd cannot make uid {owner_uid} the region's owner: it needs "
                "CAP_CHOWN (run it as root, or with AmbientCapabilities=CAP_CHOWN)"
            ) from None
        except OSError as exc:
            raise OSError(exc.errno, f"fchown: {exc.strerror}") from exc
