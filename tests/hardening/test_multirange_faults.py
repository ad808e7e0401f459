"""A list of ranges plugged in one call fails as one plug: all or nothing.

Faults are real: a hugetlb pool and a tmpfs too small for the list, so the
plug runs out of memory part-way through it, and a SIGKILL in the middle of
the call. Afterwards nothing of the call is left plugged or allocated, blocks
plugged before keep their contents, and the daemon serves on (or, after the
kill, a restart rolls the plug back over every range its intent recorded).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HUGE_2M, DaemonProcess, GiB, MiB, huge_free
from hardening_kit import (
    Baseline,
    alive,
    assert_consistent,
    assert_serving,
    connect,
    digest,
    fault,
    fill,
    stop,
)
from sdharness import FakeSystemd

from memplug.client import NoSpace, PoolExhausted
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]

pytestmark = pytest.mark.privileged

BLOCK = 2 * MiB


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    sd = FakeSystemd(tmp_path / "sd")
    try:
        yield sd
    finally:
        sd.close()


@pytest.mark.parametrize("strategy", ["auto", "fallocate"])
def test_hugetlb_pool_runs_out_mid_list(
    daemon_factory: Factory, hugetlb_pool: Callable[[int], None], strategy: str
) -> None:
    hugetlb_pool(10)
    d = daemon_factory()
    with connect(d) as c:
        c.create_region("huge", 64 * MiB, "hugetlb", page_size=HUGE_2M)
        c.plug("huge", 20 * MiB, BLOCK, strategy=strategy)
        base = Baseline(c, ["huge"], pools=[HUGE_2M])
        base.remember("huge", fill(c, "huge", [(20 * MiB, BLOCK)], seed=3))
        free = huge_free()
        assert free <= 9
        # 16 blocks, one of them plugged already: 15 new pages, more than the pool has.
        ranges = [(block * 4 * MiB, BLOCK) for block in range(16)]
        assert (20 * MiB, BLOCK) in ranges

        fault(f"hugetlb pool runs out mid-list ({strategy})")
        with pytest.raises(PoolExhausted) as info:
            c.plug("huge", ranges=ranges, strategy=strategy, threads=1)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "16 ranges of 32 MiB" in info.value.message, info.value.message
        assert "rolled back" in info.value.message
        # It failed part-way, with every free page taken, not before starting.
        assert f"{15 - free} more pages" in info.value.message, info.value.message
        alive(d)
        base.verify()
        assert_serving(c)
        # What fits still plugs, as a list too (block 5 of these is plugged already).
        fits = ranges[: free + 1]
        assert c.plug("huge", ranges=fits, strategy=strategy).bytes == free * BLOCK
        c.delete_region("huge")


def test_tmpfs_fills_up_mid_list(
    daemon_factory: Factory, small_tmpfs: Callable[[str], Path]
) -> None:
    mnt = small_tmpfs("32M")
    d = daemon_factory("--allow-dir", str(mnt))
    with connect(d) as c:
        c.create_region("disk", 256 * MiB, "file", path="disk.img")
        c.plug("disk", 8 * MiB, BLOCK)
        base = Baseline(c, ["disk"], mounts=[mnt])
        base.remember("disk", fill(c, "disk", [(8 * MiB, BLOCK)], seed=4))
        # 24 blocks of 2 MiB in a 32 MiB tmpfs: the first ones fit, the rest do not.
        ranges = [(block * 4 * MiB, BLOCK) for block in reversed(range(24))]

        fault("tmpfs fills up mid-list")
        with pytest.raises(NoSpace) as info:
            c.plug("disk", ranges=ranges, threads=1)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        message = info.value.message
        assert "24 ranges of 48 MiB" in message and "rolled back" in message, message
        # It failed part-way, after allocating some of the list, not before starting.
        assert "more needed" in message and "46 MiB more needed" not in message, message
        alive(d)
        base.verify()
        assert_serving(c)
        c.delete_region("disk")


def open_intents(db: Path) -> list[tuple[str, str, list[list[int]]]]:
    """(region, op, ranges) of the intents left open in the store."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT region, op, ranges FROM intents").fetchall()
    return [(str(r), str(op), json.loads(ranges)) for r, op, ranges in rows]


def test_sigkill_mid_multirange_plug_is_rolled_back(systemd: FakeSystemd, tmp_path: Path) -> None:
    """Killed mid-plug of a list, the restarted daemon rolls back every range of the
    list, keeps the blocks plugged before, and has no half-done range."""
    run = tmp_path / "run"
    d = systemd.start(run)
    db = systemd.workdir / "state" / "memplug.db"
    with connect(d) as c:
        c.create_region("big", 4 * GiB)
        c.plug("big", 0, 64 * MiB)
        want = fill(c, "big", [(0, 64 * MiB)], seed=5)
    # Given out of order and overlapping the plugged blocks: the list is sorted and
    # those blocks are kept. One worker thread, 64 MiB chunks, each reported: the
    # first message proves the plug is under way, and the SIGKILL lands in its middle.
    ranges = [
        (2 * GiB, GiB),
        (32 * MiB, GiB),
        (GiB + 512 * MiB, BLOCK),
        (3 * GiB + 512 * MiB, 512 * MiB),
    ]
    stream = d.stub.Plug(
        pb.PlugRequest(
            name="big", ranges=[pb.Range(offset=o, length=n) for o, n in ranges], threads=1
        )
    )
    first = next(iter(stream))
    assert not first.HasField("result") and 0 < first.done_bytes < first.total_bytes
    assert first.total_bytes == 2 * GiB + 512 * MiB + BLOCK - 32 * MiB
    fault("SIGKILL mid multi-range plug")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    stream.cancel()  # type: ignore[no-untyped-call]
    intents = open_intents(db)
    assert intents == [("big", "plug", [[o, n] for o, n in sorted(ranges)])], (
        f"the kill did not land mid-plug, or the intent misses ranges: {intents}"
    )
    held = systemd.fdstore["big"]
    assert os.fstat(held).st_blocks * 512 > 64 * MiB, "the killed plug had allocated nothing"

    d2 = systemd.start(run)
    try:
        with connect(d2) as c:
            regions = assert_consistent(c, db)
            assert regions["big"].plugged == [(0, 64 * MiB)], "the plug was not rolled back"
            assert os.fstat(held).st_blocks * 512 == 64 * MiB, "a range was left half-done"
            assert digest(c, "big", [(0, 64 * MiB)]) == want
            assert "rolled back an interrupted plug of 4 ranges" in d2.log()
            assert_serving(c)
            assert c.plug("big", ranges=ranges).bytes == first.total_bytes
    finally:
        stop(d2)
