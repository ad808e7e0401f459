"""Lifecycle of a real memplugd: restarts, crash recovery, the systemd protocol.

systemd is played by FakeSystemd (tests/sdharness.py), which speaks the real
protocol over a real NOTIFY_SOCKET and keeps the fd store; socket activation
uses the real systemd-socket-activate. Memory, hugetlb pools, files and
sockets are the kernel's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    GiB,
    MiB,
    Ranges,
    checksum,
    huge_free,
    require,
    scribble,
    start_daemon,
)
from sdharness import FakeSystemd

from memplug.client import Client
from memplug.client.attach import Attachment
from memplug.common.errors import NotFound, QuotaExceeded
from memplug.v1 import memplug_pb2 as pb

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


# --------------------------------------------------------------------------- helpers


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of fd, as any holder of a read-write fd can."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def memfd(name: str, size: int) -> int:
    """A fresh, unsealed memfd (MFD_CLOEXEC) of size bytes."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def allocated(fd: int) -> int:
    return int(os.fstat(fd).st_blocks) * 512


def intents(db: Path) -> list[tuple[str, str, int, int]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT region, op, offset, length FROM intents ORDER BY id")
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]


def add_intent(db: Path, region: str, op: str, offset: int, length: int) -> None:
    """Leave an intent as a crash in the middle of an operation would (daemon stopped)."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO intents (region, op, offset, length, keep, started) "
            "VALUES (?, ?, ?, ?, '[]', ?)",
            (region, op, offset, length, time.time()),
        )


def pool_path(page_size: int = HUGE_2M) -> Path:
    return Path(f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/nr_hugepages")


def pool_size_for(free: int) -> int:
    """The 2 MiB pool size that leaves `free` pages free, whatever others hold now."""
    return int(pool_path().read_text()) - huge_free() + free


def set_free_huge_pages(free: int) -> None:
    """Grow or shrink the 2 MiB pool to exactly `free` free pages (restored by the fixture)."""
    pool_path().write_text(str(pool_size_for(free)))
    assert huge_free() == free


@dataclass
class Systemd:
    """FakeSystemd plus the daemons it started; every live one is stopped at teardown."""

    sd: FakeSystemd
    run: Path
    started: list[DaemonProcess] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.sd.workdir / "state" / "memplug.db"

    def start(self, *flags: str, watchdog_usec: int | None = None) -> DaemonProcess:
        d = self.sd.start(self.run, *flags, watchdog_usec=watchdog_usec)
        self.started.append(d)
        return d

    def restart(self, d: DaemonProcess, sig: int, *flags: str) -> DaemonProcess:
        """Stop d with sig (SIGTERM must exit 0) and start it again on the same state."""
        code = d.stop(sig)
        if sig == signal.SIGTERM:
            assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()}"
        else:
            assert code == -sig
        return self.start(*flags)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    with systemd_harness(tmp_path) as harness:
        yield harness


@contextlib.contextmanager
def systemd_harness(tmp_path: Path) -> Iterator[Systemd]:
    """A Systemd on tmp_path; its daemons must be alive at the end and exit 0 on SIGTERM."""
    sd = FakeSystemd(tmp_path / "sd")
    harness = Systemd(sd, tmp_path / "run")
    try:
        yield harness
    finally:
        try:
            for d in harness.started:
                if d.proc.returncode is None:
                    assert d.alive(), f"memplugd died during the test:\n{d.log()}"
                    code = d.stop()
                    assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()}"
        finally:
            sd.close()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Daemons without systemd (no NOTIFY_SOCKET, no fds), all on tmp_path/plain."""
    started: list[DaemonProcess] = []

    def start(*flags: str) -> DaemonProcess:
        d = start_daemon(tmp_path / "plain", *flags, env={"NOTIFY_SOCKET": ""})
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.returncode is None:
            code = d.stop()
            assert code == 0, f"memplugd exited with {code} on SIGTERM:\n{d.log()}"


# --------------------------------------------------------------------------- 1. restart survival

