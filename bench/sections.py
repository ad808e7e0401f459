"""The sections of the benchmark: each is a function of the Bench that returns a Section.

A section measures (every sample through stats.repeat or run_load), then
builds its tables, rows and targets from the Results; nothing here formats
numbers by hand or computes a median itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import echo, grpcecho, memplugd
from bench import qemu as qemu_mod
from bench.charge import charge_section
from bench.context import Bench
from bench.hugepool import hugepool_section
from bench.liveupdate import live_update_section
from bench.loadclient import BLOCK, GRPC_ALONE
from bench.machine import HUGE_2M
from bench.multirange import multirange_section
from bench.raw import Kind, RawMemory
from bench.report import (
    NA,
    MiB,
    Section,
    Table,
    Target,
    fmt_ops,
    fmt_rate,
    fmt_ratio,
    fmt_size,
    fmt_time,
)
from bench.split import split_section
from bench.stats import Result, Run, interleave, median, repeat
from bench.takeover import takeover_section
from bench.thp_pool import thp_section, warm_pool_section
from memplug.client import Client
from memplug.common import memory

SectionFn = Callable[[Bench], Section]


def page_size(kind: Kind) -> int:
    return HUGE_2M if kind == "hugetlb" else memory.BASE_PAGE_SIZE


def tag(kind: Kind, size: int) -> str:
    """A key fragment such as shmem.1024M."""
    return f"{kind}.{size // MiB}M"


def threads(n: int) -> str:
    return f"{n} thread{'s' * (n > 1)}"


def clients_label(n: int) -> str:
    return f"{n} client{'s' * (n > 1)}"


def speedup(other: float, memplug: float) -> float:
    """memplug's speed ÷ the other's speed (> 1: memplug is faster)."""
    return other / memplug if memplug > 0 else math.nan


# =========================================================================== 1. plug

FALLOCATE = "fallocate"


def populate_key(threads: int) -> str:
    return f"populate-write.threads-{threads}"


def populate_chunks_key(threads: int) -> str:
    return f"populate-write.chunks.threads-{threads}"


@dataclass
class QemuPrealloc:
    """QEMU's time to the QMP greeting with prealloc off, and on per prealloc-threads."""

    off: Result
    on: dict[int, Result]

    def cost(self, threads: int) -> float:
        """Seconds QEMU spends preallocating: greeting with prealloc=on minus off."""
        return self.on[threads].median - self.off.median

    def best(self) -> tuple[int, float]:
        threads = min(self.on, key=self.cost)
        return threads, self.cost(threads)

    @property
    def results(self) -> list[Result]:
        return [self.off, *self.on.values()]


def qemu_prealloc(b: Bench, kind: Kind, size: int) -> QemuPrealloc | None:
    """QEMU's prealloc cost for kind and size, measured once per run (None without QEMU)."""
    if b.qemu is None:
        return None
    return b.cached(f"qemu.{tag(kind, size)}", lambda: _measure_qemu(b, kind, size))


def _measure_qemu(b: Bench, kind: Kind, size: int) -> QemuPrealloc:
    binary = b.qemu
    assert binary is not None
    directory = b.tmpfs() if kind == "file" else None

    def greet(prealloc: bool, threads: int = 1) -> Callable[[], float]:
        arg = qemu_mod.backend(kind, size, prealloc=prealloc, threads=threads, directory=directory)

        return b.with_pages(kind, size, lambda: qemu_mod.time_to_greeting(binary, arg))

    key, reps = f"qemu.{tag(kind, size)}", b.options.reps
    b.log(f"QEMU {kind} {fmt_size(size)}: prealloc off, on with 1..{b.options.threads} threads")
    meta = {"kind": kind, "size": size}
    off = Result(f"{key}.prealloc-off", repeat(greet(False), reps=reps), meta=meta)
    on = {
        t: Result(
            f"{key}.prealloc-on.threads-{t}",
            repeat(greet(True, t), reps=reps),
            meta={**meta, "threads": t},
        )
        for t in range(1, b.options.threads + 1)
    }
    return QemuPrealloc(off, on)


@dataclass
class PlugCase:
    kind: Kind
    size: int
    memplug: Result  # client call to the final message of the Plug stream
    work: Result  # the daemon's own account (OperationResult.seconds): the syscalls
    raw: dict[str, Result]  # label -> result, in this process
    qemu: QemuPrealloc | None
    notes: list[str] = field(default_factory=list)

    def best_raw(self) -> tuple[str, float]:
        """(label, median) of the fastest raw method."""
        best = min(self.raw.values(), key=lambda r: r.median)
        return str(best.meta["label"]), best.median

    @property
    def results(self) -> list[Result]:
        qemu = self.qemu.results if self.qemu else []
        return [self.memplug, self.work, *self.raw.values(), *qemu]


