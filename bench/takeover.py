"""Take-over: how long `memplugd --takeover` takes, and how long clients go unanswered."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time

import grpc

from bench import memplugd
from bench.context import Bench
from bench.loadclient import BLOCK
from bench.report import Section, Table, Target, fmt_time
from bench.stats import Result
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

REGION_COUNTS = (1, 100, 1000)
HANDED = re.compile(r"handed (\d+) regions over to memplugd pid \d+ in (\d+) ms")


class Poller:
    """GetStatus in a loop, no retries: the longest time between two answers."""

    def __init__(self, daemon: memplugd.Memplugd) -> None:
        self._channel = grpc.insecure_channel(
            f"unix:{daemon.socket}", options=memplugd.FAST_RECONNECT
        )
        self._stub = pb_grpc.MemplugStub(self._channel)
        self._stop = threading.Event()
        self.longest_gap = 0.0
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._channel.close()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            try:
                self._stub.GetStatus(pb.GetStatusRequest(), timeout=0.5)
            except grpc.RpcError:
                time.sleep(0.001)
                continue
            now = time.perf_counter()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now


def _digest(daemon: memplugd.Memplugd) -> str:
    with daemon.client() as c, c.attach("r00000") as att:
        assert att.view is not None
        return hashlib.sha256(att.view[:BLOCK]).hexdigest()


def take_over(old: memplugd.Memplugd) -> tuple[memplugd.Memplugd, float, float, float]:
    """(the new daemon, spawn to serving, the old one's hand-over time, longest client gap)."""
    command = [
        sys.executable, "-m", "memplug.daemon", "--takeover",
        "--socket", str(old.socket), "--fd-socket", str(old.fd_socket),
        "--state-dir", str(old.directory / "state"),
    ]  # fmt: skip
    log = old.log.with_name(f"log.{time.monotonic_ns()}")
    with Poller(old) as poller:
        with log.open("wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        new = memplugd.Memplugd(proc, old.directory, old.socket, old.fd_socket, log, 0.0)
        if old.proc.wait(120) != 0:
            new.stop()
            raise RuntimeError(f"the old memplugd did not hand over:\n{old.tail()}")
        new.exec_to_serving = memplugd._wait_serving(new, started, 120)
        time.sleep(0.05)  # an answer after the gap, for the poller
    found = HANDED.search(old.log.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"the old memplugd did not say it handed over:\n{old.tail()}")
    return new, new.exec_to_serving, int(found.group(2)) / 1000, poller.longest_gap


def takeover_section(b: Bench) -> Section:
    s = Section("takeover", "Take-over: `memplugd --takeover` replacing a running daemon")
    reps = 1 if b.options.quick else b.options.reps
    table = Table(
        (
            "regions",
            "spawn → new one serving",
            "old one: stop serving → let go",
            "longest client gap (GetStatus, no retry)",
        )
    )
    worst_gap = 0.0
    for count in REGION_COUNTS:
        b.log(f"take-over with {count} regions: {reps} take-overs")
        daemon = memplugd.start(b.workdir / f"takeover-{count}")
        try:
            with daemon.client() as c:
                for i in range(count):
                    c.create_region(f"r{i:05d}", BLOCK, "shmem")
                c.plug("r00000")
            with daemon.client() as c, c.attach("r00000") as att:
                assert att.view is not None
                att.view[:BLOCK] = bytes(range(256)) * (BLOCK // 256)
            digest = _digest(daemon)
            spawn, handed, gaps = [], [], []
            for _ in range(reps):
                daemon, total, handover, gap = take_over(daemon)
                spawn.append(total)
                handed.append(handover)
                gaps.append(gap)
                if _digest(daemon) != digest:
                    raise RuntimeError("the take-over changed a region's contents")
                with daemon.client() as c:
                    if c.status().regions != count:
                        raise RuntimeError(f"the take-over lost regions:\n{daemon.tail()}")
        finally:
            daemon.stop()
        meta = {"regions": count, "region_size": BLOCK}
        results = [
            Result(f"takeover.{count}.spawn-to-serving", spawn, meta=meta),
            Result(f"takeover.{count}.handover", handed, meta=meta),
            Result(f"takeover.{count}.client-gap", gaps, meta=meta),
        ]
        s.results += results
        table.add(f"{count:,}", *(fmt_time(r.median) for r in results))
        worst_gap = max(worst_gap, results[2].median)
    s.tables.append(table)
    s.notes.append(
        "Regions of 2 MiB shmem, one plugged and checked by checksum after each take-over. "
        "Spawn → serving includes the new interpreter's start-up, during which the old one "
        "still serves; the gap is what a client that does not retry sees (the Python "
        "client retries GetRegion, ListRegions, GetStatus and Attach through it)."
    )
    s.targets.append(
        Target(
            "clients unanswered ≤ 3 s (the client's retry window) in a take-over of 1,000 regions",
            fmt_time(worst_gap),
            worst_gap <= 3.0,
        )
    )
    return s
