"""Attacks, each by a real unprivileged process (uid/gid 65534, no supplementary groups).

The attacker runs the system python with the standard library only (it drops
to 65534 itself before it execs: see hardening_kit.DROP_PRIVILEGES), talks to
the daemon's real fd socket (in a 0755 directory under /tmp so it can reach
it) and uses every syscall it has. The daemon must let no one in:
- a uid outside a region's ACL gets ERR PERMISSION_DENIED and no fd; the
  control socket (0660, root) does not even accept its connection;
- replayed, expired and guessed tickets fail, and guesses do not burn the
  real ticket;
- a read-only holder cannot write by any means (write, pwrite, a read-write
  reopen of /proc/self/fd/N, a shared writable mapping, mprotect, madvise,
  fallocate), cannot resize, cannot add seals; a read-write holder cannot
  resize or add the seals that would block the daemon's discards; Discard
  still works afterwards;
- a FILE region cannot be pointed outside its allowed dir by '..', an
  absolute symlink, a relative symlink, a /proc magic link, or a symlink
  swapped in and out of a path component while regions are being created;
  no file outside is created, adopted or modified.

Every attack runs twice: against memplugd as root, and against memplugd as the
packaged unit runs it (packaging/systemd/memplugd.service: a system uid, only
the unit's capabilities, here with RLIMIT_NOFILE 1024), its state dir and
sockets in a directory that uid owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import packaged_user
import pytest
from conftest import HUGE_2M, DaemonProcess, MiB, hugetlb_pool_of, require_root, start_daemon
from hardening_kit import (
    NOBODY,
    digest,
    fill,
    public_dir,
    record,
    run_nobody,
    spawn_nobody,
)

from memplug.client import Client, MemplugError, PermissionDenied
from memplug.client.attach import redeem

pytestmark = pytest.mark.privileged

# The attacker's toolbox. argv[1] is the mode; it prints one JSON line.
ATTACKER = r"""
import ctypes, errno, fcntl, json, mmap, os, select, socket, sys, time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
MAP_NORESERVE = 0x4000
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 1, 2, 4, 8, 16
MADV_REMOVE, MADV_DONTNEED = 9, 4

def checked(rc):
    if rc == -1 or rc == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc

def attempt(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

def redeem(path, ticket):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(("MEMPLUG/1 ATTACH %s\n" % ticket).encode())
    msg, fds, _, _ = socket.recv_fds(s, 4096, 4)
    s.close()
    return msg.decode(errors="replace"), fds

mode, args = sys.argv[1], sys.argv[2:]
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
       "pid": os.getpid()}

if mode == "redeem":
    path, tickets = args[0], args[1:]
    out["replies"] = []
    for t in tickets:
        line, fds = redeem(path, t)
        out["replies"].append({"line": line, "fds": len(fds)})
        for fd in fds:
            os.close(fd)

elif mode == "redeem-late":
    path, ticket, delay = args[0], args[1], float(args[2])
    time.sleep(delay)
    line, fds = redeem(path, ticket)
    out["replies"] = [{"line": line, "fds": len(fds)}]
    for fd in fds:
        os.close(fd)

elif mode == "guess":
    path, count = args[0], int(args[1])
    import secrets
    out["replies"] = []
    for i in range(count):
        line, fds = redeem(path, secrets.token_urlsafe(24))
        out["replies"].append({"line": line, "fds": len(fds)})
        for fd in fds:
            os.close(fd)

elif mode == "connect":
    def go():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(args[0])
        finally:
            s.close()
    out["connect"] = attempt(go)

