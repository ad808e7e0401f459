"""Fixtures on the real kernel: a real daemon process, real hugetlb pools, real tmpfs.

Every fixture that changes the machine restores it on teardown. Tests that
need root skip when not root, except under MEMPLUG_REQUIRE_PRIVILEGED=1
(set by CI), where a skip would hide a gap and so fails instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memplug.client.attach import Attachment
from memplug.common import memory
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

MiB = 1 << 20
GiB = 1 << 30

ERROR_KEY = "memplug-error"  # trailing metadata: the error class of a failed call
MAP_NORESERVE = 0x4000  # Linux; typeshed lacks mmap.MAP_NORESERVE
HUGE_2M = 2 * MiB
# Reconnect quickly while a daemon under test is not listening yet: gRPC's
# default backoff starts at 1 s and would dominate every daemon start.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 2),
    ("grpc.min_reconnect_backoff_ms", 2),
    ("grpc.max_reconnect_backoff_ms", 10),
]


def require_root(why: str) -> None:
    """Skip (or, under MEMPLUG_REQUIRE_PRIVILEGED=1, fail) unless running as root."""
    if os.geteuid() == 0:
        return
    message = f"needs root: {why}"
    if os.environ.get("MEMPLUG_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"{message} (MEMPLUG_REQUIRE_PRIVILEGED=1 forbids skipping)")
    pytest.skip(message)


def require(condition: bool, why: str) -> None:
    """Skip (or fail under MEMPLUG_REQUIRE_PRIVILEGED=1) when the machine lacks something."""
    if condition:
        return
    if os.environ.get("MEMPLUG_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"{why} (MEMPLUG_REQUIRE_PRIVILEGED=1 forbids skipping)")
    pytest.skip(why)


# --------------------------------------------------------------------------- the daemon


@dataclass
class DaemonProcess:
    """A memplugd subprocess on its own sockets, with a gRPC stub to it."""

    proc: subprocess.Popen[bytes]
    socket: Path
    fd_socket: Path
    log_path: Path
    channel: grpc.Channel
    stub: pb_grpc.MemplugStub
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def plug(self, name: str, offset: int, length: int, **kw: Any) -> pb.OperationResult:
        """Run a Plug to its end and return the final result."""
        last = None
        for msg in self.stub.Plug(pb.PlugRequest(name=name, offset=offset, length=length, **kw)):
            last = msg
        assert last is not None and last.HasField("result"), "Plug stream ended without a result"
        return last.result

    def populate(
        self, name: str, offset: int, length: int, write: bool = True
    ) -> pb.OperationResult:
        mode = pb.POPULATE_MODE_WRITE if write else pb.POPULATE_MODE_READ
        last = None
        for msg in self.stub.Populate(
            pb.PopulateRequest(name=name, offset=offset, length=length, mode=mode)
        ):
            last = msg
        assert last is not None and last.HasField("result")
        return last.result


# env={"JOURNAL_STREAM": JOURNAL_IS_LOG}: the daemon's stderr (its log file) is
# announced as the journal's stream, as systemd does, by its device:inode.
JOURNAL_IS_LOG = "the log file"


def start_daemon(
    tmp: Path, *extra: str, env: dict[str, str] | None = None, wrapper: Sequence[str] = ()
) -> DaemonProcess:
    """wrapper: a command that execs the daemon in its place (prlimit, setpriv)."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock, fd_sock = tmp / "memplug.sock", tmp / "fd.sock"
    log_path = tmp / "memplugd.log"
    args = [
        *wrapper,
        sys.executable,
        "-m",
        "memplug.daemon",
        "--socket",
        str(sock),
        "--fd-socket",
        str(fd_sock),
        "--state-dir",
        str(tmp / "state"),
        "--log-level",
        "debug",
        *extra,
    ]
    with log_path.open("wb") as log:
        if env is not None and env.get("JOURNAL_STREAM") == JOURNAL_IS_LOG:
            st = os.fstat(log.fileno())
            env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    channel = grpc.insecure_channel(f"unix:{sock}", options=FAST_RECONNECT)
    # Wait with a real call (the health service, which the access log leaves out):
    # grpc.channel_ready_future polls connectivity on a thread of its own, which
    # raised "Channel closed!" when a test closed the channel under it.
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"memplugd exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=0.2, wait_for_ready=True)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"memplugd did not serve in 20 s:\n{log_path.read_text()}"
                ) from None
    return DaemonProcess(proc, sock, fd_sock, log_path, channel, pb_grpc.MemplugStub(channel), args)


def create(
    daemon: DaemonProcess,
    name: str,
    size: int = 64 * MiB,
    backing: int = pb.BACKING_SHMEM,
    **kw: object,
) -> pb.Region:
    """CreateRegion through the raw stub; kw are further CreateRegionRequest fields."""
    return daemon.stub.CreateRegion(
        pb.CreateRegionRequest(name=name, size=size, backing=backing, **kw)  # type: ignore[arg-type]
    )


def get(daemon: DaemonProcess, name: str) -> pb.Region:
    return daemon.stub.GetRegion(pb.GetRegionRequest(name=name))


def spans(region: pb.Region) -> list[tuple[int, int]]:
    return [(r.offset, r.length) for r in region.plugged]


def error_class(err: grpc.RpcError) -> str | None:
    """The error class the daemon named in the trailing metadata, if any."""
    call: Any = err
    for item in call.trailing_metadata() or ():
        if item.key == ERROR_KEY:
            value: str | bytes = item.value
            return value.decode() if isinstance(value, bytes) else value
    return None