SHM_RANGES: Ranges = [(0, 8 * MiB), (16 * MiB, 8 * MiB), (40 * MiB, 4 * MiB)]
HUGE_RANGES: Ranges = [(0, 4 * MiB), (8 * MiB, 8 * MiB), (28 * MiB, 2 * MiB)]
FILE_RANGES: Ranges = [(2 * MiB, 4 * MiB), (12 * MiB, 6 * MiB)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "crash"])
def test_regions_survive_restart(
    systemd: Systemd,
    tmp_path: Path,
    hugetlb_pool: Callable[[int], None],
    sig: int,
) -> None:
    hugetlb_pool(pool_size_for(16))
    files = tmp_path / "files"
    files.mkdir()
    flags = ("--allow-dir", str(files))
    d = systemd.start(*flags)
    free_at_start = huge_free()
    layout = {"vm-shm": SHM_RANGES, "vm-huge": HUGE_RANGES, "vm-file": FILE_RANGES}
    held: dict[str, Attachment] = {}
    with Client(d.socket) as c:
        c.create_region(
            "vm-shm",
            64 * MiB,
            labels={"vm": "shm", "tier": "gold"},
            owner_uid=1234,
            allowed_uids=[1001, 1002],
            allowed_gids=[100],
            read_only_uids=[2000],
            read_only_gids=[300],
        )
        c.create_region("vm-huge", 32 * MiB, "hugetlb", labels={"vm": "huge"}, allowed_uids=[1003])
        c.create_region(
            "vm-file",
            32 * MiB,
            "file",
            path="vm-file.img",
            labels={"vm": "file"},
            read_only_gids=[301],
        )
        for name, ranges in layout.items():
            for offset, length in ranges:
                c.plug(name, offset, length)
            held[name] = c.attach(name, sparse=True)
            scribble(held[name], ranges)
        sums = {name: checksum(held[name], ranges) for name, ranges in layout.items()}
        before = c.list_regions()
        status_before = c.status()
        free_before = huge_free()
    assert free_before == free_at_start - 7  # the 7 pages of vm-huge
    assert {r.name: r.plugged for r in before} == layout

    try:
        d2 = systemd.restart(d, sig, *flags)
        assert "reconciled" not in d2.log(), "a clean restart must find nothing to repair"
        with Client(d2.socket) as c:
            after = c.list_regions()
            assert after == before  # ranges, labels, ACL, allocated bytes, created_at, path
            status = c.status()
            assert (status.regions, status.plugged_bytes, status.allocated_bytes) == (
                status_before.regions,
                status_before.plugged_bytes,
                status_before.allocated_bytes,
            )
            assert huge_free() == free_before, "the restart leaked or double-allocated pages"
            for name, ranges in layout.items():
                with c.attach(name, sparse=True) as fresh:
                    assert checksum(fresh, ranges) == sums[name], f"{name}: contents changed"
                # The mapping held across the restart is the same memory.
                old = held[name]
                assert old.view is not None
                marker = os.urandom(4096)
                at = ranges[-1][0] + 4096
                old.view[at : at + 4096] = marker
                with c.attach(name, sparse=True) as fresh:
                    assert fresh.view is not None
                    assert bytes(fresh.view[at : at + 4096]) == marker, name
            assert huge_free() == free_before
    finally:
        for att in held.values():
            att.close()


# --------------------------------------------------------------------------- 2. without systemd


