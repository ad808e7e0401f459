"""systemd's service protocol, spoken directly: sd_notify, the fd store, LISTEN_FDS, reload.

No libsystemd: the protocol is a datagram of NEWLINE-separated KEY=VALUE
fields on $NOTIFY_SOCKET (fds ride along with SCM_RIGHTS), and inherited fds
numbered from 3, described by $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID.
Without $NOTIFY_SOCKET every call is a no-op that returns False.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Final

log = logging.getLogger("memplug.systemd")

SD_LISTEN_FDS_START: Final = 3


class Notifier:
    def __init__(self, env: Mapping[str, str]) -> None:
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


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if off."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def listen_fds(env: MutableMapping[str, str]) -> list[tuple[int, str]]:
    """The fds systemd passed us, with their names; consumes the LISTEN_* variables.

    They are unset so that children of the daemon do not think the fds are theirs.
    """
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


# --------------------------------------------------------------------------- reload

# systemd 252 has no Type=notify-reload (>= 253): ExecReload= must itself wait
# until the daemon has reloaded, or `systemctl reload` returns early and never
# fails. The daemon writes each reload's outcome here, in its state dir;
# `memplugd --reload-running PID` sends SIGHUP and waits for the outcome of a
# reload that began after the signal.
RELOAD_RESULT = "reload-result.json"
RELOAD_TIMEOUT = 60.0


def write_reload_result(state_dir: Path, *, started_ns: int, ok: bool, message: str) -> None:
    """Publish a reload's outcome atomically (rename), for `--reload-running` to read."""
    result = {"pid": os.getpid(), "started_ns": started_ns, "ok": ok, "message": message}
    path = state_dir / RELOAD_RESULT
    tmp = path.with_name(f".{RELOAD_RESULT}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot write the reload result %s: %s", path, exc)


def _read_reload_result(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_memplugd(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"memplugd" in arg or b"memplug.daemon" in arg for arg in argv[:3])


def reload_running(pid: int, state_dir: Path, timeout: float = RELOAD_TIMEOUT) -> tuple[bool, str]:
    """Ask the memplugd of pid to reload and wait for its answer: (reloaded, what it said)."""
    if not _is_memplugd(pid):
        return False, f"process {pid} is not a running memplugd"
    path = state_dir / RELOAD_RESULT
    asked_ns = time.monotonic_ns()  # CLOCK_MONOTONIC: the daemon reads the same clock
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return False, f"cannot signal memplugd (pid {pid}): {exc.strerror}"
    deadline = time.monotonic() + timeout
    while True:
        result = _read_reload_result(path) or {}
        started = result.get("started_ns")
        # Only a reload that began after the signal read the configuration as it is now.
        if result.get("pid") == pid and isinstance(started, int) and started >= asked_ns:
            return bool(result.get("ok")), str(result.get("message", ""))
        if not _is_memplugd(pid):
            return False, f"memplugd (pid {pid}) exited during the reload"
        if time.monotonic() > deadline:
            return False, (
                f"memplugd (pid {pid}) gave no answer in {path} within {timeout:g} s: "
                "is --state-dir the daemon's own?"
            )
        time.sleep(0.02)
