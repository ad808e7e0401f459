"""A take-over keeps what regions carry besides their memory, on real cgroups and pools.

A hold (HoldRegion), the pages a plug added to the 2 MiB pool under
--hugetlb-budget, and a region's charge cgroup live through a take-over by
`memplugd --takeover=auto` and through a taker killed right after the old
daemon let go (the old process then starts afresh on the store with the fds it
kept). The huge page pool is shared with other tests on this machine: a
pool figure that fails once is worth a rerun.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    MiB,
    huge_free,
    kill_takers,
    serving,
    start_daemon,
    start_taker,
)
from hardening_kit import MemoryCgroup, cgroup_path, memory_cgroup, own_memory_cgroup_dir

from memplug.client import Client
from memplug.common import memory
from memplug.common.errors import MemplugError

HOLDER = "vmm-update"
CHARGED_STEP = 32 * MiB


def added_pages(c: Client) -> int:
    pool = next(p for p in c.status().hugetlb_pools if p.page_size == HUGE_2M and p.node is None)
    return pool.added_pages


def plug_growing_the_pool(c: Client, hugetlb_pool: Callable[[int], None]) -> int:
    """Plug "huge" from a pool with no free page, so that it grows: the pages added.

    Other tests may size the shared pool meanwhile and leave free pages: try again.
    """
    for _ in range(5):
        in_use = memory.huge_pool(HUGE_2M).total - huge_free()
        hugetlb_pool(in_use)
        c.plug("huge")
        added = added_pages(c)
        if added:
            return added
        c.unplug("huge")
    pytest.fail("the plug never had to grow the pool: other tests keep free pages in it")


def check_state(
    d: DaemonProcess, consumer: MemoryCgroup, path: str, recorded: int | None, step: int
) -> int:
    """The hold refuses Unplug, the pages added before the take-over were read back from
    the store (recorded; it may give free ones back at once), the budget is still in force,
    and the next plug of the charged region is billed to its cgroup. Returns the pages
    added now."""
    if recorded:
        restored = re.findall(r"(\d+) pages added by memplug before the restart", d.log())
        assert restored and int(restored[-1]) == recorded, d.log()
    with Client(d.socket) as c:
        with pytest.raises(MemplugError) as refused:
            c.unplug("held", 0, 2 * MiB)
        assert refused.value.code == "FAILED_PRECONDITION", refused.value
        assert HOLDER in str(refused.value), refused.value
        assert c.get_region("held").plugged_bytes == 4 * MiB
        pool = next(
            p for p in c.status().hugetlb_pools if p.page_size == HUGE_2M and p.node is None
        )
        assert pool.budget_pages == 32
        assert recorded is None or pool.added_pages <= recorded
        assert c.get_region("charged").charge_cgroup == path
        before = consumer.usage()
        c.plug("charged", step * CHARGED_STEP, CHARGED_STEP)
        charged = consumer.usage() - before
        assert abs(charged - CHARGED_STEP) <= CHARGED_STEP * 0.05, (
            f"the consumer's cgroup grew by {charged} for a plug of {CHARGED_STEP}"
        )
        return pool.added_pages


def test_holds_budget_pages_and_charge_cgroups_survive_takeovers(
    tmp_path: Path, hugetlb_pool: Callable[[int], None]
) -> None:
    own = own_memory_cgroup_dir()
    with memory_cgroup(None, parent=own) as consumer:
        path = cgroup_path(consumer)
        in_use = memory.huge_pool(HUGE_2M).total - huge_free()  # by other tests, maybe
        hugetlb_pool(in_use)  # no free page: the hugetlb plug must grow the pool
        d = start_daemon(tmp_path, "--hugetlb-budget", "2M:64M")
        try:
            with Client(d.socket) as c:
                c.create_region("held", 8 * MiB)
                c.plug("held", 0, 4 * MiB)
                c.hold_region("held", HOLDER, "moving the VM", ttl=600)
                c.create_region("huge", 8 * MiB, "hugetlb", page_size=HUGE_2M)
                plug_growing_the_pool(c, hugetlb_pool)
                c.create_region("charged", 4 * CHARGED_STEP, charge_cgroup=path)
            added = check_state(d, consumer, path, None, 0)

            # A take-over by the auto mode.
            proc, log_path = start_taker(d, "auto", mode="auto")
            assert d.proc.wait(30) == 0, d.log()
            new = serving(proc, log_path, d.socket)
            added = check_state(new, consumer, path, added, 1)

            # A taker killed once the daemon has let go: that daemon starts afresh.
            proc, log_path = start_taker(
                new, "killed", env={"MEMPLUG_TAKEOVER_KILL_AFTER_COMMITTED": "1"}
            )
            assert proc.wait(30) == -9, log_path.read_text()
            revived = serving(new.proc, new.log_path, d.socket)
            assert "ended before it served" in revived.log(), revived.log()
            check_state(revived, consumer, path, added, 2)

            with Client(revived.socket) as c:
                c.delete_region("huge")
                assert added_pages(c) == 0, "delete gives back the pages added before"
                assert c.release_region("held", HOLDER)
                c.unplug("held")
                c.delete_region("held")
                c.delete_region("charged")
            assert revived.stop() == 0
            assert "Traceback" not in revived.log(), revived.log()
        finally:
            kill_takers(d.proc)
