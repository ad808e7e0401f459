"""Failing nicely, for real: an empty hugetlb pool, a full filesystem, the quota, cancel, deadline.

Each failed Plug must end with the right code and error class, release every
page it allocated (the machine's counters say so, not the daemon), leave the
region's plugged blocks as they were and their contents intact.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import (
    MAP_NORESERVE,
    DaemonProcess,
    GiB,
    MiB,
    create,
    error_class,
    get,
    huge_free,
    hugetlb_pool_of,
    open_region_fd,
    spans,
    used_bytes,
)

from memplug.v1 import memplug_pb2 as pb

Code = grpc.StatusCode
Factory = Callable[..., DaemonProcess]


def drain(stream: Iterable[pb.Progress]) -> list[pb.Progress]:
    return list(stream)


def failed_plug(
    daemon: DaemonProcess, name: str, offset: int, length: int, strategy: int = pb.STRATEGY_AUTO
) -> grpc.RpcError:
    """Run a Plug that must fail; the error, checked never to be INTERNAL."""
    request = pb.PlugRequest(name=name, offset=offset, length=length, strategy=strategy)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        drain(daemon.stub.Plug(request))
    err = info.value
    assert err.code() is not Code.INTERNAL, f"INTERNAL is a daemon bug: {err.details()}"
    assert daemon.alive(), f"memplugd died:\n{daemon.log()}"
    return err


def own_pool(hugetlb_pool: Callable[[int], None], pages: int) -> None:
    """Set the 2 MiB pool to `pages` and make sure nobody else is drawing from it."""
    hugetlb_pool(pages)
    free = huge_free()
    assert free == pages, (
        f"the hugetlb pool was just set to {pages} pages but {free} are free: another "
        "process on this machine is using huge pages (a concurrent test run?)"
    )


def pattern(length: int, seed: int = 1) -> bytes:
    block = bytes((seed * 131 + i * 7) % 251 + 1 for i in range(4096))
    return block * (length // 4096)


@contextlib.contextmanager
def region_memory(
    daemon: DaemonProcess, name: str, offset: int, length: int
) -> Iterator[mmap.mmap]:
    """A shared mapping of part of a memfd region (hugetlb: 2 MiB aligned, plugged only)."""
    fd = open_region_fd(daemon, name)
    try:
        m = mmap.mmap(fd, length, mmap.MAP_SHARED | MAP_NORESERVE, offset=offset)
        try:
            yield m
        finally:
            m.close()
    finally:
        os.close(fd)


def wait_for_allocated(daemon: DaemonProcess, name: str, want: int, timeout: float) -> pb.Region:
    """Poll GetRegion until allocated_bytes is back to want (a rollback finishing)."""
    deadline = time.monotonic() + timeout
    while True:
        region = get(daemon, name)
        if region.allocated_bytes == want:
            return region
        assert time.monotonic() < deadline, (
            f"allocated_bytes still {region.allocated_bytes}, want {want}: no rollback"
        )
        time.sleep(0.05)


def wait_for_quota(daemon: DaemonProcess, want: int, timeout: float = 5) -> None:
    """Poll GetStatus until the plugged total (what the quota counts) is back to want."""
    deadline = time.monotonic() + timeout
    while (got := daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes) != want:
        assert time.monotonic() < deadline, f"quota still counts {got} plugged bytes, want {want}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- hugetlb pool


@pytest.mark.parametrize(
    "strategy", [pb.STRATEGY_AUTO, pb.STRATEGY_FALLOCATE], ids=["auto", "fallocate"]
)
@pytest.mark.parametrize("plugged_at", [0, 16 * MiB], ids=["first-8M", "middle-8M"])
def test_hugetlb_pool_too_small(
    daemon: DaemonProcess, hugetlb_pool: Callable[[int], None], strategy: int, plugged_at: int
) -> None:
    own_pool(hugetlb_pool, 8)  # 16 MiB of 2 MiB pages
    create(daemon, "huge", 64 * MiB, pb.BACKING_HUGETLB)
    daemon.plug("huge", plugged_at, 8 * MiB, strategy=strategy)
    data = pattern(8 * MiB)
    with region_memory(daemon, "huge", plugged_at, 8 * MiB) as m:
        m[:] = data
        before = get(daemon, "huge")
        free_before = huge_free()
        assert free_before == 4
        assert before.allocated_bytes == 8 * MiB

        err = failed_plug(daemon, "huge", 0, 64 * MiB, strategy)
        assert err.code() is Code.RESOURCE_EXHAUSTED, err.details()
        assert error_class(err) == "PoolExhausted"
        details = err.details() or ""
        assert "hugetlb" in details
        # 56 MiB were missing, 4 free pages (8 MiB) could be had: 48 MiB short.
        assert "48 MiB" in details or "24 more pages" in details, details

        assert huge_free() == free_before, "the failed plug kept huge pages"
        after = get(daemon, "huge")
        assert spans(after) == [(plugged_at, 8 * MiB)]
        assert after.plugged_bytes == 8 * MiB
        assert after.allocated_bytes == before.allocated_bytes
        assert m[:] == data, "the failed plug touched the plugged blocks"
    with region_memory(daemon, "huge", plugged_at, 8 * MiB) as m:
        assert m[:] == data

    # The region still works: what fits can be plugged.
    assert daemon.plug("huge", 32 * MiB, 8 * MiB).bytes == 8 * MiB
    assert huge_free() == 0


def test_hugetlb_empty_pool_of_gigantic_pages(daemon: DaemonProcess) -> None:
    with hugetlb_pool_of(0, GiB):  # skips where the kernel has no 1 GiB pool
        region = create(daemon, "giant", GiB, pb.BACKING_HUGETLB, page_size=GiB)
        assert region.page_size == region.block_size == GiB
        for strategy in (pb.STRATEGY_AUTO, pb.STRATEGY_FALLOCATE):
            err = failed_plug(daemon, "giant", 0, GiB, strategy)
            assert err.code() is Code.RESOURCE_EXHAUSTED, err.details()
            assert error_class(err) == "PoolExhausted"
            assert "1 GiB" in (err.details() or "")
            after = get(daemon, "giant")
            assert list(after.plugged) == [] and after.allocated_bytes == 0


# --------------------------------------------------------------------------- full filesystem


def test_file_region_filesystem_full(
    daemon_factory: Factory, small_tmpfs: Callable[[str], Path]
) -> None:
    mnt = small_tmpfs("64M")
    daemon = daemon_factory("--allow-dir", str(mnt))
    region = create(daemon, "f", 128 * MiB, pb.BACKING_FILE, path="vm.img")
    file = Path(region.path)
    assert file == mnt / "vm.img"
    daemon.plug("f", 0, 16 * MiB)
    data = pattern(16 * MiB)
    with file.open("r+b") as fh:  # a FILE region is a regular file
        fh.write(data)
    used = used_bytes(mnt)
    before = get(daemon, "f")
    assert before.allocated_bytes == 16 * MiB

    err = failed_plug(daemon, "f", 0, 128 * MiB)
    assert err.code() is Code.RESOURCE_EXHAUSTED, err.details()
    assert error_class(err) == "NoSpace"
    assert "full" in (err.details() or "")

    assert used_bytes(mnt) == used, "the failed plug left blocks allocated"
    after = get(daemon, "f")
    assert spans(after) == [(0, 16 * MiB)]
    assert after.allocated_bytes == before.allocated_bytes
    with file.open("rb") as fh:
        assert fh.read(16 * MiB) == data
    # What fits still plugs.
    assert daemon.plug("f", 16 * MiB, 32 * MiB).bytes == 32 * MiB


def test_file_region_full_keeps_data_the_file_had(
    daemon_factory: Factory, small_tmpfs: Callable[[str], Path]
) -> None:
    """Blocks of an adopted file that held data before a failed plug keep it."""
    mnt = small_tmpfs("96M")
    file = mnt / "disk.img"
    data = pattern(8 * MiB, seed=3)
    with file.open("wb") as fh:
        fh.truncate(128 * MiB)
        fh.seek(100 * MiB)
        fh.write(data)
    daemon = daemon_factory("--allow-dir", str(mnt))
    region = create(daemon, "f", 0, pb.BACKING_FILE, path="disk.img")  # adopt it
    assert region.size == 128 * MiB and list(region.plugged) == []
    assert region.allocated_bytes == 8 * MiB
    used = used_bytes(mnt)

    # 88 MiB free: the first 64 MiB fit, the rest does not.
    err = failed_plug(daemon, "f", 0, 128 * MiB)
    assert err.code() is Code.RESOURCE_EXHAUSTED, err.details()
    assert error_class(err) == "NoSpace"
    assert used_bytes(mnt) == used, "the failed plug left blocks allocated"
    after = get(daemon, "f")
    assert list(after.plugged) == [] and after.allocated_bytes == 8 * MiB
    with file.open("rb") as fh:
        fh.seek(100 * MiB)
        assert fh.read(8 * MiB) == data, "the rollback punched data the file held before"


# --------------------------------------------------------------------------- quota


def test_quota(daemon_factory: Factory) -> None:
    daemon = daemon_factory("--max-bytes", "32M")
    create(daemon, "a", 64 * MiB)
    create(daemon, "b", 64 * MiB)
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).quota_bytes == 32 * MiB
    assert daemon.plug("a", 0, 32 * MiB).bytes == 32 * MiB

    for name, offset in (("a", 32 * MiB), ("b", 0)):
        err = failed_plug(daemon, name, offset, 2 * MiB)
        assert err.code() is Code.RESOURCE_EXHAUSTED, err.details()
        assert error_class(err) == "QuotaExceeded"
        assert "quota" in (err.details() or "")
    # A range that is partly plugged needs quota only for its gaps, and still too much.
    err = failed_plug(daemon, "a", 0, 64 * MiB)
    assert error_class(err) == "QuotaExceeded"
    assert spans(get(daemon, "a")) == [(0, 32 * MiB)]
    assert get(daemon, "a").allocated_bytes == 32 * MiB
    assert get(daemon, "b").allocated_bytes == 0 and list(get(daemon, "b").plugged) == []
    status = daemon.stub.GetStatus(pb.GetStatusRequest())
    assert status.plugged_bytes == 32 * MiB and status.allocated_bytes == 32 * MiB

    # Unplugging returns quota.
    daemon.stub.Unplug(pb.RangeRequest(name="a", offset=0, length=2 * MiB))
    assert daemon.plug("b", 0, 2 * MiB).bytes == 2 * MiB
    assert error_class(failed_plug(daemon, "b", 2 * MiB, 2 * MiB)) == "QuotaExceeded"
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == 32 * MiB

    # Deleting a region returns its quota.
    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="a"))
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == 2 * MiB
    assert daemon.plug("b", 2 * MiB, 30 * MiB).bytes == 30 * MiB
    assert error_class(failed_plug(daemon, "b", 32 * MiB, 2 * MiB)) == "QuotaExceeded"
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == 32 * MiB


# --------------------------------------------------------------------------- cancel and deadline


def test_cancel_mid_plug(daemon: DaemonProcess) -> None:
    size = 4 * GiB
    create(daemon, "vm", size)
    daemon.plug("vm", 0, 64 * MiB)
    data = pattern(4 * MiB)
    with region_memory(daemon, "vm", 60 * MiB, 4 * MiB) as m:
        m[:] = data
    before = get(daemon, "vm")

    call = daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=size))
    first = next(iter(call))
    assert not first.HasField("result"), "a 4 GiB plug ended before it could be cancelled"
    assert first.done_bytes < first.total_bytes == size - 64 * MiB
    call.cancel()  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as info:
        drain(call)
    assert info.value.code() is Code.CANCELLED

    after = wait_for_allocated(daemon, "vm", before.allocated_bytes, timeout=15)
    assert spans(after) == [(0, 64 * MiB)]
    assert after.plugged_bytes == 64 * MiB
    wait_for_quota(daemon, 64 * MiB)
    with region_memory(daemon, "vm", 60 * MiB, 4 * MiB) as m:
        assert m[:] == data
    assert daemon.alive()
    # Nothing is left busy: the region can be plugged and deleted.
    assert daemon.plug("vm", 64 * MiB, 64 * MiB).bytes == 64 * MiB
    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="vm"))


def test_deadline_mid_plug(daemon: DaemonProcess) -> None:
    size = 4 * GiB
    create(daemon, "vm", size)
    daemon.plug("vm", 0, 64 * MiB)
    data = pattern(4 * MiB)
    with region_memory(daemon, "vm", 0, 4 * MiB) as m:
        m[:] = data
    before = get(daemon, "vm")

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        drain(daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=size), timeout=0.2))
    assert info.value.code() is Code.DEADLINE_EXCEEDED, info.value.details()
    assert time.monotonic() - t0 < 2

    after = wait_for_allocated(daemon, "vm", before.allocated_bytes, timeout=15)
    assert spans(after) == [(0, 64 * MiB)]
    wait_for_quota(daemon, 64 * MiB)
    with region_memory(daemon, "vm", 0, 4 * MiB) as m:
        assert m[:] == data
    assert daemon.plug("vm", 64 * MiB, 64 * MiB).bytes == 64 * MiB
    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="vm"))