def memplug_plug_runs(
    b: Bench, c: Client, kind: Kind, size: int, name: str, work: list[float], used: set[str]
) -> Run:
    """Plug end to end through the daemon; Unplug (punch) as the reset."""

    def run() -> float:
        start = time.perf_counter()
        result = c.plug(name, 0, size)
        elapsed = time.perf_counter() - start
        work.append(result.seconds)
        used.add(f"{result.strategy} on {threads(result.threads)}")
        return elapsed

    return b.with_pages(kind, size, run), lambda: c.unplug(name, 0, size)


def raw_runs(b: Bench, kind: Kind, mem: RawMemory) -> dict[str, tuple[str, int, Run]]:
    """key -> (label, threads, run): fallocate, MADV_POPULATE_WRITE on 1..N threads, both."""
    n, size = b.options.threads, mem.size

    def guarded(run: Callable[[], float]) -> Callable[[], float]:
        return b.with_pages(kind, size, run, undo=mem.discard)

    runs: dict[str, tuple[str, int, Run]] = {
        FALLOCATE: (
            "raw fallocate, 1 thread",
            1,
            (guarded(lambda: b.raw.fallocate(mem)), mem.discard),
        ),
        # The daemon punches (Unplug) on an RPC thread and allocates on a worker:
        # pages freed on another CPU come back slower than the punching thread's own.
        "fallocate.freed-by-another-thread": (
            "raw fallocate, 1 thread, range punched by another thread",
            1,
            (
                guarded(lambda: b.raw.fallocate(mem)),
                functools.partial(b.raw.elsewhere, mem.discard),
            ),
        ),
    }
    for t in range(1, n + 1):
        populate = functools.partial(b.raw.populate, mem, t)
        runs[populate_key(t)] = (
            f"raw MADV_POPULATE_WRITE, {threads(t)}{', one contiguous share each' * (t > 1)}",
            t,
            (guarded(populate), mem.discard),
        )
    if n > 1:  # memplugd's split: 64 MiB chunks in address order, pulled from one queue
        runs[populate_chunks_key(n)] = (
            f"raw MADV_POPULATE_WRITE, {threads(n)} pulling 64 MiB chunks from one queue",
            n,
            (guarded(lambda: b.raw.populate_chunks(mem, n)), mem.discard),
        )
    runs[f"fallocate+populate-write.threads-{n}"] = (
        f"raw fallocate, then MADV_POPULATE_WRITE on {threads(n)}",
        n,
        (guarded(lambda: b.raw.fallocate_then_populate(mem, n)), mem.discard),
    )
    return runs


def plug_case(b: Bench, kind: Kind, size: int) -> PlugCase:
    """memplug's Plug and every raw path on the same kind and size, repetitions interleaved."""
    c = b.client()
    name = f"plug-{kind}-{size // MiB}m"
    path = f"{name}.img" if kind == "file" else ""
    directory = b.tmpfs() if kind == "file" else None
    work: list[float] = []
    used: set[str] = set()
    b.log(f"memplug Plug and the raw kernel paths, {kind} {fmt_size(size)}, interleaved")
    c.create_region(name, size, kind, page_size=HUGE_2M if kind == "hugetlb" else 0, path=path)
    try:
        with RawMemory(kind, size, page_size=page_size(kind), directory=directory) as mem:
            raws = raw_runs(b, kind, mem)
            runs = {"memplug": memplug_plug_runs(b, c, kind, size, name, work, used)}
            runs.update({key: run for key, (_, _, run) in raws.items()})
            samples = interleave(runs, reps=b.options.reps)
    finally:
        c.delete_region(name)
        if path:
            (b.tmpfs() / path).unlink(missing_ok=True)
    key = f"plug.{tag(kind, size)}"
    meta = {"kind": kind, "size": size, "strategy": ", ".join(sorted(used))}
    memplug = Result(f"{key}.memplug", samples["memplug"], meta=meta)
    work_result = Result(f"{key}.memplug-work", work[-len(samples["memplug"]) :], meta=meta)
    raw = {
        k: Result(
            f"raw.{tag(kind, size)}.{k}",
            samples[k],
            meta={"kind": kind, "size": size, "threads": t, "label": label},
        )
        for k, (label, t, _) in raws.items()
    }
    return PlugCase(kind, size, memplug, work_result, raw, qemu_prealloc(b, kind, size))


