"""Who is on the other end of a Unix socket: SO_PEERCRED and SO_PEERGROUPS."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Final

from memplug.daemon.engine.tickets import Peer

SO_PEERGROUPS: Final = 59  # Linux 4.13; not in Python's socket module
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
