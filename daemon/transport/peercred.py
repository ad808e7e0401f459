"""Who is on the other end of a Unix socket: SO_PEERCRED and SO_PEERGROUPS."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Final

from memplug.daemon.engine.tickets import Peer

SO_PEERGROUPS: Final = 59  # Linux 4.13; not in Python's socket module
_UCRED = struct.Struct("iII")  # pid_t pid; uid_t uid; gid_t gid


def peer_of(sock: socket.socket) -> Peer:
    """Credentials the kernel recorded when the peer connected; they cannot be forged."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid=pid, uid=uid, gids=frozenset({gid, *_peer_groups(sock)}))


def peer_uid(sock: socket.socket) -> int:
    """Only the uid (one getsockopt): enough to count a connection against its owner."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


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
