"""Cgroups a region's memory is charged to: finding the controllers, checking a path.

The kernel charges a shmem, file or hugetlb page to the cgroup of the task
that allocates it, and the charge stays there after that task exits. To bill
a consumer for a region, the daemon allocates in a helper process it moves
into the consumer's cgroup first (helper.py). This module finds where the
memory and hugetlb controllers are mounted (cgroup v1, v2 or both, as in a
hybrid layout), turns a cgroup path as /proc/PID/cgroup prints it into the
controller's directory, and reads that cgroup's headroom.

A path names a cgroup relative to the controller's mount, so it cannot leave
it: "." and ".." components are refused, and the resolved directory must
still lie beneath the mount.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memplug.daemon.kernel import memcg

MOUNTINFO: Final = Path("/proc/self/mountinfo")
MAX_PATH: Final = 4096  # PATH_MAX: longer cannot be a cgroup directory


class CgroupError(Exception):
    """A cgroup path that cannot be used; the message says why (for people)."""


class BadCgroupPath(CgroupError):
    """A path that cannot name a cgroup: relative, "..", too long, leaving the mount."""


class CgroupMissing(CgroupError):
    """A well-formed cgroup path with no cgroup behind it (never made, or removed)."""


@dataclass(frozen=True)
class Controller:
    """Where one controller is mounted, and in which cgroup version."""

    name: str  # "memory" or "hugetlb"
    version: int  # 1 or 2
    mount: Path


@dataclass(frozen=True)
class ChargeTarget:
    """The directories a helper joins to charge a cgroup: memory, and hugetlb where it exists."""

    path: str  # as the request named it
    memory: Controller
    memory_dir: Path
    hugetlb: Controller | None = None
    hugetlb_dir: Path | None = None

    def procs_files(self, *, hugetlb: bool) -> list[Path]:
        """The files a helper writes its pid into; v1 and v2 both have cgroup.procs."""
        files = [self.memory_dir / "cgroup.procs"]
        if hugetlb and self.hugetlb_dir is not None and self.hugetlb_dir != self.memory_dir:
            files.append(self.hugetlb_dir / "cgroup.procs")
        return files


def check_path(path: str) -> str:
    """The path, normalised, if it is well-formed; raises BadCgroupPath otherwise."""
    if not path.startswith("/"):
        raise BadCgroupPath(
            f"cgroup path {path!r} must be absolute, as /proc/PID/cgroup prints it "
            "(e.g. /kubepods/pod1/ctr)"
        )
    if len(path) > MAX_PATH or "\0" in path or "\n" in path:
        raise BadCgroupPath(f"cgroup path {path[:64]!r}... is too long or holds NUL or newline")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise BadCgroupPath(f"cgroup path {path!r} must not contain '.' or '..' components")
    return "/" + "/".join(parts)


def _mounts() -> list[tuple[Path, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    for line in MOUNTINFO.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        # Octal escapes (\040 for a space) are how mountinfo writes odd characters.
        point = fields[4].encode().decode("unicode_escape")
        found.append((Path(point), after[0], set(after[2].split(","))))
    return found


@functools.cache
def controller(name: str) -> Controller | None:
    """Where controller `name` is mounted: a v1 hierarchy of its own first, else cgroup2.

    Cached: mounts of the cgroup controllers do not move under a running daemon.
    """
    mounts = _mounts()
    for point, fstype, options in mounts:
        if fstype == "cgroup" and name in options:
            return Controller(name, 1, point)
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            try:
                offered = (point / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if name in offered:
                return Controller(name, 2, point)
    return None


def directory(ctrl: Controller, path: str) -> Path:
    """The cgroup's directory under the controller's mount; raises CgroupError if absent."""
    where = ctrl.mount.joinpath(*[p for p in check_path(path).split("/") if p])
    real = Path(os.path.realpath(where))
    if real != ctrl.mount and ctrl.mount not in real.parents:
        raise BadCgroupPath(f"cgroup path {path!r} leaves the {ctrl.name} controller's mount")
    if not (real / "cgroup.procs").is_file():
        raise CgroupMissing(
            f"memory cgroup {path} does not exist (no {where}): create it, or name another"
            if ctrl.name == "memory"
            else f"{ctrl.name} cgroup {path} does not exist (no {where})"
        )
    return real


def target(path: str, hugetlb_path: str = "") -> ChargeTarget:
    """Where a helper must go to charge `path`; raises CgroupError saying why it cannot.

    hugetlb_path: the hugetlb cgroup when it is not `path` (a process's own
    cgroups differ per controller in a hybrid v1/v2 layout); "": `path`.
    """
    path = check_path(path)  # a malformed path is the caller's, whatever the machine
    memory = controller("memory")
    if memory is None:
        raise CgroupError(
            "no memory cgroup controller is mounted (neither a cgroup v1 'memory' "
            "hierarchy nor a cgroup2 mount offering 'memory'): charge_cgroup cannot be used"
        )
    memory_dir = directory(memory, path)
    hugetlb = controller("hugetlb")
    hugetlb_dir = None
    if hugetlb is not None:
        try:
            hugetlb_dir = directory(hugetlb, hugetlb_path or path)
        except CgroupError:
            hugetlb_dir = None  # charged to the memory cgroup only, as documented
    return ChargeTarget(path, memory, memory_dir, hugetlb, hugetlb_dir)


def memory_headroom(t: ChargeTarget) -> memcg.Headroom | None:
    """The smallest headroom along the target's memory cgroup and its ancestors."""
    return memcg.chain_headroom(t.memory.mount, t.memory_dir, t.memory.version)


