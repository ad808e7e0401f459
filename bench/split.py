"""Section split: how hugetlb MADV_POPULATE_WRITE is shared out over threads.

One hugetlb memfd, populated in the benchmark process (bench.raw) on all the
benchmark's threads, three ways, in turns (stats.interleave): one contiguous
share per thread ("halves" on 2 threads), chunks dealt round-robin to the
threads in advance, and chunks the threads pull from one queue as they finish
the last (what memplugd's workers do), for several chunk sizes; and on one
thread for reference. memplugd's choice (strategy.make_plan, runner.Runner)
rests on these figures; see docs/strategies.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from bench.context import Bench
from bench.machine import HUGE_2M, load_average
from bench.raw import RawMemory
from bench.report import MiB, Section, Table, fmt_rate, fmt_ratio, fmt_size, fmt_time
from bench.stats import Result, Run, interleave
from memplug.common import memory
from memplug.daemon.kernel import ops

CHUNKS = (2 * MiB, 16 * MiB, 64 * MiB, 128 * MiB)

Shares = list[list[tuple[int, int]]]  # per thread: (offset, length) pieces, in order


def contiguous(size: int, threads: int) -> Shares:
    step = size // threads // HUGE_2M * HUGE_2M
    shares = [[(i * step, step)] for i in range(threads - 1)]
    shares.append([((threads - 1) * step, size - (threads - 1) * step)])
    return shares


def round_robin(size: int, threads: int, chunk: int) -> Shares:
    shares: Shares = [[] for _ in range(threads)]
    for i, offset in enumerate(range(0, size, chunk)):
        shares[i % threads].append((offset, min(chunk, size - offset)))
    return shares


def split_section(b: Bench) -> Section:
    s = Section("split", "hugetlb populate over threads: fixed shares vs a queue of chunks")
    why = b.can("hugetlb")
    if why is not None:
        s.notes.append(f"skipped: {why}")
        return s
    size, threads = b.options.consumer_size, b.options.threads  # 1 GiB; --quick: 128 MiB
    b.warm_up()
    with RawMemory("hugetlb", size, page_size=HUGE_2M) as mem:

        def timed_mapping(populate: Callable[[int], None]) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                with ops.map_shared(mem.fd, 0, size) as mapping:
                    populate(mapping.address)
                    return time.perf_counter() - start  # munmap untimed, as bench.raw

            return b.with_pages("hugetlb", size, run, undo=mem.discard)

        def shares_run(shares: Shares) -> Run:
            def populate(address: int) -> None:
                def one(pieces: list[tuple[int, int]]) -> None:
                    for offset, length in pieces:
                        memory.populate(address + offset, length, write=True)

                workers = [threading.Thread(target=one, args=(p,)) for p in shares]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()

            return timed_mapping(populate), mem.discard

        def queue_run(chunk: int) -> Run:
            return (
                b.with_pages(
                    "hugetlb", size, lambda: b.raw.populate_chunks(mem, threads, chunk), mem.discard
                ),
                mem.discard,
            )

        runs: dict[str, Run] = {
            "1 thread": shares_run(contiguous(size, 1)),
            f"{threads} threads, one contiguous share each": shares_run(contiguous(size, threads)),
        }
        for chunk in CHUNKS:
            label = f"{threads} threads, {fmt_size(chunk)} chunks dealt round-robin"
            runs[label] = shares_run(round_robin(size, threads, chunk))
            runs[f"{threads} threads, {fmt_size(chunk)} chunks pulled from a queue"] = queue_run(
                chunk
            )
        b.log(f"split: hugetlb {fmt_size(size)} populate, {len(runs)} ways, interleaved")
        load_before = load_average()
        samples = interleave(runs, reps=b.options.reps)
        load_after = load_average()
    results = {
        label: Result(f"split.hugetlb.{i}", v, meta={"size": size, "label": label})
        for i, (label, v) in enumerate(samples.items())
    }
    s.results += list(results.values())
    table = Table(
        ("method", "median", "min", "speed", "÷ one contiguous share each"),
        caption=f"hugetlb 2 MiB memfd, {fmt_size(size)}, MADV_POPULATE_WRITE (medians, "
        f"{b.options.reps} repetitions in turns; load average {load_before:.2f} before, "
        f"{load_after:.2f} after):",
    )
    shares = results[f"{threads} threads, one contiguous share each"].median
    for label, r in results.items():
        table.add(
            label, fmt_time(r.median), fmt_time(r.minimum), fmt_rate(size, r.median),
            fmt_ratio(shares / r.median if r.median > 0 else float("nan")),
        )  # fmt: skip
    s.tables.append(table)
    s.notes.append(
        "Threads are started per repetition for the fixed shares (as QEMU's prealloc does) "
        "and reused from the benchmark's pool for the queue (as memplugd's workers are); "
        "thread start-up costs tens of microseconds, below what these rows resolve."
    )
    return s
