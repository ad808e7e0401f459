"""Region options and the warm pool, through a real daemon, with kernel witnesses.

THP: /proc/meminfo ShmemHugePages; NUMA: get_mempolicy on a mapping of the
region; lock: the daemon's VmLck; warm pool: GetStatus and allocated bytes.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import DaemonProcess, MiB, require_root
from sdharness import FakeSystemd

from memplug.client import Client, FailedPrecondition, InvalidArgument
from memplug.daemon.kernel import ops, probe
from memplug.v1 import memplug_pb2 as pb

THP_KNOB = probe.THP_SYSFS / "shmem_enabled"
THP_PER_SIZE = probe.THP_SYSFS / "hugepages-2048kB" / "shmem_enabled"


def meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def vm_locked(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmLck:\s+(\d+) kB", text, re.M)
    assert match is not None
    return int(match.group(1)) * 1024


@contextlib.contextmanager
def shmem_thp(mode: str) -> Iterator[None]:
    """Set the kernel's shmem THP mode for the test; restore both knobs after."""
    require_root("changes /sys/kernel/mm/transparent_hugepage/shmem_enabled")
    if not THP_KNOB.exists():
        pytest.skip("this kernel has no shmem THP")
    saved = {p: probe._selected(p) for p in (THP_KNOB, THP_PER_SIZE) if p.exists()}
    try:
        THP_KNOB.write_text(mode)
        if THP_PER_SIZE.exists():
            THP_PER_SIZE.write_text("inherit")
        yield
    finally:
        for path, value in saved.items():
            if value is not None:
                path.write_text(value)


def client(d: DaemonProcess) -> Client:
    return Client(d.socket)


# --------------------------------------------------------------------------- THP


def test_thp_region_plugs_huge_pages_and_says_zeroing_is_done(daemon: DaemonProcess) -> None:
    with shmem_thp("advise"), client(daemon) as c:
        region = c.create_region("thp", 256 * MiB)
        assert region.transparent_huge_pages
        res = c.plug("thp")
        assert res.strategy == "populate-write" and res.zeroing == "done"
        # The witness: unplugging the region gives back (at least most of) 256 MiB
        # of huge pages. Relative, since other processes may use shmem THP too.
        plugged = meminfo_kib("ShmemHugePages")
        assert c.status().shmem_thp_allowed
        c.unplug("thp")
        assert plugged - meminfo_kib("ShmemHugePages") >= 200 * 1024
        assert c.get_region("thp").allocated_bytes == 0


def test_thp_required_but_off_is_refused_with_a_hint(daemon: DaemonProcess) -> None:
    with shmem_thp("never"), client(daemon) as c:
        with pytest.raises(FailedPrecondition, match="shmem_enabled"):
            c.create_region("nothp", 64 * MiB, transparent_huge_pages=True)
        default = c.create_region("plain", 64 * MiB)
        assert not default.transparent_huge_pages
        res = c.plug("plain")
        assert res.strategy == "fallocate" and res.zeroing == "deferred"
        status = c.status()
        assert status.shmem_thp == "never" and not status.shmem_thp_allowed
        assert "echo advise" in status.shmem_thp_hint
        assert [r.name for r in c.list_regions()] == ["plain"]


def test_thp_is_a_shmem_option(daemon: DaemonProcess, hugetlb_pool: Callable[[int], None]) -> None:
    hugetlb_pool(2)
    with client(daemon) as c, pytest.raises(InvalidArgument, match="SHMEM option"):
        c.create_region("h", 4 * MiB, "hugetlb", transparent_huge_pages=True)


# --------------------------------------------------------------------------- NUMA


def test_numa_bind_is_set_and_read_back(daemon: DaemonProcess) -> None:
    node = probe.numa_nodes()[0]
    with client(daemon) as c:
        region = c.create_region("numa", 64 * MiB, numa_policy="bind", numa_nodes=[node])
        assert (region.numa_policy, region.numa_nodes) == ("bind", [node])
        res = c.plug("numa")
        assert res.region.plugged_bytes == 64 * MiB
        with c.attach("numa", map_memory=False) as att:
            mapping = ops.map_shared(att.fd, 0, 4096, writable=False)
            try:
                # shmem keeps the policy on the inode: any mapping of it sees it
                assert ops.get_mempolicy(mapping.address) == (ops.MPOL_BIND, [node])
            finally:
                mapping.close()


def test_numa_interleave_on_hugetlb_plugs(
    daemon: DaemonProcess, hugetlb_pool: Callable[[int], None]
) -> None:
    hugetlb_pool(8)
    node = probe.numa_nodes()[0]
    with client(daemon) as c:
        c.create_region("hnuma", 8 * MiB, "hugetlb", numa_policy="interleave", numa_nodes=[node])
        res = c.plug("hnuma")
        assert res.region.plugged_bytes == 8 * MiB


@pytest.mark.parametrize(
    ("policy", "nodes", "message"),
    [
        ("bind", [], "needs numa_nodes"),
        ("default", [0], "without a NUMA policy"),
        ("bind", [4095], "not online"),
    ],
)
def test_numa_bad_placements_are_invalid(
    daemon: DaemonProcess, policy: str, nodes: list[int], message: str
) -> None:
    with client(daemon) as c:
        with pytest.raises(InvalidArgument, match=message):
            c.create_region("bad", 64 * MiB, numa_policy=policy, numa_nodes=nodes)
        assert c.list_regions() == []


