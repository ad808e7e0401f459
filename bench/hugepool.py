"""Section hugepool: a hugetlb plug that grows its pool (--hugetlb-budget) vs a preset pool.

Both plugs are taken in turns in the same run (stats.interleave), so the ratio
is the cost of growing the pool (the kernel allocating and zeroing the pages
when nr_hugepages is written, plus the daemon's sysfs reads and store write)
against a plug whose pages were in the pool already.
"""

from __future__ import annotations

import time

from bench import memplugd
from bench.context import Bench
from bench.machine import HUGE_2M
from bench.report import NA, MiB, Section, Table, fmt_rate, fmt_ratio, fmt_size, fmt_time
from bench.stats import Result, interleave
from memplug.client import Client
from memplug.common import memory


def _empty_pool() -> None:
    """Shrink the 2 MiB pool to the pages in use: no free page left for the next plug."""
    pool = memory.huge_pool(HUGE_2M)
    spare = pool.free - pool.reserved
    if spare > 0:
        path = memory.HUGEPAGES_SYSFS / f"hugepages-{HUGE_2M // 1024}kB" / "nr_hugepages"
        path.write_text(str(pool.total - spare))


def hugepool_section(b: Bench) -> Section:
    s = Section("hugepool", "hugetlb pool on demand: plug growing the pool vs from a preset pool")
    why = b.can("hugetlb")
    if why is not None:
        s.notes.append(f"skipped: {why}")
        return s
    size = b.options.consumer_size
    pages = size // HUGE_2M
    b.warm_up()
    preset = b.client()
    b.hugepages(pages)  # the benchmark's pool, restored at exit (also after _empty_pool)
    growing = memplugd.start(
        b.workdir / "memplugd-budget", "--hugetlb-budget", f"2M:{size // MiB}M"
    )
    b.stack.callback(growing.stop)
    grower = growing.client()
    b.stack.callback(grower.close)

    def plug_from(c: Client) -> float:
        c.create_region("hp", size, "hugetlb", page_size=HUGE_2M)
        start = time.perf_counter()
        c.plug("hp")
        return time.perf_counter() - start

    def grow() -> float:
        _empty_pool()
        return plug_from(grower)

    def from_preset() -> float:
        b.hugepages(pages)
        return plug_from(preset)

    samples = interleave(
        {
            "grow": (grow, lambda: grower.delete_region("hp")),
            "preset": (from_preset, lambda: preset.delete_region("hp")),
        },
        reps=b.options.reps,
    )
    grown = Result("hugepool.plug-growing-pool", samples["grow"], meta={"size": size})
    ready = Result("hugepool.plug-preset-pool", samples["preset"], meta={"size": size})
    s.results += [grown, ready]
    table = Table(("plug", "size", "median", "p99", "rate", "vs preset"))
    for label, result in (
        (f"empty pool, --hugetlb-budget 2M:{size // MiB}M", grown),
        ("preset pool (nr_hugepages set before)", ready),
    ):
        table.add(
            label,
            fmt_size(size),
            fmt_time(result.median),
            fmt_time(result.p99),
            fmt_rate(size, result.median),
            fmt_ratio(result.median / ready.median) if ready.median else NA,
        )
    s.tables.append(table)
    s.notes.append(
        f"Each repetition creates a {fmt_size(size)} hugetlb region (2 MiB pages), times its "
        "plug and deletes it (untimed). Growing: a second memplugd with a budget, the pool "
        f"shrunk to the pages in use before each plug, so the daemon adds all {pages} pages "
        "(nr_hugepages written, read back) and gives them back at the delete. Preset: the "
        "shared memplugd, with the pages already free in the pool. Taken in turns."
    )
    return s