def hugetlb_headroom(t: ChargeTarget, page_size: int) -> memcg.Headroom | None:
    """The smallest headroom for pages of page_size along the target's hugetlb cgroups."""
    if t.hugetlb is None or t.hugetlb_dir is None:
        return None
    size = f"{page_size >> 30}GB" if page_size >= 1 << 30 else f"{page_size >> 20}MB"
    if t.hugetlb.version == 2:
        limit, usage = f"hugetlb.{size}.max", f"hugetlb.{size}.current"
    else:
        limit, usage = f"hugetlb.{size}.limit_in_bytes", f"hugetlb.{size}.usage_in_bytes"
    return memcg.files_headroom(t.hugetlb.mount, t.hugetlb_dir, limit, usage, kind="hugetlb")


@dataclass(frozen=True)
class ProcessCgroups:
    """The cgroups a process is in, per controller, as /proc/PID/cgroup names them."""

    pid: int  # in the daemon's pid namespace
    memory: str
    hugetlb: str  # "": no hugetlb controller is mounted


class ProcessGone(CgroupError):
    """The process exited (its pid may already be someone else's) before it was read."""


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to in this pid namespace: -1 once it exited, 0 if not visible."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise CgroupError("this kernel's pidfds do not say their pid (no Pid: in fdinfo)")


def _controller_path(lines: list[str], ctrl: Controller) -> str:
    """The process's cgroup under `ctrl`, from the lines of /proc/PID/cgroup."""
    for line in lines:
        ident, _, rest = line.partition(":")
        names, _, where = rest.partition(":")
        if ctrl.version == 2 and ident == "0" and names == "":
            return where
        if ctrl.version == 1 and ctrl.name in names.split(","):
            return where
    raise CgroupError(f"the process's /proc/PID/cgroup has no line for {ctrl.name}")


def of_pidfd(pidfd: int) -> ProcessCgroups:
    """The memory and hugetlb cgroups of the process a pidfd refers to.

    /proc/PID/cgroup is read by pid, and a pid can be reused once its process
    exits: the pidfd is checked to refer to that same pid before and after the
    read, so what was read is that process's, not a newcomer's.
    """
    pid = _pidfd_pid(pidfd)
    if pid == 0:
        raise CgroupError(
            "the process is in a pid namespace the daemon cannot see into (a container's "
            "own, seen from a daemon inside another): its cgroups cannot be read"
        )
    if pid < 0:
        raise ProcessGone("the process exited before its cgroups were read")
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError as exc:
        raise ProcessGone(f"the process (pid {pid}) exited before its cgroups were read") from exc
    if _pidfd_pid(pidfd) != pid:
        raise ProcessGone(f"the process (pid {pid}) exited while its cgroups were read")
    memory = controller("memory")
    if memory is None:
        raise CgroupError(
            "no memory cgroup controller is mounted (neither a cgroup v1 'memory' "
            "hierarchy nor a cgroup2 mount offering 'memory')"
        )
    hugetlb = controller("hugetlb")
    return ProcessCgroups(
        pid=pid,
        memory=check_path(_controller_path(lines, memory)),
        hugetlb="" if hugetlb is None else check_path(_controller_path(lines, hugetlb)),
    )
