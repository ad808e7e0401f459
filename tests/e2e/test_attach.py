"""The hand-off: Attach tickets redeemed on the fd socket of a real memplugd.

Everything goes over the daemon's real sockets. ACL checks run a real
unprivileged process (uid 65534) that redeems the ticket itself, so the
daemon sees its credentials through SO_PEERCRED; read-only is then probed in
that process with every write path the kernel offers.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import mmap
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    DaemonProcess,
    MiB,
    open_region_fd,
    require,
    require_root,
    start_daemon,
    stop_shared,
)

from memplug.client import Client
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]

NOBODY = 65534
OTHER_GID = 4242  # a group nobody is not in unless the test says so
UNPRIVILEGED_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
F_GET_SEALS = 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 1, 2, 4
PATTERN = bytes(range(256)) * 16  # 4 KiB

# Runs as uid 65534 with the system interpreter and the standard library only.
# argv: fd_socket ticket mode; prints one JSON object.
CHILD = r"""
import ctypes, errno, fcntl, json, mmap, os, socket, sys

def redeem(path, ticket):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(("MEMPLUG/1 ATTACH %s\n" % ticket).encode())
    msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
    s.close()
    return msg.decode(errors="replace"), fds

def attempt(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

def checked(rc):
    if rc == -1 or rc == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc

path, ticket, mode = sys.argv[1:4]
line, fds = redeem(path, ticket)
out = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
       "groups": sorted(os.getgroups()),
       "line": line, "fds": len(fds)}
if fds:
    fd = fds[0]
    size = os.fstat(fd).st_size
    out["size"] = size
    out["accmode"] = {os.O_RDONLY: "ro", os.O_WRONLY: "wo", os.O_RDWR: "rw"}[
        fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE]
    out["head"] = os.pread(fd, 16, 0).hex()
    scribble = b"\xee" * 16
    if mode == "ro-checks":
        r = out["attempts"] = {}

        def map_shared_write():
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0:16] = scribble
            m.close()
        r["mmap_shared_write"] = attempt(map_shared_write)

        addr = checked(libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0))
        out["mapped_head"] = ctypes.string_at(addr, 16).hex()

        def mprotect_write():
            checked(libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE))
            ctypes.memmove(addr, scribble, 16)
        r["mprotect_write"] = attempt(mprotect_write)
        r["madvise_remove"] = attempt(lambda: checked(libc.madvise(addr, size, 9)))
        r["write"] = attempt(lambda: os.write(fd, scribble))
        r["pwrite"] = attempt(lambda: os.pwrite(fd, scribble, 0))

        def reopen(flags):
            def go():
                nfd = os.open("/proc/self/fd/%d" % fd, flags)
                try:
                    os.pwrite(nfd, scribble, 0)
                finally:
                    os.close(nfd)
            return go
        r["reopen_rdwr"] = attempt(reopen(os.O_RDWR))
        r["reopen_wronly"] = attempt(reopen(os.O_WRONLY))
        r["punch_hole"] = attempt(lambda: checked(libc.fallocate(fd, 3, 0, 4096)))
        r["fallocate"] = attempt(lambda: checked(libc.fallocate(fd, 0, 0, size)))
        r["ftruncate_same_size"] = attempt(lambda: os.ftruncate(fd, size))
        r["ftruncate_zero"] = attempt(lambda: os.ftruncate(fd, 0))
        r["add_seal_write"] = attempt(lambda: fcntl.fcntl(fd, 1033, 8))
        out["size_after"] = os.fstat(fd).st_size
    elif mode == "reopen-rw":
        def reopen_and_write():
            nfd = os.open("/proc/self/fd/%d" % fd, os.O_RDWR)
            try:
                os.pwrite(nfd, b"owner-was-here!!", 0)
            finally:
                os.close(nfd)
        out["reopen_rdwr"] = attempt(reopen_and_write)
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- helpers


