"""RegionEngine in-process on the real kernel: bookkeeping, rollback, quota, fallbacks, shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HUGE_2M, GiB, MiB, require, used_bytes

from memplug.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotFound,
    OutOfRange,
    PoolExhausted,
    QuotaExceeded,
)
from memplug.common.ranges import Range
from memplug.daemon.backings import BackingKind
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.region import RegionSpec
from memplug.daemon.kernel import ops, probe

EngineFactory = Callable[..., RegionEngine]


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """make_engine(max_bytes=..., allow_dirs=[...]): engines shut down after the test."""
    engines: list[RegionEngine] = []

    def make(*, max_bytes: int | None = None, allow_dirs: list[Path] | None = None) -> RegionEngine:
        engine = RegionEngine(threads=2, max_bytes=max_bytes, allow_dirs=allow_dirs or [])
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout=10)


@pytest.fixture
def engine(make_engine: EngineFactory) -> RegionEngine:
    return make_engine()


def shmem(name: str, size: int) -> RegionSpec:
    return RegionSpec(name=name, size=size, backing=BackingKind.SHMEM)


def dup_fd(engine: RegionEngine, name: str) -> int:
    """A dup of the region's fd, to look at its memory after the engine lets go."""
    return os.dup(engine._get(name).backing.fd)


def plugged(engine: RegionEngine, name: str) -> list[tuple[int, int]]:
    return [(r.offset, r.length) for r in engine.get_region(name).plugged]


# --------------------------------------------------------------------------- bookkeeping


def test_plug_unplug_discard_bookkeeping(engine: RegionEngine) -> None:
    info = engine.create_region(shmem("vm0", 64 * MiB))
    assert info.block_size == 2 * MiB and info.plugged_bytes == 0 and info.allocated_bytes == 0

    result = engine.plug("vm0", 0, 8 * MiB)
    assert result.bytes == 8 * MiB
    assert result.strategy == "fallocate" and result.threads == 1
    assert result.region.plugged == (Range(0, 8 * MiB),)
    assert result.region.allocated_bytes == 8 * MiB
    assert engine.plugged_total == 8 * MiB

    # Only the unplugged part of an overlapping range is new.
    progress: list[tuple[int, int]] = []
    result = engine.plug("vm0", 4 * MiB, 8 * MiB, progress=lambda d, t: progress.append((d, t)))
    assert result.bytes == 4 * MiB
    assert progress[-1] == (4 * MiB, 4 * MiB)
    assert plugged(engine, "vm0") == [(0, 12 * MiB)]
    assert engine.get_region("vm0").allocated_bytes == 12 * MiB
    assert engine.plugged_total == 12 * MiB

    # Unplug a hole in the middle.
    out = engine.unplug("vm0", 2 * MiB, 2 * MiB)
    assert out.bytes == 2 * MiB
    assert plugged(engine, "vm0") == [(0, 2 * MiB), (4 * MiB, 8 * MiB)]
    assert out.region.allocated_bytes == 10 * MiB
    assert engine.plugged_total == 10 * MiB
    # Unplugging across plugged and unplugged blocks counts the plugged ones.
    out = engine.unplug("vm0", 10 * MiB, 8 * MiB)
    assert out.bytes == 2 * MiB
    assert plugged(engine, "vm0") == [(0, 2 * MiB), (4 * MiB, 6 * MiB)]
    assert engine.unplug("vm0", 32 * MiB, 2 * MiB).bytes == 0

    # Discard zeroes plugged blocks and keeps them plugged and backed.
    fd = dup_fd(engine, "vm0")
    try:
        os.pwrite(fd, b"secret", 5 * MiB)
        out = engine.discard("vm0", 4 * MiB, 2 * MiB)
        assert out.bytes == 2 * MiB
        assert os.pread(fd, 6, 5 * MiB) == bytes(6)
        assert plugged(engine, "vm0") == [(0, 2 * MiB), (4 * MiB, 6 * MiB)]
        assert ops.allocated_bytes(fd) == 8 * MiB
    finally:
        os.close(fd)
    assert engine.plugged_total == 8 * MiB
    with pytest.raises(FailedPrecondition, match="unplugged"):
        engine.discard("vm0", 0, 4 * MiB)  # [2 MiB, 4 MiB) is not plugged

    # Populate works on plugged blocks only.
    result = engine.populate("vm0", 4 * MiB, 6 * MiB, write=True)
    assert result.bytes == 6 * MiB and result.strategy == "populate-write"
    with pytest.raises(FailedPrecondition, match="plug it first"):
        engine.populate("vm0", 0, 4 * MiB, write=False)

    status = engine.status()
    assert status.regions == 1
    assert status.plugged_bytes == 8 * MiB
    assert status.allocated_bytes == 8 * MiB


