"""Shared by the hardening tests: figures, data checks, consistency checks, probes, cgroups.

Figures: with MEMPLUG_FIGURES=FILE set (bench/reliability.py sets it), every
record() call appends one JSON line to FILE: the test's node id, a figure
name, a value and labels. Figures are computed where they happen (a byte
count that was really hashed, a pool delta that was really measured) and
recorded before the assertion that checks them, so a failing test still
leaves its numbers behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from conftest import HUGE_2M, DaemonProcess, MiB, huge_free, require, require_root, used_bytes

from memplug.client import Client, Region
from memplug.v1 import memplug_pb2 as pb

FIGURES_ENV: Final = "MEMPLUG_FIGURES"
NOBODY: Final = 65534
UNPRIVILEGED_PYTHON: Final = "/usr/bin/python3"  # stdlib only; readable by every uid
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")

# The codes the API documents for failures a caller can cause or meet.
# INTERNAL means a daemon bug; UNKNOWN an exception that escaped the status
# table; UNAVAILABLE a daemon that went away.
DOCUMENTED_CODES: Final = frozenset(
    {
        "INVALID_ARGUMENT",
        "OUT_OF_RANGE",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "PERMISSION_DENIED",
        "CANCELLED",
        "DEADLINE_EXCEEDED",
    }
)

Ranges = list[tuple[int, int]]


# --------------------------------------------------------------------------- figures


def current_test() -> str:
    """The running test's node id (pytest keeps it in PYTEST_CURRENT_TEST)."""
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]


