"""Section charge: a shmem plug charged to a memory cgroup (charge_cgroup) vs uncharged.

A charged plug allocates in helper processes that first join the region's
cgroup (one per worker thread, started for the call), so the kernel bills that
cgroup; an uncharged one allocates in the daemon's own threads. Both are taken
in turns on the same daemon (stats.interleave), so the ratio is what the
helpers cost. Besides the wall time, the daemon's CPU time per plug is read
from /proc/PID/stat, its children's included (the helpers, reaped by the
daemon), which the load of a shared machine disturbs less.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.context import Bench
from bench.report import NA, GiB, MiB, Section, Table, fmt_ratio, fmt_size, fmt_time
from bench.stats import Result, interleave
from memplug.client import Client
from memplug.daemon.kernel import cgroup

SIZES = (256 * MiB, GiB)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children it has reaped (the helpers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command: state is field 3, so utime..cstime (14..17) are [11:15].
    return sum(int(f) for f in fields[11:15]) / TICKS


@contextlib.contextmanager
def child_memory_cgroup(pid: int) -> Iterator[str]:
    """A fresh memory cgroup beneath process pid's own; yields its path, removed after."""
    memory = cgroup.controller("memory")
    if memory is None:
        raise RuntimeError("no memory cgroup controller is mounted")
    own = ""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        ident, names, where = line.split(":", 2)
        if (memory.version == 2 and ident == "0") or (
            memory.version == 1 and "memory" in names.split(",")
        ):
            own = where
    path = f"{own.rstrip('/')}/memplug-bench-{secrets.token_hex(4)}"
    directory = memory.mount / path.lstrip("/")
    directory.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):  # the kernel may still drain the freed pages' charges
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def charge_section(b: Bench) -> Section:
    s = Section("charge", "Charged plug: shmem charged to a memory cgroup vs the daemon's")
    if not b.root:
        s.notes.append("skipped: needs root (creates a memory cgroup)")
        return s
    if cgroup.controller("memory") is None:
        s.notes.append("skipped: no memory cgroup controller is mounted")
        return s
    b.warm_up()
    daemon = b.daemon()
    c = b.client()
    target = b.stack.enter_context(child_memory_cgroup(daemon.proc.pid))
    load_before = os.getloadavg()
    table = Table(
        (
            "size",
            "uncharged",
            "charged",
            "charged ÷ uncharged",
            "CPU uncharged",
            "CPU charged",
            "CPU ratio",
        )
    )
    for size in SIZES:
        plain, charged, cpu_plain, cpu_charged = _measure(b, c, daemon.proc.pid, target, size)
        s.results += [plain, charged, cpu_plain, cpu_charged]
        table.add(
            fmt_size(size),
            fmt_time(plain.median),
            fmt_time(charged.median),
            fmt_ratio(charged.median / plain.median) if plain.median else NA,
            fmt_time(cpu_plain.median),
            fmt_time(cpu_charged.median),
            fmt_ratio(cpu_charged.median / cpu_plain.median) if cpu_plain.median else NA,
        )
    load_after = os.getloadavg()
    s.tables.append(table)
    s.notes.append(
        f"Each repetition creates a shmem region, times its plug (fallocate) and deletes it "
        f"(untimed): uncharged, then charged to {target}, a memory cgroup made for the run "
        "beneath the daemon's own, in turns; medians of "
        f"{b.options.reps} after one warm-up turn. CPU: the daemon's user + system time per "
        "plug, its reaped children's (the helpers) included. Load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after."
    )
    return s


def _measure(
    b: Bench, c: Client, pid: int, target: str, size: int
) -> tuple[Result, Result, Result, Result]:
    """Wall and CPU time of plugs of `size`, uncharged and charged to `target`, in turns."""
    cpu: dict[str, list[float]] = {"uncharged": [], "charged": []}

    def plug(key: str, charge: str) -> Callable[[], float]:
        def run() -> float:
            c.create_region("charge", size, "shmem", charge_cgroup=charge)
            cpu_start = cpu_seconds(pid)
            start = time.perf_counter()
            c.plug("charge")
            wall = time.perf_counter() - start
            cpu[key].append(cpu_seconds(pid) - cpu_start)
            return wall

        return run

    def delete() -> None:
        c.delete_region("charge")

    samples = interleave(
        {
            "uncharged": (plug("uncharged", ""), delete),
            "charged": (plug("charged", target), delete),
        },
        reps=b.options.reps,
    )
    meta = {"size": size, "backing": "shmem", "cgroup": target}
    key = f"charge.shmem.{size // MiB}M"
    reps = b.options.reps  # interleave drops its warm-up turn from the wall times; so here
    return (
        Result(f"{key}.uncharged", samples["uncharged"], meta=meta),
        Result(f"{key}.charged", samples["charged"], meta=meta),
        Result(f"{key}.uncharged.cpu", cpu["uncharged"][-reps:], meta=meta),
        Result(f"{key}.charged.cpu", cpu["charged"][-reps:], meta=meta),
    )