def test_plug_of_a_plugged_range_is_a_no_op(engine: RegionEngine) -> None:
    engine.create_region(shmem("vm0", 16 * MiB))
    engine.plug("vm0", 0, 8 * MiB)
    fd = dup_fd(engine, "vm0")
    try:
        os.pwrite(fd, b"keep me", 2 * MiB)
        progress: list[tuple[int, int]] = []
        result = engine.plug("vm0", 2 * MiB, 4 * MiB, progress=lambda d, t: progress.append((d, t)))
        assert result.bytes == 0
        assert result.threads == 0
        assert progress == [(0, 0)]
        assert os.pread(fd, 7, 2 * MiB) == b"keep me"
        assert ops.allocated_bytes(fd) == 8 * MiB
    finally:
        os.close(fd)
    assert engine.plugged_total == 8 * MiB


def test_requests_are_validated(engine: RegionEngine) -> None:
    engine.create_region(shmem("vm0", 16 * MiB))
    with pytest.raises(InvalidArgument, match="block size"):
        engine.plug("vm0", MiB, 2 * MiB)
    with pytest.raises(InvalidArgument, match="length must be > 0"):
        engine.unplug("vm0", 0, -2 * MiB)
    with pytest.raises(OutOfRange, match="nothing left to the end"):
        engine.unplug("vm0", 16 * MiB, 0)  # length 0 is "to the end", and there is none
    with pytest.raises(OutOfRange):
        engine.plug("vm0", 16 * MiB, 2 * MiB)
    with pytest.raises(OutOfRange):
        engine.discard("vm0", 2 * MiB, 2**64 - 2 * MiB)
    with pytest.raises(NotFound):
        engine.plug("nope", 0, 2 * MiB)
    assert engine.get_region("vm0").allocated_bytes == 0
    assert engine.plugged_total == 0


def test_length_zero_is_to_the_end_of_the_region(engine: RegionEngine) -> None:
    engine.create_region(shmem("vm0", 16 * MiB))
    result = engine.plug("vm0", 4 * MiB, 0)
    assert result.bytes == 12 * MiB
    assert result.region.plugged == (Range(4 * MiB, 12 * MiB),)
    assert engine.get_region("vm0").allocated_bytes == 12 * MiB
    assert engine.unplug("vm0", 8 * MiB, 0).bytes == 8 * MiB
    assert engine.get_region("vm0").plugged == (Range(4 * MiB, 4 * MiB),)


# --------------------------------------------------------------------------- quota


def test_quota(make_engine: EngineFactory) -> None:
    engine = make_engine(max_bytes=16 * MiB)
    engine.create_region(shmem("a", 32 * MiB))
    engine.create_region(shmem("b", 32 * MiB))
    engine.plug("a", 0, 12 * MiB)
    with pytest.raises(QuotaExceeded, match="4 MiB left") as info:
        engine.plug("b", 0, 8 * MiB)
    assert info.value.region == "b"
    assert engine.get_region("b").allocated_bytes == 0
    assert engine.plugged_total == 12 * MiB
    # The already-plugged part of a request does not count against the quota.
    engine.plug("a", 8 * MiB, 8 * MiB)
    assert engine.plugged_total == 16 * MiB
    # Unplug returns quota.
    engine.unplug("a", 0, 4 * MiB)
    engine.plug("b", 0, 4 * MiB)
    assert engine.plugged_total == 16 * MiB
    with pytest.raises(QuotaExceeded):
        engine.plug("b", 4 * MiB, 2 * MiB)