def stop_shared(d: DaemonProcess) -> None:
    """Stop a daemon that a module's tests shared; it must have lived through them all."""
    assert d.alive(), f"memplugd died during the tests:\n{d.log()}"
    code = d.stop()
    assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()}"
    # Whatever clients did, the daemon must never have hit an unexpected exception.
    assert "Traceback" not in d.log(), f"memplugd logged a traceback:\n{d.log()}"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons with extra flags; each must still be alive at teardown and exit 0."""
    started: list[DaemonProcess] = []

    def factory(*extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
        d = start_daemon(tmp_path / f"daemon{len(started)}", *extra, env=env)
        started.append(d)
        return d

    yield factory
    for d in started:
        if d.proc.returncode is not None:
            continue  # the test stopped it on purpose and checked the code
        assert d.alive(), f"memplugd died during the test:\n{d.log()}"
        code = d.stop()
        assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()}"


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory()


# --------------------------------------------------------------------------- take-over

# Every taker a test starts; a test's fixture kills those still running (kill_takers).
TAKERS: list[subprocess.Popen[bytes]] = []


def start_taker(
    old: DaemonProcess, name: str, env: dict[str, str] | None = None, mode: str = "must"
) -> tuple[subprocess.Popen[bytes], Path]:
    """`memplugd --takeover=MODE` on the old daemon's sockets and state, logging to its own file."""
    log_path = old.log_path.with_name(f"{name}.log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*old.args, f"--takeover={mode}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    TAKERS.append(proc)
    return proc, log_path


def serving(proc: subprocess.Popen[bytes], log_path: Path, sock: Path) -> DaemonProcess:
    """Wait until proc (a taker, or a daemon started afresh) serves on sock; it as a
    DaemonProcess."""
    channel = grpc.insecure_channel(f"unix:{sock}", options=FAST_RECONNECT)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the taker exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=0.2, wait_for_ready=True)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, log_path.read_text()
    assert isinstance(proc.args, list)
    args = [str(a) for a in proc.args]
    return DaemonProcess(
        proc, sock, sock.with_name("fd.sock"), log_path, channel, pb_grpc.MemplugStub(channel), args
    )


def state_dir(d: DaemonProcess) -> Path:
    return Path(d.args[d.args.index("--state-dir") + 1])


def kill_takers(*others: subprocess.Popen[bytes]) -> None:
    """Kill the given processes and every taker still running (a test's teardown)."""
    for proc in [*others, *TAKERS]:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    TAKERS.clear()


# --------------------------------------------------------------------------- machine state


_POOLS_TO_RESTORE: dict[Path, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Put back hugetlb pools a test could not shrink while their pages were in use."""
    for path, original in _POOLS_TO_RESTORE.items():
        path.write_text(str(original))
        if int(path.read_text()) != original:
            print(f"\nwarning: {path} could not be restored to {original}: pages still in use")


def _pool_file(page_size: int) -> Path:
    return memory.HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB" / "nr_hugepages"


@contextlib.contextmanager
def hugetlb_pool_of(pages: int, page_size: int = HUGE_2M) -> Iterator[Path]:
    """Set the pool of page_size to exactly `pages` pages; restore it afterwards."""
    require_root("sets the hugetlb pool size")
    path = _pool_file(page_size)
    require(path.exists(), f"the kernel offers no {page_size // MiB} MiB huge page pool")
    original = int(path.read_text())
    try:
        path.write_text(str(pages))
        got = int(path.read_text())
        require(got == pages, f"could only get {got} of {pages} huge pages (memory fragmented)")
        yield path
    finally:
        path.write_text(str(original))
        if int(path.read_text()) != original:
            # Pages still in use (a daemon shared by a module holds them): the
            # kernel cannot shrink the pool yet. Try again when the session ends.
            _POOLS_TO_RESTORE.setdefault(path, original)


@pytest.fixture
def hugetlb_pool() -> Iterator[Callable[[int], None]]:
    """hugetlb_pool(n) sets the 2 MiB pool to n pages for this test; restored after."""
    stack = contextlib.ExitStack()

    def set_pool(pages: int, page_size: int = HUGE_2M) -> None:
        stack.enter_context(hugetlb_pool_of(pages, page_size))

    with stack:
        yield set_pool


def huge_free(page_size: int = HUGE_2M) -> int:
    return memory.huge_pool(page_size).free


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_tmpfs('64M') mounts a tmpfs of that size and returns its path; unmounted after."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        require_root("mounts a tmpfs with a size limit")
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            check=True,
        )
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def open_region_fd(daemon: DaemonProcess, name: str) -> int:
    """Open the daemon's memfd of a SHMEM or HUGETLB region through /proc, O_RDWR.

    Stands in for the fd-passing API in tests: the caller closes the fd.
    """
    want = f"/memfd:memplug:{name} (deleted)"
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        if target == want:
            return os.open(entry, os.O_RDWR | os.O_CLOEXEC)
    raise LookupError(f"memplugd (pid {daemon.proc.pid}) holds no memfd of region {name!r}")


# --------------------------------------------------------------------------- region contents

Ranges = list[tuple[int, int]]


def checksum(att: Attachment, ranges: Ranges) -> str:
    """sha256 of the plugged bytes of an attachment, read through its mapping."""
    assert att.view is not None
    h = hashlib.sha256()
    for offset, length in ranges:
        h.update(att.view[offset : offset + length])
    return h.hexdigest()


def scribble(att: Attachment, ranges: Ranges) -> None:
    """Random bytes at the start, middle and end of every plugged range."""
    assert att.view is not None
    piece = 64 * 1024
    for offset, length in ranges:
        for at in (offset, offset + length // 2, offset + length - piece):
            att.view[at : at + piece] = os.urandom(piece)
    if att.info.backing == "file":
        # Written back now: a filesystem may spend a metadata block on it (ext4
        # splitting an unwritten extent), which st_blocks counts, so allocated_bytes
        # settles here rather than at some writeback during the test.
        os.fsync(att.fd)
