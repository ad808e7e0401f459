"""The fault matrix: every way a plug can fail, injected for real, then checked for real.

Each fault runs through a real memplugd against real kernel limits (hugetlb
pools, a size-limited tmpfs, a memory cgroup, signals). After it:
- the call ended with the documented status code (and error class);
- the machine is back where it was: hugetlb pool free counts, tmpfs used bytes,
  each region's allocated bytes and plugged set, the quota's plugged total;
- every byte written earlier into plugged blocks is intact (sha256 through a
  fresh attach);
- the daemon still serves real work (create, plug, attach, write, delete), or,
  after SIGKILL, a restart under FakeSystemd brings back a consistent daemon:
  the store's plugged sets are the API's, allocated bytes match plugged bytes,
  no intent is left open.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HUGE_2M, DaemonProcess, GiB, MiB, huge_free, used_bytes
from hardening_kit import (
    Baseline,
    alive,
    assert_consistent,
    assert_serving,
    connect,
    digest,
    expected_digest,
    fault,
    fill,
    gib_pool,
    leak_check,
    memory_cgroup,
    record,
    stop,
    store_state,
    wait_until,
)
from sdharness import FakeSystemd

from memplug.client import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    NoSpace,
    PoolExhausted,
    QuotaExceeded,
    ResourceExhausted,
)
from memplug.client.attach import Attachment
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]

pytestmark = pytest.mark.privileged


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    sd = FakeSystemd(tmp_path / "sd")
    try:
        yield sd
    finally:
        sd.close()


# --------------------------------------------------------------------------- hugetlb pools


@pytest.mark.parametrize("strategy", ["auto", "fallocate"])
def test_hugetlb_2m_pool_exhausted(
    daemon_factory: Factory, hugetlb_pool: Callable[[int], None], strategy: str
) -> None:
    hugetlb_pool(8)  # 16 MiB
    d = daemon_factory()
    with connect(d) as c:
        c.create_region("huge", 64 * MiB, "hugetlb", page_size=HUGE_2M)
        c.plug("huge", 16 * MiB, 8 * MiB, strategy=strategy)
        base = Baseline(c, ["huge"], pools=[HUGE_2M])
        base.remember("huge", fill(c, "huge", [(16 * MiB, 8 * MiB)], seed=1))
        assert huge_free() == 4

        fault(f"hugetlb 2 MiB pool exhausted ({strategy})")
        with pytest.raises(PoolExhausted) as info:
            c.plug("huge", 0, 64 * MiB, strategy=strategy)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "hugetlb" in info.value.message and "pool" in info.value.message
        alive(d)
        base.verify()
        assert_serving(c)
        # What fits still plugs: the 4 free pages.
        assert c.plug("huge", 0, 8 * MiB, strategy=strategy).bytes == 8 * MiB
        assert huge_free() == 0
        c.delete_region("huge")


def test_hugetlb_1g_pool_exhausted(daemon_factory: Factory) -> None:
    with gib_pool(1):
        d = daemon_factory()
        with connect(d) as c:
            c.create_region("giant", 2 * GiB, "hugetlb", page_size=GiB)
            assert c.get_region("giant").block_size == GiB
            base = Baseline(c, ["giant"], pools=[GiB])
            assert base.huge[GiB] == 1

            # Nothing plugged yet: the plug gets the one page, then fails on the second.
            fault("hugetlb 1 GiB pool exhausted (nothing plugged)")
            with pytest.raises(PoolExhausted) as info:
                c.plug("giant")
            assert info.value.code == "RESOURCE_EXHAUSTED" and "1 GiB" in info.value.message
            alive(d)
            base.verify()

            # One page plugged and full of data: a plug over it and beyond keeps it.
            c.plug("giant", 0, GiB)
            base = Baseline(c, ["giant"], pools=[GiB])
            base.remember("giant", fill(c, "giant", [(0, GiB)], seed=2))
            fault("hugetlb 1 GiB pool exhausted (one page plugged)")
            with pytest.raises(PoolExhausted):
                c.plug("giant", 0, 2 * GiB)
            alive(d)
            base.verify()
            assert_serving(c)
            c.delete_region("giant")
        stop(d)


# --------------------------------------------------------------------------- filesystem and quota


def test_file_region_on_full_tmpfs(
    daemon_factory: Factory, small_tmpfs: Callable[[str], Path]
) -> None:
    mnt = small_tmpfs("64M")
    d = daemon_factory("--allow-dir", str(mnt))
    with connect(d) as c:
        region = c.create_region("f", 128 * MiB, "file", path="vm.img")
        assert Path(region.path) == mnt / "vm.img"
        plugged = [(0, 16 * MiB), (32 * MiB, 8 * MiB)]
        for offset, length in plugged:
            c.plug("f", offset, length)
        base = Baseline(c, ["f"], mounts=[mnt], pools=[])
        base.remember("f", fill(c, "f", plugged, seed=3))
        base.capture()  # writing into fallocated tmpfs pages allocates nothing more

        fault("FILE region on a full tmpfs")
        with pytest.raises(NoSpace) as info:
            c.plug("f")
        assert info.value.code == "RESOURCE_EXHAUSTED" and "full" in info.value.message
        alive(d)
        base.verify()
        assert_serving(c)
        assert c.plug("f", 64 * MiB, 16 * MiB).bytes == 16 * MiB  # what fits still plugs


def test_daemon_quota(daemon_factory: Factory) -> None:
    d = daemon_factory("--max-bytes", "32M")
    with connect(d) as c:
        c.create_region("a", 64 * MiB)
        c.create_region("b", 64 * MiB)
        c.plug("a", 0, 16 * MiB)
        base = Baseline(c, ["a", "b"], pools=[])
        base.remember("a", fill(c, "a", [(0, 16 * MiB)], seed=4))

        fault("the daemon's --max-bytes quota")
        with pytest.raises(QuotaExceeded) as info:
            c.plug("a")
        assert info.value.code == "RESOURCE_EXHAUSTED" and "quota" in info.value.message
        with pytest.raises(QuotaExceeded):
            c.plug("b", 0, 32 * MiB)
        alive(d)
        base.verify()
        assert_serving(c)
        assert c.plug("b", 0, 16 * MiB).bytes == 16 * MiB  # exactly the rest of the quota
        with pytest.raises(QuotaExceeded):
            c.plug("b", 16 * MiB, 2 * MiB)


# --------------------------------------------------------------------------- cancel and deadline


def test_cancel_mid_plug(daemon_factory: Factory) -> None:
    d = daemon_factory()
    with connect(d) as c:
        c.create_region("vm", 4 * GiB)
        c.plug("vm", 0, 64 * MiB)
        base = Baseline(c, ["vm"], pools=[])
        base.remember("vm", fill(c, "vm", [(0, 64 * MiB)], seed=5))
        cancel = threading.Event()
        seen: list[tuple[int, int]] = []

        def progress(done: int, total: int) -> None:
            seen.append((done, total))
            cancel.set()  # at the first progress message: the plug is under way

        fault("cancel mid-plug")
        with pytest.raises(Cancelled):
            c.plug("vm", threads=1, progress=progress, cancel=cancel)
        assert seen and seen[0][0] < seen[0][1], f"cancelled before or after the work: {seen}"
        alive(d)
        base.verify()
        assert_serving(c)
        c.delete_region("vm")


def test_deadline_mid_plug(daemon_factory: Factory) -> None:
    d = daemon_factory()
    with connect(d) as c:
        c.create_region("vm", 4 * GiB)
        c.plug("vm", 0, 64 * MiB)
        base = Baseline(c, ["vm"], pools=[])
        base.remember("vm", fill(c, "vm", [(0, 64 * MiB)], seed=6))

        fault("deadline mid-plug")
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            c.plug("vm", threads=1, timeout=0.25)
        assert time.monotonic() - t0 < 3, "the deadline was not honoured promptly"
        alive(d)
        base.verify()
        assert_serving(c)
        c.delete_region("vm")


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("backing", ["shmem", "file"])
def test_sigkill_mid_plug(
    systemd: FakeSystemd, tmp_path: Path, small_tmpfs: Callable[[str], Path], backing: str
) -> None:
    """A memfd region comes back from the fd store, a FILE region from its file; either
    way the interrupted plug is rolled back (the tmpfs's used bytes say so too)."""
    run = tmp_path / "run"
    mnt = small_tmpfs("6G")
    flags = ("--allow-dir", str(mnt))
    d = systemd.start(run, *flags)
    db = systemd.workdir / "state" / "memplug.db"
    with connect(d) as c:
        c.create_region("big", 4 * GiB, backing, path="big.img" if backing == "file" else "")
        c.create_region("small", 16 * MiB)
        c.plug("big", 0, 64 * MiB)
        c.plug("small")
        sums = {
            "big": fill(c, "big", [(0, 64 * MiB)], seed=7),
            "small": fill(c, "small", [(0, 16 * MiB)], seed=8),
        }
        used = used_bytes(mnt)
    # One worker thread, chunks of 64 MiB, each reported: the first message proves the
    # plug is under way, and the SIGKILL lands in its middle.
    stream = d.stub.Plug(
        pb.PlugRequest(name="big", offset=64 * MiB, length=4 * GiB - 64 * MiB, threads=1)
    )
    first = next(iter(stream))
    assert not first.HasField("result") and 0 < first.done_bytes < first.total_bytes
    fault(f"SIGKILL mid-plug ({backing})")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    stream.cancel()  # type: ignore[no-untyped-call]
    _, intents = store_state(db)
    assert ("big", "plug") in intents, "the kill did not land mid-plug (no open intent)"
    if backing == "file":
        assert used_bytes(mnt) > used, "the killed plug had allocated nothing"
    else:
        held = systemd.fdstore["big"]
        assert os.fstat(held).st_blocks * 512 > 64 * MiB, "the killed plug had allocated nothing"

    d2 = systemd.start(run, *flags)
    try:
        with connect(d2) as c:
            regions = assert_consistent(c, db)
            assert regions["big"].plugged == [(0, 64 * MiB)]
            assert regions["small"].plugged == [(0, 16 * MiB)]
            leaked = regions["big"].allocated_bytes - 64 * MiB
            leak_check("region big allocated after restart", leaked)
            leak_check("tmpfs used after restart", used_bytes(mnt) - used)
            assert used_bytes(mnt) == used, "the restart did not roll the plug back on disk"
            assert digest(c, "big", [(0, 64 * MiB)]) == sums["big"]
            assert digest(c, "small", [(0, 16 * MiB)]) == sums["small"]
            assert_serving(c)
            assert c.plug("big", 64 * MiB, 64 * MiB).bytes == 64 * MiB
    finally:
        stop(d2)


def test_sigkill_mid_unplug(systemd: FakeSystemd, tmp_path: Path) -> None:
    run = tmp_path / "run"
    d = systemd.start(run)
    db = systemd.workdir / "state" / "memplug.db"
    size = 2 * GiB
    with connect(d) as c:
        c.create_region("big", size)
        c.plug("big")
        want = fill(c, "big", [(0, 64 * MiB)], seed=9)
    held = systemd.fdstore["big"]
    full = os.fstat(held).st_blocks * 512
    assert full == size

    # Unplug is unary and fast: watch the memory go (the fd store holds the memfd)
    # and kill at the first punched chunk.
    future = d.stub.Unplug.future(
        pb.RangeRequest(name="big", offset=64 * MiB, length=size - 64 * MiB)
    )
    deadline = time.monotonic() + 10
    while os.fstat(held).st_blocks * 512 == full and time.monotonic() < deadline:
        pass
    fault("SIGKILL mid-unplug")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    future.cancel()  # type: ignore[no-untyped-call]
    left = os.fstat(held).st_blocks * 512
    _, intents = store_state(db)
    record("sigkill_unplug_left_allocated", left)
    assert 64 * MiB < left < full or ("big", "unplug") in intents, (
        f"the kill did not land mid-unplug ({left} of {full} bytes allocated, intents {intents})"
    )

    d2 = systemd.start(run)
    try:
        with connect(d2) as c:
            regions = assert_consistent(c, db)
            assert regions["big"].plugged == [(0, 64 * MiB)], "the unplug was not rolled forward"
            assert digest(c, "big", [(0, 64 * MiB)]) == want
            assert_serving(c)
    finally:
        stop(d2)


# --------------------------------------------------------------------------- no MADV_POPULATE


def test_forced_fallback_without_madv_populate(
    daemon_factory: Factory, hugetlb_pool: Callable[[int], None]
) -> None:
    """MEMPLUG_DISABLE_MADV_POPULATE=1: plug by fallocate, populate by touching pages in a
    helper. Exhaustion still rolls back, and a page that cannot be backed kills the
    helper (SIGBUS), never the daemon."""
    hugetlb_pool(8)
    d = daemon_factory(env={"MEMPLUG_DISABLE_MADV_POPULATE": "1"})
    with connect(d) as c:
        assert c.status().madv_populate is False
        c.create_region("huge", 64 * MiB, "hugetlb", page_size=HUGE_2M)
        result = c.plug("huge", 0, 8 * MiB)
        assert result.strategy == "fallocate"
        base = Baseline(c, ["huge"], pools=[HUGE_2M])
        base.remember("huge", fill(c, "huge", [(0, 8 * MiB)], seed=10))

        fault("no MADV_POPULATE: hugetlb pool exhausted")
        with pytest.raises(PoolExhausted):
            c.plug("huge")
        with pytest.raises(FailedPrecondition):
            c.plug("huge", 8 * MiB, 2 * MiB, strategy="populate-write")
        alive(d)
        base.verify()
        populated = c.populate("huge", 0, 8 * MiB, mode="read")
        assert populated.strategy == "touch-read" and populated.bytes == 8 * MiB

        # A client punches a plugged page and the pool loses it: touching it must SIGBUS
        # the helper, and the daemon must say so instead of dying.
        with c.attach("huge", sparse=True) as att:
            punch(att, 6 * MiB, 2 * MiB)
        pool = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
        total = int(pool.read_text())
        pool.write_text(str(total - huge_free()))  # no free page left anywhere
        assert huge_free() == 0
        fault("no MADV_POPULATE: populate of an unbackable page (helper SIGBUS)")
        with pytest.raises(ResourceExhausted) as info:
            c.populate("huge", 0, 8 * MiB, mode="read")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        alive(d)
        assert_serving(c)
        pool.write_text(str(total))
        assert digest(c, "huge", [(0, 6 * MiB)]) == expected_digest(10, [(0, 6 * MiB)])
        c.delete_region("huge")


def punch(att: Attachment, offset: int, length: int) -> None:
    """Free a range through a client's read-write fd, as any such holder can."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(att.fd, 0x02 | 0x01, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --------------------------------------------------------------------------- memory cgroup


LIMIT = 256 * MiB
CG_SLACK = 32 * MiB  # what a refused plug may still charge: the daemon's Python heap


def test_memcg_plug_beyond_headroom_is_refused(daemon_factory: Factory) -> None:
    with memory_cgroup(LIMIT) as cg:
        d = daemon_factory()
        cg.add(d.proc.pid)
        try:
            with connect(d) as c:
                c.create_region("vm", GiB)
                c.plug("vm", 0, 16 * MiB)  # fits: allocated by the helper, inside the limit
                base = Baseline(c, ["vm"], pools=[])
                base.remember("vm", fill(c, "vm", [(0, 16 * MiB)], seed=11))
                usage = cg.usage()

                fault("memory cgroup: plug beyond the headroom")
                with pytest.raises(ResourceExhausted) as info:
                    c.plug("vm", 0, 512 * MiB)
                assert info.value.code == "RESOURCE_EXHAUSTED"
                assert "memory cgroup" in info.value.message, info.value.message
                assert str(cg.path) in info.value.message, info.value.message
                alive(d)
                base.verify()
                grew = cg.usage() - usage  # the daemon's own heap may grow a little
                leak_check(
                    "memory cgroup usage after a refused plug", max(0, grew), tolerance=CG_SLACK
                )
                assert grew < CG_SLACK, f"the refused plug charged {grew} bytes to the cgroup"
                assert_serving(c)
        finally:
            stop(d)


@pytest.mark.parametrize("strategy", ["auto", "populate-write"])
def test_memcg_limit_hit_kills_the_helper_not_the_daemon(
    daemon_factory: Factory, strategy: str
) -> None:
    """Past the limit the kernel OOM-kills instead of failing the syscall: the helper
    (oom_score_adj 1000) must be the victim, and the plug must roll back."""
    with memory_cgroup(LIMIT) as cg:
        d = daemon_factory(env={"MEMPLUG_MEMCG_CHECK": "0"})
        cg.add(d.proc.pid)
        try:
            with connect(d) as c:
                c.create_region("vm", GiB)
                c.plug("vm", 0, 16 * MiB)
                base = Baseline(c, ["vm"], pools=[])
                base.remember("vm", fill(c, "vm", [(0, 16 * MiB)], seed=12))
                kills = cg.oom_kills()

                fault(f"memory cgroup: limit reached, helper OOM-killed ({strategy})")
                with pytest.raises(ResourceExhausted) as info:
                    c.plug("vm", 0, 512 * MiB, strategy=strategy)
                assert info.value.code == "RESOURCE_EXHAUSTED"
                record("memcg_oom_kills", cg.oom_kills() - kills)
                alive(d)
                assert cg.oom_kills() > kills, "the limit was never reached (no OOM kill)"
                assert "memory cgroup" in info.value.message, info.value.message
                base.verify()
                assert_serving(c)
                wait_until(lambda: d.proc.pid in cg.procs(), 1, "the daemon to stay in its cgroup")
        finally:
            stop(d)
