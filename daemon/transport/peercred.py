"""Who is on the other end of a Unix socket: SO_PEERCRED, SO_PEERGROUPS, its cgroups."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import Final

from memplug.daemon.engine.tickets import Peer
from memplug.daemon.kernel import cgroup

SO_PEERGROUPS: Final = 59  # Linux 4.13; not in Python's socket module
SO_PEERPIDFD: Final = 77  # Linux 6.5: a pidfd of the process that connected
_UCRED = struct.Struct("iII")  # pid_t pid; uid_t uid; gid_t gid


def peer_of(sock: socket.socket, cred: tuple[int, int, int] | None = None) -> Peer:
    """Credentials the kernel recorded when the peer connected; they cannot be forged.

    cred: (pid, uid, gid) as peer_cred() read them from this socket already.
    """
    pid, uid, gid = cred if cred is not None else peer_cred(sock)
    return Peer(pid=pid, uid=uid, gids=frozenset({gid, *_peer_groups(sock)}))


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid), one getsockopt: the uid counts a connection against its owner."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(pid), int(uid), int(gid)


def peer_cgroups(sock: socket.socket) -> cgroup.ProcessCgroups:
    """The cgroups of the process that connected, read while its connection is open.

    SO_PEERPIDFD pins that very process, so a pid reused after it exits is
    never mistaken for it. Before Linux 6.5 the pidfd is opened from
    SO_PEERCRED's pid, which could only be a newcomer's if the peer exited
    and its pid was reused in the microseconds since it sent its request.
    """
    try:
        pidfd = int.from_bytes(
            sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), sys.byteorder, signed=True
        )
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise cgroup.CgroupError(f"cannot identify the peer process: {exc}") from exc
        pid = peer_of(sock).pid
        if pid <= 0:
            raise cgroup.CgroupError(
                "the peer is in a pid namespace the daemon cannot see into"
            ) from exc
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as gone:
            raise cgroup.ProcessGone(f"the peer (pid {pid}) exited: {gone}") from gone
    try:
        return cgroup.of_pidfd(pidfd)
    except OSError as exc:  # /proc unreadable: the daemon's sandbox, not the peer
        raise cgroup.CgroupError(f"cannot read the peer's cgroups: {exc}") from exc
    finally:
        os.close(pidfd)


def _peer_groups(sock: socket.socket) -> list[int]:
    size = 64 * 4
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return []
            raise
        return list(struct.unpack(f"{len(raw) // 4}I", raw))
    return []
