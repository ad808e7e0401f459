"""What holders of a region's fd can do to the region and to everyone else.

- A consumer never gets a mapping of unplugged blocks it did not ask for: the
  README's client flow against an empty hugetlb pool ends with a clear error,
  not SIGBUS (Client.attach and `memplug exec` refuse a partly plugged region
  unless it is asked for sparse).
- A FILE region's file cannot be sealed: only its owner and root get it
  read-write; when the owner shrinks or reshapes it anyway (ftruncate,
  FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE on ext4), the region is
  reported damaged with why, refuses the work that would mislead, and comes
  back damaged after a restart instead of vanishing.
- Memory a read-only holder allocates by reading unplugged shmem blocks is
  counted: status and metrics show it, and the quota refuses a plug for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import HUGE_2M, MiB, huge_free, require, require_root, start_daemon
from hardening_kit import NOBODY, public_dir, record, run_nobody
from test_attacks import ATTACKER
from test_state_and_metrics import free_port

from memplug.client import Client, FailedPrecondition, QuotaExceeded
from memplug.common import memory

pytestmark = pytest.mark.privileged

# A holder of a region's fd (stdlib only, run as uid 65534): OPENs the region on
# the fd socket, does one thing with the fd, prints one JSON line.
HOLDER = r"""
import ctypes, errno, json, mmap, os, socket, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, MADV_POPULATE_READ = 0x08, 0x20, 22