def speed_target(name: str, memplug: float, other: float, other_is: str, need: float) -> Target:
    """memplug's speed ÷ the other's must reach `need`."""
    ratio = speedup(other, memplug)
    measured = f"{fmt_ratio(ratio, 3)} ({fmt_time(memplug)} vs {fmt_time(other)}{other_is})"
    return Target(name, measured, ratio >= need)


def plug_targets(case: PlugCase) -> list[Target]:
    what = f"{case.kind} {fmt_size(case.size)} plug"
    m = case.memplug.median
    targets: list[Target] = []
    if case.kind in ("shmem", "file"):
        raw = case.raw[FALLOCATE].median
        targets.append(speed_target(f"{what} ≥ 0.95x raw fallocate", m, raw, "", 0.95))
        if case.kind == "file":
            return targets
        need, versus = 1.2, "≥ 1.2x faster than QEMU's best thread count"
    elif case.kind == "hugetlb":
        # The fastest raw populate of this run, whichever the split and thread count.
        populates = [r for k, r in case.raw.items() if k.startswith("populate-write.")]
        best = min(populates, key=lambda r: r.median)
        name = f"{what} ≥ 0.97x the best raw MADV_POPULATE_WRITE"
        other = f" ({str(best.meta['label']).removeprefix('raw MADV_POPULATE_WRITE, ')})"
        targets.append(speed_target(name, m, best.median, other, 0.97))
        need, versus = 1.0, "≥ QEMU's best thread count"
    else:
        return targets
    if case.qemu is not None:
        t, cost = case.qemu.best()
        targets.append(speed_target(f"{what} {versus}", m, cost, f" on {threads(t)}", need))
    return targets


def _detail_rows(detail: Table, case: PlugCase) -> None:
    m = case.memplug.median

    def row(label: str, seconds: float, ratio: bool = True) -> None:
        detail.add(
            case.kind, fmt_size(case.size), label, fmt_time(seconds), fmt_rate(case.size, seconds),
            fmt_ratio(speedup(seconds, m)) if ratio else NA,
        )  # fmt: skip

    row(f"**memplug Plug, end to end** ({case.memplug.meta['strategy']})", m)
    row("memplug: the daemon's own work time (OperationResult.seconds)", case.work.median, False)
    for result in case.raw.values():
        row(str(result.meta["label"]), result.median)
    if case.qemu is not None:
        for t in case.qemu.on:
            row(f"QEMU prealloc=on, prealloc-threads={t}", case.qemu.cost(t))
        detail.add(
            case.kind, fmt_size(case.size), "(QEMU start to greeting, prealloc=off: subtracted)",
            fmt_time(case.qemu.off.median), NA, NA,
        )  # fmt: skip


def plug_section(b: Bench) -> Section:
    s = Section("plug", "Plug: memplugd end to end vs the raw kernel paths and QEMU")
    summary = Table(
        ("backing", "size", "memplug Plug", "best raw", "memplug ÷ best raw", "raw fallocate",
         "memplug ÷ fallocate", "QEMU prealloc, best", "memplug ÷ QEMU best"),
        caption="Summary (medians; memplug ÷ X is a speed ratio, > 1 means memplug is faster):",
    )  # fmt: skip
    detail = Table(
        ("backing", "size", "method", "median", "speed", "memplug ÷ this"),
        caption="Every method (raw: in the benchmark process through memplug.daemon.kernel.ops, "
        "GIL released; QEMU: time to the QMP greeting with prealloc=on minus with prealloc=off):",
    )
    b.warm_up()
    for kind, size in b.options.plug_cases:
        why = b.can(kind) or b.can_size(kind, size)
        if why is not None:
            s.notes.append(f"{kind} {fmt_size(size)} skipped: {why}")
            continue
        try:
            case = plug_case(b, kind, size)
        except Exception as exc:
            s.notes.append(f"{kind} {fmt_size(size)} failed: {exc!r}")
            s.targets.append(Target(f"{kind} {fmt_size(size)} plug", f"error: {exc}", None))
            continue
        s.results += case.results
        s.targets += plug_targets(case)
        m = case.memplug.median
        best_label, best = case.best_raw()
        falloc = case.raw[FALLOCATE].median
        qemu = case.qemu.best() if case.qemu else None
        summary.add(
            kind, fmt_size(size), fmt_time(m),
            f"{fmt_time(best)} ({best_label.removeprefix('raw ')})", fmt_ratio(speedup(best, m)),
            fmt_time(falloc), fmt_ratio(speedup(falloc, m)),
            f"{fmt_time(qemu[1])} ({threads(qemu[0])})" if qemu else "no QEMU",
            fmt_ratio(speedup(qemu[1], m)) if qemu else NA,
        )  # fmt: skip

        _detail_rows(detail, case)
    s.tables += [summary, detail]
    s.notes += [
        "memplug Plug: `Client.plug(name, 0, size)` to the last message of the stream; between "
        "repetitions `Client.unplug` punches the range. The gap between end to end and the "
        "daemon's own work time is RPC, bookkeeping (SQLite intents) and streaming.",
        "memplug and the raw paths of a case are measured in turns (repetition 1 of each, then "
        "2 of each, ...), so that a VM's drift between minutes does not land on one side of a "
        "ratio; QEMU, which needs a process start per figure, is measured after them.",
        "Raw paths punch the range between repetitions on the timed thread itself, except the "
        "row 'punched by another thread': the daemon punches on an RPC thread and allocates on "
        "a worker, and pages freed on another CPU come back a little slower.",
    ]
    return s


