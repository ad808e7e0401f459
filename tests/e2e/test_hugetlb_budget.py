"""hugetlb pools that follow demand (--hugetlb-budget), on the real kernel's pools.

Every test sets the pool it uses with the hugetlb_pool fixture (restored after).
Other test runs on this machine may use the 2 MiB pool at the same time: a
pool-size assertion that fails once is worth a rerun before a chase.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    GiB,
    MiB,
    create,
    error_class,
    get,
    require,
    require_root,
    start_daemon,
)

from memplug.common import memory
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]
Pool = Callable[..., None]


def total(page_size: int = HUGE_2M) -> int:
    return memory.huge_pool(page_size).total


def status_pool(daemon: DaemonProcess, page_size: int = HUGE_2M) -> pb.HugePagePool:
    pools = daemon.stub.GetStatus(pb.GetStatusRequest()).hugetlb_pools
    return next(p for p in pools if p.page_size == page_size)


def delete(daemon: DaemonProcess, name: str) -> None:
    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name=name))


def test_a_plug_grows_an_empty_pool_by_its_shortfall_and_delete_gives_it_back(
    daemon_factory: Factory, hugetlb_pool: Pool
) -> None:
    hugetlb_pool(0)
    d = daemon_factory("--hugetlb-budget", "2M:256M")
    create(d, "vm0", 128 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
    result = d.plug("vm0", 0, 0)
    assert result.bytes == 128 * MiB
    assert total() == 64, "the pool grows by exactly the 64 pages the plug lacked"
    pool = status_pool(d)
    assert (pool.added_pages, pool.budget_pages) == (64, 128)
    status = d.stub.GetStatus(pb.GetStatusRequest())
    node_pools = [p for p in status.hugetlb_node_pools if p.page_size == HUGE_2M]
    assert node_pools and all(p.HasField("node") for p in node_pools)
    assert sum(p.total for p in node_pools) == 64

    delete(d, "vm0")
    assert total() == 0, "delete gives back the pages memplug added"
    assert status_pool(d).added_pages == 0


def test_a_plug_beyond_the_budget_is_refused_and_the_pool_left_as_it_was(
    daemon_factory: Factory, hugetlb_pool: Pool
) -> None:
    hugetlb_pool(2)
    d = daemon_factory("--hugetlb-budget", "2M:256M")
    create(d, "big", 512 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
    with pytest.raises(grpc.RpcError) as caught:
        d.plug("big", 0, 0)
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert error_class(err) == "PoolExhausted"
    details = err.details() or ""
    assert "--hugetlb-budget 2M:256M" in details and "254 short" in details, details
    assert total() == 2, "a refused plug leaves the pool as it was"
    assert get(d, "big").allocated_bytes == 0
    # Within the budget the same daemon still grows it, and unplug gives back.
    create(d, "small", 16 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
    d.plug("small", 0, 0)
    assert total() == 8
    d.stub.Unplug(pb.RangeRequest(name="small", offset=0, length=0))
    assert total() == 2


# A process that maps (and so reserves) huge pages, then waits to touch them.
HOLDER = textwrap.dedent(
    """
    import mmap, sys
    MAP_HUGETLB = 0x40000
    size = int(sys.argv[1])
    m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    print("mapped", flush=True)
    sys.stdin.readline()
    for off in range(0, size, 2 << 20):
        m[off] = 1  # a page taken from under it would be SIGBUS here
    print("touched", flush=True)
    """
)


def test_another_process_s_reserved_pages_are_never_taken(
    daemon_factory: Factory, hugetlb_pool: Pool
) -> None:
    hugetlb_pool(4)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(4 * HUGE_2M)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "mapped"
        assert memory.huge_pool(HUGE_2M).reserved >= 4
        d = daemon_factory("--hugetlb-budget", "2M:64M")
        create(d, "vm0", 8 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
        d.plug("vm0", 0, 0)
        assert total() == 8, "4 free but reserved pages are used: the pool grows by 4"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "touched"
        delete(d, "vm0")
        assert total() == 4, "only the pages memplug added are given back"
    finally:
        holder.kill()
        holder.wait()


def test_a_1g_page_plug_grows_the_pool_or_says_memory_is_fragmented(
    daemon_factory: Factory, hugetlb_pool: Pool
) -> None:
    require(Path("/sys/kernel/mm/hugepages/hugepages-1048576kB").is_dir(), "no 1 GiB pool")
    hugetlb_pool(0, GiB)
    d = daemon_factory("--hugetlb-budget", "1G:1G")
    create(d, "vm1g", GiB, pb.BACKING_HUGETLB, page_size=GiB)
    try:
        d.plug("vm1g", 0, 0)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        details = err.details() or ""
        assert "fragmented" in details and "1 pages missing" in details, details
        assert "hugepagesz=1G hugepages=1" in details and "hugetlb_cma=" in details, details
        assert total(GiB) == 0, "the pool is put back where it was"
    else:
        assert total(GiB) == 1
        delete(d, "vm1g")
        assert total(GiB) == 0


def test_a_restart_keeps_the_record_of_pages_added(tmp_path: Path, hugetlb_pool: Pool) -> None:
    require_root("sizes the hugetlb pool")
    hugetlb_pool(0)
    where = tmp_path / "d"
    first = start_daemon(where, "--hugetlb-budget", "2M:64M", "--hugetlb-keep")
    try:
        create(first, "vm0", 16 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
        first.plug("vm0", 0, 0)
        assert total() == 8
    finally:
        assert first.stop() == 0
    # The region is gone with the process (no fd store here); the pages stay.
    second = start_daemon(where, "--hugetlb-budget", "2M:64M", "--hugetlb-keep")
    try:
        assert total() == 8
        assert status_pool(second).added_pages == 8
    finally:
        assert second.stop() == 0
    third = start_daemon(where, "--hugetlb-budget", "2M:64M")
    try:
        assert total() == 0, "without --hugetlb-keep the next daemon gives them back"
        assert status_pool(third).added_pages == 0
    finally:
        assert third.stop() == 0