def test_without_systemd_files_survive_memfds_are_lost(
    plain: Callable[..., DaemonProcess],
    tmp_path: Path,
    hugetlb_pool: Callable[[int], None],
) -> None:
    hugetlb_pool(pool_size_for(4))
    files = tmp_path / "files"
    files.mkdir()
    flags = ("--allow-dir", str(files))
    d = plain(*flags)
    free_at_start = huge_free()
    log = d.log()
    assert re.search(r"level=WARNING .*memfd regions .*will not outlive", log), log
    with Client(d.socket) as c:
        c.create_region("disk", 16 * MiB, "file", path="disk.img", labels={"k": "v"})
        c.create_region("shm", 16 * MiB)
        c.create_region("huge", 8 * MiB, "hugetlb")
        for name in ("disk", "shm", "huge"):
            c.plug(name, 0, 4 * MiB)
        with c.attach("disk", sparse=True) as att:
            scribble(att, [(0, 4 * MiB)])
            disk_sum = checksum(att, [(0, 4 * MiB)])
        disk_before = c.get_region("disk")
    assert huge_free() == free_at_start - 2
    assert d.stop() == 0
    assert huge_free() == free_at_start, (
        "the hugetlb pages must go back to the pool with the process"
    )

    d2 = plain(*flags)
    assert re.search(r"level=WARNING .*memfd regions .*will not outlive", d2.log())
    with Client(d2.socket) as c:
        assert c.get_region("disk") == disk_before
        with c.attach("disk", sparse=True) as att:
            assert checksum(att, [(0, 4 * MiB)]) == disk_sum
        assert [r.name for r in c.list_regions()] == ["disk"]
        for name in ("shm", "huge"):
            with pytest.raises(NotFound) as info:
                c.get_region(name)
            message = info.value.message
            assert info.value.code == "NOT_FOUND"
            assert "lost" in message and "systemd" in message, message
            assert re.search(r"fd store|FileDescriptorStore", message), message
        assert c.status().regions == 1
    assert re.search(r"level=WARNING .*region shm is lost", d2.log())
    assert d2.stop() == 0

    # Still explained on the next start, and the name can be used again.
    d3 = plain(*flags)
    with Client(d3.socket) as c:
        with pytest.raises(NotFound, match="systemd"):
            c.get_region("shm")
        c.create_region("shm", 4 * MiB)
        assert c.get_region("shm").size == 4 * MiB


