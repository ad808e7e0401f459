"""The machine under test: the facts in the header, and the state the benchmark changes.

Everything changed here (a hugetlb pool size, a tmpfs mount) is registered on
an ExitStack by the caller and put back at exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from bench.report import GiB, MiB, fmt_size
from memplug.common import memory

NODE_SYSFS = Path("/sys/devices/system/node")
THP_SHMEM = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
HUGE_2M = 2 * MiB


def _read(path: Path, default: str = "?") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def cpu_model() -> str:
    for line in _read(Path("/proc/cpuinfo"), "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (0 if absent)."""
    for line in _read(Path("/proc/meminfo"), "").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def numa_layout() -> str:
    nodes = sorted(NODE_SYSFS.glob("node[0-9]*"), key=lambda p: int(p.name[4:]))
    if not nodes:
        return "no NUMA information"
    parts = []
    for node in nodes:
        total = 0
        for line in _read(node / "meminfo", "").splitlines():
            if "MemTotal:" in line:
                total = int(line.split()[-2]) * 1024
        parts.append(f"{node.name}: cpus {_read(node / 'cpulist')}, {total / GiB:.1f} GiB")
    return "; ".join(parts)


def thp_mode(path: Path = THP_SHMEM) -> str:
    match = re.search(r"\[(\w+)\]", _read(path))
    return match.group(1) if match else "?"


def qemu_version(binary: str | None) -> str:
    if binary is None:
        return "not installed"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"unusable ({exc})"
    return out.stdout.splitlines()[0] if out.stdout else "?"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Only what the daemon runs: the benchmark's own files (bench/) do not change its speed.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "daemon", "client", "proto"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" (with uncommitted changes to the daemon or client)" if dirty else "")


def filesystem_of(path: Path) -> str:
    """The filesystem type holding path (from /proc/self/mounts, longest prefix)."""
    best, fstype = "", "?"
    target = str(path.resolve())
    for line in _read(Path("/proc/self/mounts"), "").splitlines():
        fields = line.split()
        inside = len(fields) > 2 and (target + "/").startswith(fields[1].rstrip("/") + "/")
        if inside and len(fields[1]) >= len(best):
            best, fstype = fields[1], f"{fields[2]} ({fields[0]} on {fields[1]})"
    return fstype


def load_average() -> float:
    return os.getloadavg()[0]


def header(*, qemu: str | None, state_dir: Path, reps: int, threads: int) -> list[tuple[str, str]]:
    huge = f"hugepages-{HUGE_2M // 1024}kB/shmem_enabled"
    per_size = Path("/sys/kernel/mm/transparent_hugepage") / f"hugepages-{HUGE_2M // 1024}kB"
    thp = thp_mode()
    if (per_size / "shmem_enabled").exists():
        thp += f" ({huge}: {thp_mode(per_size / 'shmem_enabled')})"
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("kernel", platform.release()),
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} (this process may use {len(os.sched_getaffinity(0))})"),
        ("memory", fmt_size(meminfo("MemTotal") // MiB * MiB)),
        ("NUMA", numa_layout()),
        ("THP shmem_enabled", thp),
        ("QEMU", qemu_version(qemu)),
        ("Python", sys.version.split()[0]),
        ("grpcio", _version("grpcio")),
        ("memplug", git_revision()),
        ("daemon state dir", f"{state_dir}: {filesystem_of(state_dir)}"),
        ("repetitions", f"{reps} (median), after 1 warm-up; raw threads 1..{threads}"),
        ("load average at start", f"{load_average():.2f}"),
    ]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- hugetlb pool


class HugePool:
    """The 2 MiB hugetlb pool, grown to give this benchmark `pages` free pages.

    Other processes (tests run beside the benchmark) may hold pages of the
    pool; the benchmark keeps theirs and adds its own. ensure() sets it again
    before each use, since someone may have shrunk it meanwhile. The original
    size is written back by restore().
    """

    def __init__(self, page_size: int = HUGE_2M) -> None:
        self.page_size = page_size
        self.path = memory.HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB" / "nr_hugepages"
        self.original = int(self.path.read_text())
        self.pages = 0

    def ensure(self, pages: int) -> None:
        """Make at least `pages` pages free for us; RuntimeError if the kernel cannot.

        The pool is grown towards the largest request so far (no shrinking and
        growing between cases of different sizes), but only `pages` must be
        free: pages other processes took meanwhile fail only the runs that need them.
        """
        pool = memory.huge_pool(self.page_size)
        if pool.free - pool.reserved >= pages:
            self.pages = max(self.pages, pages)
            return
        in_use = pool.total - pool.free + pool.reserved
        self.path.write_text(str(in_use + max(self.pages, pages)))
        got = memory.huge_pool(self.page_size)
        if got.free - got.reserved < pages:
            raise RuntimeError(
                f"the {fmt_size(self.page_size)} hugetlb pool gave {got.free - got.reserved} free "
                f"pages of the {pages} needed (memory fragmented, or in use)"
            )
        self.pages = max(self.pages, pages)

    def restore(self) -> None:
        self.path.write_text(str(self.original))


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on where (created), unmounted at exit (lazily if busy)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "memplug-bench", str(where)],
        check=True,
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def sleep_until_quiet(threshold: float, limit: float) -> float:
    """Wait (at most limit seconds) for the 1-minute load average to drop below threshold."""
    deadline = time.monotonic() + limit
    while load_average() >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    return load_average()