elif mode in ("ro-attack", "rw-attack"):
    path, ticket = args
    line, fds = redeem(path, ticket)
    out["line"], out["fds"] = line, len(fds)
    if fds:
        fd = fds[0]
        size = os.fstat(fd).st_size
        out["size"] = size
        out["accmode"] = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        scribble = b"\xee" * 4096
        r = out["attempts"] = {}
        if mode == "ro-attack":
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
            r["reopen_trunc"] = attempt(reopen(os.O_RDONLY | os.O_TRUNC))

            def map_shared_write():
                checked(libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_SHARED | MAP_NORESERVE, fd, 0))
            r["mmap_shared_write"] = attempt(map_shared_write)
            addr = checked(libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED | MAP_NORESERVE,
                                     fd, 0))

            def mprotect_write():
                checked(libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE))
                ctypes.memmove(addr, scribble, len(scribble))
            r["mprotect_write"] = attempt(mprotect_write)
            r["madvise_remove"] = attempt(lambda: checked(libc.madvise(addr, size, MADV_REMOVE)))
            r["punch_hole"] = attempt(lambda: checked(libc.fallocate(fd, 3, 0, size)))
            r["fallocate"] = attempt(lambda: checked(libc.fallocate(fd, 0, 0, size)))
            # FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE: reshape a file
            r["collapse_range"] = attempt(lambda: checked(libc.fallocate(fd, 0x08, 0, size // 2)))
            r["insert_range"] = attempt(lambda: checked(libc.fallocate(fd, 0x20, 0, size // 2)))
        r["ftruncate_zero"] = attempt(lambda: os.ftruncate(fd, 0))
        r["ftruncate_shrink"] = attempt(lambda: os.ftruncate(fd, size // 2))
        r["ftruncate_grow"] = attempt(lambda: os.ftruncate(fd, size * 2))
        r["seal_write"] = attempt(lambda: fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE))
        r["seal_future_write"] = attempt(lambda: fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE))
        r["seal_seal"] = attempt(lambda: fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL))
        out["size_after"] = os.fstat(fd).st_size
        os.close(fd)

elif mode == "plant":
    # Symlinks out of the allowed dir, planted in the attacker's own dir inside it.
    evil, outside = args
    os.symlink(outside, os.path.join(evil, "abs"))
    rel = os.path.relpath(outside, evil)
    os.symlink(rel, os.path.join(evil, "rel"))
    os.symlink(os.path.join(outside, "victim"), os.path.join(evil, "file-link"))
    os.symlink(os.path.join(rel, "victim"), os.path.join(evil, "file-link-rel"))
    os.symlink("/proc/self/root" + outside, os.path.join(evil, "magic"))
    out["planted"] = sorted(os.listdir(evil))

elif mode == "flip":
    # Swap evil/d between a real directory (inside) and a symlink (outside), atomically,
    # as fast as possible until stdin closes; leave d a directory.
    evil, target = args
    d, x = os.path.join(evil, "d").encode(), os.path.join(evil, "x").encode()
    os.mkdir(d)
    with open(os.path.join(evil, "d", "passwd"), "wb") as f:
        f.write(b"decoy: inside the allowed dir\n".ljust(2 << 20, b"."))  # adoptable: 2 MiB
    os.symlink(target, x)
    flips = 0
    print("ready", flush=True)
    while True:
        if flips % 64 == 0 and select.select([sys.stdin], [], [], 0)[0]:
            if not sys.stdin.read(1):
                break
        checked(libc.renameat2(-100, d, -100, x, 2))  # RENAME_EXCHANGE
        flips += 1
    if os.path.islink(d):
        checked(libc.renameat2(-100, d, -100, x, 2))
        flips += 1
    out["flips"] = flips

print(json.dumps(out))
"""


# --------------------------------------------------------------------------- fixtures


@dataclass
class Public:
    """A daemon whose sockets live in a 0755 dir under /tmp, and its allowed dir."""

    d: DaemonProcess
    client: Client
    root: Path
    allow: Path
    outside: Path


# Which daemon the running attacks hit, for the figures (set by the daemon_as fixture).
_daemon_as = ["root"]


@pytest.fixture(scope="module", params=["root", "packaged"], ids=["as-root", "as-memplug-user"])
def daemon_as(request: pytest.FixtureRequest) -> str:
    """root, or packaged: the unit's non-root uid and capabilities, RLIMIT_NOFILE 1024."""
    require_root("runs attackers as uid 65534")
    who: str = request.param
    _daemon_as[0] = who
    return who


def start_as(who: str, where: Path, *extra: str) -> DaemonProcess:
    if who == "root":
        return start_daemon(where, *extra)
    d = start_daemon(packaged_user.owned_dir(where), *extra, wrapper=packaged_user.wrapper())
    packaged_user.assert_runs_packaged(d.proc.pid)
    return d


@pytest.fixture(scope="module")
def public(daemon_as: str) -> Iterator[Public]:
    with public_dir("memplug-attack-") as root:
        allow, outside = root / "allow", root / "outside"
        allow.mkdir(mode=0o755)
        outside.mkdir(mode=0o755)
        # 2 MiB each: adoptable (a whole block), so an escape would not stop at a size check.
        (outside / "victim").write_bytes(b"root's file outside the allowed dir\n".ljust(2 * MiB))
        (outside / "passwd").write_bytes(b"root:x:0:0:outside sentinel\n".ljust(2 * MiB))
        # Both sockets in the 0755 dir: the fd socket (0666) for the attackers to reach,
        # the gRPC socket (0660, root) for them to be refused by.
        d = start_as(daemon_as, root / "daemon", "--allow-dir", str(allow))
        client = Client(d.socket, timeout=30)
        try:
            yield Public(d, client, root, allow, outside)
        finally:
            client.close()
            assert d.alive(), f"memplugd died under attack:\n{d.log()[-4000:]}"
            code = d.stop()
            assert code == 0, f"memplugd exited with {code}:\n{d.log()[-4000:]}"


_count = iter(range(1_000_000))


def fresh(prefix: str = "atk") -> str:
    return f"{prefix}{next(_count)}"


def refused(reply: dict[str, Any], status: str = "PERMISSION_DENIED") -> None:
    assert reply["fds"] == 0, f"the attacker got an fd: {reply['line']!r}"
    assert reply["line"].startswith(f"ERR {status} "), reply["line"]


def attack(tag: str, blocked: bool) -> None:
    outcome = "blocked" if blocked else "succeeded"
    record("attack", 1, attack=tag, outcome=outcome, daemon=_daemon_as[0])


def fingerprint(root: Path) -> dict[str, tuple[int, int, float, str]]:
    """Every entry under root (no symlinks followed): mode, size, mtime, sha256."""
    out: dict[str, tuple[int, int, float, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            h = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime, h)
    return out


def etc_fingerprint() -> dict[str, Any]:
    passwd = Path("/etc/passwd")
    return {
        "names": sorted(os.listdir("/etc")),
        "passwd": (passwd.stat().st_mtime, hashlib.sha256(passwd.read_bytes()).hexdigest()),
    }


# --------------------------------------------------------------------------- ACL


def test_other_uid_without_acl_gets_nothing(public: Public) -> None:
    c = public.client
    name = fresh()
    c.create_region(name, 16 * MiB, allowed_uids=[1000], read_only_uids=[1001])
    c.plug(name)
    tickets = [c.ticket(name, "rw").ticket, c.ticket(name, "ro").ticket]
    report = run_nobody(ATTACKER, "redeem", str(public.d.fd_socket), *tickets)
    assert report["uid"] == NOBODY and report["gid"] == NOBODY and report["groups"] == []
    for reply in report["replies"]:
        attack("uid outside the ACL redeems a ticket", reply["fds"] == 0)
        refused(reply)
    log = public.d.log()
    assert f"refused pid={report['pid']} uid={NOBODY}" in log, "the refusal was not logged"
    # The control plane does not even take the connection.
    control = run_nobody(ATTACKER, "connect", str(public.d.socket))
    attack("uid outside the socket group opens the gRPC socket", control["connect"] != "ok")
    assert control["connect"] == "EACCES", control


def test_replayed_ticket(public: Public) -> None:
    c = public.client
    name = fresh()
    c.create_region(name, 16 * MiB, allowed_uids=[NOBODY])
    first = c.ticket(name, "rw").ticket
    report = run_nobody(ATTACKER, "redeem", str(public.d.fd_socket), first, first)
    ok, replay = report["replies"]
    assert ok["fds"] == 1 and ok["line"].startswith("OK "), ok
    attack("replay of a ticket the attacker redeemed", replay["fds"] == 0)
    refused(replay)
    # A ticket someone else (root) redeemed first cannot be replayed either.
    taken = c.ticket(name, "rw")
    fd, _ = redeem(taken.fd_socket, taken.ticket)
    os.close(fd)
    report = run_nobody(ATTACKER, "redeem", str(public.d.fd_socket), taken.ticket)
    attack("replay of a ticket another process redeemed", report["replies"][0]["fds"] == 0)
    refused(report["replies"][0])


def test_expired_ticket(daemon_as: str) -> None:
    with public_dir("memplug-ttl-") as root:
        d = start_as(daemon_as, root / "d", "--ticket-ttl", "0.5")
        try:
            with Client(d.socket) as c:
                name = fresh()
                c.create_region(name, 16 * MiB, allowed_uids=[NOBODY])
                ticket = c.ticket(name, "rw")
                assert ticket.expires_in == pytest.approx(0.5)
                report = run_nobody(ATTACKER, "redeem-late", ticket.fd_socket, ticket.ticket, "1.0")
                reply = report["replies"][0]
                attack("redeem after the ticket's TTL", reply["fds"] == 0)
                refused(reply)
                assert "expired" in reply["line"], reply["line"]
                prompt = c.ticket(name, "rw")  # the same uid, in time: fine
                report = run_nobody(ATTACKER, "redeem", prompt.fd_socket, prompt.ticket)
                assert report["replies"][0]["fds"] == 1, report
        finally:
            assert d.alive()
            assert d.stop() == 0


def test_guessed_tickets(public: Public) -> None:
    c = public.client
    name = fresh()
    c.create_region(name, 16 * MiB, allowed_uids=[NOBODY])
    real = c.ticket(name, "rw").ticket  # outstanding while the attacker guesses
    guesses = 300
    report = run_nobody(ATTACKER, "guess", str(public.d.fd_socket), str(guesses), timeout=120)
    hits = [r for r in report["replies"] if r["fds"]]
    record("ticket_guesses", guesses)
    attack(f"{guesses} guessed tickets", not hits)
    assert not hits, f"a guessed ticket was accepted: {hits[:3]}"
    for reply in report["replies"]:
        refused(reply)
    report = run_nobody(ATTACKER, "redeem", str(public.d.fd_socket), real)
    assert report["replies"][0]["fds"] == 1, "the guesses burnt the real ticket"


def test_ticket_of_a_deleted_region_says_not_found(public: Public) -> None:
    """fd-protocol.md: ERR NOT_FOUND when the region was deleted (not 'unknown ticket')."""
    c = public.client
    name = fresh()
    c.create_region(name, 16 * MiB, allowed_uids=[NOBODY])
    ticket = c.ticket(name, "rw").ticket
    c.delete_region(name)
    report = run_nobody(ATTACKER, "redeem", str(public.d.fd_socket), ticket)
    reply = report["replies"][0]
    attack("redeem a ticket of a deleted region", reply["fds"] == 0)
    refused(reply, "NOT_FOUND")


# --------------------------------------------------------------------------- read-only and seals


@pytest.fixture(scope="module")
def pool() -> Iterator[None]:
    with hugetlb_pool_of(8):
        yield


def make_region(public: Public, backing: str, **acl: Any) -> tuple[str, str]:
    c = public.client
    name = fresh(f"{backing}-")
    extra: dict[str, Any] = {}
    if backing == "hugetlb":
        extra["page_size"] = HUGE_2M
    if backing == "file":
        extra["path"] = f"{name}.img"
    c.create_region(name, 4 * MiB, backing, **extra, **acl)
    c.plug(name)
    return name, fill(c, name, [(0, 4 * MiB)], seed=int.from_bytes(os.urandom(2), "little"))


@pytest.mark.parametrize("backing", ["shmem", "hugetlb", "file"])
def test_read_only_holder_cannot_write(
    public: Public, request: pytest.FixtureRequest, backing: str
) -> None:
    if backing == "hugetlb":
        request.getfixturevalue("pool")
    c = public.client
    name, data = make_region(public, backing, read_only_uids=[NOBODY])
    before = c.get_region(name)
    ticket = c.ticket(name, "ro").ticket
    report = run_nobody(ATTACKER, "ro-attack", str(public.d.fd_socket), ticket)
    assert report["fds"] == 1 and report["accmode"] == os.O_RDONLY, report
    attempts: dict[str, str] = report["attempts"]
    for what, result in attempts.items():
        attack(f"read-only {backing} fd: {what}", result != "ok")
    assert not [k for k, v in attempts.items() if v == "ok"], f"writes got through: {attempts}"
    assert report["size_after"] == 4 * MiB
    after = c.get_region(name)
    assert after.plugged == before.plugged and after.allocated_bytes == before.allocated_bytes
    assert digest(c, name, [(0, 4 * MiB)]) == data, "a read-only holder changed the data"
    # The daemon's own discard still works: nothing sealed it shut.
    c.discard(name, 0, 2 * MiB)
    with c.attach(name, "ro") as att:
        assert att.view is not None
        assert bytes(att.view[0 : 2 * MiB]) == bytes(2 * MiB)
    c.delete_region(name)


@pytest.mark.parametrize("backing", ["shmem", "hugetlb", "file"])
def test_read_write_holder_cannot_seal_or_resize(
    public: Public, request: pytest.FixtureRequest, backing: str
) -> None:
    if backing == "hugetlb":
        request.getfixturevalue("pool")
    c = public.client
    name, data = make_region(public, backing, allowed_uids=[NOBODY])
    ticket = c.ticket(name, "rw").ticket
    report = run_nobody(ATTACKER, "rw-attack", str(public.d.fd_socket), ticket)
    if backing == "file":
        # A regular file cannot be sealed: no read-write fd for anyone but its
        # owner and root, whose truncation the daemon reports (test_holders.py).
        attack("read-write file fd for a uid other than the owner", report["fds"] == 0)
        refused(report, "FAILED_PRECONDITION")
        assert "cannot be sealed against truncation" in report["line"], report["line"]
        assert c.get_region(name).plugged == [(0, 4 * MiB)]
        assert digest(c, name, [(0, 4 * MiB)]) == data
        c.delete_region(name)
        return
    assert report["fds"] == 1 and report["accmode"] == os.O_RDWR, report
    attempts: dict[str, str] = report["attempts"]
    for what, result in attempts.items():
        attack(f"read-write {backing} fd: {what}", result != "ok")
    assert not [k for k, v in attempts.items() if v == "ok"], (
        f"seals/resizes got through: {attempts}"
    )
    assert report["size_after"] == 4 * MiB
    discarded = c.discard(name)
    assert discarded.bytes == 4 * MiB
    assert c.get_region(name).allocated_bytes == 4 * MiB
    c.delete_region(name)


# --------------------------------------------------------------------------- FILE regions


@pytest.fixture(scope="module")
def evil(public: Public) -> Path:
    """A directory inside the allowed dir that belongs to the attacker."""
    path = public.allow / "evil"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    report = run_nobody(ATTACKER, "plant", str(path), str(public.outside))
    assert "abs" in report["planted"]
    return path


ESCAPES = [
    "../outside/victim",
    "../outside/new.img",
    "evil/../../outside/victim",
    "@OUTSIDE@/victim",
    "@OUTSIDE@/new.img",
    "evil/abs/victim",
    "evil/abs/new.img",
    "evil/rel/victim",
    "evil/rel/new.img",
    "evil/file-link",
    "evil/file-link-rel",
    "evil/magic/victim",
    "evil/magic/new.img",
    "/proc/self/root@OUTSIDE@/victim",
    "/proc/self/cwd/new.img",
    "/etc/passwd",
    "/dev/zero",
]


@pytest.mark.parametrize("size", [0, 4 * MiB], ids=["adopt", "create"])
@pytest.mark.parametrize("path", ESCAPES)
def test_file_region_cannot_leave_the_allowed_dir(
    public: Public, evil: Path, path: str, size: int
) -> None:
    c = public.client
    target = path.replace("@OUTSIDE@", str(public.outside))
    outside, etc = fingerprint(public.outside), etc_fingerprint()
    name = fresh("esc")
    made = None
    try:
        made = c.create_region(name, size, "file", path=target)
    except MemplugError as exc:
        code = exc.code
    else:
        c.delete_region(name)
    intact = fingerprint(public.outside) == outside and etc_fingerprint() == etc
    attack(f"FILE region at {path.replace('@OUTSIDE@', '<outside>')}", made is None and intact)
    assert made is None, f"{path!r} made a region at {made.path}"
    assert code in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), code
    assert fingerprint(public.outside) == outside, "a file outside the allowed dir changed"
    assert etc_fingerprint() == etc, "/etc changed"
    assert name not in {r.name for r in c.list_regions()}


RACE_SECONDS = 4.0


@pytest.mark.parametrize("target", ["outside", "etc"])
def test_symlink_swap_race(public: Public, evil: Path, target: str) -> None:
    """The attacker flips evil/race/d between a directory inside and a symlink out (to
    a sentinel dir, or /etc) while regions are created under it for a few seconds:
    new files, adoptions of a file the inside dir has (passwd), and adoptions of a
    name only the outside has (victim; absent in /etc too, for the /etc target).

    Every region that gets made must be a file inside the allowed dir: its inode is
    one found by walking the allowed dir, its path resolves inside; every refusal is
    a documented code; nothing outside is created, deleted or changed."""
    c = public.client
    race = evil / f"race-{target}"
    race.mkdir()
    os.chown(race, NOBODY, NOBODY)
    dest = str(public.outside) if target == "outside" else "/etc"
    absent = "victim" if target == "outside" else "memplug-absent-victim"
    assert not (Path("/etc") / absent).exists()
    outside, etc = fingerprint(public.outside), etc_fingerprint()
    flipper = spawn_nobody(ATTACKER, "flip", str(race), dest)
    assert flipper.stdout is not None and flipper.stdin is not None
    assert flipper.stdout.readline().strip() == "ready", flipper.stderr
    made: list[tuple[str, str, tuple[int, int]]] = []
    outcomes: dict[str, int] = {}
    messages: dict[str, str] = {}
    deadline = time.monotonic() + RACE_SECONDS
    i = 0
    try:
        while time.monotonic() < deadline:
            i += 1
            kind = (0, 1, 2, 2)[i % 4]  # half of them adopt the absent name: the narrowest race
            leaf = (f"race-{i}.img", "passwd", absent)[kind]
            where = f"evil/race-{target}/d/{leaf}"
            name = fresh("race")
            try:
                region = c.create_region(name, 2 * MiB if kind == 0 else 0, "file", path=where)
            except MemplugError as exc:
                code = exc.code or "?"
                outcomes[code] = outcomes.get(code, 0) + 1
                messages.setdefault(code, exc.message)
                continue
            outcomes["OK"] = outcomes.get("OK", 0) + 1
            with c.attach(name, "ro", map_memory=False, sparse=True) as att:
                st = os.fstat(att.fd)
                made.append((name, region.path, (st.st_dev, st.st_ino)))
            c.delete_region(name)
    finally:
        flipper.stdin.close()  # tells the attacker to stop
        flipper.stdin = None
        out, err = flipper.communicate(timeout=30)
    assert flipper.returncode == 0, err
    flips = json.loads(out.strip().splitlines()[-1])["flips"]
    record("symlink_race_attempts", i, target=target)
    record("symlink_race_flips", flips, target=target)
    for code, count in outcomes.items():
        record("symlink_race_outcomes", count, target=target, code=code)
    assert flips > 100, f"the attacker flipped only {flips} times"
    assert sum(outcomes.values()) > 20, f"only {outcomes} region creations in {RACE_SECONDS} s"

    inside: set[tuple[int, int]] = set()
    for dirpath, _, filenames in os.walk(public.allow):  # no symlink is followed
        for n in filenames:
            st = (Path(dirpath) / n).lstat()
            if stat.S_ISREG(st.st_mode):
                inside.add((st.st_dev, st.st_ino))
    allow = public.allow.resolve()
    escaped = [m for m in made if m[2] not in inside]
    damaged = fingerprint(public.outside) != outside or etc_fingerprint() != etc
    undocumented = set(outcomes) - {"OK", "PERMISSION_DENIED", "INVALID_ARGUMENT"}
    attack(f"symlink swap race ({target})", not escaped and not damaged and not undocumented)
    assert not escaped, f"regions backed by files outside the allowed dir: {escaped[:5]}"
    for _, where, _ in made:
        assert Path(os.path.realpath(where)).is_relative_to(allow), where
    assert fingerprint(public.outside) == outside, (
        f"a file outside the allowed dir changed (or vanished): {sorted(outside)} before, "
        f"{sorted(fingerprint(public.outside))} after; outcomes {outcomes}"
    )
    assert etc_fingerprint() == etc, "/etc changed"
    assert not undocumented, (outcomes, messages)
    assert not list(Path("/etc").glob("race-*.img"))


def test_attacks_left_the_daemon_serving(public: Public) -> None:
    c = public.client
    name = fresh()
    c.create_region(name, 4 * MiB)
    c.plug(name)
    with c.attach(name) as att:
        assert att.view is not None
        att.view[0:5] = b"alive"
    c.delete_region(name)
    with pytest.raises(PermissionDenied):
        c.create_region(fresh(), 4 * MiB, "file", path="../outside/late.img")
    assert public.d.alive()
