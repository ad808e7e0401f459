"""A request the daemon refuses must cost it next to nothing, however big it asks.

A Plug of a huge sparse region (256 TiB, 1 PiB: a shmem memfd of that size
allocates nothing until plugged) with the most threads a uint32 can ask for,
refused by the quota: the daemon answers in well under 100 ms and its RSS
(VmRSS) grows by less than 5 MiB. The work is planned per worker thread, never
per 64 MiB of the request, and the quota is checked before any planning.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import DaemonProcess, MiB, create, start_daemon, stop_shared
from hardening_kit import code_of, details_of, drain, record, rss_bytes

from memplug.v1 import memplug_pb2 as pb

TiB = 1 << 40
PiB = 1 << 50
MAX_LATENCY = 0.100
MAX_RSS_GROWTH = 5 * MiB


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("memplugd"), "--max-bytes", "256M", "--threads", "2")
    yield d
    stop_shared(d)


def refused_plug(d: DaemonProcess, name: str, length: int, threads: int) -> tuple[float, str]:
    """Plug [0, length) of name; it must fail RESOURCE_EXHAUSTED. Returns (seconds, details)."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        # populate-write: the method that spreads over threads (fallocate uses one).
        request = pb.PlugRequest(
            name=name,
            offset=0,
            length=length,
            threads=threads,
            strategy=pb.STRATEGY_POPULATE_WRITE,
        )
        drain(d.stub.Plug(request))
    seconds = time.monotonic() - started
    assert code_of(caught.value) == "RESOURCE_EXHAUSTED", details_of(caught.value)
    return seconds, details_of(caught.value)


@pytest.mark.parametrize("threads", [2**32 - 1, 0], ids=["threads-max", "threads-0"])
@pytest.mark.parametrize("size", [256 * TiB, PiB], ids=["256TiB", "1PiB"])
def test_huge_plug_refused_cheaply(daemon: DaemonProcess, size: int, threads: int) -> None:
    name = f"huge-{size // TiB}t-{threads}"
    create(daemon, name, size)
    try:
        # A first refusal warms up whatever the daemon loads lazily on the way.
        refused_plug(daemon, name, 512 * MiB, threads)
        rss_before = rss_bytes(daemon.proc.pid)
        seconds, details = refused_plug(daemon, name, size, threads)
        growth = rss_bytes(daemon.proc.pid) - rss_before
        record("refused_plug_seconds", seconds, size=str(size), threads=str(threads))
        record("refused_plug_rss_growth", growth, size=str(size), threads=str(threads))
        assert "quota" in details, details
        assert seconds < MAX_LATENCY, f"refusing took {seconds * 1e3:.0f} ms"
        assert growth < MAX_RSS_GROWTH, f"refusing grew the daemon's RSS by {growth} bytes"
        region = daemon.stub.GetRegion(pb.GetRegionRequest(name=name))
        assert region.plugged_bytes == 0 and region.allocated_bytes == 0
    finally:
        daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name=name))


def test_threads_beyond_the_workers_are_capped(daemon: DaemonProcess) -> None:
    """Asking for more threads than the daemon has workers gets the workers, no more."""
    name = "threads-capped"
    create(daemon, name, 256 * MiB, block_size=2 * MiB)
    try:
        last = drain(
            daemon.stub.Plug(
                pb.PlugRequest(
                    name=name,
                    offset=0,
                    length=256 * MiB,
                    threads=2**32 - 1,
                    strategy=pb.STRATEGY_POPULATE_WRITE,
                )
            )
        )
        assert last is not None and last.HasField("result")
        assert 1 <= last.result.threads <= 2, last.result
    finally:
        daemon.stub.DeleteRegion(pb.DeleteRegionRequest(name=name))
