"""Section multirange: 64 scattered 2 MiB blocks plugged and unplugged in one call vs 64 calls.

An allocator plugs and unplugs many small blocks. Three ways to do 64 of them,
taken in turns in the same run (stats.interleave): one Plug (Unplug) call with
the list of 64 ranges, 64 Plug (Unplug) calls of one block each, and 64
fallocate (punch hole) calls on a memfd in the caller (the kernel's floor,
no daemon at all). Each way has its own region (memfd) of 128 blocks; the 64
blocks are every other block, so none merges with its neighbour, listed in a
shuffled order.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable

from bench.context import Bench
from bench.machine import HUGE_2M
from bench.raw import Kind, RawMemory
from bench.report import NA, MiB, Section, Table, Target, fmt_ratio, fmt_size, fmt_time
from bench.stats import Result, interleave
from memplug.client import Client
from memplug.daemon.kernel import ops

BLOCKS = 64
BLOCK = 2 * MiB
REGION = 2 * BLOCKS * BLOCK  # every other block: no two of the 64 touch
NEED = 10.0  # one call's throughput ÷ 64 calls'


def scattered_blocks(seed: int = 64) -> list[tuple[int, int]]:
    """The 64 blocks, every other one of the region, in a shuffled order."""
    ranges = [(2 * i * BLOCK, BLOCK) for i in range(BLOCKS)]
    random.Random(seed).shuffle(ranges)
    return ranges


def _timed(work: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


def _nothing() -> None:
    pass


def _measure(b: Bench, c: Client, kind: Kind) -> dict[str, list[float]]:
    ranges = scattered_blocks()
    names = {"one": f"mr-{kind}-one", "many": f"mr-{kind}-many"}
    page_size = HUGE_2M if kind == "hugetlb" else 0
    for name in names.values():
        c.create_region(name, REGION, kind, page_size=page_size)
        b.stack.callback(c.delete_region, name)
    raw = b.stack.enter_context(RawMemory(kind, REGION, page_size=page_size or 4096))

    def plug_many() -> None:
        for offset, length in ranges:
            c.plug(names["many"], offset, length)

    def unplug_many() -> None:
        for offset, length in ranges:
            c.unplug(names["many"], offset, length)

    def raw_fallocate() -> None:
        for offset, length in ranges:
            ops.fallocate(raw.fd, offset, length)

    def raw_punch() -> None:
        for offset, length in ranges:
            ops.punch_hole(raw.fd, offset, length)

    # In this order in each turn: every plug leaves its 64 blocks plugged (or
    # allocated) for the unplug of the same way, which leaves the region empty.
    return interleave(
        {
            "plug-one": (_timed(lambda: c.plug(names["one"], ranges=ranges)), _nothing),
            "plug-many": (_timed(plug_many), _nothing),
            "plug-raw": (_timed(raw_fallocate), _nothing),
            "unplug-one": (_timed(lambda: c.unplug(names["one"], ranges=ranges)), _nothing),
            "unplug-many": (_timed(unplug_many), _nothing),
            "unplug-raw": (_timed(raw_punch), _nothing),
        },
        reps=b.options.reps,
    )


def multirange_section(b: Bench) -> Section:
    s = Section(
        "multirange", f"{BLOCKS} scattered 2 MiB blocks: one call with a list vs {BLOCKS} calls"
    )
    c = b.client()
    kinds: list[Kind] = ["shmem"]
    why = b.can("hugetlb")
    if why is None:
        kinds.append("hugetlb")
    else:
        s.notes.append(f"hugetlb skipped: {why}")
    b.warm_up()
    load_before = os.getloadavg()[0]
    total = BLOCKS * BLOCK
    table = Table(("backing", "op", "way", "median", "p99", "per block", "vs one call"))
    for kind in kinds:
        if kind == "hugetlb":
            b.hugepages(3 * BLOCKS)  # the three ways hold their 64 blocks at once
        samples = _measure(b, c, kind)
        for op in ("plug", "unplug"):
            results = {
                way: Result(
                    f"multirange.{kind}.{op}-{way}",
                    samples[f"{op}-{way}"],
                    meta={"kind": kind, "blocks": BLOCKS, "block": BLOCK},
                )
                for way in ("one", "many", "raw")
            }
            s.results += results.values()
            one = results["one"].median
            labels = {
                "one": "1 call, 64 ranges",
                "many": f"{BLOCKS} calls",
                "raw": f"{BLOCKS} {'fallocate' if op == 'plug' else 'punch hole'} (no daemon)",
            }
            for way, result in results.items():
                table.add(
                    kind,
                    op,
                    labels[way],
                    fmt_time(result.median),
                    fmt_time(result.p99),
                    fmt_time(result.median / BLOCKS),
                    fmt_ratio(result.median / one) if one else NA,
                )
            many, floor = results["many"].median, results["raw"].median
            ratio = many / one if one else math.nan
            # One call cannot beat the kernel's own work: where that work is most
            # of the 64 calls' time, the ratio is capped by many / floor.
            ceiling = many / floor if floor else math.nan
            s.targets.append(
                Target(
                    f"{kind} {op} of {BLOCKS} x 2 MiB: one call >= {NEED:g}x the throughput "
                    f"of {BLOCKS} calls",
                    f"{fmt_ratio(ratio, 3)} ({fmt_time(one)} vs {fmt_time(many)}; the "
                    f"{BLOCKS} syscalls alone {fmt_time(floor)}: at most {fmt_ratio(ceiling)})",
                    ratio >= NEED,
                )
            )
    s.tables.append(table)
    s.notes.append(
        f"{fmt_size(total)} in {BLOCKS} blocks of 2 MiB, every other block of a "
        f"{fmt_size(REGION)} region, listed shuffled. Taken in turns (plug one, plug many, "
        "raw fallocate, unplug one, unplug many, raw punch), medians of "
        f"{b.options.reps} after a warm-up turn; the client is in this process, over the "
        f"daemon's Unix socket. 'vs one call' is the way's time ÷ one call's. Load "
        f"average at the start of the section {load_before:.2f}, at its end "
        f"{os.getloadavg()[0]:.2f} (the machine is shared)."
    )
    return s
