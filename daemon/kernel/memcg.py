"""The memory cgroup the daemon lives in: how much it may still charge.

Reaching a memcg limit while allocating does not fail the syscall: the
kernel OOM-kills a process of the cgroup. So the daemon checks the headroom
of its cgroup and every ancestor before a plug (v1 and v2), and lets a
sacrificial helper do the allocating when a limit exists (see helper.py).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
UNLIMITED: Final = 1 << 62  # v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class Headroom:
    bytes: int  # what can still be charged before the tightest limit
    limit: int
    usage: int
    cgroup: str  # the cgroup whose limit is the tightest
    kind: str = "memory"  # or "hugetlb": which controller's limit

    def describe(self) -> str:
        return f"{self.kind} cgroup {self.cgroup} (limit {self.limit}, in use {self.usage})"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


# /proc/PID/cgroup stays open: a pread from offset 0 regenerates it (a move to
# another cgroup shows at once) in one syscall, where open/read/close took five
# and each let another thread take the GIL in the middle of a small plug.
_cgroup_files: dict[int, int] = {}
_cgroup_files_lock = threading.Lock()


def _read_cgroup_file(pid: int) -> str:
    with _cgroup_files_lock:
        fd = _cgroup_files.get(pid)
        if fd is None:
            fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
            _cgroup_files[pid] = fd
    try:
        return os.pread(fd, 65536, 0).decode()
    except OSError:
        # The process is gone (ESRCH): forget its fd so a reused pid is read afresh.
        with _cgroup_files_lock:
            if _cgroup_files.get(pid) == fd:
                del _cgroup_files[pid]
                os.close(fd)
        raise


def _own_cgroups(pid: int) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of the process."""
    v2 = v1 = None
    try:
        lines = _read_cgroup_file(pid).splitlines()
    except OSError:
        return None, None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _chain(base: Path, path: str) -> list[Path]:
    """base/path and each ancestor up to base, innermost first."""
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


UNLIMITED_TTL: Final = 5.0  # seconds a "no limit on this chain" answer is trusted
_unlimited: dict[tuple[str | None, str | None], float] = {}


def headroom(pid: int | None = None) -> Headroom | None:
    """The smallest headroom along the process's memory cgroups; None if unlimited.

    The process's cgroups are read every time (it may be moved); that a chain
    has no limit at all is remembered for a few seconds, which spares a small
    plug a dozen file reads in the common case.
    """
    v2, v1 = _own_cgroups(pid or os.getpid())
    key = (v2, v1)
    now = time.monotonic()
    if _unlimited.get(key, 0.0) > now:
        return None
    found = _headroom(v2, v1)
    if found is None:
        _unlimited[key] = now + UNLIMITED_TTL
    return found


def _headroom(v2: str | None, v1: str | None) -> Headroom | None:
    candidates: list[Headroom] = []
    if v1 is not None:
        for d in _chain(CGROUP_ROOT / "memory", v1):
            limit = _read_int(d / "memory.limit_in_bytes")
            usage = _read_int(d / "memory.usage_in_bytes")
            if limit is not None and usage is not None:
                candidates.append(Headroom(max(0, limit - usage), limit, usage, str(d)))
    if v2 is not None and (CGROUP_ROOT / "cgroup.controllers").exists():
        for d in _chain(CGROUP_ROOT, v2):
            limit = _read_int(d / "memory.max")
            usage = _read_int(d / "memory.current")
            if limit is not None and usage is not None:
                candidates.append(Headroom(max(0, limit - usage), limit, usage, str(d)))
    return min(candidates, key=lambda h: h.bytes) if candidates else None


def chain_headroom(mount: Path, directory: Path, version: int) -> Headroom | None:
    """The smallest memory headroom from directory up to the controller's mount (any cgroup)."""
    if version == 2:
        return files_headroom(mount, directory, "memory.max", "memory.current")
    return files_headroom(mount, directory, "memory.limit_in_bytes", "memory.usage_in_bytes")


def files_headroom(
    mount: Path, directory: Path, limit_file: str, usage_file: str, *, kind: str = "memory"
) -> Headroom | None:
    """The smallest limit - usage along directory and its ancestors up to mount; None: no limit."""
    candidates: list[Headroom] = []
    relative = directory.relative_to(mount).as_posix()
    for d in _chain(mount, "" if relative == "." else relative):
        limit = _read_int(d / limit_file)
        usage = _read_int(d / usage_file)
        if limit is not None and usage is not None:
            candidates.append(Headroom(max(0, limit - usage), limit, usage, str(d), kind))
    return min(candidates, key=lambda h: h.bytes) if candidates else None
