"""Concurrent calls to one real memplugd: parallel plugs, serialized overlaps, reads during work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import grpc
from conftest import DaemonProcess, GiB, MiB, create, get, spans

from memplug.v1 import memplug_pb2 as pb

ANSWER_WITHIN = 0.5  # seconds a read may take while a long plug runs
LONG = 4 * GiB  # a shmem plug of this takes about a second here


def run_together(calls: list[Callable[[], pb.OperationResult]]) -> list[pb.OperationResult]:
    """Start every call at once on its own thread; their results, or the first error raised."""
    barrier = threading.Barrier(len(calls))
    results: list[pb.OperationResult | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a call never returned"
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def plug_call(
    daemon: DaemonProcess, name: str, offset: int, length: int
) -> Callable[[], pb.OperationResult]:
    return lambda: daemon.plug(name, offset, length)


def test_parallel_plugs_on_disjoint_ranges(daemon: DaemonProcess) -> None:
    n, piece = 8, 32 * MiB
    create(daemon, "vm", n * piece)
    results = run_together([plug_call(daemon, "vm", i * piece, piece) for i in range(n)])
    assert len(results) == n
    assert [r.bytes for r in results] == [piece] * n
    region = get(daemon, "vm")
    assert spans(region) == [(0, n * piece)]
    assert region.plugged_bytes == region.allocated_bytes == n * piece
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == n * piece


def test_parallel_plugs_of_different_regions(daemon: DaemonProcess) -> None:
    names = [f"vm{i}" for i in range(4)]
    for name in names:
        create(daemon, name, 128 * MiB)
    results = run_together([plug_call(daemon, name, 0, 128 * MiB) for name in names])
    assert [r.bytes for r in results] == [128 * MiB] * 4
    for name in names:
        assert get(daemon, name).allocated_bytes == 128 * MiB
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == 4 * 128 * MiB


def test_overlapping_plugs_serialize(daemon: DaemonProcess) -> None:
    size = 1 * GiB
    create(daemon, "vm", size)
    results = run_together(
        [
            plug_call(daemon, "vm", 0, 768 * MiB),
            plug_call(daemon, "vm", 256 * MiB, 768 * MiB),
        ]
    )
    # Whichever ran second found the overlap plugged already and did not count it again.
    assert sum(r.bytes for r in results) == size, [r.bytes for r in results]
    assert sorted(r.bytes for r in results) in ([256 * MiB, 768 * MiB],), [r.bytes for r in results]
    region = get(daemon, "vm")
    assert spans(region) == [(0, size)]
    assert region.plugged_bytes == size
    assert region.allocated_bytes == size, "the overlap was allocated twice"
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == size


def test_many_identical_plugs(daemon: DaemonProcess) -> None:
    create(daemon, "vm", 256 * MiB)
    results = run_together([plug_call(daemon, "vm", 0, 256 * MiB) for _ in range(6)])
    assert sorted(r.bytes for r in results) == [0] * 5 + [256 * MiB]
    assert get(daemon, "vm").allocated_bytes == 256 * MiB
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == 256 * MiB


def timed(call: Callable[[], object]) -> float:
    t0 = time.monotonic()
    call()
    return time.monotonic() - t0


def test_reads_answer_while_a_long_plug_runs(daemon: DaemonProcess) -> None:
    create(daemon, "idle", 64 * MiB)
    daemon.plug("idle", 0, 32 * MiB)
    create(daemon, "busy", 2 * GiB)
    request = pb.PlugRequest(name="busy", offset=0, length=2 * GiB)
    call = daemon.stub.Plug(request)
    stream = iter(call)
    try:
        first = next(stream)
        assert not first.HasField("result") and first.done_bytes < first.total_bytes

        reads: dict[str, Callable[[], object]] = {
            "GetRegion(idle)": lambda: get(daemon, "idle"),
            "ListRegions": lambda: daemon.stub.ListRegions(pb.ListRegionsRequest()),
            "GetStatus": lambda: daemon.stub.GetStatus(pb.GetStatusRequest()),
            "GetRegion(busy)": lambda: get(daemon, "busy"),
        }
        for what, read in reads.items():
            took = timed(read)
            assert took < ANSWER_WITHIN, f"{what} took {took:.2f}s while a plug ran"
        # Work on another region is not held up either.
        assert timed(lambda: daemon.plug("idle", 32 * MiB, 32 * MiB)) < ANSWER_WITHIN

        # The plug was still running when those calls answered: nothing recorded yet.
        busy = get(daemon, "busy")
        assert busy.plugged_bytes == 0, "the plug finished before the reads: test proves nothing"
        assert 0 < busy.allocated_bytes < 2 * GiB
        listed = {r.name: r for r in daemon.stub.ListRegions(pb.ListRegionsRequest()).regions}
        assert sorted(listed) == ["busy", "idle"]
        assert listed["idle"].plugged_bytes == 64 * MiB
    except BaseException:
        call.cancel()  # type: ignore[no-untyped-call]
        raise

    rest = list(stream)
    assert rest and rest[-1].HasField("result")
    done = [first.done_bytes] + [m.done_bytes for m in rest]
    assert done == sorted(done), f"progress went backwards: {done}"
    assert rest[-1].result.bytes == 2 * GiB
    assert get(daemon, "busy").allocated_bytes == 2 * GiB


def test_unplug_and_plug_of_disjoint_ranges_meanwhile(daemon: DaemonProcess) -> None:
    """A long plug locks only its range: other ranges of the same region stay usable."""
    create(daemon, "vm", LONG + 64 * MiB)
    daemon.plug("vm", LONG, 32 * MiB)
    request = pb.PlugRequest(name="vm", offset=0, length=LONG)
    call = daemon.stub.Plug(request)
    stream = iter(call)
    try:
        first = next(stream)
        assert not first.HasField("result")
        t0 = time.monotonic()
        out = daemon.stub.Unplug(pb.RangeRequest(name="vm", offset=LONG, length=32 * MiB))
        assert out.bytes == 32 * MiB
        assert daemon.plug("vm", LONG + 32 * MiB, 32 * MiB).bytes == 32 * MiB
        assert time.monotonic() - t0 < 2 * ANSWER_WITHIN
        assert get(daemon, "vm").plugged_bytes == 32 * MiB, "the long plug had already ended"
    except BaseException:
        call.cancel()  # type: ignore[no-untyped-call]
        raise
    last = list(stream)[-1]
    assert last.result.bytes == LONG
    assert spans(last.result.region) == [(0, LONG), (LONG + 32 * MiB, 32 * MiB)]


def drain(stream: Iterable[pb.Progress]) -> list[pb.Progress]:
    return list(stream)


def test_overlapping_plug_waits_then_cancels(daemon: DaemonProcess) -> None:
    """A plug waiting for an overlapping one honours its own deadline, and changes nothing."""
    create(daemon, "vm", LONG)
    request = pb.PlugRequest(name="vm", offset=0, length=LONG)
    call = daemon.stub.Plug(request)
    stream = iter(call)
    try:
        next(stream)
        t0 = time.monotonic()
        try:
            drain(
                daemon.stub.Plug(pb.PlugRequest(name="vm", offset=0, length=64 * MiB), timeout=0.2)
            )
            raise AssertionError("a plug overlapping a running one did not wait for it")
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
        assert time.monotonic() - t0 < 2
    except BaseException:
        call.cancel()  # type: ignore[no-untyped-call]
        raise
    last = list(stream)[-1]
    assert last.result.bytes == LONG
    assert get(daemon, "vm").allocated_bytes == LONG
    assert daemon.stub.GetStatus(pb.GetStatusRequest()).plugged_bytes == LONG