def test_file_region_unreachable_for_one_start_comes_back(
    plain: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A FILE region's memory is its file: one start that cannot open it loses nothing.

    A memfd region whose fd did not come back is gone for good; a file that
    is unreachable for a while (its dir left out of --allow-dir by mistake, a
    filesystem not mounted yet) is still there, and so must be the region.
    """
    files = tmp_path / "files"
    files.mkdir()
    d = plain("--allow-dir", str(files))
    with Client(d.socket) as c:
        c.create_region("disk", 8 * MiB, "file", path="disk.img", labels={"vm": "a"})
        c.plug("disk", 0, 4 * MiB)
        with c.attach("disk", sparse=True) as att:
            scribble(att, [(0, 4 * MiB)])
            data_sum = checksum(att, [(0, 4 * MiB)])
        before = c.get_region("disk")
    assert d.stop() == 0

    d2 = plain()  # --allow-dir forgotten: the file cannot be opened on this start
    with Client(d2.socket) as c, pytest.raises(NotFound):
        c.get_region("disk")
    assert d2.stop() == 0
    assert (files / "disk.img").exists()

    d3 = plain("--allow-dir", str(files))
    with Client(d3.socket) as c:
        assert c.get_region("disk") == before, d3.log()
        with c.attach("disk", sparse=True) as att:
            assert checksum(att, [(0, 4 * MiB)]) == data_sum


# --------------------------------------------------------------------------- 3. crash mid-operation


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "graceful"])
def test_stop_mid_plug_rolls_it_back(systemd: Systemd, sig: int) -> None:
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("big", 4 * GiB)
        c.plug("big", 0, 64 * MiB)
        with c.attach("big", sparse=True) as att:
            scribble(att, [(0, 64 * MiB)])
            data_sum = checksum(att, [(0, 64 * MiB)])
        before = c.get_region("big")
    assert before.allocated_bytes == 64 * MiB

    # One worker thread: 63 chunks of 64 MiB, each reported; the first one is proof
    # the plug is under way, and a signal right after lands in its middle.
    stream: Any = d.stub.Plug(
        pb.PlugRequest(name="big", offset=64 * MiB, length=4 * GiB - 64 * MiB, threads=1)
    )
    first = next(stream)
    assert not first.HasField("result") and 0 < first.done_bytes < first.total_bytes
    d.proc.send_signal(sig)
    code = d.proc.wait(30)
    stream.cancel()
    store_fd = systemd.sd.fdstore["big"]
    if sig == signal.SIGKILL:
        left = intents(systemd.db)
        assert [(r, op) for r, op, _, _ in left] == [("big", "plug")], "the crash left no intent"
        assert allocated(store_fd) > before.allocated_bytes, "the plug allocated nothing"
    else:
        # SIGTERM cancels the plug, which rolls back before the daemon exits.
        assert code == 0, d.log()
        assert intents(systemd.db) == []
        assert allocated(store_fd) == before.allocated_bytes

    d2 = systemd.start()
    assert ("rolled back an interrupted plug" in d2.log()) == (sig == signal.SIGKILL)
    with Client(d2.socket) as c:
        region = c.get_region("big")
        assert region.plugged == before.plugged
        assert region.allocated_bytes == before.allocated_bytes
        assert c.status().plugged_bytes == 64 * MiB
        with c.attach("big", sparse=True) as att:
            assert checksum(att, [(0, 64 * MiB)]) == data_sum
        assert intents(systemd.db) == []
        c.plug("big", 64 * MiB, 64 * MiB)  # the range is free to plug again
        assert c.get_region("big").plugged == [(0, 128 * MiB)]


def test_interrupted_unplug_and_discard_are_rolled_forward(systemd: Systemd) -> None:
    d = systemd.start()
    with Client(d.socket) as c:
        for name in ("u", "z"):
            c.create_region(name, 64 * MiB)
            c.plug(name, 0, 32 * MiB)
            with c.attach(name, sparse=True) as att:
                assert att.view is not None
                att.view[0 : 32 * MiB] = b"\xa5" * (32 * MiB)
    assert d.stop() == 0
    # What a crash in the middle of each operation leaves: the intent, nothing done yet.
    add_intent(systemd.db, "u", "unplug", 8 * MiB, 8 * MiB)
    add_intent(systemd.db, "z", "discard", 0, 8 * MiB)

    d2 = systemd.start()
    log = d2.log()
    assert "completed an interrupted unplug" in log
    assert "completed an interrupted discard" in log
    with Client(d2.socket) as c:
        u = c.get_region("u")
        assert u.plugged == [(0, 8 * MiB), (16 * MiB, 16 * MiB)]
        assert u.allocated_bytes == 24 * MiB
        z = c.get_region("z")
        assert z.plugged == [(0, 32 * MiB)]
        assert z.allocated_bytes == 32 * MiB, "discarded blocks must stay backed"
        with c.attach("z", sparse=True) as att:
            assert att.view is not None
            assert bytes(att.view[0 : 8 * MiB]) == bytes(8 * MiB)
            assert bytes(att.view[8 * MiB : 32 * MiB]) == b"\xa5" * (24 * MiB)
        with c.attach("u", sparse=True) as att:
            assert att.view is not None
            assert bytes(att.view[0 : 8 * MiB]) == b"\xa5" * (8 * MiB)
            assert bytes(att.view[16 * MiB : 32 * MiB]) == b"\xa5" * (16 * MiB)
        assert c.status().plugged_bytes == 8 * MiB + 16 * MiB + 32 * MiB
    assert intents(systemd.db) == []


def test_block_punched_while_down_is_backed_again(systemd: Systemd) -> None:
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("vm0", 32 * MiB)
        c.plug("vm0", 0, 16 * MiB)
        att = c.attach("vm0", sparse=True)
    try:
        scribble(att, [(0, 2 * MiB), (4 * MiB, 12 * MiB)])
        kept = checksum(att, [(0, 2 * MiB), (4 * MiB, 12 * MiB)])
        d.stop(signal.SIGKILL)
        punch_hole(att.fd, 2 * MiB, 2 * MiB)
        assert allocated(att.fd) == 14 * MiB

        d2 = systemd.start()
        with Client(d2.socket) as c:
            region = c.get_region("vm0")
            assert region.plugged == [(0, 16 * MiB)]
            assert region.allocated_bytes == 16 * MiB, "the punched block was not backed again"
            with c.attach("vm0", sparse=True) as fresh:
                assert checksum(fresh, [(0, 2 * MiB), (4 * MiB, 12 * MiB)]) == kept
        assert allocated(att.fd) == 16 * MiB
    finally:
        att.close()


def test_hugetlb_block_that_cannot_be_backed_is_unplugged(
    systemd: Systemd, hugetlb_pool: Callable[[int], None]
) -> None:
    hugetlb_pool(pool_size_for(8))
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("hp", 16 * MiB, "hugetlb")
        c.plug("hp", 0, 16 * MiB)
        att = c.attach("hp")
    good: Ranges = [(0, 4 * MiB), (6 * MiB, 10 * MiB)]
    try:
        scribble(att, good)
        kept = checksum(att, good)
        d.stop(signal.SIGKILL)
        att.close()  # a mapping of the block would keep it
        fd = systemd.sd.fdstore["hp"]
        punch_hole(fd, 4 * MiB, 2 * MiB)
        assert allocated(fd) == 14 * MiB
        # Someone shrinks the pool meanwhile: the freed page (and any other) is gone.
        set_free_huge_pages(0)

        d2 = systemd.start()
        log = d2.log()
        assert re.search(r"block .*was plugged but cannot be backed.*now unplugged", log), log
        with Client(d2.socket) as c:
            region = c.get_region("hp")
            assert region.plugged == good
            assert region.allocated_bytes == 14 * MiB
            assert c.status().plugged_bytes == 14 * MiB
            with c.attach("hp", sparse=True) as fresh:
                assert checksum(fresh, good) == kept
            set_free_huge_pages(1)
            c.plug("hp", 4 * MiB, 2 * MiB)  # plugging it again works once pages exist
            assert c.get_region("hp").plugged == [(0, 16 * MiB)]
    finally:
        att.close()


# --------------------------------------------------------------------------- 4. sd_notify


def test_ready_only_once_serving_with_status(systemd: Systemd) -> None:
    d = systemd.start()
    # sd.start returned at READY=1: the socket must answer now, with no retry.
    reply = d.stub.GetStatus(pb.GetStatusRequest(), timeout=2.0)
    assert reply.regions == 0
    ready = systemd.sd.wait_for(lambda m: m.get("READY") == "1")
    assert ready.get("STATUS") == "0 regions, 0 B plugged", ready
    with Client(d.socket) as c:
        c.create_region("a", 64 * MiB)
        c.create_region("b", 64 * MiB)
        c.plug("a", 0, 32 * MiB)
        c.plug("b", 0, 16 * MiB)
    d2 = systemd.restart(d, signal.SIGKILL)
    assert d2.stub.GetStatus(pb.GetStatusRequest(), timeout=2.0).regions == 2
    ready = systemd.sd.wait_for(lambda m: m.get("READY") == "1")
    assert ready.get("STATUS") == "2 regions, 48 MiB plugged", ready


def test_watchdog_pings(systemd: Systemd) -> None:
    d = systemd.start(watchdog_usec=400_000)
    sd = systemd.sd
    time.sleep(1.5)
    pings = sum(1 for m in list(sd.messages) if m.get("WATCHDOG") == "1")
    assert pings >= 3, f"{pings} WATCHDOG=1 in 1.5 s: {sd.messages}"
    # ... and they go on: more arrive within one watchdog period.
    sd.clear()
    sd.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=0.4)
    assert d.alive()


def test_reload_and_stop(systemd: Systemd, tmp_path: Path) -> None:
    config = tmp_path / "memplugd.toml"
    config.write_text('max-bytes = "8M"\n')
    d = systemd.start("--config", str(config))
    sd = systemd.sd
    with Client(d.socket) as c:
        c.create_region("vm0", 64 * MiB)
        with pytest.raises(QuotaExceeded):
            c.plug("vm0", 0, 32 * MiB)
        config.write_text('max-bytes = "64M"\n')
        sd.clear()
        d.proc.send_signal(signal.SIGHUP)
        reloading = sd.wait_for(lambda m: m.get("RELOADING") == "1")
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert re.fullmatch(r"\d+", reloading.get("MONOTONIC_USEC", "")), reloading
        assert 0 <= now_usec - int(reloading["MONOTONIC_USEC"]) < 5_000_000, reloading
        ready = sd.wait_for(lambda m: m.get("READY") == "1")
        assert sd.messages.index(reloading) < sd.messages.index(ready)
        assert "STATUS" in ready
        assert c.plug("vm0", 0, 32 * MiB).bytes == 32 * MiB
        assert c.status().quota_bytes == 64 * MiB
        # A broken file is refused; the running configuration stays.
        config.write_text("max-bytes = [\n")
        sd.clear()
        d.proc.send_signal(signal.SIGHUP)
        sd.wait_for(lambda m: m.get("RELOADING") == "1")
        sd.wait_for(lambda m: m.get("READY") == "1")
        assert "reload failed, keeping the running configuration" in d.log()
        assert c.status().quota_bytes == 64 * MiB
    sd.clear()
    assert d.stop() == 0
    sd.wait_for(lambda m: m.get("STOPPING") == "1", timeout=2)


def test_reload_keeps_serving_on_the_socket_it_bound(systemd: Systemd, tmp_path: Path) -> None:
    """socket is a restart-only setting: a reload that changes it must not act on it.

    The watchdog's health check must keep probing the socket the daemon serves,
    and stopping must not unlink the new path (which may be another daemon's).
    """
    run = tmp_path / "own"
    run.mkdir()
    bound, other_path = run / "memplug.sock", run / "other.sock"
    config = tmp_path / "memplugd.toml"

    def write(sock: Path) -> None:
        config.write_text(
            f'socket = "{sock}"\nfd-socket = "{run / "fd.sock"}"\nstate-dir = "{run / "state"}"\n'
        )

    write(bound)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # someone else's, live
    other.bind(str(other_path))
    other.listen(1)
    sd = systemd.sd
    env = {**os.environ, "NOTIFY_SOCKET": str(sd.notify_path), "WATCHDOG_USEC": "400000"}
    log_path = run / "memplugd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memplug.daemon", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        sd.wait_for(lambda m: m.get("READY") == "1")
        write(other_path)
        sd.clear()
        proc.send_signal(signal.SIGHUP)
        sd.wait_for(lambda m: m.get("RELOADING") == "1")
        sd.wait_for(lambda m: m.get("READY") == "1")
        sd.clear()
        time.sleep(1.2)
        pings = sum(1 for m in list(sd.messages) if m.get("WATCHDOG") == "1")
        with Client(bound) as c:
            assert c.status().regions == 0  # still serving where it bound
        assert pings >= 3, (
            f"{pings} WATCHDOG=1 in 1.2 s after a reload that changed socket: the health "
            f"check probes the new path, systemd would kill memplugd\n{log_path.read_text()}"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert other_path.exists(), "memplugd unlinked a socket it never bound"
    finally:
        other.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fd_store_follows_create_and_delete(systemd: Systemd, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    d = systemd.start("--allow-dir", str(files))
    sd = systemd.sd
    with Client(d.socket) as c:
        c.create_region("vm0", 8 * MiB)
        msg = sd.wait_for(lambda m: m.get("FDSTORE") == "1", timeout=2)
        assert msg.get("FDNAME") == "vm0"
        assert os.readlink(f"/proc/self/fd/{sd.fdstore['vm0']}").startswith("/memfd:memplug:vm0 ")
        c.create_region("disk", 8 * MiB, "file", path="disk.img")
        c.delete_region("vm0")
        sd.wait_for(lambda m: m.get("FDSTOREREMOVE") == "1" and m.get("FDNAME") == "vm0", 2)
        assert "vm0" not in sd.fdstore
        c.delete_region("disk")
        c.create_region("sync", 2 * MiB)  # a later message: the ones before it have arrived
        sd.wait_for(lambda m: m.get("FDNAME") == "sync", timeout=2)
    assert not [m for m in sd.messages if m.get("FDNAME") == "disk"], sd.messages
    assert set(sd.fdstore) == {"sync"}


# --------------------------------------------------------------------------- 5. foreign fds


def test_stray_fd_is_dropped(systemd: Systemd) -> None:
    systemd.sd.fdstore["ghost"] = memfd("memplug:ghost", 2 * MiB)
    d = systemd.start()
    removed = systemd.sd.wait_for(lambda m: m.get("FDSTOREREMOVE") == "1", timeout=2)
    assert removed.get("FDNAME") == "ghost"
    assert "ghost" not in systemd.sd.fdstore
    assert "ghost that matches no region" in d.log()
    assert d.stub.GetStatus(pb.GetStatusRequest(), timeout=2.0).regions == 0


@pytest.mark.parametrize("impostor", ["other-size", "unsealed"])
def test_foreign_fd_under_a_region_name_is_rejected(systemd: Systemd, impostor: str) -> None:
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("vm0", 16 * MiB)
        c.create_region("vm1", 16 * MiB)
        c.plug("vm0", 0, 8 * MiB)
        c.plug("vm1", 0, 8 * MiB)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    old = systemd.sd.fdstore.pop("vm0")
    os.close(old)
    size = 32 * MiB if impostor == "other-size" else 16 * MiB
    systemd.sd.fdstore["vm0"] = memfd("memplug:vm0", size)

    d2 = systemd.start()
    assert re.search(r"region vm0 is lost: the fd handed back does not match", d2.log())
    with Client(d2.socket) as c:
        with pytest.raises(NotFound, match="does not match"):
            c.get_region("vm0")
        assert c.get_region("vm1").plugged == [(0, 8 * MiB)]
        assert [r.name for r in c.list_regions()] == ["vm1"]
        c.create_region("vm0", 16 * MiB)  # the daemon carries on; the name is free again
    assert d2.alive()


def test_rejected_fd_is_removed_from_the_fd_store(systemd: Systemd) -> None:
    """An fd refused for a region must leave systemd's store, like a stray one.

    Otherwise systemd keeps it (and whatever memory it holds) and hands it back
    on every restart; once the name is used again, real systemd holds two fds
    under it (its store is keyed by file, not by name).
    """
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("vm0", 16 * MiB)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    os.close(systemd.sd.fdstore.pop("vm0"))
    impostor = memfd("memplug:vm0", 32 * MiB)
    os.posix_fallocate(impostor, 0, 32 * MiB)  # memory systemd would go on holding
    systemd.sd.fdstore["vm0"] = impostor

    d2 = systemd.start()
    assert "region vm0 is lost" in d2.log()
    assert "vm0" not in systemd.sd.fdstore, (
        "memplugd rejected the fd handed back as vm0 but left it in systemd's fd store "
        f"(no FDSTOREREMOVE=1 FDNAME=vm0 among {systemd.sd.messages})"
    )


# --------------------------------------------------------------------------- 6. socket activation


def test_socket_activated_fd_socket(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    require(activate is not None, "systemd-socket-activate is not installed")
    assert activate is not None
    sd = FakeSystemd(tmp_path / "sd")
    fd_sock, grpc_sock = tmp_path / "fd.sock", tmp_path / "memplug.sock"
    log_path = tmp_path / "memplugd.log"
    argv = [
        activate, "-l", str(fd_sock), "--fdname=fd-socket",
        "-E", f"NOTIFY_SOCKET={sd.notify_path}",
        sys.executable, "-m", "memplug.daemon",
        "--socket", str(grpc_sock), "--fd-socket", str(fd_sock),
        "--state-dir", str(tmp_path / "state"), "--log-level", "debug",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    trigger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 10
        while not fd_sock.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate never listened"
            time.sleep(0.02)
        # systemd-socket-activate starts the service on the first connection.
        trigger.settimeout(10)
        trigger.connect(str(fd_sock))
        try:
            sd.wait_for(lambda m: m.get("READY") == "1", timeout=20)
        except TimeoutError:
            pytest.fail(f"no READY=1:\n{log_path.read_text()}")
        with Client(grpc_sock) as c:
            c.create_region("vm0", 8 * MiB)
            c.plug("vm0", 0, 8 * MiB)
            with c.attach("vm0") as att:
                assert att.view is not None
                att.view[0:6] = b"hello!"
            # The connection that woke the service is served by it, on systemd's socket.
            ticket = c.ticket("vm0")
            trigger.sendall(f"MEMPLUG/1 ATTACH {ticket.ticket}\n".encode())
            reply, fds, _flags, _addr = socket.recv_fds(trigger, 4096, 1)
            assert reply.startswith(b"OK region=vm0 "), reply
            assert len(fds) == 1
            try:
                assert os.pread(fds[0], 6, 0) == b"hello!"
            finally:
                os.close(fds[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        assert fd_sock.exists(), "the activated socket is systemd's: memplugd must not unlink it"
    finally:
        trigger.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sd.close()


def test_activated_socket_and_fd_store_across_restart(systemd: Systemd) -> None:
    """systemd hands back the listening fd socket and the memfds together."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        systemd.run.mkdir(parents=True, exist_ok=True)
        fd_sock = systemd.run / "fd.sock"
        listener.bind(str(fd_sock))
        listener.listen(16)
        systemd.sd.extra_fds = [(listener.fileno(), "fd-socket")]
        d = systemd.start()
        with Client(d.socket) as c:
            c.create_region("vm0", 8 * MiB)
            c.plug("vm0", 0, 4 * MiB)
            with c.attach("vm0", sparse=True) as att:
                assert att.view is not None
                att.view[0:6] = b"hello!"
        d2 = systemd.restart(d, signal.SIGKILL)
        with Client(d2.socket) as c:
            assert c.get_region("vm0").plugged == [(0, 4 * MiB)]
            with c.attach("vm0", sparse=True) as att:
                assert att.view is not None
                assert bytes(att.view[0:6]) == b"hello!"
        assert d2.stop() == 0
        assert fd_sock.exists(), "memplugd unlinked the fd socket systemd owns"
    finally:
        listener.close()


def test_region_lost_to_a_stop_says_what_happened(systemd: Systemd) -> None:
    """`systemctl stop` empties the fd store: the message says so and what keeps regions.

    The unit already is Type=notify with FileDescriptorStoreMax; advising that
    would send an operator in circles.
    """
    d = systemd.start()
    with Client(d.socket) as c:
        c.create_region("vm0", 8 * MiB)
    assert d.stop() == 0
    systemd.sd.empty_fd_store()
    d2 = systemd.start()
    with Client(d2.socket) as c, pytest.raises(NotFound) as info:
        c.get_region("vm0")
    message = info.value.message
    assert "systemctl stop" in message, message
    assert "FileDescriptorStorePreserve=yes" in message, message
    assert "systemctl restart" in message, message
    assert "run memplugd as a Type=notify service" not in message, message


def reload_running(pid: int, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """What the unit's ExecReload= runs."""
    argv = [sys.executable, "-m", "memplug.daemon", "--reload-running", str(pid)]
    return subprocess.run(
        [*argv, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_reload_running_waits_and_tells_the_truth(systemd: Systemd, tmp_path: Path) -> None:
    """ExecReload= returns once the daemon has reloaded, non-zero when it refused."""
    config = tmp_path / "memplugd.toml"
    config.write_text('max-bytes = "8M"\n')
    d = systemd.start("--config", str(config))
    state = systemd.sd.workdir / "state"
    config.write_text('max-bytes = "64M"\n')
    out = reload_running(d.proc.pid, state)
    assert out.returncode == 0, out.stderr
    assert "reloaded the configuration" in out.stdout, out.stdout
    with Client(d.socket) as c:
        # At once, no waiting: the command returned after the daemon applied it.
        assert c.status().quota_bytes == 64 * MiB
        c.create_region("vm0", 64 * MiB)
        config.write_text("max-bytes = [\n")
        out = reload_running(d.proc.pid, state)
        assert out.returncode == 1, out.stdout
        assert "reload failed, keeping the running configuration" in out.stderr, out.stderr
        assert str(config) in out.stderr, out.stderr
        # Still serving, with the old configuration.
        assert c.status().quota_bytes == 64 * MiB
        assert c.plug("vm0", 0, 32 * MiB).bytes == 32 * MiB
    # Both reloads spoke the notify protocol newer systemds read.
    assert sum(1 for m in systemd.sd.messages if m.get("RELOADING") == "1") >= 1
    assert d.alive()


def test_reload_running_refuses_a_process_that_is_not_memplugd(systemd: Systemd) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        out = reload_running(other.pid, systemd.sd.workdir / "state")
        assert out.returncode == 1
        assert "is not a running memplugd" in out.stderr, out.stderr
        assert other.poll() is None, "it sent SIGHUP to a process that is not memplugd"
    finally:
        other.kill()
        other.wait()
