"""A sacrificial allocation helper: allocates for the daemon where an OOM kill is harmless.

Under a memory cgroup limit the kernel answers an allocation that does not
fit by OOM-killing a process of the cgroup, not with an error. The helper
runs the allocating syscalls on the daemon's behalf with oom_score_adj 1000,
so it is the process the OOM killer picks; the daemon sees it die, rolls the
plug back and answers RESOURCE_EXHAUSTED.

A helper can also charge a cgroup other than the daemon's (a region's
charge_cgroup, see cgroup.py): it is given the cgroup.procs files to join,
writes its pid into each before its first allocation, and answers one line,
ok or err, before any request. Pages it allocates from then on are charged
to those cgroups, and stay charged there after it exits.

Protocol on stdin/stdout, one line each way per request:
    fallocate OFFSET LENGTH | populate OFFSET LENGTH 0|1   ->   ok | err ERRNO MESSAGE

    python -m memplug.daemon.kernel.helper FD [CGROUP_PROCS_FILE...]
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from memplug.common import memory
from memplug.common.errors import FailedPrecondition
from memplug.daemon.kernel import ops

OOM_KILLED: Final = "the allocation helper was killed by the kernel (OOM)"


class AllocHelper:
    """One helper process holding the region's fd; not thread-safe (one per worker)."""

    def __init__(self, fd: int, cgroups: Sequence[Path] = ()) -> None:
        """cgroups: cgroup.procs files the helper joins before it allocates anything."""
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__, str(fd), *map(str, cgroups)],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        if cgroups:
            self._joined(cgroups)

    def _joined(self, cgroups: Sequence[Path]) -> None:
        """Wait for the helper to join its cgroups; FailedPrecondition if it could not."""
        assert self._proc.stdout is not None
        reply = self._proc.stdout.readline()
        if reply.startswith("ok"):
            return
        self.close()
        if reply.startswith("err "):
            _, _, detail = reply.rstrip("\n").split(" ", 2)
        else:
            detail = f"the helper exited with {self._proc.returncode}"
        raise FailedPrecondition(
            f"the allocation helper could not join cgroup {detail}: was the cgroup "
            "removed, or does it take no processes (cgroup v2: only leaves do)?"
        )

    def _call(self, line: str) -> None:
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(line + "\n")
            stdin.flush()
            reply = stdout.readline()
        except BrokenPipeError:
            reply = ""
        if reply.startswith("ok"):
            return
        if reply.startswith("err "):
            _, code, message = reply.rstrip("\n").split(" ", 2)
            raise OSError(int(code), message)
        status = self._proc.wait()
        if status == -signal.SIGKILL:
            raise OSError(errno.ENOMEM, OOM_KILLED)
        raise OSError(errno.EIO, f"the allocation helper exited with {status}")

    def allocate(self, offset: int, length: int) -> None:
        self._call(f"fallocate {offset} {length}")

    def populate(self, offset: int, length: int, *, write: bool) -> None:
        self._call(f"populate {offset} {length} {int(write)}")

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class HelperPool:
    """A helper per worker thread, created on first use, closed together."""

    def __init__(self, fd: int, cgroups: Sequence[Path] = ()) -> None:
        self._fd = fd
        self._cgroups = tuple(cgroups)
        self._local = threading.local()
        self._all: list[AllocHelper] = []
        self._lock = threading.Lock()

    def get(self) -> AllocHelper:
        helper: AllocHelper | None = getattr(self._local, "helper", None)
        if helper is None:
            helper = AllocHelper(self._fd, self._cgroups)
            self._local.helper = helper
            with self._lock:
                self._all.append(helper)
        return helper

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(2) in the calling worker's helper."""
        self.get().allocate(offset, length)

    def populate_write(self, offset: int, length: int) -> None:
        """MADV_POPULATE_WRITE in the calling worker's helper."""
        self.get().populate(offset, length, write=True)

    def populate_read(self, offset: int, length: int) -> None:
        """MADV_POPULATE_READ in the calling worker's helper."""
        self.get().populate(offset, length, write=False)

    def close(self) -> None:
        with self._lock:
            helpers, self._all = self._all, []
        for helper in helpers:
            helper.close()

    def __enter__(self) -> HelperPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(cgroups: Sequence[str], stdout: IO[str]) -> bool:
    """Move this process into each cgroup (its cgroup.procs file); answer ok or err."""
    for procs in cgroups:
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            where = os.path.dirname(procs)
            stdout.write(f"err {exc.errno or errno.EIO} {where} ({exc.strerror})\n")
            stdout.flush()
            return False
    stdout.write("ok\n")
    stdout.flush()
    return True


def _serve(fd: int, stdin: IO[str], stdout: IO[str]) -> None:
    for line in stdin:
        words = line.split()
        try:
            if words[0] == "fallocate":
                ops.fallocate(fd, int(words[1]), int(words[2]))
            elif words[0] == "populate":
                offset, length = int(words[1]), int(words[2])
                with ops.map_shared(fd, offset, length) as mapping:
                    memory.populate(mapping.address, length, write=words[3] == "1")
            else:
                raise OSError(errno.EINVAL, f"unknown request {words[0]!r}")
            stdout.write("ok\n")
        except OSError as exc:
            stdout.write(f"err {exc.errno or errno.EIO} {exc.strerror}\n")
        stdout.flush()


if __name__ == "__main__":
    # Be the OOM killer's first choice in the cgroup, well before the daemon.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    # Joined after start-up, so the interpreter's own memory stays the daemon's.
    if _join(sys.argv[2:], sys.stdout):
        _serve(int(sys.argv[1]), sys.stdin, sys.stdout)
    os._exit(0)
