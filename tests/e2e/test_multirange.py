"""Plug, Unplug and Discard of a list of ranges in one call, against a real daemon.

The blocks plugged are checked on the kernel's side (st_blocks of the region's
memfd) as well as in the daemon's block map; refused lists must leave both as
they were.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import DaemonProcess, GiB, MiB, open_region_fd, start_daemon, stop_shared

from memplug.client import Client, InvalidArgument, MemplugError, OutOfRange, QuotaExceeded
from memplug.v1 import memplug_pb2 as pb

MEMPLUG = Path(sys.executable).parent / "memplug"
SIZE = 1 * GiB
BLOCK = 2 * MiB


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("memplugd"))
    yield d
    stop_shared(d)


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(socket=daemon.socket, timeout=30) as c:
        yield c


@pytest.fixture
def region(client: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"mr-{request.node.name.split('[')[-1].strip(']').lower()}"[:60]
    name = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in name)
    client.create_region(name, SIZE)
    try:
        yield name
    finally:
        client.delete_region(name)


def allocated(daemon: DaemonProcess, name: str) -> int:
    """Bytes the kernel holds for the region's memfd (st_blocks, the daemon aside)."""
    fd = open_region_fd(daemon, name)
    try:
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def scattered(count: int, seed: int) -> list[tuple[int, int]]:
    """count blocks of 2 MiB, none adjacent to another, in a shuffled order."""
    rng = random.Random(seed)
    slots = rng.sample(range(SIZE // (2 * BLOCK)), count)  # every other block: no merging
    ranges = [(slot * 2 * BLOCK, BLOCK) for slot in slots]
    rng.shuffle(ranges)
    return ranges


def test_plug_64_scattered_ranges_in_one_call(
    daemon: DaemonProcess, client: Client, region: str
) -> None:
    ranges = scattered(64, seed=1)
    # The raw stream: progress counts bytes across every range of the list.
    messages = list(
        daemon.stub.Plug(
            pb.PlugRequest(
                name=region, ranges=[pb.Range(offset=o, length=n) for o, n in ranges], threads=1
            )
        )
    )
    last = messages[-1]
    assert last.HasField("result") and last.result.bytes == 64 * BLOCK
    assert last.done_bytes == last.total_bytes == 64 * BLOCK
    assert all(m.total_bytes == 64 * BLOCK for m in messages)

    info = client.get_region(region)
    assert info.plugged == sorted(ranges), "the daemon's block map is not exactly the list"
    assert info.plugged_bytes == info.allocated_bytes == 64 * BLOCK
    assert allocated(daemon, region) == 64 * BLOCK, "the kernel holds other blocks than those"
    assert "ranges=64" in daemon.log(), "the access log does not count the call's ranges"


def test_plug_list_keeps_plugged_blocks_and_their_data(client: Client, region: str) -> None:
    client.plug(region, 4 * BLOCK, 2 * BLOCK)
    with client.attach(region, sparse=True) as att:
        assert att.view is not None
        att.view[4 * BLOCK : 4 * BLOCK + 5] = b"kept!"
    result = client.plug(region, ranges=[(0, 2 * BLOCK), (4 * BLOCK, 4 * BLOCK)])
    assert result.bytes == 4 * BLOCK, "already plugged blocks were counted as new"
    assert client.get_region(region).plugged == [(0, 2 * BLOCK), (4 * BLOCK, 4 * BLOCK)]
    with client.attach(region, "ro", sparse=True) as att:
        assert att.view is not None
        assert bytes(att.view[4 * BLOCK : 4 * BLOCK + 5]) == b"kept!"


# Each: the list, the error class, what the message must name.
INVALID: dict[str, tuple[list[tuple[int, int]], type[MemplugError], str]] = {
    "overlap": (
        [(0, 2 * BLOCK), (8 * BLOCK, BLOCK), (BLOCK, 2 * BLOCK)],
        InvalidArgument,
        "ranges 0 and 2 overlap",
    ),
    "duplicate": (
        [(6 * BLOCK, BLOCK), (0, BLOCK), (6 * BLOCK, BLOCK)],
        InvalidArgument,
        "ranges 0 and 2 overlap",
    ),
    "misaligned-offset": ([(0, BLOCK), (3 * BLOCK + 4096, BLOCK)], InvalidArgument, "range 1:"),
    "misaligned-length": (
        [(0, BLOCK), (2 * BLOCK, BLOCK), (8 * BLOCK, BLOCK + 4096)],
        InvalidArgument,
        "range 2:",
    ),
    "empty-range": ([(0, BLOCK), (4 * BLOCK, 0)], InvalidArgument, "range 1: length must be > 0"),
    "out-of-bounds": ([(0, BLOCK), (SIZE - BLOCK, 2 * BLOCK)], OutOfRange, "range 1:"),
    "past-the-end": ([(SIZE, BLOCK), (0, BLOCK)], OutOfRange, "range 0:"),
    "too-many": ([(i * BLOCK, BLOCK) for i in range(4097)], InvalidArgument, "at most 4096"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_list_plugs_nothing(
    daemon: DaemonProcess, client: Client, region: str, case: str
) -> None:
    ranges, error, says = INVALID[case]
    with pytest.raises(error) as info:
        client.plug(region, ranges=ranges)
    assert says in info.value.message, info.value.message
    assert client.get_region(region).plugged == []
    assert allocated(daemon, region) == 0


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_list_unplugs_nothing(
    daemon: DaemonProcess, client: Client, region: str, case: str
) -> None:
    client.plug(region, 0, 16 * BLOCK)
    ranges, error, says = INVALID[case]
    with pytest.raises(error) as info:
        client.unplug(region, ranges=ranges)
    assert says in info.value.message, info.value.message
    assert client.get_region(region).plugged == [(0, 16 * BLOCK)]
    assert allocated(daemon, region) == 16 * BLOCK


@pytest.mark.parametrize("rpc", ["plug", "unplug", "discard"])
def test_a_list_as_long_as_a_message_holds_is_refused_by_its_count(
    daemon: DaemonProcess, client: Client, region: str, rpc: str
) -> None:
    ranges = [(0, 1)] * 60_000  # about 0.5 MiB of request, under gRPC's 1 MiB
    with pytest.raises(InvalidArgument, match=f"{rpc} of '{region}': 60000 ranges in one call"):
        if rpc == "plug":
            client.plug(region, ranges=ranges)
        elif rpc == "unplug":
            client.unplug(region, ranges=ranges)
        else:
            client.discard(region, ranges=ranges)
    assert client.get_region(region).plugged == []


@pytest.mark.parametrize("rpc", ["plug", "unplug", "discard"])
def test_offset_and_ranges_together_are_refused(
    daemon: DaemonProcess, client: Client, region: str, rpc: str
) -> None:
    client.plug(region, 0, 4 * BLOCK)
    ranges = [pb.Range(offset=0, length=BLOCK)]
    with pytest.raises(grpc.RpcError) as info:
        if rpc == "plug":
            list(daemon.stub.Plug(pb.PlugRequest(name=region, length=BLOCK, ranges=ranges)))
        elif rpc == "unplug":
            daemon.stub.Unplug(pb.RangeRequest(name=region, offset=BLOCK, ranges=ranges))
        else:
            daemon.stub.Discard(pb.RangeRequest(name=region, offset=BLOCK, ranges=ranges))
    err: grpc.Call = info.value  # type: ignore[assignment]
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "either offset and length or a list of ranges" in (err.details() or "")
    assert client.get_region(region).plugged == [(0, 4 * BLOCK)]
    assert allocated(daemon, region) == 4 * BLOCK


def test_unplug_a_list(daemon: DaemonProcess, client: Client, region: str) -> None:
    client.plug(region, 0, 32 * BLOCK)
    gone = [
        (30 * BLOCK, 2 * BLOCK),
        (2 * BLOCK, BLOCK),
        (10 * BLOCK, 4 * BLOCK),
        (40 * BLOCK, BLOCK),
    ]
    result = client.unplug(region, ranges=gone)
    # Blocks of the list that were not plugged (at 40) are punched but not counted.
    assert result.bytes == 7 * BLOCK
    want = [(0, 2 * BLOCK), (3 * BLOCK, 7 * BLOCK), (14 * BLOCK, 16 * BLOCK)]
    assert client.get_region(region).plugged == want
    assert allocated(daemon, region) == 25 * BLOCK


def test_discard_a_list(client: Client, region: str) -> None:
    client.plug(region, 0, 8 * BLOCK)
    with client.attach(region, sparse=True) as att:
        assert att.view is not None
        for block in range(8):
            att.view[block * BLOCK] = 0xAB
    # One block of the list unplugged: refused whole, nothing zeroed.
    client.unplug(region, 7 * BLOCK, BLOCK)
    with pytest.raises(MemplugError) as info:
        client.discard(region, ranges=[(0, BLOCK), (7 * BLOCK, BLOCK)])
    assert info.value.code == "FAILED_PRECONDITION"
    result = client.discard(region, ranges=[(BLOCK, BLOCK), (4 * BLOCK, 2 * BLOCK)])
    assert result.bytes == 3 * BLOCK
    with client.attach(region, "ro", sparse=True) as att:
        assert att.view is not None
        seen = [att.view[block * BLOCK] for block in range(7)]
    assert seen == [0xAB, 0, 0xAB, 0xAB, 0, 0, 0xAB]
    assert client.get_region(region).plugged == [(0, 7 * BLOCK)]


def test_cli_plug_and_unplug_ranges(daemon: DaemonProcess, client: Client, region: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPLUG_")}
    env["MEMPLUG_SOCKET"] = str(daemon.socket)

    def memplug(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MEMPLUG), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    done = memplug(
        "plug", region, "--range", "0:4M", "--range", "0x10000000:2M", "--range", "512M:2M"
    )
    assert done.returncode == 0, done.stderr
    assert client.get_region(region).plugged == [
        (0, 4 * MiB),
        (256 * MiB, BLOCK),
        (512 * MiB, BLOCK),
    ]
    done = memplug("unplug", region, "--range", "2M:2M", "--range", "256M:2M")
    assert done.returncode == 0, done.stderr
    assert "4 MiB released" in done.stdout
    assert client.get_region(region).plugged == [(0, BLOCK), (512 * MiB, BLOCK)]
    bad = memplug("plug", region, "--range", "0:1M")
    assert bad.returncode != 0 and "range 0" in bad.stderr, bad.stderr
    bad = memplug("plug", region, "--range", "4M")
    assert bad.returncode != 0 and "OFFSET:LENGTH" in bad.stderr, bad.stderr
    assert client.get_region(region).plugged == [(0, BLOCK), (512 * MiB, BLOCK)]


def test_quota_is_checked_for_the_list_total(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory("--max-bytes", "8M")
    with Client(socket=d.socket, timeout=30) as c:
        c.create_region("q", 64 * MiB)
        c.plug("q", 0, BLOCK)
        # Each range fits in the 6 MiB left, the four together (8 MiB) do not.
        ranges = [(8 * BLOCK, BLOCK), (2 * BLOCK, BLOCK), (12 * BLOCK, BLOCK), (4 * BLOCK, BLOCK)]
        with pytest.raises(QuotaExceeded) as info:
            c.plug("q", ranges=ranges)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert c.get_region("q").plugged == [(0, BLOCK)]
        assert c.status().plugged_bytes == BLOCK
        assert allocated(d, "q") == BLOCK
        # Three fit; one of them already plugged counts nothing.
        assert c.plug("q", ranges=[(0, BLOCK), *ranges[:3]]).bytes == 3 * BLOCK
        assert c.status().plugged_bytes == 4 * BLOCK


def test_concurrent_lists_over_the_same_blocks_neither_deadlock_nor_double_count(
    daemon: DaemonProcess, client: Client, region: str
) -> None:
    """Four callers plug and unplug lists that share blocks, each in its own order:
    each call holds all of its ranges or waits for all of them, so all finish."""
    blocks = list(range(0, 48, 3))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with Client(socket=daemon.socket, timeout=60) as c:
                for _ in range(10):
                    mine = rng.sample(blocks, 8)
                    c.plug(region, ranges=[(b * BLOCK, BLOCK) for b in mine])
                    c.unplug(region, ranges=[(b * BLOCK, BLOCK) for b in reversed(mine[:4])])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller is stuck (deadlock?)"
    assert errors == []
    info = client.get_region(region)
    assert info.plugged_bytes == info.allocated_bytes == allocated(daemon, region)
    assert client.status().plugged_bytes == info.plugged_bytes


def test_cli_ctrl_c_rolls_back_a_list(daemon: DaemonProcess, client: Client) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPLUG_")}
    env["MEMPLUG_SOCKET"] = str(daemon.socket)
    client.create_region("mr-ctrl-c", 4 * GiB)
    try:
        args = ["--range", "3G:1G", "--range", "0:1G", "--range", "1536M:1G"]
        proc = subprocess.Popen(
            [str(MEMPLUG), "plug", "mr-ctrl-c", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while client.get_region("mr-ctrl-c").allocated_bytes == 0:  # under way
                assert proc.poll() is None, f"memplug plug ended early: {proc.communicate()}"
                assert time.monotonic() < deadline, "the plug never started"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, f"exit {proc.returncode}, want 130\n{err}"
        lines = err.splitlines()
        assert len(lines) == 1 and "plug mr-ctrl-c: cancelled;" in lines[0], err
        assert "too late" not in err, err
        deadline = time.monotonic() + 10
        while (region := client.get_region("mr-ctrl-c")).allocated_bytes:
            assert time.monotonic() < deadline, f"no rollback after Ctrl-C: {region}"
            time.sleep(0.05)
        assert region.plugged == []
    finally:
        client.delete_region("mr-ctrl-c")
