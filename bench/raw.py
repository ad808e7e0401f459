"""The raw kernel paths, in this (plain) process, through memplug.daemon.kernel.ops.

ops calls libc through ctypes.CDLL, which releases the GIL, so the populate
threads here really run in parallel. The memory is the same kind the daemon
uses: a shmem memfd, a hugetlb memfd, or a file on the benchmark's tmpfs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from bench.stats import timed
from memplug.common import memory
from memplug.common.sizes import MiB
from memplug.daemon.kernel import ops

CHUNK = 64 * MiB  # the engine's chunk (memplug.daemon.engine.strategy.CHUNK_BYTES)

Kind = Literal["shmem", "hugetlb", "file"]
KINDS: tuple[Kind, ...] = ("shmem", "hugetlb", "file")


class RawMemory:
    """An fd of `size` bytes with nothing allocated; close() frees everything."""

    def __init__(
        self, kind: Kind, size: int, *, page_size: int, directory: Path | None = None
    ) -> None:
        self.kind = kind
        self.size = size
        self.page_size = page_size
        self.path: Path | None = None
        if kind == "file":
            if directory is None:
                raise ValueError("a file needs a directory")
            self.path = directory / f"raw-{os.getpid()}-{time.monotonic_ns()}.img"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            flags = ops.MFD_CLOEXEC
            if kind == "hugetlb":
                flags |= ops.huge_page_flag(page_size)
            self.fd = ops.memfd_create(f"memplug-bench-{kind}", flags)
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            self.close()
            raise

    def discard(self) -> None:
        """Punch the whole range: the next repetition starts from nothing allocated."""
        ops.punch_hole(self.fd, 0, self.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> RawMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slices(size: int, threads: int, align: int) -> list[tuple[int, int]]:
    """Disjoint, align-multiple pieces of [0, size), one per thread, the last takes the rest."""
    step = size // threads // align * align
    pieces = [(i * step, step) for i in range(threads - 1)]
    pieces.append(((threads - 1) * step, size - (threads - 1) * step))
    return [p for p in pieces if p[1]]


class RawPaths:
    """Runs the raw methods; one thread pool for every populate, made once."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="bench-raw")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def elsewhere(self, fn: Callable[[], object]) -> None:
        """fn() on one of the pool's threads, not this one."""
        self._pool.submit(fn).result()

    def fallocate(self, mem: RawMemory) -> float:
        """fallocate(fd, KEEP_SIZE, 0, size) on one thread, as the daemon's shmem plug."""
        return timed(lambda: ops.fallocate(mem.fd, 0, mem.size))

    def populate(self, mem: RawMemory, threads: int, *, write: bool = True) -> float:
        """map + MADV_POPULATE_* over disjoint slices on `threads` threads; unmap untimed."""
        start = time.perf_counter()
        mapping = ops.map_shared(mem.fd, 0, mem.size)
        try:
            self._populate_mapping(mapping.address, mem.size, threads, mem.page_size, write)
            return time.perf_counter() - start
        finally:
            mapping.close()

    def populate_chunks(self, mem: RawMemory, threads: int, chunk: int = CHUNK) -> float:
        """map + MADV_POPULATE_WRITE of `chunk`-byte pieces, in address order, that
        `threads` threads pull from one queue (as memplugd's workers do); unmap untimed."""
        start = time.perf_counter()
        mapping = ops.map_shared(mem.fd, 0, mem.size)
        try:
            self._populate_pulled(mapping.address, mem.size, threads, chunk)
            return time.perf_counter() - start
        finally:
            mapping.close()

    def fallocate_then_populate(self, mem: RawMemory, threads: int) -> float:
        """fallocate on one thread, then MADV_POPULATE_WRITE (page tables) on `threads`."""
        start = time.perf_counter()
        ops.fallocate(mem.fd, 0, mem.size)
        mapping = ops.map_shared(mem.fd, 0, mem.size)
        try:
            self._populate_mapping(mapping.address, mem.size, threads, mem.page_size, True)
            return time.perf_counter() - start
        finally:
            mapping.close()

    def _populate_mapping(
        self, address: int, size: int, threads: int, align: int, write: bool
    ) -> None:
        futures = [
            self._pool.submit(memory.populate, address + offset, length, write=write)
            for offset, length in slices(size, threads, align)
        ]
        for f in futures:
            f.result()

    def _populate_pulled(self, address: int, size: int, threads: int, chunk: int) -> None:
        offsets = iter(range(0, size, chunk))
        lock = threading.Lock()

        def pull() -> None:
            while True:
                with lock:
                    offset = next(offsets, None)
                if offset is None:
                    return
                memory.populate(address + offset, min(chunk, size - offset), write=True)

        futures = [self._pool.submit(pull) for _ in range(threads)]
        for f in futures:
            f.result()


def warm_up(size: int, raw: RawPaths) -> None:
    """Populate and discard `size` bytes of shmem once: the VM's first touch is slow."""
    with RawMemory("shmem", size, page_size=memory.BASE_PAGE_SIZE) as mem:
        raw.populate(mem, raw.max_threads)
