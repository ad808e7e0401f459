"""The cgroups of a process, read through a pidfd (kernel/cgroup.py), on the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from memplug.daemon.kernel import cgroup


def memory_line_path(pid: int) -> str:
    memory = cgroup.controller("memory")
    assert memory is not None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        ident, names, where = line.split(":", 2)
        if (memory.version == 1 and "memory" in names.split(",")) or (
            memory.version == 2 and ident == "0"
        ):
            return where
    raise AssertionError("no memory line")


def test_a_live_process_cgroups_are_what_proc_says() -> None:
    require(cgroup.controller("memory") is not None, "no memory cgroup controller mounted")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    pidfd = os.pidfd_open(child.pid)
    try:
        found = cgroup.of_pidfd(pidfd)
        assert found.pid == child.pid
        assert found.memory == memory_line_path(child.pid)
        hugetlb = cgroup.controller("hugetlb")
        assert (found.hugetlb == "") == (hugetlb is None), found
    finally:
        os.close(pidfd)
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def test_a_process_that_exited_is_never_read_through_its_old_pid() -> None:
    require(cgroup.controller("memory") is not None, "no memory cgroup controller mounted")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()  # reaped: its pid is free for the next process to take
        with pytest.raises(cgroup.ProcessGone, match="exited"):
            cgroup.of_pidfd(pidfd)
    finally:
        os.close(pidfd)