def attempt(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

def checked(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

path, name, access, action, *args = sys.argv[1:]
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
s.sendall(("MEMPLUG/1 OPEN %s %s\n" % (name, access)).encode())
msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
s.close()
out["line"], out["fds"] = msg.decode(errors="replace").strip(), len(fds)
if fds:
    fd = fds[0]
    size = os.fstat(fd).st_size
    if action == "truncate":
        out["result"] = attempt(lambda: os.ftruncate(fd, int(args[0])))
    elif action == "collapse":
        out["result"] = attempt(lambda: checked(
            libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, int(args[0]), int(args[1]))))
    elif action == "insert":
        out["result"] = attempt(lambda: checked(
            libc.fallocate(fd, FALLOC_FL_INSERT_RANGE, int(args[0]), int(args[1]))))
    elif action == "populate-read":
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        def go():
            m.madvise(MADV_POPULATE_READ, int(args[0]), int(args[1]))
        out["result"] = attempt(go)
        m.close()
    out["size_after"] = os.fstat(fd).st_size
    os.close(fd)
print(json.dumps(out))
"""


def hold(fd_socket: Path, name: str, access: str, action: str, *args: int) -> dict[str, Any]:
    return run_nobody(HOLDER, str(fd_socket), name, access, action, *map(str, args))


# --------------------------------------------------------------------------- sparse attach


README_FLOW = r"""
import sys
from memplug.client import Client, MemplugError, PoolExhausted

with Client(sys.argv[1]) as c:
    c.create_region("vm0", 8 << 20, "hugetlb", page_size=2 << 20)
    try:
        c.plug("vm0")
    except PoolExhausted as exc:
        print("plug:", exc)
    try:
        with c.attach("vm0", populate="write") as mem:
            mem.view[0:5] = b"hello"
    except MemplugError as exc:
        print("attach:", exc.code, exc)
        sys.exit(0)
    print("attached and wrote")
"""


@contextlib.contextmanager
def no_free_huge_pages() -> Iterator[None]:
    """The 2 MiB pool shrunk as far as it goes: pages others use stay, none is free."""
    require_root("sets the hugetlb pool size")
    path = memory.HUGEPAGES_SYSFS / f"hugepages-{HUGE_2M // 1024}kB" / "nr_hugepages"
    require(path.exists(), "the kernel offers no 2 MiB huge page pool")
    original = int(path.read_text())
    try:
        path.write_text("0")
        require(huge_free() == 0, "huge pages stay free in a pool shrunk to 0")
        yield
    finally:
        path.write_text(str(original))


def test_readme_flow_on_an_empty_pool_fails_cleanly_not_sigbus(tmp_path: Path) -> None:
    """The plug fails for want of huge pages; the attach that follows must fail too,
    with a clear error, instead of mapping unplugged blocks that SIGBUS on write."""
    with no_free_huge_pages():
        d = start_daemon(tmp_path / "d")
        try:
            child = subprocess.run(
                [sys.executable, "-c", README_FLOW, str(d.socket)],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            assert d.alive(), d.log()
            assert d.stop() == 0
    refused = "attach: FAILED_PRECONDITION region 'vm0' has unplugged blocks" in child.stdout
    record("holder_check", int(child.returncode == 0 and refused),
           check="attach after a failed plug refused, no SIGBUS")  # fmt: skip
    assert child.returncode == 0, (
        f"the client exited {child.returncode} (-7 is SIGBUS):\n{child.stdout}\n{child.stderr}"
    )
    assert "plug:" in child.stdout, child.stdout
    assert "attach: FAILED_PRECONDITION region 'vm0' has unplugged blocks" in child.stdout, (
        child.stdout
    )
    assert "sparse" in child.stdout


def test_sparse_attach_and_exec(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d")
    try:
        with Client(d.socket) as c:
            c.create_region("part", 8 * MiB)
            c.plug("part", 2 * MiB, 2 * MiB)
            with pytest.raises(FailedPrecondition, match=r"unplugged blocks: \[0x0, \+2 MiB\)"):
                c.attach("part", map_memory=False)
            with c.attach("part", "ro", populate="read", sparse=True) as att:
                assert att.plugged == [(2 * MiB, 2 * MiB)]
                assert att.populated_bytes == 2 * MiB
            assert c.get_region("part").allocated_bytes == 2 * MiB, "populate left the plug"
            env = {**os.environ, "MEMPLUG_SOCKET": str(d.socket)}
            memplug = [str(Path(sys.executable).parent / "memplug")]
            refused = subprocess.run(
                [*memplug, "exec", "-r", "part", "--", "true"],
                check=False,
                env=env,
                capture_output=True,
            )
            assert refused.returncode != 0
            assert b"unplugged blocks" in refused.stderr, refused.stderr
            ran = subprocess.run(
                [*memplug, "exec", "-r", "part:ro:sparse", "--", "sh", "-c", "test -e {path:part}"],
                env=env,
                check=False,
                capture_output=True,
            )
            assert ran.returncode == 0, ran.stderr
    finally:
        assert d.stop() == 0


# --------------------------------------------------------------------------- FILE regions


@dataclass
class Ext4:
    """A daemon whose sockets are reachable by uid 65534, allowed to use an ext4 mount."""

    root: Path
    mount: Path


@pytest.fixture(scope="module")
def ext4() -> Iterator[Ext4]:
    """A small ext4 filesystem on a loop device (tmpfs has no COLLAPSE/INSERT_RANGE)."""
    require_root("mounts an ext4 image")
    require(shutil.which("mkfs.ext4") is not None, "needs mkfs.ext4 (e2fsprogs)")
    with public_dir("memplug-holders-") as root:
        image, mount = root / "ext4.img", root / "ext4"
        with image.open("wb") as f:
            f.truncate(128 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        mount.mkdir()
        done = subprocess.run(
            ["mount", "-o", "loop", str(image), str(mount)], check=False, capture_output=True
        )
        require(done.returncode == 0, f"cannot loop-mount an ext4 image: {done.stderr!r}")
        try:
            mount.chmod(0o755)
            yield Ext4(root, mount)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_file_region_read_write_only_for_its_owner(ext4: Ext4, tmp_path: Path) -> None:
    d = start_daemon(ext4.root / "acl", "--allow-dir", str(ext4.mount))
    try:
        with Client(d.socket) as c:
            c.create_region("shared", 4 * MiB, "file", path="shared.img", allowed_uids=[NOBODY])
            c.plug("shared")
            rw = hold(d.fd_socket, "shared", "rw", "truncate", 0)
            record("holder_check", int(rw["fds"] == 0), check="no rw FILE fd for a non-owner")
            assert rw["fds"] == 0, f"a read-write fd went to a uid that is not the owner: {rw}"
            assert rw["line"].startswith("ERR FAILED_PRECONDITION "), rw["line"]
            assert "cannot be sealed against truncation" in rw["line"], rw["line"]
            ticket = c.ticket("shared", "rw")
            by_ticket = run_nobody(ATTACKER, "redeem", ticket.fd_socket, ticket.ticket)
            assert by_ticket["replies"][0]["fds"] == 0, by_ticket
            assert "cannot be sealed" in by_ticket["replies"][0]["line"]
            for action in ("collapse", "insert"):
                ro = hold(d.fd_socket, "shared", "ro", action, 0, 2 * MiB)
                record("holder_check", int(ro["result"] == "EBADF"),
                       check=f"read-only FILE fd cannot {action} a range")  # fmt: skip
                assert ro["fds"] == 1 and ro["result"] == "EBADF", ro
            region = c.get_region("shared")
            assert region.damage == "" and region.plugged == [(0, 4 * MiB)]
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    "action, args, size_after, plugged_after, how",
    [
        ("truncate", (MiB,), MiB, [], "truncated"),
        ("collapse", (0, 2 * MiB), 6 * MiB, [(0, 6 * MiB)], "truncated"),
        ("insert", (0, 2 * MiB), 10 * MiB, [(0, 8 * MiB)], "extended"),
    ],
)
def test_owner_resizing_a_file_region_damages_it_visibly(
    ext4: Ext4,
    action: str,
    args: tuple[int, ...],
    size_after: int,
    plugged_after: list[tuple[int, int]],
    how: str,
) -> None:
    where = ext4.root / f"resize-{action}"
    d = start_daemon(where, "--allow-dir", str(ext4.mount))
    name = f"own-{action}"
    try:
        with Client(d.socket) as c:
            c.create_region(name, 8 * MiB, "file", path=f"{name}.img", owner_uid=NOBODY)
            c.plug(name)
            held = hold(d.fd_socket, name, "rw", action, *args)
            assert held["fds"] == 1 and held["result"] == "ok", held
            assert held["size_after"] == size_after
            region = c.get_region(name)
            record("holder_check", int(how in region.damage),
                   check=f"owner's {action} marks the FILE region damaged")  # fmt: skip
            assert how in region.damage and "cannot be sealed" in region.damage, region.damage
            assert region.plugged == plugged_after, "status still claims lost blocks plugged"
            for call in (
                lambda: c.plug(name),
                lambda: c.populate(name, mode="read"),
                lambda: c.discard(name, 0, 2 * MiB),
                lambda: c.attach(name, "ro", map_memory=False),
            ):
                with pytest.raises(FailedPrecondition, match=f"damaged.*{how}") as err:
                    call()
                assert "full" not in err.value.message
        d.stop()
        d = start_daemon(where, "--allow-dir", str(ext4.mount))
        with Client(d.socket) as c:
            assert name in [r.name for r in c.list_regions()], "the region vanished at restart"
            region = c.get_region(name)
            assert how in region.damage, region.damage
            assert region.plugged == plugged_after
            c.unplug(name)
            c.delete_region(name)
    finally:
        assert d.alive(), d.log()[-4000:]
        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()


# --------------------------------------------------------------------------- uncounted memory


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise LookupError(f"no metric {line_start!r} in:\n{text}")


def test_memory_a_read_only_holder_allocates_is_counted() -> None:
    require_root("runs a holder as uid 65534")
    port = free_port()
    with public_dir("memplug-stray-") as root:
        d = start_daemon(root / "d", "--max-bytes", "8M", "--metrics", f"127.0.0.1:{port}")
        try:
            with Client(d.socket) as c:
                c.create_region("shared", 8 * MiB, read_only_uids=[NOBODY])
                c.create_region("other", 8 * MiB)
                held = hold(d.fd_socket, "shared", "ro", "populate-read", 0, 6 * MiB)
                assert held["fds"] == 1 and held["result"] == "ok", held
                region = c.get_region("shared")
                record("holder_allocated_outside_plugged", region.allocated_outside_plugged_bytes,
                       holder="uid 65534, read-only, populated 6 MiB")  # fmt: skip
                assert region.plugged_bytes == 0
                assert region.allocated_outside_plugged_bytes == 6 * MiB == region.allocated_bytes
                status = c.status()
                assert status.allocated_outside_plugged_bytes == 6 * MiB
                outside = 'memplug_allocated_outside_plugged_bytes{backing="shmem"}'
                assert metric(port, outside) == 6 * MiB
                assert metric(port, "memplug_quota_used_bytes ") == 6 * MiB
                # 4 MiB fitted the 8 MiB quota before the holder took 6 MiB.
                with pytest.raises(QuotaExceeded, match="6 MiB of it is memory that holders"):
                    c.plug("other", 0, 4 * MiB)
                c.plug("other", 0, 2 * MiB)
                # The owner's unplug frees it, and the room comes back.
                c.unplug("shared")
                assert c.get_region("shared").allocated_outside_plugged_bytes == 0
                c.plug("other", 2 * MiB, 4 * MiB)
                assert metric(port, "memplug_quota_used_bytes ") == 6 * MiB
        finally:
            assert d.alive(), d.log()[-4000:]
            assert d.stop() == 0