# =========================================================================== 2. consumer


def measure_ready(b: Bench, kind: Kind, size: int) -> Result:
    """Client.attach(populate="write") on a freshly plugged region; re-plugged between reps."""
    c = b.client()
    name = f"ready-{kind}"
    c.create_region(name, size, kind, page_size=HUGE_2M if kind == "hugetlb" else 0)
    plug = b.with_pages(kind, size, lambda: c.plug(name, 0, size))
    plug()

    def run() -> float:
        start = time.perf_counter()
        attachment = c.attach(name, populate="write")
        elapsed = time.perf_counter() - start
        attachment.close()
        return elapsed

    def replug() -> None:
        c.unplug(name, 0, size)
        plug()

    b.log(f"consumer attach + populate {kind} {fmt_size(size)}")
    try:
        samples = repeat(run, reps=b.options.reps, reset=replug)
    finally:
        c.delete_region(name)
    return Result(f"ready.{tag(kind, size)}.memplug", samples, meta={"kind": kind, "size": size})


def consumer_section(b: Bench) -> Section:
    s = Section(
        "consumer", "Time to ready for a consumer: attach a plugged region vs QEMU prealloc"
    )
    table = Table(
        ("backing", "size", "memplug: attach + populate(write)", "QEMU prealloc=on, best",
         "QEMU start to greeting, prealloc=on", "memplug ÷ QEMU prealloc"),
    )  # fmt: skip
    size = b.options.consumer_size
    b.warm_up()
    for kind in ("shmem", "hugetlb"):
        why = b.can(kind)
        if why is not None:
            s.notes.append(f"{kind} skipped: {why}")
            continue
        try:
            qemu = qemu_prealloc(b, kind, size)  # before the region holds the memory
            ready = measure_ready(b, kind, size)
        except Exception as exc:
            s.notes.append(f"{kind} failed: {exc!r}")
            s.targets.append(Target(f"{kind} time to ready", f"error: {exc}", None))
            continue
        s.results.append(ready)
        m = ready.median
        if qemu is None:
            table.add(kind, fmt_size(size), fmt_time(m), "no QEMU", NA, NA)
            continue
        best, cost = qemu.best()
        ratio = speedup(cost, m)
        table.add(
            kind, fmt_size(size), fmt_time(m), f"{fmt_time(cost)} ({threads(best)})",
            fmt_time(qemu.on[best].median), fmt_ratio(ratio),
        )  # fmt: skip
        s.targets.append(
            Target(
                f"{kind} {fmt_size(size)}: consumer ready ≥ 2x faster than QEMU prealloc=on",
                f"{fmt_ratio(ratio, 3)} ({fmt_time(m)} vs {fmt_time(cost)} on {threads(best)})",
                ratio >= 2.0,
            )
        )
    s.tables.append(table)
    s.notes.append(
        'memplug: `Client.attach(name, populate="write")` (ticket RPC, fd over the fd socket, '
        "mmap, MADV_POPULATE_WRITE of the page tables on the client's threads) on a region "
        "plugged just before (unplugged and plugged again between repetitions). QEMU: the same "
        "size from nothing, time to greeting with prealloc=on minus prealloc=off."
    )
    return s


# =========================================================================== 3. small operations


@dataclass
class Load:
    """Latencies per step (all repetitions pooled) and cycles per second per repetition."""

    latencies: dict[str, list[float]]
    rates: list[float]