def exchange(path: str | Path, data: bytes, *, timeout: float = 10.0) -> tuple[bytes, list[int]]:
    """Send data on the fd socket, return the one reply (b"" if closed) and any fds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        except ConnectionResetError:
            return b"", []
    return msg, fds


def redeem_raw(path: str | Path, ticket: str) -> tuple[str, int | None]:
    """The reply line and the fd (None if none came); the caller closes the fd."""
    msg, fds = exchange(path, f"MEMPLUG/1 ATTACH {ticket}\n".encode())
    assert len(fds) <= 1, f"the daemon passed {len(fds)} fds"
    return msg.decode(errors="replace"), (fds[0] if fds else None)


def ok_fields(line: str) -> dict[str, str]:
    assert line.startswith("OK ") and line.endswith("\n"), f"not an OK line: {line!r}"
    return dict(item.split("=", 1) for item in line[3:].split())


def expect_refused(line: str, fd: int | None, status: str) -> None:
    if fd is not None:
        os.close(fd)
    assert fd is None, f"the daemon passed an fd along with {line!r}"
    assert line.startswith(f"ERR {status} "), f"expected ERR {status}, got {line!r}"
    assert line.endswith("\n") and line.count("\n") == 1


def good_attach(client: Client, name: str, size: int) -> None:
    """A normal attach works right now: OK line and an fd of the region's size."""
    ticket = client.ticket(name)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    assert fd is not None, f"no fd: {line!r}"
    try:
        assert ok_fields(line)["region"] == name
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)


def accmode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def region_bytes(daemon: DaemonProcess, name: str, length: int) -> bytes:
    fd = open_region_fd(daemon, name)
    try:
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


