"""What the fd socket lets one peer hold, and how it sheds a flood.

The socket is open to every local uid, so what one uid can hold is bounded,
sized from the daemon's RLIMIT_NOFILE: connections per uid and in all, and
replies whose fd the peer has not read yet (such an fd counts against the
daemon's own RLIMIT_NOFILE until read; SIOCOUTQ tells when it was).
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Final

MAX_CONNECTIONS: Final = 4096  # in all, however high RLIMIT_NOFILE is
RESERVED_FDS: Final = 256  # at least this many fds stay for regions, gRPC, the store
ACCEPT_BACKOFF: Final = (0.05, 1.0)  # pause accepting after EMFILE/ENFILE: first, longest
# Shedding costs the daemon about what reconnecting costs the flooder: past this many
# sheds in a window, accepting pauses until the window ends (the connects wait in the
# backlog), so a reconnect loop cannot take more than a sliver of a CPU.
SHED_BURST: Final = 100
SHED_WINDOW: Final = 0.1  # seconds
UNREAD_RECHECK: Final = (0.01, 1.0)  # SIOCOUTQ polls of an unread reply: first, longest
_INT = struct.Struct("i")


@dataclass(frozen=True)
class FdLimits:
    """What the fd socket may hold, in all and per peer uid."""

    nofile: int  # the daemon's RLIMIT_NOFILE (soft) these were sized from
    connections: int  # open connections in all
    per_uid: int  # open connections of one uid, unread replies included
    unread_per_uid: int  # replies with an fd that one uid has not read yet

    @classmethod
    def for_nofile(cls, nofile: int) -> FdLimits:
        """A quarter of the fd table (at least RESERVED_FDS) stays for regions and gRPC;
        one uid may hold a sixteenth of the connections, half of those unread."""
        reserve = max(RESERVED_FDS, nofile // 4)
        connections = max(16, min(MAX_CONNECTIONS, nofile - reserve))
        per_uid = max(8, connections // 16)
        return cls(nofile, connections, per_uid, max(4, per_uid // 2))

    def describe(self) -> str:
        return (
            f"RLIMIT_NOFILE {self.nofile}: at most {self.connections} connections, "
            f"{self.per_uid} per uid, {self.unread_per_uid} unread replies per uid"
        )


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes sent on a Unix stream socket that the peer has not read (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_INT.size))
    return int(_INT.unpack(raw)[0])