def record(name: str, value: float = 1, **labels: str) -> None:
    """Append one figure for bench/reliability.py; a no-op unless MEMPLUG_FIGURES is set."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    line = json.dumps({"test": current_test(), "name": name, "value": value, "labels": labels})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write per line: O_APPEND keeps lines whole
    finally:
        os.close(fd)


def fault(name: str) -> None:
    """Count a fault injected by the running test (the report's pass/fail table keys on it)."""
    record("fault", 1, fault=name)


def leak_check(what: str, leaked: float, unit: str = "bytes", tolerance: float = 0) -> None:
    """Record a measured leak (0 when nothing leaked) and the growth the test tolerates
    (e.g. RSS noise); assert it separately. The report counts a leak when leaked
    exceeds the tolerance (or is negative: something was freed that was in use)."""
    record("leak", leaked, what=what, unit=unit, tolerance=str(tolerance))


# --------------------------------------------------------------------------- RPC helpers


def code_of(err: grpc.RpcError) -> str:
    call: Any = err
    code: grpc.StatusCode = call.code()
    return code.name


def details_of(err: grpc.RpcError) -> str:
    call: Any = err
    return str(call.details() or "")


def drain(stream: Iterable[pb.Progress]) -> pb.Progress | None:
    last = None
    for message in stream:
        last = message
    return last


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- data


def _chunks(ranges: Ranges, chunk: int = MiB) -> Iterator[tuple[int, int]]:
    for offset, length in ranges:
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            yield pos, n
            pos += n


def pattern(seed: int, ranges: Ranges) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the data fill() writes: every MiB differs (seed and index lead
    it), so a block moved, lost or zeroed changes the digest."""
    base = random.Random(seed).randbytes(MiB)
    for i, (pos, n) in enumerate(_chunks(ranges)):
        yield pos, (seed.to_bytes(8, "little") + i.to_bytes(8, "little") + base[16:])[:n]


def expected_digest(seed: int, ranges: Ranges) -> str:
    h = hashlib.sha256()
    for _, piece in pattern(seed, ranges):
        h.update(piece)
    return h.hexdigest()


def fill(client: Client, name: str, ranges: Ranges, seed: int) -> str:
    """Write pattern(seed, ranges) through a read-write attach; the sha256 written."""
    h = hashlib.sha256()
    with client.attach(name, sparse=True) as att:  # touches only the ranges given
        assert att.view is not None
        for pos, piece in pattern(seed, ranges):
            att.view[pos : pos + len(piece)] = piece
            h.update(piece)
    return h.hexdigest()


def digest(client: Client, name: str, ranges: Ranges) -> str:
    """sha256 of ranges read through a fresh read-only attach (the kernel's bytes)."""
    h = hashlib.sha256()
    total = 0
    with client.attach(name, "ro", sparse=True) as att:  # reads only the ranges given
        assert att.view is not None
        for pos, n in _chunks(ranges):
            h.update(att.view[pos : pos + n])
            total += n
    record("bytes_checked", total)
    return h.hexdigest()


# --------------------------------------------------------------------------- fault guard


@dataclass
class Baseline:
    """What must hold again after a fault: the machine's pools and filesystems,
    each region's plugged set and allocation, the daemon's plugged total, the data."""

    client: Client
    names: list[str]
    mounts: list[Path] = field(default_factory=list)
    pools: list[int] = field(default_factory=lambda: [HUGE_2M])
    sums: dict[str, str] = field(default_factory=dict)
    regions: dict[str, Region] = field(default_factory=dict)
    huge: dict[int, int] = field(default_factory=dict)
    used: dict[Path, int] = field(default_factory=dict)
    plugged_total: int = 0

    def __post_init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        self.regions = {n: self.client.get_region(n) for n in self.names}
        self.huge = {size: huge_free(size) for size in self.pools}
        self.used = {m: used_bytes(m) for m in self.mounts}
        self.plugged_total = self.client.status().plugged_bytes

    def remember(self, name: str, digest_value: str) -> None:
        self.sums[name] = digest_value

    def _settled(self) -> bool:
        now = {n: self.client.get_region(n) for n in self.names}
        return (
            all(
                now[n].allocated_bytes == r.allocated_bytes and now[n].plugged == r.plugged
                for n, r in self.regions.items()
            )
            and self.client.status().plugged_bytes == self.plugged_total
            and all(huge_free(s) == free for s, free in self.huge.items())
            and all(used_bytes(m) == u for m, u in self.used.items())
        )

    def verify(self, *, settle: float = 15.0) -> None:
        """Wait (rollbacks may finish after the RPC ends) then check everything, recording leaks."""
        with contextlib.suppress(AssertionError):
            wait_until(self._settled, settle, "the rollback to finish")
        for size, free in self.huge.items():
            now = huge_free(size)
            leak_check(f"hugetlb {size // MiB} MiB pages", free - now, "pages")
            assert now == free, f"hugetlb {size // MiB} MiB pool: {free} free before, {now} after"
        for mount, used in self.used.items():
            now = used_bytes(mount)
            leak_check(f"tmpfs {mount.name}", now - used)
            assert now == used, f"{mount}: {used} bytes used before the fault, {now} after"
        for name, before in self.regions.items():
            after = self.client.get_region(name)
            leak_check(f"region {name} allocated", after.allocated_bytes - before.allocated_bytes)
            assert after.plugged == before.plugged, (
                f"{name}: plugged {before.plugged} before the fault, {after.plugged} after"
            )
            assert after.allocated_bytes == before.allocated_bytes, (
                f"{name}: {before.allocated_bytes} bytes allocated before, "
                f"{after.allocated_bytes} after"
            )
        total = self.client.status().plugged_bytes
        leak_check("quota plugged total", total - self.plugged_total)
        assert total == self.plugged_total, f"quota counts {total}, was {self.plugged_total}"
        for name, want in self.sums.items():
            got = digest(self.client, name, self.regions[name].plugged)
            assert got == want, f"{name}: the data in its plugged blocks changed"


def assert_serving(client: Client) -> None:
    """The daemon answers and does real work: status, create, plug, attach, write, delete."""
    client.status()
    name = f"probe-{secrets.token_hex(4)}"
    client.create_region(name, 2 * MiB)
    try:
        client.plug(name)
        with client.attach(name) as att:
            assert att.view is not None
            att.view[0:8] = b"serving!"
        with client.attach(name, "ro") as att:
            assert att.view is not None
            assert bytes(att.view[0:8]) == b"serving!"
    finally:
        client.delete_region(name)


# --------------------------------------------------------------------------- the store


def store_state(db: Path) -> tuple[dict[str, Ranges], list[tuple[str, str]]]:
    """(live region -> plugged ranges, [(region, op) of open intents]) from the SQLite store."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        regions = {
            str(name): [(int(o), int(n)) for o, n in json.loads(plugged)]
            for name, plugged, gone in conn.execute("SELECT name, plugged, gone FROM regions")
            if not gone
        }
        intents = [(str(r), str(op)) for r, op in conn.execute("SELECT region, op FROM intents")]
    return regions, intents


def assert_consistent(client: Client, db: Path) -> dict[str, Region]:
    """The API, the store and the kernel agree: same regions, same plugged sets, every
    plugged byte allocated and nothing else, the quota total the sum, no open intents."""
    api = {r.name: r for r in client.list_regions()}
    stored, intents = store_state(db)
    assert intents == [], f"intents left open after the restart: {intents}"
    assert set(api) == set(stored), f"API has {sorted(api)}, the store {sorted(stored)}"
    for name, region in api.items():
        assert region.plugged == stored[name], (
            f"{name}: API says plugged {region.plugged}, the store {stored[name]}"
        )
        assert region.allocated_bytes == region.plugged_bytes, (
            f"{name}: {region.allocated_bytes} bytes allocated for {region.plugged_bytes} plugged"
        )
    status = client.status()
    assert status.plugged_bytes == sum(r.plugged_bytes for r in api.values())
    assert status.allocated_bytes == sum(r.allocated_bytes for r in api.values())
    return api


# --------------------------------------------------------------------------- processes


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def alive(d: DaemonProcess) -> None:
    assert d.alive(), f"memplugd died:\n{d.log()[-4000:]}"


def connect(d: DaemonProcess) -> Client:
    """A client with a long timeout: faults make some calls slow on purpose."""
    return Client(d.socket, timeout=60)


def stop(d: DaemonProcess, *, no_traceback: bool = False) -> None:
    """SIGTERM a daemon that must still be alive; it must exit 0 (and log no
    traceback, when asked)."""
    alive(d)
    code = d.stop()
    assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()[-4000:]}"
    if no_traceback:
        assert "Traceback" not in d.log(), f"memplugd logged a traceback:\n{d.log()}"


def run_nobody(script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run script with the system python as uid/gid 65534, no supplementary groups.

    It prints one JSON object as its last line of output: returned.
    """
    proc = spawn_nobody(script, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"uid {NOBODY} child timed out:\n{err}") from None
    assert proc.returncode == 0, f"uid {NOBODY} child failed ({proc.returncode}):\n{err}"
    lines = out.strip().splitlines()
    assert lines, f"uid {NOBODY} child printed nothing:\n{err}"
    report: dict[str, Any] = json.loads(lines[-1])
    assert report.get("uid") == NOBODY and report.get("gid") == NOBODY, report
    assert report.get("groups") == [], report
    return report


# Drops to uid/gid 65534 with no supplementary groups, then execs the attacker: the
# setgroups/setgid/setuid that subprocess's user=, group= and extra_groups=[] would do.
# subprocess does those after a fork() of this process (no vfork with setuid in 3.11),
# and gRPC's fork handlers in a process with live channels can crash that child
# (SIGSEGV) before it execs; this launcher is spawned with vfork and drops itself.
DROP_PRIVILEGES: Final = """
import os, sys
os.setgroups([])
os.setgid(int(sys.argv[1]))
os.setuid(int(sys.argv[1]))
assert os.getuid() == os.geteuid() == os.getgid() == os.getegid() == int(sys.argv[1])
assert os.getgroups() == []
os.execv(sys.executable, [sys.executable, "-I", *sys.argv[2:]])
"""


def spawn_nobody(script: str, *args: str) -> subprocess.Popen[str]:
    require_root("runs processes as uid 65534")
    require(os.path.exists(UNPRIVILEGED_PYTHON), f"needs {UNPRIVILEGED_PYTHON} for uid 65534")
    return subprocess.Popen(
        [UNPRIVILEGED_PYTHON, "-I", "-c", DROP_PRIVILEGES, str(NOBODY), "-c", script, *args],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def public_dir(prefix: str) -> Iterator[Path]:
    """A fresh 0755 directory under /tmp (pytest's tmp dirs are 0700: uid 65534 cannot
    reach a socket there)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- memory cgroups


@dataclass
class MemoryCgroup:
    path: Path
    version: int  # 1 or 2

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _memory_hierarchy() -> tuple[Path, int] | None:
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return CGROUP_ROOT, 2
    v1 = CGROUP_ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        return v1, 1
    return None


def own_memory_cgroup(root: Path, version: int) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if (version == 2 and hierarchy == "0") or (
            version == 1 and "memory" in controllers.split(",")
        ):
            return root / path.lstrip("/")
    return root


def cgroup_path(cg: MemoryCgroup) -> str:
    """The cgroup's path as /proc/PID/cgroup prints it (relative to its hierarchy's root)."""
    found = _memory_hierarchy()
    assert found is not None
    return "/" + cg.path.relative_to(found[0]).as_posix()


def own_memory_cgroup_dir() -> Path:
    """This test process's memory cgroup directory (skips without root or a controller)."""
    require_root("creates memory cgroups")
    found = _memory_hierarchy()
    require(found is not None, "no memory cgroup controller mounted (v1 or v2)")
    assert found is not None
    return own_memory_cgroup(*found)


@contextlib.contextmanager
def memory_cgroup(limit: int | None, parent: Path | None = None) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup (v2 if the unified hierarchy has the memory controller,
    else v1) limited to `limit` bytes (None: no limit of its own), made in `parent`
    (default: the hierarchy's root); removed afterwards.

    Stop the processes put in it before leaving; any still there are moved back
    to this test process's own memory cgroup (where they came from) first.
    """
    require_root("creates a memory cgroup")
    found = _memory_hierarchy()
    require(found is not None, "no memory cgroup controller mounted (v1 or v2)")
    assert found is not None
    root, version = found
    path = (parent or root) / f"memplug-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        cg = MemoryCgroup(path, version)
        if limit is not None:
            cg.limit_file.write_text(str(limit))
        if limit is not None and version == 1 and (path / "memory.memsw.limit_in_bytes").exists():
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield cg
    finally:
        home = own_memory_cgroup(root, version)
        deadline = time.monotonic() + 10
        while True:
            try:
                left = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except OSError:
                break
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    (home / "cgroup.procs").write_text(str(pid))
            if time.monotonic() > deadline:
                for pid in left:  # processes this test started, stuck in the cgroup
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)  # the kernel still drains the cgroup's charges


# --------------------------------------------------------------------------- 1 GiB pages


@contextlib.contextmanager
def gib_pool(pages: int) -> Iterator[None]:
    """The 1 GiB pool set to `pages`; restored after. Skips (never fails) when the kernel
    offers the pool but cannot find the contiguous memory for the pages."""
    require_root("sets the hugetlb pool size")
    path = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")
    require(path.exists(), "the kernel offers no 1 GiB huge page pool")
    original = int(path.read_text())
    try:
        path.write_text(str(pages))
        got = int(path.read_text())
        if got < pages:
            pytest.skip(
                f"could allocate only {got} of {pages} 1 GiB huge pages (no contiguous GiB "
                "of free memory): the 1 GiB fault cannot be injected on this machine"
            )
        yield
    finally:
        path.write_text(str(original))


def names(regions: Sequence[Region]) -> list[str]:
    return sorted(r.name for r in regions)