def test_plug_without_quota_reads_no_other_region(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quota's count of stray memory costs an fstat per region: asked only under a quota."""
    from memplug.daemon.engine.region import Region

    asked: list[str] = []
    real = Region.allocated_outside_plugged

    def counted(self: Region, allocated: int | None = None) -> int:
        asked.append(self.name)
        return real(self, allocated)

    monkeypatch.setattr(Region, "allocated_outside_plugged", counted)
    for max_bytes, others in ((None, 0), (64 * MiB, 19)):
        engine = make_engine(max_bytes=max_bytes)
        for i in range(20):
            engine.create_region(shmem(f"r{i}", 4 * MiB))
        asked.clear()
        engine.plug("r0", 0, 2 * MiB)
        assert len([name for name in asked if name != "r0"]) == others, (max_bytes, asked)


def test_plugs_and_deletes_under_a_quota_do_not_deadlock(make_engine: EngineFactory) -> None:
    """A plug counts every region's stray memory (their mutexes) while a delete,
    holding its region's mutex, returns quota: neither may wait for the other."""
    engine = make_engine(max_bytes=256 * MiB)
    engine.create_region(shmem("steady", 8 * MiB))
    errors: list[BaseException] = []
    stop = threading.Event()

    def plugs() -> None:
        try:
            while not stop.is_set():
                engine.plug("steady", 0, 2 * MiB)
                engine.unplug("steady", 0, 2 * MiB)
        except BaseException as exc:
            errors.append(exc)

    def deletes() -> None:
        try:
            for i in range(300):
                engine.create_region(shmem(f"brief{i}", 2 * MiB))
                engine.plug(f"brief{i}", 0, 2 * MiB)
                engine.delete_region(f"brief{i}")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=plugs, daemon=True) for _ in range(2)]
    deleter = threading.Thread(target=deletes, daemon=True)
    for t in [*workers, deleter]:
        t.start()
    deleter.join(60)
    stop.set()
    for t in workers:
        t.join(10)
    assert not deleter.is_alive() and not any(t.is_alive() for t in workers), "deadlocked"
    assert not errors, errors


def test_delete_returns_quota(make_engine: EngineFactory) -> None:
    engine = make_engine(max_bytes=16 * MiB)
    engine.create_region(shmem("a", 16 * MiB))
    engine.create_region(shmem("b", 16 * MiB))
    engine.plug("a", 0, 16 * MiB)
    with pytest.raises(QuotaExceeded):
        engine.plug("b", 0, 2 * MiB)
    engine.delete_region("a")
    assert engine.plugged_total == 0
    with pytest.raises(NotFound):
        engine.get_region("a")
    assert engine.plug("b", 0, 16 * MiB).bytes == 16 * MiB
    assert engine.status().plugged_bytes == 16 * MiB


# --------------------------------------------------------------------------- rollback


def test_failed_file_plug_rolls_back_but_keeps_data_that_was_there(
    make_engine: EngineFactory, small_tmpfs: Callable[[str], Path]
) -> None:
    mnt = small_tmpfs("100M")
    path = mnt / "guest.img"
    # A sparse 192 MiB file on a 100 MiB tmpfs, with data in two unplugged blocks.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 192 * MiB)
        os.pwrite(fd, b"first chunk data", 2 * MiB + 100)
        os.pwrite(fd, b"third chunk data", 130 * MiB)
    finally:
        os.close(fd)
    before = used_bytes(mnt)

    engine = make_engine(allow_dirs=[mnt])
    spec = RegionSpec(name="file0", size=0, backing=BackingKind.FILE, path=str(path))
    info = engine.create_region(spec)
    assert info.size == 192 * MiB

    # fallocate in 64 MiB chunks: the first fits, the second fills the tmpfs.
    with pytest.raises(NoSpace, match="rolled back") as err:
        engine.plug("file0", 0, 192 * MiB)
    assert err.value.region == "file0"

    assert used_bytes(mnt) == before, "the failed plug left memory allocated"
    assert engine.get_region("file0").plugged == ()
    assert engine.plugged_total == 0
    with path.open("rb") as f:
        f.seek(2 * MiB + 100)
        assert f.read(16) == b"first chunk data"
        f.seek(130 * MiB)
        assert f.read(16) == b"third chunk data"

    # The region still works within what the tmpfs holds.
    assert engine.plug("file0", 0, 32 * MiB).bytes == 32 * MiB
    with path.open("rb") as f:
        f.seek(2 * MiB + 100)
        assert f.read(16) == b"first chunk data"


def test_failed_hugetlb_plug_rolls_back(
    engine: RegionEngine, hugetlb_pool: Callable[[int], None]
) -> None:
    hugetlb_pool(3)
    engine.create_region(
        RegionSpec(name="h", size=16 * MiB, backing=BackingKind.HUGETLB, page_size=HUGE_2M)
    )
    with pytest.raises(PoolExhausted, match="rolled back"):
        engine.plug("h", 0, 16 * MiB)
    assert engine.get_region("h").allocated_bytes == 0
    assert engine.plugged_total == 0
    result = engine.plug("h", 0, 6 * MiB)
    assert result.strategy == "populate-write"
    assert result.region.allocated_bytes == 6 * MiB
    engine.delete_region("h")
    assert engine.plugged_total == 0