class ClientProcesses:
    """`count` load clients (loadclient.py), each its own process, running one workload."""

    def __init__(self, workload: str, count: int, socket: Path, echo_path: Path) -> None:
        self.workload = workload
        self.procs: list[subprocess.Popen[str]] = []
        try:
            for i in range(count):
                command = [
                    sys.executable, "-m", "bench.loadclient",
                    workload, str(socket), str(echo_path), f"small-{i}",
                ]  # fmt: skip
                self.procs.append(
                    subprocess.Popen(
                        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                    )
                )
            for proc in self.procs:
                self._expect(proc, "ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, proc: subprocess.Popen[str], what: str) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line or (what and line.strip() != what):
            raise RuntimeError(
                f"load client {self.workload!r} (pid {proc.pid}) answered {line!r}, "
                f"not {what or 'its latencies'}; its traceback is above"
            )
        return line

    def round(self, iterations: int) -> tuple[dict[str, list[float]], float]:
        """Every client runs its steps `iterations` times at once; (latencies, wall time)."""
        start = time.perf_counter()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {iterations}\n")
            proc.stdin.flush()
        merged: dict[str, list[float]] = defaultdict(list)
        for proc in self.procs:
            for name, values in json.loads(self._expect(proc, "")).items():
                merged[name] += values
        return merged, time.perf_counter() - start

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write("exit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def run_loads(loads: dict[str, ClientProcesses], iterations: int, reps: int) -> dict[str, Load]:
    """Every workload's clients run their steps `iterations` times per repetition.

    The workloads take turns within each repetition (as the plug section's
    methods do), so an operation and its floors see the same moments of a
    drifting VM. A repetition's rate is the cycles of all clients over the wall
    time until the last one finished. One shorter warm-up repetition is discarded.
    """
    latencies: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in loads}
    rates: dict[str, list[float]] = {name: [] for name in loads}
    for rep in range(reps + 1):
        n = max(1, iterations // 5) if rep == 0 else iterations
        for name, clients in loads.items():
            got, wall = clients.round(n)
            if rep:
                for step, values in got.items():
                    latencies[name][step] += values
                rates[name].append(len(clients.procs) * n / wall)
    return {name: Load(dict(latencies[name]), rates[name]) for name in loads}


SMALL_REGION = 64 * MiB
# The targets of the judged small operations: within this much of the floor with one
# client (a per-call cost, in seconds), and within this ratio of it with more.
ONE_CLIENT_MARGIN = 0.0002
MANY_CLIENTS_RATIO = 1.5


@dataclass(frozen=True)
class SmallOp:
    """A row of the small-operation table and what its floor is made of."""

    label: str
    step: str  # the step name in the Load
    load: str  # the workload (loadclient.WORKLOADS)
    trips: str  # what it costs in round trips
    floor: tuple[str, ...] = ()  # steps whose p50s add up to its floor
    apart: tuple[str, ...] = ()  # the same floor from loads measured apart, for comparison
    # judged: p50 ≤ floor + margin (seconds) with one client, ≤ MANY_CLIENTS_RATIO x floor
    # with more; None: shown, not judged
    margin: float | None = None
    rate: bool = True  # show the workload's cycles per second


SMALL_OPS: tuple[SmallOp, ...] = (
    SmallOp("floor: bare Unix-socket round trip (echo thread)", "unix round trip", "unix",
            "1 socket"),
    SmallOp("floor: Unix connect + round trip + close", "unix connect + round trip",
            "unix-connect", "1 connect"),
    SmallOp("floor: gRPC no-op (grpc.health.v1 Check)", "gRPC health Check", "health", "1 gRPC"),
    SmallOp("floor: raw fallocate 2 MiB (shmem memfd, in the client)", "raw fallocate 2 MiB",
            "kernel", NA, rate=False),
    SmallOp("floor: raw punch hole 2 MiB", "raw punch 2 MiB", "kernel", NA, rate=False),
    SmallOp("floor: gRPC no-op, then raw fallocate 2 MiB", "gRPC no-op + raw fallocate",
            "rpc+kernel", "1 gRPC + fallocate", rate=False),
    SmallOp("floor: gRPC no-op, then raw punch 2 MiB", "gRPC no-op + raw punch",
            "rpc+kernel", "1 gRPC + punch", rate=False),
    SmallOp("floor: grpcio alone, unary no-op (bench server, no memplug code)",
            "grpcio unary no-op", "grpc-unary", "1 gRPC"),
    SmallOp("floor: grpcio alone, server stream of one message (Plug's shape)",
            "grpcio one-message stream", "grpc-stream", "1 gRPC stream"),
    SmallOp("GetStatus", "GetStatus", "status", "1 gRPC", ("gRPC health Check",)),
    SmallOp("GetRegion", "GetRegion", "get", "1 gRPC", ("gRPC health Check",),
            margin=ONE_CLIENT_MARGIN),
    SmallOp("Plug 2 MiB (one block)", "Plug 2 MiB", "plug", "1 gRPC stream + fallocate",
            ("gRPC no-op + raw fallocate",), ("gRPC health Check", "raw fallocate 2 MiB"),
            margin=ONE_CLIENT_MARGIN, rate=False),
    SmallOp("Unplug 2 MiB", "Unplug 2 MiB", "plug", "1 gRPC + punch",
            ("gRPC no-op + raw punch",), ("gRPC health Check", "raw punch 2 MiB"),
            margin=ONE_CLIENT_MARGIN, rate=False),
    SmallOp("Attach by ticket (gRPC Attach, then redeem on the fd socket)", "Attach by ticket",
            "ticket", "1 gRPC + 1 connect", ("gRPC health Check", "unix connect + round trip"),
            margin=ONE_CLIENT_MARGIN),
    SmallOp("fd socket OPEN (`open_region`: connect, OPEN, fd back, close; no gRPC)",
            "fd socket OPEN", "attach", "1 connect", ("unix connect + round trip",),
            margin=0.0001),
    SmallOp("Attach (`Client.attach(map_memory=False, sparse=True)`: OPEN, then GetRegion "
            "for a partly plugged region)", "Attach", "attach", "1 connect + 1 gRPC",
            ("unix connect + round trip", "gRPC health Check")),
)  # fmt: skip


def small_section(b: Bench) -> Section:
    s = Section("small", "Small operations: latency and throughput beside the floors")
    c = b.client()
    daemon = b.daemon()
    top = max(b.options.small_clients)
    for i in range(top):
        c.create_region(f"small-{i}", SMALL_REGION, "shmem")
    server = echo.EchoServer(b.workdir / "echo.sock")
    judged: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    attach_p50: dict[str, list[tuple[int, float]]] = defaultdict(list)
    stream_shape: list[str] = []
    grpc_alone: grpcecho.GrpcEcho | None = None
    try:
        grpc_alone = grpcecho.start(b.workdir / "grpcecho.sock")
        workloads = list(dict.fromkeys(op.load for op in SMALL_OPS))
        for clients in b.options.small_clients:
            b.log(f"small ops: {len(workloads)} workloads in turns, {clients_label(clients)} each")
            procs: dict[str, ClientProcesses] = {}
            try:
                for name in workloads:
                    socket = grpc_alone.socket if name in GRPC_ALONE else daemon.socket
                    procs[name] = ClientProcesses(name, clients, socket, server.path)
                loads = run_loads(procs, b.options.small_iterations, b.options.reps)
            finally:
                for started in procs.values():
                    started.close()
            table = _small_table(s, loads, clients, judged, attach_p50)
            s.tables.append(table)
            stream_shape.append(_stream_shape(loads, clients))
    finally:
        if grpc_alone is not None:
            grpc_alone.stop()
        server.close()
        for i in range(top):
            c.delete_region(f"small-{i}")
    for op in SMALL_OPS:
        if op.margin is not None:
            s.targets += _small_targets(op.label.split(" (")[0], op.margin, judged[op.label])
    for label, got in attach_p50.items():
        s.targets.append(
            Target(
                f"{label} p50 ≤ 2 ms",
                ", ".join(f"{fmt_time(v)} ({clients_label(n)})" for n, v in got),
                all(v <= 0.002 for _, v in got),
            )
        )
    s.notes += [
        "Each client is its own process (`bench.loadclient`), as memplugd's "
        "clients are; the clients of a load start each repetition together, and the loads "
        "take turns within each repetition, so an operation and its floors are measured "
        "seconds apart, not minutes. Latencies pool every repetition; ops/s is the median over "
        "repetitions of all clients' operations per second of wall time.",
        "Floor: what the operation cannot avoid, measured in the same run at the same "
        "concurrency. For Plug and Unplug it is one client cycle of a gRPC no-op followed by "
        "the same kernel work (fallocate or punch of 2 MiB) done in the client: with more "
        "clients than cores the kernel work and the RPCs compete for the CPUs, which adding "
        "up p50s measured in separate loads would leave out (that sum is shown beside it). "
        "Attach by ticket: a gRPC no-op plus a Unix-socket connect. fd socket OPEN: a "
        "Unix-socket connect, round trip and close, what the hand-off of an fd cannot avoid.",
        f"Targets: with one client, p50 within {fmt_time(ONE_CLIENT_MARGIN)} of its floor "
        "(the fd socket's OPEN within 0.1 ms): the daemon's own cost per call, which the "
        f"floor does not pay; with more clients, within {MANY_CLIENTS_RATIO:g}x of it, since "
        "clients, daemon threads and kernel work then share the cores.",
        "Plug and Unplug alternate on one block of a 64 MiB shmem region per client; the "
        "ops/s of that pair is given on the Plug+Unplug row.",
        "The grpcio-alone floors call a gRPC server with no memplug code in it "
        "(`bench.grpcecho`, its own process, built as memplugd builds its server: "
        "the same thread pool and options, no interceptor) serving memplug's service with "
        "two no-op methods: a unary one answers an empty Region, Plug streams one Progress "
        "and ends; the client "
        "opens its channel as `memplug.client` does and reads the stream to its end. The "
        "difference between the two is what a streamed call costs beyond a unary one in "
        "grpcio's threaded server and client, before any memplug code runs. They are not "
        "judged: the Plug 2 MiB row's floor stays a unary no-op plus fallocate.",
        f"Plug's floor with the stream shape (one-message stream p50 + raw fallocate "
        f"2 MiB p50, this run): {'; '.join(stream_shape)}.",
    ]
    return s


def _stream_shape(loads: dict[str, Load], clients: int) -> str:
    """Plug's floor counted with its RPC's shape, a server stream, beside Plug's p50."""

    def p50(load: str, step: str) -> float:
        return Result("", loads[load].latencies[step]).p50

    floor = p50("grpc-stream", "grpcio one-message stream") + p50("kernel", "raw fallocate 2 MiB")
    plug = p50("plug", "Plug 2 MiB")
    return (
        f"{fmt_time(floor)} with {clients_label(clients)} "
        f"(Plug 2 MiB p50 {fmt_time(plug)}, {_fmt_excess(plug - floor)})"
    )


def _small_targets(label: str, margin: float, got: list[tuple[int, float, float]]) -> list[Target]:
    """One client: p50 ≤ floor + margin; more: p50 ≤ MANY_CLIENTS_RATIO x floor."""
    targets = []
    for clients, p50, floor in got:
        if clients == 1:
            targets.append(
                Target(
                    f"{label} p50 ≤ its floor + {fmt_time(margin)} ({clients_label(clients)})",
                    f"floor {_fmt_excess(p50 - floor)} ({fmt_time(p50)} vs {fmt_time(floor)})",
                    p50 - floor <= margin,
                )
            )
        else:
            targets.append(
                Target(
                    f"{label} p50 ≤ {MANY_CLIENTS_RATIO:g}x its floor ({clients_label(clients)})",
                    f"{fmt_ratio(p50 / floor, 3)} ({fmt_time(p50)} vs {fmt_time(floor)})",
                    p50 <= MANY_CLIENTS_RATIO * floor,
                )
            )
    return targets


def _small_table(
    s: Section,
    loads: dict[str, Load],
    clients: int,
    judged: dict[str, list[tuple[int, float, float]]],
    attach_p50: dict[str, list[tuple[int, float]]],
) -> Table:
    table = Table(
        ("operation", "costs", "p50", "p99", "ops/s", "floor p50", "p50 - floor", "p50 ÷ floor",
         "p50 ÷ floors measured apart"),
        caption=f"**{clients_label(clients)} at once**:",
    )  # fmt: skip
    p50: dict[str, float] = {}
    for name, load in loads.items():
        for step, values in load.latencies.items():
            result = Result(
                f"small.{clients}.{step.replace(' ', '-')}",
                values,
                meta={"clients": clients, "ops_per_second": median(load.rates)},
            )
            s.results.append(result)
            p50[step] = result.p50
        s.results.append(Result(f"small.{clients}.{name}.rate", load.rates, unit="ops/s"))
    for op in SMALL_OPS:
        load = loads[op.load]
        result = Result("", load.latencies[op.step])
        floor = sum(p50[f] for f in op.floor) if op.floor else math.nan
        ratio = result.p50 / floor if op.floor else math.nan
        apart = result.p50 / sum(p50[f] for f in op.apart) if op.apart else math.nan
        if op.margin is not None:
            judged[op.label].append((clients, result.p50, floor))
        if op.step in ("Attach", "Attach by ticket"):  # what a consumer waits for
            attach_p50[op.label.split(" (")[0]].append((clients, result.p50))
        table.add(
            op.label, op.trips, fmt_time(result.p50), fmt_time(result.p99),
            fmt_ops(median(load.rates)) if op.rate else NA,
            fmt_time(floor), _fmt_excess(result.p50 - floor), fmt_ratio(ratio),
            fmt_ratio(apart) if op.apart else NA,
        )  # fmt: skip
    plug = loads["plug"].latencies
    pair = Result(
        "", [a + b for a, b in zip(plug["Plug 2 MiB"], plug["Unplug 2 MiB"], strict=True)]
    )
    table.add(
        "Plug + Unplug 2 MiB (pair)", "2 gRPC + fallocate + punch", fmt_time(pair.p50),
        fmt_time(pair.p99), fmt_ops(median(loads["plug"].rates)), NA, NA, NA, NA,
    )  # fmt: skip
    return table


def _fmt_excess(seconds: float) -> str:
    """p50 - floor, signed."""
    if math.isnan(seconds):
        return NA
    return f"{'+' if seconds >= 0 else '-'}{fmt_time(abs(seconds))}"


# =========================================================================== 4. footprint


def rss_section(b: Bench) -> Section:
    s = Section("rss", "Daemon footprint: exec to serving, idle RSS, RSS per region")
    reps, regions = b.options.reps, b.options.regions
    starts: list[memplugd.Memplugd] = []
    b.log(f"exec to serving: {reps} + 1 daemons")
    try:
        for i in range(reps + 1):
            if starts:
                starts[-1].stop()
            starts.append(memplugd.start(b.workdir / f"footprint-{i}"))
        daemon = starts[-1]
        exec_times = Result("rss.exec-to-serving", [d.exec_to_serving for d in starts[1:]])
        time.sleep(1.0)  # let start-up garbage settle
        idle = daemon.rss()
        with daemon.client() as c:
            b.log(f"creating {regions} regions")
            names = [f"r{i:05d}" for i in range(regions)]
            start = time.perf_counter()
            for name in names:
                c.create_region(name, BLOCK, "shmem")
            created = time.perf_counter() - start
            full = daemon.rss()
            start = time.perf_counter()
            for name in names:
                c.delete_region(name)
            deleted = time.perf_counter() - start
            after = daemon.rss()
    finally:
        for d in starts:
            d.stop()
    per_1000 = (full - idle) * 1000 / regions
    s.results += [
        exec_times,
        Result("rss.idle", [idle], unit="bytes"),
        Result(f"rss.with-{regions}-regions", [full], unit="bytes"),
        Result("rss.after-delete", [after], unit="bytes"),
        Result(f"rss.create-{regions}-regions", [created]),
        Result(f"rss.delete-{regions}-regions", [deleted]),
    ]
    table = Table(("figure", "value"))
    table.add(
        f"exec to serving (spawn → first GetStatus answer), median of {reps}",
        f"{fmt_time(exec_times.median)} (min {fmt_time(exec_times.minimum)})",
    )
    table.add("VmRSS idle (after start and one GetStatus)", fmt_mib(idle))
    table.add(f"VmRSS with {regions:,} regions (2 MiB shmem, unplugged)", fmt_mib(full))
    table.add(f"added by {regions:,} regions", fmt_mib(full - idle))
    table.add("VmRSS after deleting them", fmt_mib(after))
    table.add(
        f"{regions:,} CreateRegion calls, one client, in sequence",
        f"{fmt_time(created)} ({fmt_time(created / regions)} each)",
    )
    table.add(
        f"{regions:,} DeleteRegion calls",
        f"{fmt_time(deleted)} ({fmt_time(deleted / regions)} each)",
    )
    s.tables.append(table)
    scaled = "" if regions == 1000 else f" (scaled from {regions})"
    s.targets += [
        Target("idle RSS ≤ 60 MiB", fmt_mib(idle), idle <= 60 * MiB),
        Target("1,000 regions add ≤ 20 MiB", fmt_mib(int(per_1000)) + scaled, per_1000 <= 20 * MiB),
        Target("exec to serving ≤ 1.5 s", fmt_time(exec_times.median), exec_times.median <= 1.5),
    ]
    return s


def fmt_mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB"


# =========================================================================== registry

SECTIONS: dict[str, SectionFn] = {
    "plug": plug_section,
    "consumer": consumer_section,
    "small": small_section,
    "rss": rss_section,
    "thp": thp_section,
    "warmpool": warm_pool_section,
    "hugepool": hugepool_section,
    "split": split_section,
    "liveupdate": live_update_section,
    "takeover": takeover_section,
    "charge": charge_section,
    "multirange": multirange_section,
}
