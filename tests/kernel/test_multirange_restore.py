"""A multi-range operation interrupted by a crash is replayed over its ranges only.

The engine's store is kept and its memfd handed to a second engine, as systemd's
fd store does across a restart; the intent left open is the one a crash in the
middle of the call would leave. The blocks between the ranges of the list were
not part of the call: the replay must not touch them.
"""

from __future__ import annotations

import os

from conftest import MiB

from memplug.common.ranges import Range
from memplug.daemon.backings import BackingKind
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.region import RegionSpec
from memplug.daemon.kernel import ops
from memplug.daemon.state.store import MemoryStore

BLOCK = 2 * MiB


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def crash_with_open_intent(op: str, parts: tuple[Range, ...]) -> tuple[MemoryStore, int]:
    """A region of 16 blocks, blocks 0-7 plugged, then a crash with `op` of parts open."""
    store = MemoryStore()
    engine = RegionEngine(threads=1, store=store)
    try:
        engine.create_region(RegionSpec(name="vm0", size=16 * BLOCK, backing=BackingKind.SHMEM))
        engine.plug("vm0", 0, 8 * BLOCK)
        fd = os.dup(engine._get("vm0").backing.fd)
        span = Range(parts[0].offset, parts[-1].end - parts[0].offset)
        store.begin("vm0", op, span, (), parts)
    finally:
        engine.shutdown(timeout=10)
    return store, fd


def restart(store: MemoryStore, fd: int) -> RegionEngine:
    engine = RegionEngine(threads=1, store=store)
    engine.restore({"vm0": os.dup(fd)})
    return engine


def test_interrupted_multirange_unplug_completes_its_ranges_only() -> None:
    parts = (Range(BLOCK, BLOCK), Range(4 * BLOCK, 2 * BLOCK))
    store, fd = crash_with_open_intent("unplug", parts)
    try:
        engine = restart(store, fd)
        try:
            plugged = [(r.offset, r.length) for r in engine.get_region("vm0").plugged]
            # Blocks 2 and 3 lie between the ranges: still plugged, still backed.
            assert plugged == [(0, BLOCK), (2 * BLOCK, 2 * BLOCK), (6 * BLOCK, 2 * BLOCK)]
            assert allocated(fd) == 5 * BLOCK
            assert store.load()[1] == []
        finally:
            engine.shutdown(timeout=10)
    finally:
        os.close(fd)


def test_interrupted_multirange_plug_rolls_back_its_ranges_only() -> None:
    parts = (Range(8 * BLOCK, BLOCK), Range(12 * BLOCK, 2 * BLOCK))
    store, fd = crash_with_open_intent("plug", parts)
    try:
        # What the plug had allocated before the crash, and a block between its
        # ranges that a holder of the fd allocated itself (not the call's to free).
        for r in parts:
            ops.fallocate(fd, r.offset, r.length)
        ops.fallocate(fd, 10 * BLOCK, BLOCK)
        assert allocated(fd) == 12 * BLOCK
        engine = restart(store, fd)
        try:
            region = engine.get_region("vm0")
            assert [(r.offset, r.length) for r in region.plugged] == [(0, 8 * BLOCK)]
            assert allocated(fd) == 9 * BLOCK, "the replay freed more or less than the list"
            assert region.allocated_outside_plugged == BLOCK
        finally:
            engine.shutdown(timeout=10)
    finally:
        os.close(fd)
