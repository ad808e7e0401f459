"""Sections 6 and 7: shmem transparent huge pages, and the warm pool.

THP: the benchmark (never the daemon) switches shmem_enabled to advise for
the section and restores it. The target compares a THP region's plug with
memset over populated memory, measured in the same run (the bandwidth limit).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator

from bench import memplugd
from bench.context import Bench
from bench.report import (
    NA,
    MiB,
    Section,
    Table,
    Target,
    fmt_rate,
    fmt_ratio,
    fmt_size,
    fmt_time,
)
from bench.stats import Result, repeat, timed
from memplug.client import Client
from memplug.common import memory
from memplug.daemon.kernel import ops, probe

HUGE = 2 * MiB
KNOBS = (probe.THP_SYSFS / "shmem_enabled", probe.THP_SYSFS / "hugepages-2048kB" / "shmem_enabled")


@contextlib.contextmanager
def shmem_thp(mode: str) -> Iterator[None]:
    """shmem_enabled = mode (the per-size knob to inherit) for a while; restored after."""
    saved = {k: probe._selected(k) for k in KNOBS if k.exists()}
    try:
        KNOBS[0].write_text(mode)
        if KNOBS[1].exists():
            KNOBS[1].write_text("inherit")
        yield
    finally:
        for knob, value in saved.items():
            if value is not None:
                knob.write_text(value)


def memset_bandwidth(b: Bench, size: int) -> Result:
    """memset over already populated (THP) shmem, one thread: the memory bandwidth limit."""
    fd = ops.memfd_create("memplug-bench-memset", ops.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with ops.map_shared(fd, 0, size, align=HUGE) as m:
            memory.madvise(m.address, size, memory.MADV_HUGEPAGE)
            memory.populate(m.address, size, write=True)

            def fill() -> float:
                return timed(lambda: ctypes.memset(m.address, 0x5A, size))

            samples = repeat(fill, reps=b.options.reps)
    finally:
        os.close(fd)
    return Result("thp.memset", samples, meta={"size": size})


def raw_thp_populate(b: Bench, size: int) -> Result:
    """MADV_POPULATE_WRITE of a 2 MiB-aligned MADV_HUGEPAGE memfd mapping on N threads."""
    fd = ops.memfd_create("memplug-bench-thp", ops.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    n = b.options.threads

    def run() -> float:
        start = time.perf_counter()
        with ops.map_shared(fd, 0, size, align=HUGE) as m:
            memory.madvise(m.address, size, memory.MADV_HUGEPAGE)
            b.raw._populate_mapping(m.address, size, n, HUGE, True)
            return time.perf_counter() - start

    try:
        samples = repeat(run, reps=b.options.reps, reset=lambda: ops.punch_hole(fd, 0, size))
    finally:
        os.close(fd)
    return Result("thp.raw-populate", samples, meta={"size": size, "threads": n})


def memplug_thp_plug(b: Bench, size: int, strategy: str) -> tuple[Result, str]:
    c = b.client()
    name = f"thp-{strategy}"
    c.create_region(name, size, transparent_huge_pages=True)
    zeroing: set[str] = set()

    def run() -> float:
        start = time.perf_counter()
        result = c.plug(name, 0, size, strategy=strategy)
        zeroing.add(result.zeroing)
        return time.perf_counter() - start

    try:
        samples = repeat(run, reps=b.options.reps, reset=lambda: c.unplug(name, 0, size))
    finally:
        c.delete_region(name)
    return Result(f"thp.memplug.{strategy}", samples, meta={"size": size}), ",".join(zeroing)


def thp_section(b: Bench) -> Section:
    s = Section("thp", "Shmem transparent huge pages: plug at memory bandwidth")
    if not b.root or not KNOBS[0].exists():
        s.notes.append("skipped: needs root and a kernel with shmem THP")
        s.targets.append(Target("THP plug ≥ 0.9x memset bandwidth", "not measured", None))
        return s
    size = b.options.consumer_size
    b.warm_up()
    table = Table(("method", "size", "median", "rate", "zeroing", "÷ memset"))
    with shmem_thp("advise"):
        memset = memset_bandwidth(b, size)
        raw = raw_thp_populate(b, size)
        plug, zeroing = memplug_thp_plug(b, size, "auto")
    with shmem_thp("within_size"):
        deferred, deferred_zeroing = memplug_thp_plug(b, size, "fallocate")
    s.results += [memset, raw, plug, deferred]
    ratio = memset.median / plug.median if plug.median > 0 else float("nan")
    rows = (
        ("memset over populated THP memory, 1 thread", memset, "-", NA),
        (f"raw MADV_POPULATE_WRITE + MADV_HUGEPAGE, {b.options.threads} threads", raw, "done",
         fmt_ratio(memset.median / raw.median)),
        ("memplug Plug, THP region (advise)", plug, zeroing, fmt_ratio(ratio)),
        ("memplug Plug strategy=fallocate (within_size)", deferred, deferred_zeroing,
         fmt_ratio(memset.median / deferred.median)),
    )  # fmt: skip
    for label, result, zero, rel in rows:
        rate = fmt_rate(size, result.median)
        table.add(label, fmt_size(size), fmt_time(result.median), rate, zero, rel)
    s.tables.append(table)
    s.targets.append(
        Target(
            f"THP region plug ≥ 0.9x memset bandwidth ({fmt_size(size)})",
            f"{fmt_ratio(ratio, 3)} ({fmt_rate(size, plug.median)} vs memset "
            f"{fmt_rate(size, memset.median)}; zeroing {zeroing})",
            ratio >= 0.9,
        )
    )
    s.notes.append(
        "shmem_enabled is switched by the benchmark for this section and restored. 'zeroing' "
        "is what the daemon reports: done during the plug, or deferred to the first touch "
        "(fallocate with within_size reserves huge pages without clearing them)."
    )
    return s


# =========================================================================== warm pool


def warm_pool_section(b: Bench) -> Section:
    s = Section("warmpool", "Warm pool: create + plug + attach, from the pool vs from nothing")
    size = b.options.consumer_size
    b.warm_up()
    pooled = memplugd.start(b.workdir / "memplugd-pool", "--warm-pool", f"shmem:{size}:1")
    b.stack.callback(pooled.stop)
    cold = b.client()
    warm = pooled.client()
    b.stack.callback(warm.close)

    def cycle(c: Client, name: str) -> float:
        start = time.perf_counter()
        c.create_region(name, size, transparent_huge_pages=False)
        c.plug(name)
        c.attach(name, map_memory=False).close()
        elapsed = time.perf_counter() - start
        c.delete_region(name)
        return elapsed

    def pool_ready() -> None:
        deadline = time.monotonic() + 60
        while warm.status().warm_pools[0].ready < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the warm pool did not refill in 60 s")
            time.sleep(0.01)

    pool_ready()
    reps = b.options.reps
    from_pool = Result(
        "warmpool.from-pool", repeat(lambda: cycle(warm, "w"), reps=reps, reset=pool_ready)
    )
    from_nothing = Result("warmpool.from-nothing", repeat(lambda: cycle(cold, "n"), reps=reps))
    s.results += [from_pool, from_nothing]
    table = Table(("path", "size", "median", "p99", "speed-up"))
    for label, result in (("from the warm pool", from_pool), ("from nothing", from_nothing)):
        table.add(
            label,
            fmt_size(size),
            fmt_time(result.median),
            fmt_time(result.p99),
            fmt_ratio(from_nothing.median / result.median),
        )
    s.tables.append(table)
    hits = warm.status().warm_pools[0].hits
    s.notes.append(
        f"`--warm-pool shmem:{size // MiB}M:1` on a second daemon; each cycle creates a "
        f"{fmt_size(size)} shmem region, plugs all of it, attaches (fd only) and deletes it; "
        f"the pool refills between cycles (untimed). Pool hits in this run: {hits}."
    )
    return s
