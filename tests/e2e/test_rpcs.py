"""Every RPC through a real memplugd on a real Unix socket, with the raw generated stub.

Happy paths first, then each error code the API promises: the code, the
trailing "memplug-error" class, never INTERNAL, the daemon still alive and
the daemon's state unchanged by the rejected request.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from conftest import (
    ERROR_KEY,
    HUGE_2M,
    MAP_NORESERVE,
    DaemonProcess,
    GiB,
    MiB,
    create,
    error_class,
    get,
    huge_free,
    open_region_fd,
    require,
    require_root,
    spans,
)

from memplug.v1 import memplug_pb2 as pb

Code = grpc.StatusCode
Factory = Callable[..., DaemonProcess]


# --------------------------------------------------------------------------- helpers


def names(daemon: DaemonProcess, **selector: str) -> list[str]:
    listed = daemon.stub.ListRegions(pb.ListRegionsRequest(label_selector=selector))
    return [r.name for r in listed.regions]


def snapshot(daemon: DaemonProcess) -> list[tuple[str, int, list[tuple[int, int]], int]]:
    """What a rejected request must leave alone: regions, their plugged blocks and memory."""
    regions = daemon.stub.ListRegions(pb.ListRegionsRequest()).regions
    return [(r.name, r.size, spans(r), r.allocated_bytes) for r in regions]


def expect_error(
    daemon: DaemonProcess,
    code: grpc.StatusCode,
    cls: str,
    call: Callable[[], object],
    what: str = "",
    *,
    same_state: bool = True,
) -> grpc.RpcError:
    """call() must fail with code and error class, change nothing and leave the daemon up.

    same_state=False where another operation is changing the state meanwhile.
    """
    before = snapshot(daemon) if same_state else None
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    where = f"[{what}] " if what else ""
    assert err.code() is not Code.INTERNAL, f"{where}INTERNAL is a daemon bug: {err.details()}"
    assert err.code() is code, (
        f"{where}expected {code.name}, got {err.code().name}: {err.details()}"
    )
    assert error_class(err) == cls, f"{where}trailing {ERROR_KEY}: {err.trailing_metadata()}"
    assert err.details(), f"{where}an error must say what went wrong"
    assert daemon.alive(), f"{where}memplugd died:\n{daemon.log()}"
    if before is not None:
        assert snapshot(daemon) == before, f"{where}a rejected request changed the daemon's state"
    return err


def drain(stream: Iterable[pb.Progress]) -> list[pb.Progress]:
    return list(stream)


def plug_stream(daemon: DaemonProcess, name: str, offset: int, length: int, **kw: object) -> object:
    return drain(
        daemon.stub.Plug(pb.PlugRequest(name=name, offset=offset, length=length, **kw))  # type: ignore[arg-type]
    )


def check_stream(messages: list[pb.Progress], total: int) -> pb.OperationResult:
    """A Plug/Populate stream: progress never goes back, the last message carries the result."""
    assert messages, "empty progress stream"
    *progress, last = messages
    assert last.HasField("result"), "the stream must end with a result"
    for msg in progress:
        assert not msg.HasField("result"), "only the last message carries the result"
        assert msg.total_bytes == total
        assert msg.done_bytes <= msg.total_bytes
    done = [m.done_bytes for m in messages]
    assert done == sorted(done), f"done_bytes went backwards: {done}"
    assert last.done_bytes == last.total_bytes == last.result.bytes
    return last.result


@contextlib.contextmanager
def mapped(fd: int, offset: int, length: int) -> Iterator[mmap.mmap]:
    """A shared mapping of [offset, offset+length) of fd; no hugetlb reservation."""
    m = mmap.mmap(fd, length, mmap.MAP_SHARED | MAP_NORESERVE, offset=offset)
    try:
        yield m
    finally:
        m.close()


@contextlib.contextmanager
def region_memory(
    daemon: DaemonProcess, name: str, offset: int, length: int
) -> Iterator[mmap.mmap]:
    fd = open_region_fd(daemon, name)
    try:
        with mapped(fd, offset, length) as m:
            yield m
    finally:
        os.close(fd)


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


# --------------------------------------------------------------------------- happy paths


def test_create_get_list_delete_shmem(daemon: DaemonProcess) -> None:
    t0 = time.time()
    region = create(daemon, "vm0", 64 * MiB, labels={"app": "qemu"})
    assert region.name == "vm0"
    assert region.size == 64 * MiB
    assert region.backing == pb.BACKING_SHMEM
    assert region.page_size == os.sysconf("SC_PAGE_SIZE")
    assert region.block_size == 2 * MiB
    assert region.path == ""
    assert dict(region.labels) == {"app": "qemu"}
    assert list(region.plugged) == [] and region.plugged_bytes == 0
    assert region.allocated_bytes == 0
    assert t0 - 1 <= region.created_at <= time.time() + 1
    assert region.owner_uid == 0

    assert get(daemon, "vm0") == region
    assert names(daemon) == ["vm0"]

    assert daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="vm0")) == pb.DeleteRegionResponse()
    assert names(daemon) == []
    expect_error(daemon, Code.NOT_FOUND, "NotFound", lambda: get(daemon, "vm0"))
    # The name is free again.
    assert create(daemon, "vm0", 4 * MiB, block_size=4 * MiB).block_size == 4 * MiB


def test_create_hugetlb(daemon: DaemonProcess, hugetlb_pool: Callable[[int], None]) -> None:
    own_pool(hugetlb_pool, 16)
    region = create(daemon, "huge", 32 * MiB, pb.BACKING_HUGETLB)
    assert region.backing == pb.BACKING_HUGETLB
    assert region.page_size == HUGE_2M  # 0 means the kernel's default huge page size
    assert region.block_size == 2 * MiB
    assert region.allocated_bytes == 0
    explicit = create(daemon, "huge2", 8 * MiB, pb.BACKING_HUGETLB, page_size=HUGE_2M)
    assert explicit.page_size == HUGE_2M
    assert huge_free() == 16, "creating a hugetlb region must not take pages"

    result = daemon.plug("huge", 0, 32 * MiB)
    assert result.bytes == 32 * MiB
    assert result.region.allocated_bytes == 32 * MiB
    assert huge_free() == 0
    out = daemon.stub.Unplug(pb.RangeRequest(name="huge", offset=0, length=32 * MiB))
    assert out.bytes == 32 * MiB and out.region.allocated_bytes == 0
    assert huge_free() == 16
    daemon.plug("huge2", 0, 8 * MiB)
    assert huge_free() == 12
    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="huge2"))
    assert huge_free() == 16, "deleting a region the daemon alone holds frees its pages"


def test_create_file_in_allow_dir(daemon_factory: Factory, tmp_path: Path) -> None:
    allow = tmp_path / "allowed"
    allow.mkdir()
    daemon = daemon_factory("--allow-dir", str(allow))

    region = create(daemon, "f1", 64 * MiB, pb.BACKING_FILE, path="vm.img")
    file = allow / "vm.img"
    assert region.backing == pb.BACKING_FILE
    assert region.path == str(file)
    assert region.page_size == os.sysconf("SC_PAGE_SIZE")
    assert file.is_file() and file.stat().st_size == 64 * MiB
    assert region.allocated_bytes == 0

    # Absolute paths inside the allowed dir work too; so does adopting a file (size 0).
    other = allow / "sub" / "disk.img"
    other.parent.mkdir()
    other.write_bytes(b"\0" * (4 * MiB))
    adopted = create(daemon, "f2", 0, pb.BACKING_FILE, path=str(other))
    assert adopted.size == 4 * MiB and adopted.path == str(other)

    result = daemon.plug("f1", 0, 16 * MiB)
    assert result.bytes == 16 * MiB and result.region.allocated_bytes == 16 * MiB
    assert file.stat().st_blocks * 512 == 16 * MiB
    with file.open("r+b") as fh:
        fh.write(pattern(16 * MiB))
    assert daemon.populate("f1", 0, 16 * MiB, write=False).bytes == 16 * MiB
    assert file.read_bytes()[: 16 * MiB] == pattern(16 * MiB)

    daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="f1"))
    assert file.is_file(), "a FILE region's file stays on disk"
    assert file.read_bytes()[: 16 * MiB] == pattern(16 * MiB)
    assert names(daemon) == ["f2"]


def test_list_regions_label_selector(daemon: DaemonProcess) -> None:
    create(daemon, "b-vm", 2 * MiB, labels={"app": "qemu", "tier": "gold"})
    create(daemon, "a-vm", 2 * MiB, labels={"app": "qemu", "tier": "silver"})
    create(daemon, "c-db", 2 * MiB, labels={"app": "db"})
    create(daemon, "d-bare", 2 * MiB)

    assert names(daemon) == ["a-vm", "b-vm", "c-db", "d-bare"]  # in name order
    assert names(daemon, app="qemu") == ["a-vm", "b-vm"]
    assert names(daemon, app="qemu", tier="gold") == ["b-vm"]
    assert names(daemon, app="db") == ["c-db"]
    assert names(daemon, app="qemu", tier="bronze") == []
    assert names(daemon, tier="") == [], "a missing label does not match an empty value"
    assert names(daemon, nope="x") == []


def test_plug_streams_progress_to_a_result(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 512 * MiB)
    messages = drain(daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=512 * MiB)))
    result = check_stream(messages, 512 * MiB)
    assert result.bytes == 512 * MiB
    assert result.strategy == "fallocate"
    assert result.threads >= 1 and result.seconds > 0
    assert spans(result.region) == [(0, 512 * MiB)]
    assert result.region.plugged_bytes == 512 * MiB
    assert result.region.allocated_bytes == 512 * MiB
    assert get(daemon, "vm") == result.region

    # Already plugged blocks are left alone and not counted.
    with region_memory(daemon, "vm", 0, 2 * MiB) as m:
        m[:] = pattern(2 * MiB)
    again = check_stream(
        drain(daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=64 * MiB))), 0
    )
    assert again.bytes == 0 and again.region.allocated_bytes == 512 * MiB
    with region_memory(daemon, "vm", 0, 2 * MiB) as m:
        assert m[:] == pattern(2 * MiB)


@pytest.mark.parametrize(
    ("strategy", "threads", "expected"),
    [
        (pb.STRATEGY_FALLOCATE, 0, "fallocate"),
        (pb.STRATEGY_POPULATE_WRITE, 2, "populate-write"),
    ],
)
def test_plug_strategies_progress_never_decreases(
    daemon: DaemonProcess, strategy: int, threads: int, expected: str
) -> None:
    size = 512 * MiB
    create(daemon, "vm", size)
    # Some blocks already plugged: the call works only on the gaps.
    daemon.plug("vm", 64 * MiB, 64 * MiB)
    messages = drain(
        daemon.stub.Plug(
            pb.PlugRequest(name="vm", offset=0, length=size, strategy=strategy, threads=threads)  # type: ignore[arg-type]
        )
    )
    result = check_stream(messages, size - 64 * MiB)
    assert result.bytes == size - 64 * MiB
    assert result.strategy == expected
    assert spans(result.region) == [(0, size)]
    assert result.region.allocated_bytes == size


@pytest.mark.parametrize("write", [False, True])
def test_populate(daemon: DaemonProcess, write: bool) -> None:
    create(daemon, "vm", 128 * MiB)
    daemon.plug("vm", 0, 128 * MiB)
    with region_memory(daemon, "vm", 0, 4 * MiB) as m:
        m[:] = pattern(4 * MiB)
    mode = pb.POPULATE_MODE_WRITE if write else pb.POPULATE_MODE_READ
    messages = drain(
        daemon.stub.Populate(pb.PopulateRequest(name="vm", offset=0, length=128 * MiB, mode=mode))
    )
    result = check_stream(messages, 128 * MiB)
    assert result.bytes == 128 * MiB
    assert result.strategy == ("populate-write" if write else "populate-read")
    assert spans(result.region) == [(0, 128 * MiB)]
    assert result.region.allocated_bytes == 128 * MiB, "populating plugged memory allocates nothing"
    with region_memory(daemon, "vm", 0, 4 * MiB) as m:
        assert m[:] == pattern(4 * MiB), "populate must not change contents"


def test_unplug(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 64 * MiB)
    daemon.plug("vm", 0, 64 * MiB)
    out = daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=16 * MiB, length=16 * MiB))
    assert out.bytes == 16 * MiB
    assert spans(out.region) == [(0, 16 * MiB), (32 * MiB, 32 * MiB)]
    assert out.region.plugged_bytes == 48 * MiB
    assert out.region.allocated_bytes == 48 * MiB
    # Unplugging what is unplugged already is fine and drops nothing.
    again = daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=16 * MiB, length=16 * MiB))
    assert again.bytes == 0 and again.region.allocated_bytes == 48 * MiB
    # A range straddling plugged and unplugged blocks counts only the plugged ones.
    mixed = daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=0, length=64 * MiB))
    assert mixed.bytes == 48 * MiB
    assert list(mixed.region.plugged) == [] and mixed.region.allocated_bytes == 0


def test_discard_zeroes_and_keeps_blocks_plugged(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 64 * MiB)
    daemon.plug("vm", 0, 64 * MiB)
    data = pattern(64 * MiB)
    with region_memory(daemon, "vm", 0, 64 * MiB) as m:
        m[:] = data
        before = get(daemon, "vm")
        out = daemon.stub.Discard(pb.RangeRequest(name="vm", offset=16 * MiB, length=16 * MiB))
        assert out.bytes == 16 * MiB
        assert spans(out.region) == [(0, 64 * MiB)], "discard keeps blocks plugged"
        assert out.region.allocated_bytes == before.allocated_bytes == 64 * MiB
        assert m[16 * MiB : 32 * MiB] == bytes(16 * MiB), "discarded memory reads as zero"
        assert m[: 16 * MiB] == data[: 16 * MiB]
        assert m[32 * MiB :] == data[32 * MiB :]
    assert get(daemon, "vm").allocated_bytes == 64 * MiB


def test_discard_hugetlb(daemon: DaemonProcess, hugetlb_pool: Callable[[int], None]) -> None:
    own_pool(hugetlb_pool, 8)
    create(daemon, "huge", 16 * MiB, pb.BACKING_HUGETLB)
    daemon.plug("huge", 0, 16 * MiB)
    assert huge_free() == 0
    with region_memory(daemon, "huge", 0, 16 * MiB) as m:
        m[:] = pattern(16 * MiB)
        out = daemon.stub.Discard(pb.RangeRequest(name="huge", offset=4 * MiB, length=8 * MiB))
        assert out.bytes == 8 * MiB
        assert spans(out.region) == [(0, 16 * MiB)]
        assert out.region.allocated_bytes == 16 * MiB
        assert huge_free() == 0
        assert m[4 * MiB : 12 * MiB] == bytes(8 * MiB)
        assert m[: 4 * MiB] == pattern(16 * MiB)[: 4 * MiB]


def test_get_status(daemon_factory: Factory) -> None:
    daemon = daemon_factory("--max-bytes", "1G", "--threads", "2")
    status = daemon.stub.GetStatus(pb.GetStatusRequest())
    assert status.version
    assert status.uptime_seconds > 0
    assert status.regions == 0 and status.plugged_bytes == 0 and status.allocated_bytes == 0
    assert status.quota_bytes == GiB
    assert status.threads == 2
    assert status.madv_populate  # Linux >= 5.14
    assert status.socket == str(daemon.socket)
    assert status.fd_socket == str(daemon.fd_socket)
    assert HUGE_2M in [p.page_size for p in status.hugetlb_pools]

    create(daemon, "a", 64 * MiB)
    create(daemon, "b", 64 * MiB)
    daemon.plug("a", 0, 32 * MiB)
    daemon.plug("b", 0, 8 * MiB)
    status = daemon.stub.GetStatus(pb.GetStatusRequest())
    assert status.regions == 2
    assert status.plugged_bytes == 40 * MiB
    assert status.allocated_bytes == 40 * MiB
    later = daemon.stub.GetStatus(pb.GetStatusRequest())
    assert later.uptime_seconds >= status.uptime_seconds


def test_get_status_reports_pools(
    daemon: DaemonProcess, hugetlb_pool: Callable[[int], None]
) -> None:
    own_pool(hugetlb_pool, 6)
    create(daemon, "huge", 8 * MiB, pb.BACKING_HUGETLB)
    daemon.plug("huge", 0, 4 * MiB)
    pools = {p.page_size: p for p in daemon.stub.GetStatus(pb.GetStatusRequest()).hugetlb_pools}
    assert pools[HUGE_2M].total == 6
    assert pools[HUGE_2M].free == 4


@contextlib.contextmanager
def files_opened_by(pid: int, log: Path) -> Iterator[list[str]]:
    """The paths the process (all its threads) opens inside the block, by strace."""
    require(shutil.which("strace") is not None, "strace is not installed")
    threads = len(os.listdir(f"/proc/{pid}/task"))
    tracer = subprocess.Popen(
        ["strace", "-f", "-e", "trace=open,openat,openat2", "-o", str(log), "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tracer.stderr is not None
    attached = 0
    while attached < threads:  # "Process N attached with M threads", or a line per thread
        line = tracer.stderr.readline()
        assert line, f"strace could not attach to pid {pid}"
        if re.search(r"attached with \d+ threads", line):
            break  # strace attaches every thread before it says so
        attached += "attached" in line
    opened: list[str] = []
    try:
        yield opened
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        tracer.stderr.close()
    opened += [line.split('"')[1] for line in log.read_text().splitlines() if '"' in line]


def test_get_status_reads_pool_counts_anew_and_opens_no_file(
    daemon: DaemonProcess, hugetlb_pool: Callable[[int], None], tmp_path: Path
) -> None:
    """What can change (a pool's size) shows at the next call; what cannot (page
    sizes, nodes) is looked up once, and the counts are read from files kept open."""
    pool_file = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_2M // 1024}kB/nr_hugepages")

    def pool_total() -> int:
        status = daemon.stub.GetStatus(pb.GetStatusRequest())
        return {p.page_size: p.total for p in status.hugetlb_pools}[HUGE_2M]

    before = int(pool_file.read_text())
    assert pool_total() == before
    hugetlb_pool(before + 1)
    assert pool_total() == before + 1, "a change of nr_hugepages must show at the next call"
    with files_opened_by(daemon.proc.pid, tmp_path / "strace.log") as opened:
        for _ in range(5):
            daemon.stub.GetStatus(pb.GetStatusRequest())
    # gRPC's own runtime (absl's clock) reads tsc_freq_khz when it starts a
    # thread; that is not GetStatus's work and not ours to cache.
    kernel_files = [
        f
        for f in opened
        if f.startswith(("/sys/", "/proc/")) and not f.startswith("/sys/devices/system/cpu/")
    ]
    assert not kernel_files, (
        f"5 GetStatus calls opened {len(kernel_files)} files: {sorted(set(kernel_files))}"
    )


# --------------------------------------------------------------------------- INVALID_ARGUMENT

BAD_NAMES = ["", "A", "Vm", "x" * 64, "../x", "a/b", "-a", ".a", "a b", "vm\n", "é"]


def test_create_invalid_argument(daemon: DaemonProcess) -> None:
    create(daemon, "keep")
    for name in BAD_NAMES:
        expect_error(
            daemon, Code.INVALID_ARGUMENT, "InvalidArgument", partial(create, daemon, name), name
        )
    bad_shmem: list[tuple[int, dict[str, object]]] = [
        (0, {}),
        (3 * MiB, {}),  # not a multiple of the 2 MiB block
        (4096, {}),
        (64 * MiB, {"block_size": 3 * MiB}),  # not a power of two
        (64 * MiB, {"block_size": 1024}),  # below the page size
        (64 * MiB, {"page_size": HUGE_2M}),  # huge pages are for HUGETLB regions
        (64 * MiB, {"page_size": 12345}),
        (64 * MiB, {"path": "/tmp/memplug-test-x.img"}),  # path is for FILE regions only
        (64 * MiB, {"labels": {"-bad": "x"}}),
        (64 * MiB, {"labels": {f"k{i}": "v" for i in range(65)}}),
        (64 * MiB, {"owner_uid": 0xFFFFFFFF}),  # (uid_t)-1 is no uid
        (64 * MiB, {"allowed_uids": [0xFFFFFFFF]}),
        (1 << 57, {}),  # beyond any machine
        ((1 << 64) - 2 * MiB, {}),  # the largest block-aligned uint64
    ]
    for size, kw in bad_shmem:
        expect_error(
            daemon,
            Code.INVALID_ARGUMENT,
            "InvalidArgument",
            partial(create, daemon, "vm", size, pb.BACKING_SHMEM, **kw),
            f"shmem size={size} {kw}",
        )
    assert not Path("/tmp/memplug-test-x.img").exists()
    for backing in (pb.BACKING_UNSPECIFIED, 9):
        expect_error(
            daemon,
            Code.INVALID_ARGUMENT,
            "InvalidArgument",
            partial(create, daemon, "vm", 64 * MiB, backing),
            f"backing={backing}",
        )
    bad_hugetlb: list[tuple[int, dict[str, object]]] = [
        (64 * MiB, {"page_size": 12345}),
        (64 * MiB, {"page_size": 4096}),
        (64 * MiB, {"page_size": 3 * MiB}),
        (64 * MiB, {"page_size": 4 * GiB}),
        (0, {}),
        (3 * MiB, {}),
        (64 * MiB, {"block_size": MiB}),  # below the huge page size
        (64 * MiB, {"path": "/tmp/memplug-test-x.img"}),
    ]
    for size, kw in bad_hugetlb:
        expect_error(
            daemon,
            Code.INVALID_ARGUMENT,
            "InvalidArgument",
            partial(create, daemon, "huge", size, pb.BACKING_HUGETLB, **kw),
            f"hugetlb size={size} {kw}",
        )
    assert names(daemon) == ["keep"]


def test_longest_name_is_fine(daemon: DaemonProcess) -> None:
    assert create(daemon, "x" * 63).name == "x" * 63
    assert create(daemon, "0a._-z").name == "0a._-z"


def range_call(daemon: DaemonProcess, rpc: str, name: str, offset: int, length: int) -> object:
    """Run one range RPC to its end (streams drained)."""
    if rpc == "Populate":
        return drain(
            daemon.stub.Populate(
                pb.PopulateRequest(
                    name=name, offset=offset, length=length, mode=pb.POPULATE_MODE_WRITE
                )
            )
        )
    if rpc == "Plug":
        return drain(daemon.stub.Plug(pb.PlugRequest(name=name, offset=offset, length=length)))
    request = pb.RangeRequest(name=name, offset=offset, length=length)
    if rpc == "Unplug":
        return daemon.stub.Unplug(request)
    assert rpc == "Discard"
    return daemon.stub.Discard(request)


RANGE_RPCS = ["Plug", "Populate", "Unplug", "Discard"]
TOP = (1 << 64) - 2 * MiB  # the highest block-aligned uint64 offset
BAD_RANGES: list[tuple[int, int, grpc.StatusCode, str]] = [
    (4096, 2 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),  # misaligned offset
    (0, 2 * MiB + 4096, Code.INVALID_ARGUMENT, "InvalidArgument"),  # misaligned length
    (0, 4096, Code.INVALID_ARGUMENT, "InvalidArgument"),
    # length 0 is "to the end of the region" (test_length_zero_means_to_the_end):
    # bad only when the offset is.
    (4096, 0, Code.INVALID_ARGUMENT, "InvalidArgument"),  # misaligned offset, to the end
    (64 * MiB, 0, Code.OUT_OF_RANGE, "OutOfRange"),  # nothing left after the end
    (TOP, 0, Code.OUT_OF_RANGE, "OutOfRange"),
    ((1 << 64) - 1, 2 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),
    (62 * MiB, 4 * MiB, Code.OUT_OF_RANGE, "OutOfRange"),  # past the end
    (64 * MiB, 2 * MiB, Code.OUT_OF_RANGE, "OutOfRange"),  # starts at the end
    (0, 66 * MiB, Code.OUT_OF_RANGE, "OutOfRange"),
    (TOP, 4 * MiB, Code.OUT_OF_RANGE, "OutOfRange"),  # offset + length > 2**64 - 1
    (TOP, 2 * MiB, Code.OUT_OF_RANGE, "OutOfRange"),  # ends exactly at 2**64
    (2 * MiB, TOP, Code.OUT_OF_RANGE, "OutOfRange"),  # wraps around in 64 bits
    (TOP, TOP, Code.OUT_OF_RANGE, "OutOfRange"),
]


def test_bad_ranges(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 64 * MiB)
    daemon.plug("vm", 0, 64 * MiB)  # so that only the range itself is at fault
    for rpc in RANGE_RPCS:
        for offset, length, code, cls in BAD_RANGES:
            expect_error(
                daemon,
                code,
                cls,
                partial(range_call, daemon, rpc, "vm", offset, length),
                f"{rpc} offset={offset:#x} length={length:#x}",
            )


def test_length_zero_means_to_the_end(daemon: DaemonProcess) -> None:
    """Every range RPC takes length 0 as "to the end": no GetRegion needed for the size."""
    create(daemon, "vm", 64 * MiB)
    result = check_stream(drain(daemon.stub.Plug(pb.PlugRequest(name="vm"))), 64 * MiB)
    assert result.bytes == 64 * MiB and spans(result.region) == [(0, 64 * MiB)]
    assert result.region.allocated_bytes == 64 * MiB

    populated = drain(
        daemon.stub.Populate(
            pb.PopulateRequest(name="vm", offset=48 * MiB, mode=pb.POPULATE_MODE_WRITE)
        )
    )
    assert populated[-1].result.bytes == 16 * MiB

    with region_memory(daemon, "vm", 0, 64 * MiB) as m:
        m[:] = b"\xa5" * (64 * MiB)
        discarded = daemon.stub.Discard(pb.RangeRequest(name="vm", offset=32 * MiB))
        assert discarded.bytes == 32 * MiB
        assert spans(discarded.region) == [(0, 64 * MiB)]
        assert m[32 * MiB :] == bytes(32 * MiB), "discarded to the end: zeros"
        assert m[: 32 * MiB] == b"\xa5" * (32 * MiB), "before the offset: kept"

    unplugged = daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=16 * MiB))
    assert unplugged.bytes == 48 * MiB
    assert spans(unplugged.region) == [(0, 16 * MiB)]
    assert unplugged.region.allocated_bytes == 16 * MiB

    # An offset that leaves nothing to the end is out of range, and says so.
    err = expect_error(
        daemon,
        Code.OUT_OF_RANGE,
        "OutOfRange",
        lambda: daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=64 * MiB)),
    )
    assert "end of the region" in (err.details() or "")


def populate_mode(daemon: DaemonProcess, mode: int) -> object:
    request = pb.PopulateRequest(name="vm", offset=0, length=2 * MiB, mode=mode)  # type: ignore[arg-type]
    return drain(daemon.stub.Populate(request))


def test_bad_modes_and_strategies(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 64 * MiB)
    daemon.plug("vm", 0, 64 * MiB)
    for mode in (pb.POPULATE_MODE_UNSPECIFIED, 7):
        expect_error(
            daemon,
            Code.INVALID_ARGUMENT,
            "InvalidArgument",
            partial(populate_mode, daemon, mode),
            f"populate mode={mode}",
        )
    create(daemon, "empty", 64 * MiB)
    expect_error(
        daemon,
        Code.INVALID_ARGUMENT,
        "InvalidArgument",
        lambda: plug_stream(daemon, "empty", 0, 2 * MiB, strategy=9),
        "plug strategy=9",
    )


# --------------------------------------------------------------------------- NOT_FOUND


def test_not_found(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 64 * MiB)
    calls: dict[str, Callable[[], object]] = {
        "GetRegion": lambda: get(daemon, "nope"),
        "DeleteRegion": lambda: daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="nope")),
    }
    for rpc in RANGE_RPCS:
        calls[rpc] = partial(range_call, daemon, rpc, "nope", 0, 2 * MiB)
    for rpc, call in calls.items():
        err = expect_error(daemon, Code.NOT_FOUND, "NotFound", call, rpc)
        assert "nope" in (err.details() or ""), rpc


# --------------------------------------------------------------------------- ALREADY_EXISTS


def test_same_name_already_exists(daemon: DaemonProcess) -> None:
    first = create(daemon, "vm", 64 * MiB)
    daemon.plug("vm", 0, 8 * MiB)
    expect_error(daemon, Code.ALREADY_EXISTS, "AlreadyExists", lambda: create(daemon, "vm"))
    expect_error(
        daemon, Code.ALREADY_EXISTS, "AlreadyExists", lambda: create(daemon, "vm", 2 * MiB)
    )
    region = get(daemon, "vm")
    assert region.size == first.size and region.created_at == first.created_at
    assert spans(region) == [(0, 8 * MiB)]


def test_file_region_already_exists(daemon_factory: Factory, tmp_path: Path) -> None:
    allow = tmp_path / "allowed"
    (allow / "sub").mkdir(parents=True)
    daemon = daemon_factory("--allow-dir", str(allow))
    create(daemon, "f1", 64 * MiB, pb.BACKING_FILE, path="vm.img")
    daemon.plug("f1", 0, 8 * MiB)
    file = allow / "vm.img"
    with file.open("r+b") as fh:
        fh.write(pattern(8 * MiB))
    (allow / "link.img").symlink_to("vm.img")

    # A second region on the same file, however the path is spelled.
    for spelling in ["vm.img", str(file), "sub/../vm.img", "./vm.img", "link.img"]:
        for size in (64 * MiB, 0):
            expect_error(
                daemon,
                Code.ALREADY_EXISTS,
                "AlreadyExists",
                partial(create, daemon, "f2", size, pb.BACKING_FILE, path=spelling),
                f"path={spelling} size={size}",
            )
    # A taken name creates no file.
    expect_error(
        daemon,
        Code.ALREADY_EXISTS,
        "AlreadyExists",
        lambda: create(daemon, "f1", 64 * MiB, pb.BACKING_FILE, path="new.img"),
    )
    assert sorted(p.name for p in allow.iterdir()) == ["link.img", "sub", "vm.img"]
    assert file.stat().st_size == 64 * MiB
    assert file.read_bytes()[: 8 * MiB] == pattern(8 * MiB)
    assert spans(get(daemon, "f1")) == [(0, 8 * MiB)]


# --------------------------------------------------------------------------- FAILED_PRECONDITION


def test_failed_precondition(daemon: DaemonProcess, tmp_path: Path) -> None:
    create(daemon, "vm", 64 * MiB)
    for rpc in ("Populate", "Discard"):
        expect_error(
            daemon,
            Code.FAILED_PRECONDITION,
            "FailedPrecondition",
            partial(range_call, daemon, rpc, "vm", 0, 2 * MiB),
            f"{rpc} of unplugged blocks",
        )
    daemon.plug("vm", 0, 16 * MiB)
    fd = open_region_fd(daemon, "vm")
    try:
        with mapped(fd, 0, 16 * MiB) as m:
            m[:] = pattern(16 * MiB)
            # Partly plugged is not enough, and the plugged part is left alone.
            for rpc in ("Populate", "Discard"):
                expect_error(
                    daemon,
                    Code.FAILED_PRECONDITION,
                    "FailedPrecondition",
                    partial(range_call, daemon, rpc, "vm", 8 * MiB, 16 * MiB),
                    f"{rpc} of partly plugged blocks",
                )
            assert m[:] == pattern(16 * MiB)
    finally:
        os.close(fd)

    # FILE regions are off without --allow-dir.
    err = expect_error(
        daemon,
        Code.FAILED_PRECONDITION,
        "FailedPrecondition",
        lambda: create(daemon, "f", 64 * MiB, pb.BACKING_FILE, path=str(tmp_path / "vm.img")),
    )
    assert "--allow-dir" in (err.details() or "")
    assert not (tmp_path / "vm.img").exists()


def test_delete_while_plug_runs(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 4 * GiB)
    call = daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=4 * GiB))
    try:
        first = next(iter(call))
        assert not first.HasField("result") and first.done_bytes < first.total_bytes
        err = expect_error(
            daemon,
            Code.FAILED_PRECONDITION,
            "FailedPrecondition",
            lambda: daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="vm")),
            same_state=False,  # the plug goes on meanwhile
        )
        assert "busy" in (err.details() or "")
        assert names(daemon) == ["vm"]
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    # Once the plug has rolled back, the delete goes through.
    deadline = time.monotonic() + 20
    while True:
        try:
            daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name="vm"))
            break
        except grpc.RpcError as exc:
            assert exc.code() is Code.FAILED_PRECONDITION, exc.details()
            assert time.monotonic() < deadline, "the cancelled plug never ended"
            time.sleep(0.05)
    assert names(daemon) == []


# --------------------------------------------------------------------------- PERMISSION_DENIED


def test_file_paths(daemon_factory: Factory, tmp_path: Path) -> None:
    """PERMISSION_DENIED outside the allowed dir; odd paths inside get a proper code."""
    require_root("the daemon opens files as root")
    allow = tmp_path / "allowed"
    (allow / "dir").mkdir(parents=True)
    (allow / "small.img").write_bytes(b"x" * 4096)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.img"
    victim.write_bytes(b"precious" * 1024)
    (allow / "escape.img").symlink_to(victim)  # a symlink to an existing file outside
    (allow / "dangling.img").symlink_to(outside / "new.img")  # ... to a file not there yet
    (allow / "outdir").symlink_to(outside, target_is_directory=True)
    daemon = daemon_factory("--allow-dir", str(allow))
    create(daemon, "keep", 2 * MiB)
    inside_before = sorted(p.name for p in allow.iterdir())

    for path in [
        "../outside/new.img",
        "../outside/victim.img",
        "dir/../../outside/new.img",
        "nodir/../../outside/new.img",
        str(outside / "new.img"),
        str(victim),
        "/etc/passwd",
        f"{allow}/../outside/new.img",
        "escape.img",
        "dangling.img",
        "outdir/new.img",
        "outdir/victim.img",
        str(allow),  # the allowed dir itself is no file inside it
        ".",
    ]:
        for size in (2 * MiB, 0):
            expect_error(
                daemon,
                Code.PERMISSION_DENIED,
                "PermissionDenied",
                partial(create, daemon, "f", size, pb.BACKING_FILE, path=path),
                f"path={path} size={size}",
            )
    assert sorted(p.name for p in outside.iterdir()) == ["victim.img"], "created a file outside"
    assert victim.read_bytes() == b"precious" * 1024

    cases: list[tuple[str, int, grpc.StatusCode, str]] = [
        ("", 64 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),
        ("dir", 64 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),
        ("missing/vm.img", 64 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),
        ("new.img", 0, Code.INVALID_ARGUMENT, "InvalidArgument"),  # nothing to adopt
        ("new.img", 3 * MiB, Code.INVALID_ARGUMENT, "InvalidArgument"),
        ("small.img", 0, Code.INVALID_ARGUMENT, "InvalidArgument"),  # 4 KiB: not whole blocks
        ("small.img", 64 * MiB, Code.FAILED_PRECONDITION, "FailedPrecondition"),  # size differs
    ]
    for path, size, code, cls in cases:
        expect_error(
            daemon,
            code,
            cls,
            partial(create, daemon, "f", size, pb.BACKING_FILE, path=path),
            f"path={path!r} size={size}",
        )
    assert sorted(p.name for p in allow.iterdir()) == inside_before, "a failed create left a file"
    assert (allow / "small.img").read_bytes() == b"x" * 4096
