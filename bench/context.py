"""What every section shares: options, the daemon, the tmpfs, the hugetlb pool, a cache."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench import memplugd, raw
from bench.machine import HUGE_2M, HugePool, meminfo, qemu_binary, tmpfs
from bench.raw import Kind, RawPaths
from bench.report import GiB, MiB, fmt_size
from memplug.client import Client
from memplug.common.errors import ResourceExhausted

T = TypeVar("T")

TMPFS_SIZE = "2G"
POOL_RETRIES = 3


@dataclass(frozen=True)
class Options:
    reps: int
    quick: bool
    threads: int  # N: the raw paths and QEMU run on 1..N threads
    plug_cases: tuple[tuple[Kind, int], ...]
    consumer_size: int
    small_iterations: int  # per client and repetition
    small_clients: tuple[int, ...]
    regions: int  # for the RSS-per-region figure

    @classmethod
    def make(cls, *, reps: int | None, quick: bool) -> Options:
        threads = os.cpu_count() or 1
        if quick:
            return cls(
                reps=reps or 3,
                quick=True,
                threads=threads,
                plug_cases=(("shmem", 128 * MiB), ("shmem", 256 * MiB), ("hugetlb", 128 * MiB),
                            ("file", 128 * MiB)),
                consumer_size=128 * MiB,
                small_iterations=30,
                small_clients=(1, 4),
                regions=200,
            )  # fmt: skip
        return cls(
            reps=reps or 7,
            quick=False,
            threads=threads,
            # hugetlb 8 GiB: the largest case, a third of this kind of VM's 24 GiB
            # (skipped, saying why, where the pool cannot be grown that far).
            plug_cases=(
                ("shmem", GiB),
                ("shmem", 4 * GiB),
                ("hugetlb", GiB),
                ("hugetlb", 8 * GiB),
                ("file", GiB),
            ),
            consumer_size=GiB,
            small_iterations=200,
            small_clients=(1, 4),
            regions=1000,
        )

    @property
    def hugetlb_pages(self) -> int:
        """2 MiB pages the largest hugetlb figure needs at one time."""
        sizes = [size for kind, size in self.plug_cases if kind == "hugetlb"]
        return max([*sizes, self.consumer_size]) // HUGE_2M


class Bench:
    """The run's shared state; everything it sets up is torn down by the ExitStack."""

    def __init__(self, options: Options, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.options = options
        self.workdir = workdir
        self.stack = stack
        self.root = os.geteuid() == 0
        self.qemu = qemu_binary()
        self.raw = RawPaths(options.threads)
        stack.callback(self.raw.shutdown)
        self._daemon: memplugd.Memplugd | None = None
        self._tmpfs: Path | None = None
        self._pool: HugePool | None = None
        self._warm = False
        self._cache: dict[str, object] = {}
        self._started = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self._started:6.1f}s] {message}", file=sys.stderr)

    # ------------------------------------------------------------------ shared resources

    def can(self, kind: Kind) -> str | None:
        """Why kind cannot be measured here, or None if it can."""
        if kind in ("hugetlb", "file") and not self.root:
            return "needs root (hugetlb pool, tmpfs mount)"
        if kind == "hugetlb" and not HugePool().path.exists():
            return "the kernel offers no 2 MiB hugetlb pool"
        return None

    def can_size(self, kind: Kind, size: int) -> str | None:
        """Why kind cannot be measured at size here (beyond can(kind)), or None if it can."""
        if kind != "hugetlb":
            return None
        try:
            self.hugepages(size // HUGE_2M)
        except RuntimeError as exc:
            return str(exc)
        return None

    def tmpfs(self) -> Path:
        """The benchmark's own tmpfs (size=2G), mounted once, unmounted at exit."""
        if self._tmpfs is None:
            self._tmpfs = self.stack.enter_context(tmpfs(self.workdir / "tmpfs", TMPFS_SIZE))
        return self._tmpfs

    def hugepages(self, pages: int) -> None:
        """At least `pages` free 2 MiB pages for us now; the original pool is restored at exit."""
        if self._pool is None:
            pool = HugePool()
            self.stack.callback(pool.restore)
            self._pool = pool
        self._pool.ensure(pages)

    def with_pages(
        self,
        kind: Kind,
        size: int,
        run: Callable[[], T],
        undo: Callable[[], object] | None = None,
    ) -> Callable[[], T]:
        """run, made sure of free huge pages first if kind is hugetlb, and retried if short.

        Tests running beside the benchmark may shrink the pool between our
        check and our use (EFAULT, ENOMEM, PoolExhausted, QEMU failing to start).
        undo() drops what a failed try left allocated, so the retry starts empty.
        """
        if kind != "hugetlb":
            return run
        pages = size // HUGE_2M

        def guarded() -> T:
            for attempt in range(POOL_RETRIES):
                self.hugepages(pages)
                try:
                    return run()
                except (OSError, ResourceExhausted, RuntimeError) as exc:
                    if attempt == POOL_RETRIES - 1:
                        raise
                    self.log(f"hugetlb run failed ({exc!r}); pool taken meanwhile? retrying")
                    if undo is not None:
                        undo()
            raise AssertionError("unreachable")

        return guarded

    def daemon(self) -> memplugd.Memplugd:
        """The memplugd the plug, consumer and small-op sections share (started once)."""
        if self._daemon is None:
            extra = ["--allow-dir", str(self.tmpfs())] if self.root else []
            self.log("starting memplugd")
            self._daemon = memplugd.start(self.workdir / "memplugd", *extra)
            self.stack.callback(self._daemon.stop)
        return self._daemon

    def client(self) -> Client:
        c = self.daemon().client()
        self.stack.callback(c.close)
        return c

    def warm_up(self) -> None:
        """Touch the memory the figures will use once: the VM's first touch runs at ~0.5 GB/s."""
        if self._warm:
            return
        self._warm = True
        # The hugetlb pool's pages are touched by their own warm-up below.
        largest = max(size for kind, size in self.options.plug_cases if kind != "hugetlb")
        shmem = min(largest + largest // 4, meminfo("MemAvailable") // 2)
        self.log(f"warm-up: populating and discarding {fmt_size(shmem)} of shmem")
        raw.warm_up(shmem, self.raw)
        if self.can("hugetlb") is None:
            pages = self.options.hugetlb_pages
            try:
                self.hugepages(pages)
                self.log(f"warm-up: populating and discarding {pages} pages of the 2 MiB pool")
                with raw.RawMemory("hugetlb", pages * HUGE_2M, page_size=HUGE_2M) as mem:
                    threads = self.options.threads
                    run = self.with_pages(
                        "hugetlb",
                        mem.size,
                        lambda: self.raw.populate(mem, threads),
                        undo=mem.discard,
                    )
                    run()
                    mem.discard()
            except (RuntimeError, OSError) as exc:  # the cases that need the pages say so
                self.log(f"warm-up: the hugetlb pool skipped: {exc}")

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """compute() once per run: a figure two sections need (QEMU's prealloc) is shared."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]  # type: ignore[return-value]
