"""systemd's service protocol, spoken directly: sd_notify, the fd store, LISTEN_FDS.

No libsystemd: the protocol is a datagram of NEWLINE-separated KEY=VALUE
fields on $NOTIFY_SOCKET (fds ride along with SCM_RIGHTS), and inherited fds
numbered from 3, described by $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID.
Without $NOTIFY_SOCKET every call is a no-op that returns False.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Final

log = logging.getLogger("memplug.systemd")

SD_LISTEN_FDS_START: Final = 3


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket.
        self.address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str, fds: Sequence[int] = ()) -> bool:
        if not self.address:
            return False
        payload = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                if fds:
                    socket.send_fds(sock, [payload], list(fds))
                else:
                    sock.send(payload)
            except OSError as exc:
                log.warning("sd_notify %s failed: %s", fields[0].split("=")[0], exc)
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def store_fd(self, name: str, fd: int) -> bool:
        """Keep fd in systemd's fd store under name; it comes back on restart."""
        return self.send("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def remove_fd(self, name: str) -> bool:
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if off."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def listen_fds(env: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The fds systemd passed us, with their names; consumes the LISTEN_* variables.

    They are unset so that children of the daemon do not think the fds are theirs.
    """
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            fds.append((fd, names[i] if i < len(names) else "unknown"))
    return fds