def write_region(daemon: DaemonProcess, name: str, data: bytes) -> None:
    fd = open_region_fd(daemon, name)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def run_unprivileged(
    fd_socket: str,
    ticket: str,
    mode: str = "redeem",
    *,
    gid: int = NOBODY,
    extra_groups: list[int] | None = None,
) -> dict[str, Any]:
    """Redeem ticket in a fresh uid-65534 process; its JSON report.

    setpriv drops the credentials rather than subprocess's user=/group=: those
    force a fork() of this gRPC-threaded process, whose fork handlers can abort
    the child before it execs.
    """
    require(os.path.exists(UNPRIVILEGED_PYTHON), f"needs {UNPRIVILEGED_PYTHON} for uid 65534")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    groups = ["--groups", ",".join(map(str, extra_groups))] if extra_groups else ["--clear-groups"]
    proc = subprocess.run(
        [
            *("setpriv", f"--reuid={NOBODY}", f"--regid={gid}", *groups, "--"),
            *(UNPRIVILEGED_PYTHON, "-I", "-c", CHILD, fd_socket, ticket, mode),
        ],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"unprivileged child failed ({proc.returncode}):\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["uid"] == NOBODY and report["gid"] == gid
    assert report["groups"] == sorted(extra_groups or [])
    return report


def wait_for_log(daemon: DaemonProcess, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = daemon.log()
        if needle in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


_names = itertools.count()


def fresh() -> str:
    """A region name no other test of this module uses (they share daemons)."""
    return f"r{next(_names)}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module (starting one takes a second); tests use fresh() names."""
    d = start_daemon(tmp_path_factory.mktemp("memplugd"))
    yield d
    stop_shared(d)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.socket, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def public_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon whose fd socket uid 65534 can reach: pytest's tmp dirs are 0700, so the
    fd socket lives in a 0755 directory under /tmp."""
    require_root("runs processes as uid 65534")
    public = Path(tempfile.mkdtemp(prefix="memplug-e2e-", dir="/tmp"))
    try:
        public.chmod(0o755)
        d = start_daemon(
            tmp_path_factory.mktemp("memplugd"), "--fd-socket", str(public / "fd.sock")
        )
        yield d
        stop_shared(d)
    finally:
        shutil.rmtree(public, ignore_errors=True)


# --------------------------------------------------------------------------- tickets


def test_attach_returns_ticket_and_redeem_gives_the_region_fd(
    daemon: DaemonProcess, client: Client
) -> None:
    name = fresh()
    client.create_region(name, 64 * MiB, labels={"k": "v"})
    client.plug(name, 0, 4 * MiB)
    reply = daemon.stub.Attach(pb.AttachRequest(name=name, access=pb.ACCESS_READ_WRITE))
    assert TICKET_RE.fullmatch(reply.ticket), f"ticket {reply.ticket!r}"
    assert reply.fd_socket == str(daemon.fd_socket)
    assert reply.expires_in == pytest.approx(10.0)
    assert reply.access == pb.ACCESS_READ_WRITE
    assert reply.region.name == name and reply.region.size == 64 * MiB
    other = daemon.stub.Attach(pb.AttachRequest(name=name, access=pb.ACCESS_READ_WRITE))
    assert other.ticket != reply.ticket

    line, fd = redeem_raw(reply.fd_socket, reply.ticket)
    assert fd is not None, f"no fd passed: {line!r}"
    try:
        fields = ok_fields(line)
        assert fields["region"] == name
        assert fields["size"] == str(64 * MiB)
        assert fields["page_size"] == str(mmap.PAGESIZE)
        assert fields["block_size"] == str(2 * MiB)
        assert fields["backing"] == "shmem"
        assert fields["access"] == "rw"
        st = os.fstat(fd)
        assert st.st_size == 64 * MiB
        assert accmode(fd) == os.O_RDWR
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        assert int(fields["seals"]) == seals
        want = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
        assert seals & want == want, f"seals {seals:#x} lack shrink/grow/seal"
        # It is the region's memory: what goes in through this fd, the daemon's memfd holds.
        os.pwrite(fd, PATTERN, 0)
        assert region_bytes(daemon, name, len(PATTERN)) == PATTERN
    finally:
        os.close(fd)


def test_ticket_is_single_use(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    ticket = client.ticket(name)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    assert fd is not None, line
    os.close(fd)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    expect_refused(line, fd, "PERMISSION_DENIED")
    good_attach(client, name, 16 * MiB)


def check_ticket_expiry(d: DaemonProcess) -> None:
    with Client(d.socket) as c:
        c.create_region("vm0", 16 * MiB)
        prompt = c.ticket("vm0")
        assert prompt.expires_in == pytest.approx(0.5)
        stale = c.ticket("vm0")
        line, fd = redeem_raw(prompt.fd_socket, prompt.ticket)  # within its 0.5 s: fine
        assert fd is not None, line
        os.close(fd)
        time.sleep(1.0)
        line, fd = redeem_raw(stale.fd_socket, stale.ticket)
        expect_refused(line, fd, "PERMISSION_DENIED")
        assert "expire" in line


def test_expired_ticket_is_refused(daemon_factory: Factory) -> None:
    """The README documents --ticket-ttl SECONDS."""
    check_ticket_expiry(daemon_factory("--ticket-ttl", "0.5"))


def test_expired_ticket_is_refused_ttl_from_config(daemon_factory: Factory, tmp_path: Path) -> None:
    config = tmp_path / "memplugd.toml"
    config.write_text("ticket-ttl = 0.5\n")
    check_ticket_expiry(daemon_factory("--config", str(config)))


def test_guessed_ticket_is_refused(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    client.ticket(name)  # a real one is outstanding; a guess still must not match it
    for guess in (secrets.token_urlsafe(24), "A" * 32, "0" * 16):
        line, fd = redeem_raw(daemon.fd_socket, guess)
        expect_refused(line, fd, "PERMISSION_DENIED")


@pytest.mark.parametrize("access", [pb.ACCESS_UNSPECIFIED, 7])
def test_attach_needs_a_known_access_mode(daemon: DaemonProcess, access: int) -> None:
    name = fresh()
    daemon.stub.CreateRegion(
        pb.CreateRegionRequest(name=name, size=16 * MiB, backing=pb.BACKING_SHMEM)
    )
    request = pb.AttachRequest(name=name, access=pb.Access.ValueType(access))
    with pytest.raises(grpc.RpcError) as info:
        daemon.stub.Attach(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        daemon.stub.Attach(pb.AttachRequest(name="nope", access=pb.ACCESS_READ_ONLY))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND


def test_ticket_does_not_survive_delete_and_recreate(daemon: DaemonProcess, client: Client) -> None:
    """A ticket names a region; a new region of the same name is not that region."""
    name = fresh()
    client.create_region(name, 16 * MiB)
    ticket = client.ticket(name)
    client.delete_region(name)
    client.create_region(name, 32 * MiB)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    if fd is not None:
        size = os.fstat(fd).st_size
        os.close(fd)
        pytest.fail(f"a ticket of the deleted region handed out the new one ({size} bytes)")
    assert line.startswith("ERR "), line
    good_attach(client, name, 32 * MiB)


def test_deleted_region_ticket_says_not_found(daemon: DaemonProcess, client: Client) -> None:
    """fd-protocol.md: ERR NOT_FOUND "when the region was deleted"."""
    name = fresh()
    client.create_region(name, 16 * MiB)
    ticket = client.ticket(name)
    client.delete_region(name)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    expect_refused(line, fd, "NOT_FOUND")


# --------------------------------------------------------------------------- ACL


ACL_CASES: list[tuple[str, dict[str, Any], str, int, list[int], bool]] = [
    # (id, region ACL, access, child's primary gid, supplementary gids, accepted?)
    ("no-entry-rw", {}, "rw", NOBODY, [], False),
    ("no-entry-ro", {}, "ro", NOBODY, [], False),
    ("other-uid-only", {"allowed_uids": [1000], "read_only_uids": [1001]}, "ro", NOBODY, [], False),
    ("allowed-uid-rw", {"allowed_uids": [NOBODY]}, "rw", NOBODY, [], True),
    ("allowed-uid-ro", {"allowed_uids": [NOBODY]}, "ro", NOBODY, [], True),
    ("ro-uid-ro", {"read_only_uids": [NOBODY]}, "ro", NOBODY, [], True),
    ("ro-uid-rw", {"read_only_uids": [NOBODY]}, "rw", NOBODY, [], False),
    ("allowed-gid-supp", {"allowed_gids": [OTHER_GID]}, "rw", NOBODY, [OTHER_GID], True),
    ("allowed-gid-primary", {"allowed_gids": [OTHER_GID]}, "rw", OTHER_GID, [], True),
    ("allowed-gid-not-member", {"allowed_gids": [OTHER_GID]}, "rw", NOBODY, [], False),
    ("ro-gid-ro", {"read_only_gids": [OTHER_GID]}, "ro", NOBODY, [OTHER_GID], True),
    ("ro-gid-rw", {"read_only_gids": [OTHER_GID]}, "rw", NOBODY, [OTHER_GID], False),
    ("owner-rw", {"owner_uid": NOBODY}, "rw", NOBODY, [], True),
]


@pytest.mark.parametrize(
    ("acl", "access", "gid", "groups", "accepted"),
    [pytest.param(*case[1:], id=case[0]) for case in ACL_CASES],
)
def test_acl_for_an_unprivileged_process(
    public_daemon: DaemonProcess,
    acl: dict[str, Any],
    access: str,
    gid: int,
    groups: list[int],
    accepted: bool,
) -> None:
    name = fresh()
    with Client(public_daemon.socket) as c:
        c.create_region(name, 16 * MiB, **acl)
        c.plug(name)
        write_region(public_daemon, name, PATTERN)
        ticket = c.ticket(name, access)
        report = run_unprivileged(ticket.fd_socket, ticket.ticket, gid=gid, extra_groups=groups)
        if accepted:
            assert report["fds"] == 1, f"refused: {report['line']!r}"
            assert ok_fields(report["line"])["access"] == access
            assert report["accmode"] == access
            assert report["size"] == 16 * MiB
            assert bytes.fromhex(report["head"]) == PATTERN[:16]
            assert f"attached region={name} access={access} pid={report['pid']} uid={NOBODY}" in (
                wait_for_log(public_daemon, f"pid={report['pid']} uid={NOBODY}")
            )
        else:
            assert report["fds"] == 0, f"the daemon passed an fd: {report['line']!r}"
            assert report["line"].startswith("ERR PERMISSION_DENIED "), report["line"]
            needle = f"fd socket: refused pid={report['pid']} uid={NOBODY}"
            assert needle in wait_for_log(public_daemon, needle), (
                f"no refusal line with the peer's pid/uid in the log:\n{public_daemon.log()}"
            )
            # Redeeming used the ticket up: not even root may retry it.
            line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
            expect_refused(line, fd, "PERMISSION_DENIED")


def test_read_only_is_enforced_by_the_kernel(public_daemon: DaemonProcess) -> None:
    name = fresh()
    with Client(public_daemon.socket) as c:
        c.create_region(name, 16 * MiB, read_only_uids=[NOBODY])
        c.plug(name)
        write_region(public_daemon, name, PATTERN)
        before = c.get_region(name)
        ticket = c.ticket(name, "ro")
        report = run_unprivileged(ticket.fd_socket, ticket.ticket, "ro-checks")
        assert report["fds"] == 1, report["line"]
        assert report["accmode"] == "ro"
        assert bytes.fromhex(report["mapped_head"]) == PATTERN[:16], "PROT_READ mapping works"
        attempts: dict[str, str] = report["attempts"]
        succeeded = sorted(k for k, v in attempts.items() if v == "ok")
        assert not succeeded, f"a read-only fd could write: {succeeded} ({attempts})"
        assert attempts["mmap_shared_write"] == "EACCES"
        assert attempts["mprotect_write"] == "EACCES"
        assert attempts["reopen_rdwr"] == "EACCES"
        assert attempts["reopen_wronly"] == "EACCES"
        assert attempts["write"] == "EBADF"
        assert report["size_after"] == 16 * MiB
        # Checked from root: nothing changed, not a byte, not a block.
        assert region_bytes(public_daemon, name, len(PATTERN)) == PATTERN
        after = c.get_region(name)
        assert after.plugged == before.plugged
        assert after.allocated_bytes == before.allocated_bytes == 16 * MiB


@pytest.mark.parametrize("access", ["ro", "rw"])
def test_owner_may_reopen_read_write(public_daemon: DaemonProcess, access: str) -> None:
    name = fresh()
    with Client(public_daemon.socket) as c:
        c.create_region(name, 16 * MiB, owner_uid=NOBODY)
        c.plug(name)
        ticket = c.ticket(name, access)
        report = run_unprivileged(ticket.fd_socket, ticket.ticket, "reopen-rw")
        assert report["fds"] == 1, report["line"]
        assert report["reopen_rdwr"] == "ok", "the owner must be able to reopen like QEMU does"
        assert region_bytes(public_daemon, name, 16) == b"owner-was-here!!"


def test_non_owner_cannot_reopen_read_write(public_daemon: DaemonProcess) -> None:
    name = fresh()
    with Client(public_daemon.socket) as c:
        c.create_region(name, 16 * MiB, allowed_uids=[NOBODY])
        c.plug(name)
        write_region(public_daemon, name, PATTERN)
        ticket = c.ticket(name, "ro")
        report = run_unprivileged(ticket.fd_socket, ticket.ticket, "reopen-rw")
        assert report["fds"] == 1, report["line"]
        assert report["reopen_rdwr"] == "EACCES"
        assert region_bytes(public_daemon, name, len(PATTERN)) == PATTERN


# --------------------------------------------------------------------------- robustness


def test_fifty_parallel_attaches(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 32 * MiB)
    start = threading.Barrier(50)

    def one(_: int) -> tuple[str, str, int]:
        start.wait(10)
        ticket = client.ticket(name, "ro")
        line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
        assert fd is not None, f"no fd: {line!r}"
        try:
            return ticket.ticket, line, os.fstat(fd).st_size
        finally:
            os.close(fd)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert len({t for t, _, _ in results}) == 50, "tickets must be unique"
    for _, line, size in results:
        assert ok_fields(line)["access"] == "ro"
        assert size == 32 * MiB


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\xff\xfe garbage \x80\x81\n", id="garbage"),
        pytest.param(b"MEMPLUG/1 ATTACH\n", id="no-ticket"),
        pytest.param(b"MEMPLUG/2 ATTACH " + b"A" * 32 + b"\n", id="wrong-version"),
        pytest.param(b"MEMPLUG/1 ATTACH " + b"A" * 32 + b" extra\n", id="trailing"),
        pytest.param(b"MEMPLUG/1 ATTACH " + b"A" * 129 + b"\n", id="ticket-too-long"),
    ],
)
def test_malformed_request_gets_invalid_argument(
    daemon: DaemonProcess, client: Client, data: bytes
) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    msg, fds = exchange(daemon.fd_socket, data)
    for fd in fds:
        os.close(fd)
    assert not fds
    assert msg.startswith(b"ERR INVALID_ARGUMENT "), msg
    good_attach(client, name, 16 * MiB)


def test_line_without_newline_then_close(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    ticket = client.ticket(name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(8)
        sock.connect(str(daemon.fd_socket))
        sock.sendall(f"MEMPLUG/1 ATTACH {ticket.ticket}".encode())  # no newline
        sock.shutdown(socket.SHUT_WR)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    for fd in fds:
        os.close(fd)
    assert not fds, "an unterminated request must not be served"
    assert msg == b"" or msg.startswith(b"ERR "), msg
    good_attach(client, name, 16 * MiB)


@pytest.mark.parametrize("newline", [True, False])
def test_over_long_line(daemon: DaemonProcess, client: Client, newline: bool) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    ticket = client.ticket(name)
    # A valid request hidden behind 600 bytes of padding: still over the limit.
    data = b" " * 600 + f"MEMPLUG/1 ATTACH {ticket.ticket}".encode() + (b"\n" if newline else b"")
    msg, fds = exchange(daemon.fd_socket, data)
    for fd in fds:
        os.close(fd)
    assert not fds
    assert msg == b"" or msg.startswith(b"ERR INVALID_ARGUMENT "), msg
    good_attach(client, name, 16 * MiB)


def test_idle_connections_are_dropped_and_do_not_block_attach(
    daemon: DaemonProcess, client: Client
) -> None:
    """200 connections that send nothing (or half a line) while attaches go on.

    One thread serves the fd socket: the idle ones must neither hold up good
    attaches nor stay open past the ~5 s read timeout.
    """
    name = fresh()
    client.create_region(name, 16 * MiB)
    idle: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for i in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            sock.connect(str(daemon.fd_socket))  # blocking: waits while the backlog is full
            if i % 4 == 1:
                sock.sendall(b"MEMPLUG/1 ATTA")  # slowloris: part of a line, then nothing
        start = time.monotonic()
        for _ in range(5):
            good_attach(client, name, 16 * MiB)
        assert time.monotonic() - start < 3.0, "attaches were held up by idle connections"
        # The silent ones are closed by the daemon after its read timeout (~5 s).
        first = idle[0]
        first.settimeout(max(0.1, opened + 8.0 - time.monotonic()))
        got = first.recv(4096)  # TimeoutError (a failure) if the daemon never closes it
        waited = time.monotonic() - opened
        assert got == b"", "a silent connection got an answer"
        assert 4.0 <= waited <= 8.0, f"closed after {waited:.1f} s, want ~5 s"
        for sock in idle[1:]:
            sock.settimeout(max(0.1, opened + 9.0 - time.monotonic()))
            assert sock.recv(4096) == b"", "an idle connection got an answer"
    finally:
        for sock in idle:
            sock.close()
    good_attach(client, name, 16 * MiB)


def test_clients_leaving_early(daemon: DaemonProcess, client: Client) -> None:
    """Clients that vanish before (or right after) asking cost nothing but their ticket."""
    name = fresh()
    client.create_region(name, 16 * MiB)
    for i in range(20):
        ticket = client.ticket(name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(daemon.fd_socket))
            if i % 2:
                sock.sendall(f"MEMPLUG/1 ATTACH {ticket.ticket}\n".encode())
        if i % 2:  # asked, then left: the ticket is spent either way
            line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
            expect_refused(line, fd, "PERMISSION_DENIED")
    good_attach(client, name, 16 * MiB)
    assert daemon.alive()


def test_region_fd_outlives_delete(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    client.plug(name)
    ticket = client.ticket(name)
    line, fd = redeem_raw(ticket.fd_socket, ticket.ticket)
    assert fd is not None, line
    try:
        os.pwrite(fd, PATTERN, 0)
        client.delete_region(name)
        assert os.pread(fd, len(PATTERN), 0) == PATTERN
        assert struct.unpack("<I", os.pread(fd, 4, 0))[0] == 0x03020100
    finally:
        os.close(fd)