def test_unknown_numa_policy_enum_is_invalid(daemon: DaemonProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.CreateRegion(
            pb.CreateRegionRequest(
                name="x",
                size=64 * MiB,
                backing=pb.BACKING_SHMEM,
                numa_policy=9,  # type: ignore[arg-type]  # an enum value no build knows
                numa_nodes=[0],
            )
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- lock


def test_lock_follows_plug_unplug_and_discard(daemon: DaemonProcess) -> None:
    pid = daemon.proc.pid
    base = vm_locked(pid)
    with client(daemon) as c:
        region = c.create_region("locked", 64 * MiB, lock=True)
        assert region.lock
        c.plug("locked", 0, 32 * MiB)
        assert vm_locked(pid) - base == 32 * MiB
        c.discard("locked", 0, 4 * MiB)  # punched and allocated again: locked again
        assert vm_locked(pid) - base == 32 * MiB
        c.unplug("locked", 0, 16 * MiB)
        assert vm_locked(pid) - base == 16 * MiB
        c.delete_region("locked")
        assert vm_locked(pid) == base


def test_lock_comes_back_after_a_restart(tmp_path: Path) -> None:
    require_root("restarts the daemon with its memfds handed back")
    sd = FakeSystemd(tmp_path / "sd")
    d = sd.start(tmp_path / "run")
    try:
        with client(d) as c:
            c.create_region("locked", 64 * MiB, lock=True)
            c.plug("locked", 0, 32 * MiB)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d = sd.start(tmp_path / "run")
        with client(d) as c:
            assert c.get_region("locked").lock
        assert vm_locked(d.proc.pid) >= 32 * MiB
    finally:
        assert d.stop() == 0
        sd.close()


# --------------------------------------------------------------------------- warm pool


def wait_ready(d: DaemonProcess, count: int, timeout: float = 20) -> pb.WarmPool:
    deadline = time.monotonic() + timeout
    while True:
        pool: pb.WarmPool = d.stub.GetStatus(pb.GetStatusRequest()).warm_pools[0]
        if pool.ready == count:
            return pool
        assert time.monotonic() < deadline, f"warm pool never reached {count} ready: {pool}"
        time.sleep(0.05)


def test_warm_pool_serves_a_matching_region_plugged_at_once(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory("--warm-pool", "shmem:64M:2")
    wait_ready(d, 2)
    with client(d) as c:
        region = c.create_region("warm", 64 * MiB)
        assert region.from_warm_pool
        assert region.plugged_bytes == 0 and region.allocated_bytes == 64 * MiB
        res = c.plug("warm")
        assert (res.strategy, res.bytes, res.region.plugged_bytes) == (
            "warm-pool",
            64 * MiB,
            64 * MiB,
        )
        with c.attach("warm") as att:
            assert att.view is not None
            att.view[0:5] = b"warm!"
        with c.attach("warm", "ro") as att:
            assert att.view is not None and bytes(att.view[0:5]) == b"warm!"
        other = c.create_region("cold", 128 * MiB)  # another shape: not from the pool
        assert not other.from_warm_pool and other.allocated_bytes == 0
        locked = c.create_region("locked", 64 * MiB, lock=True)  # options rule the pool out
        assert not locked.from_warm_pool
        pool = wait_ready(d, 2)  # refilled in the background
        assert (pool.hits, pool.target) == (1, 2)
        c.unplug("warm")
        assert c.get_region("warm").allocated_bytes == 0


def test_warm_pool_counts_in_the_quota_and_yields_to_real_plugs(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory("--warm-pool", "shmem:64M:2", "--max-bytes", "192M")
    wait_ready(d, 2)
    with client(d) as c:
        assert c.status().plugged_bytes == 128 * MiB  # the pool's memory is counted
        c.create_region("big", 128 * MiB)
        res = c.plug("big")  # needs room the pool holds: the pool gives it back
        assert res.region.plugged_bytes == 128 * MiB
        status = c.status()
        assert status.plugged_bytes <= 192 * MiB
        assert status.warm_pools[0].ready <= 1


def test_pooled_region_survives_a_restart_without_its_extra_memory(tmp_path: Path) -> None:
    require_root("restarts the daemon with its memfds handed back")
    sd = FakeSystemd(tmp_path / "sd")
    d = sd.start(tmp_path / "run", "--warm-pool", "shmem:64M:1")
    try:
        wait_ready(d, 1)
        with client(d) as c:
            assert c.create_region("warm", 64 * MiB).from_warm_pool
            c.plug("warm", 0, 16 * MiB)
            with c.attach("warm", sparse=True) as att:
                assert att.view is not None
                att.view[0:4] = b"kept"
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d = sd.start(tmp_path / "run")
        with client(d) as c:
            region = c.get_region("warm")
            assert region.plugged == [(0, 16 * MiB)]
            assert region.allocated_bytes == 16 * MiB  # the unplugged rest was given back
            with c.attach("warm", "ro", sparse=True) as att:
                assert att.view is not None and bytes(att.view[0:4]) == b"kept"
    finally:
        assert d.stop() == 0
        sd.close()


@pytest.mark.parametrize("spec", ["ram:1G:2", "shmem:1G", "shmem:3M:1", "hugetlb:1G:x"])
def test_bad_warm_pool_flags_are_refused(tmp_path: Path, spec: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "memplug.daemon", "--socket", str(tmp_path / "s"),
         "--warm-pool", spec],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "warm-pool" in proc.stderr or "invalid" in proc.stderr.lower()