def mappings_of(name: str) -> list[str]:
    """Address ranges of this process's mappings of the region's memfd."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return [line.split()[0] for line in maps if f"/memfd:memplug:{name} " in line]


def test_hugetlb_plugs_reuse_one_mapping_that_delete_removes(
    engine: RegionEngine, hugetlb_pool: Callable[[int], None]
) -> None:
    # mmap and munmap per plug cost ~1% of a 1 GiB plug: the populate mapping
    # is made once and kept, and must not outlive the region.
    hugetlb_pool(4)
    engine.create_region(
        RegionSpec(name="hmap", size=8 * MiB, backing=BackingKind.HUGETLB, page_size=HUGE_2M)
    )
    assert mappings_of("hmap") == []
    engine.plug("hmap", 0, 4 * MiB)
    kept = mappings_of("hmap")
    assert len(kept) == 1, f"the plug left {kept} mapped"
    engine.populate("hmap", 0, 4 * MiB, write=True)
    engine.unplug("hmap", 0, 2 * MiB)
    engine.plug("hmap", 0, 8 * MiB)
    assert mappings_of("hmap") == kept, "a later call mapped the region again"
    assert engine.get_region("hmap").allocated_bytes == 8 * MiB
    engine.delete_region("hmap")
    assert mappings_of("hmap") == [], "the mapping outlived the region"


# --------------------------------------------------------------------------- fallbacks

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json
    from memplug.daemon.backings import BackingKind
    from memplug.daemon.engine.engine import RegionEngine
    from memplug.daemon.engine.region import RegionSpec
    from memplug.common.errors import PoolExhausted

    MiB = 1 << 20
    engine = RegionEngine(threads=2, madv_populate=False)
    out = {"madv_populate": engine.status().madv_populate}
    try:
        spec = RegionSpec(name="h", size=8 * MiB, backing=BackingKind.HUGETLB, page_size=2 * MiB)
        engine.create_region(spec)
        plug = engine.plug("h", 0, 4 * MiB)
        out["plug"] = [plug.strategy, plug.bytes, plug.region.allocated_bytes]
        populate = engine.populate("h", 0, 4 * MiB, write=True)
        out["populate"] = [populate.strategy, populate.bytes]
        try:
            engine.plug("h", 0, 8 * MiB)  # 2 more pages, the pool has 1
            out["overflow"] = "no error"
        except PoolExhausted as exc:
            out["overflow"] = type(exc).__name__
        out["after_overflow"] = engine.get_region("h").allocated_bytes
        out["plugged_after_overflow"] = engine.plugged_total
    finally:
        engine.shutdown()
    print(json.dumps(out))
    """
)


def test_forced_fallbacks_without_madv_populate(hugetlb_pool: Callable[[int], None]) -> None:
    require(probe.has_memfd_hugetlb(HUGE_2M), "no 2 MiB hugetlb memfds")
    hugetlb_pool(3)
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["madv_populate"] is False
    assert out["plug"] == ["fallocate", 4 * MiB, 4 * MiB]
    assert out["populate"] == ["touch-read", 4 * MiB]
    # fallocate beyond the pool keeps the pages it got; the rollback punches them.
    assert out["overflow"] == "PoolExhausted"
    assert out["after_overflow"] == 4 * MiB
    assert out["plugged_after_overflow"] == 4 * MiB


# --------------------------------------------------------------------------- shutdown


def test_shutdown_cancels_a_running_plug_and_rolls_it_back(engine: RegionEngine) -> None:
    size = 4 * GiB
    engine.create_region(shmem("big", size))
    fd = dup_fd(engine, "big")
    started = threading.Event()
    outcome: list[BaseException | None] = []

    def progress(done: int, total: int) -> None:
        if done:
            started.set()

    def run() -> None:
        try:
            engine.plug("big", 0, size, progress=progress)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(30), "the plug made no progress"
        engine.shutdown(timeout=30)
        thread.join(30)
        assert not thread.is_alive()
        assert len(outcome) == 1
        exc = outcome[0]
        assert isinstance(exc, Cancelled), f"the plug ended with {exc!r}"
        assert "shutting down" in str(exc) and "rolled back" in str(exc)
        assert ops.allocated_bytes(fd) == 0, "the cancelled plug left memory allocated"
        assert engine.plugged_total == 0
    finally:
        os.close(fd)
    # After shutdown nothing new starts.
    with pytest.raises(Cancelled, match="shutting down"):
        engine.create_region(shmem("late", 2 * MiB))
