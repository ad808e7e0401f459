"""The warm pool: pre-plugged memfds kept ready, so a matching region is ready at once.

`--warm-pool shmem:1G:2` keeps two 1 GiB shmem memfds allocated. A
CreateRegion asking for exactly that (backing, size, page size; default
block size, no NUMA policy, no lock) takes one: its blocks start unplugged as
always, but their memory is already there, so plugging them is bookkeeping.
A background thread refills the pool, within the daemon's quota (pool memory
counts as plugged bytes), backing off while the quota or the memory is short.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from memplug.common import memory
from memplug.common.cancel import CancelToken
from memplug.common.errors import InvalidArgument, MemplugError
from memplug.common.ranges import Range
from memplug.common.sizes import format_size, parse_size
from memplug.daemon.backings import Backing, BackingKind, HugetlbBacking, ShmemBacking
from memplug.daemon.engine.runner import Runner
from memplug.daemon.engine.strategy import Strategy, make_plan, plug_strategy
from memplug.daemon.kernel import probe

log = logging.getLogger("memplug.warmpool")

RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class PoolSpec:
    backing: BackingKind
    size: int
    page_size: int
    count: int
    thp: bool = False

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        """BACKING:SIZE:COUNT[:PAGESIZE], e.g. shmem:1G:2 or hugetlb:1G:1:2M."""
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("shmem", "hugetlb"):
            raise InvalidArgument(
                f"warm-pool {text!r}: use BACKING:SIZE:COUNT[:PAGESIZE] with backing shmem or "
                "hugetlb, e.g. shmem:1G:2"
            )
        backing = BackingKind(parts[0])
        size = parse_size(parts[1])
        if not parts[2].isdigit():
            raise InvalidArgument(f"warm-pool {text!r}: COUNT must be a whole number")
        count = int(parts[2])
        if backing is BackingKind.HUGETLB:
            page = parse_size(parts[3]) if len(parts) == 4 else memory.default_huge_page_size() or 0
        else:
            page = memory.BASE_PAGE_SIZE
        if count < 1 or size <= 0 or not page or size % max(page, 2 << 20):
            raise InvalidArgument(f"warm-pool {text!r}: size must be a multiple of the block size")
        thp = backing is BackingKind.SHMEM and probe.shmem_thp_allowed()
        return cls(backing, size, page, count, thp)

    def describe(self) -> str:
        return f"{self.count} x {format_size(self.size)} {self.backing.value}"


class WarmPool:
    def __init__(
        self,
        specs: list[PoolSpec],
        runner: Runner,
        *,
        threads: int,
        madv_populate: bool,
        reserve: Callable[[int], bool],
        release: Callable[[int], None],
    ) -> None:
        self.specs = specs
        self._runner = runner
        self._threads = threads
        self._madv_populate = madv_populate
        self._reserve = reserve  # take quota for pool memory; False if it does not fit
        self._release = release
        self._ready: dict[PoolSpec, list[Backing]] = {s: [] for s in specs}
        self.hits: dict[PoolSpec, int] = dict.fromkeys(specs, 0)
        self.misses: dict[PoolSpec, int] = dict.fromkeys(specs, 0)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._token = CancelToken()
        self._thread = threading.Thread(
            target=self._refill_loop, name="memplug-warmpool", daemon=True
        )

    def start(self) -> None:
        if self.specs:
            self._thread.start()

    def stop(self) -> None:
        self._token.cancel("the daemon is shutting down")
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(30)
        with self._lock:
            ready = [b for backings in self._ready.values() for b in backings]
            for backings in self._ready.values():
                backings.clear()
        for backing in ready:
            self._release(backing.size)
            backing.close()

    def poke(self) -> None:
        """Quota was given back: the refill thread may find room now."""
        self._wake.set()

    def ready(self, spec: PoolSpec) -> int:
        with self._lock:
            return len(self._ready[spec])

    def take(self, backing: BackingKind, size: int, page_size: int, thp: bool) -> Backing | None:
        """A ready, fully allocated memfd for this shape, or None (a miss)."""
        for spec in self.specs:
            if (spec.backing, spec.size, spec.page_size, spec.thp) == (
                backing, size, page_size, thp,
            ):  # fmt: skip
                with self._lock:
                    ready = self._ready[spec]
                    taken = ready.pop() if ready else None
                    if taken is None:
                        self.misses[spec] += 1
                    else:
                        self.hits[spec] += 1
                self._wake.set()
                return taken
        return None

    def shed(self, nbytes: int) -> int:
        """Free ready memory (at least nbytes if there is that much) for a real request."""
        freed: list[Backing] = []
        with self._lock:
            for backings in self._ready.values():
                while backings and sum(b.size for b in freed) < nbytes:
                    freed.append(backings.pop())
        for backing in freed:
            self._release(backing.size)
            backing.close()
        if freed:
            log.info("warm pool: gave back %s for a plug", format_size(sum(b.size for b in freed)))
        return sum(b.size for b in freed)

    # ------------------------------------------------------------------ refill

    def _refill_loop(self) -> None:
        while not self._token.cancelled:
            short = False
            for spec in self.specs:
                while not self._token.cancelled and self.ready(spec) < spec.count:
                    if not self._fill_one(spec):
                        short = True
                        break
            self._wake.wait(RETRY_SECONDS if short else None)
            self._wake.clear()

    def _fill_one(self, spec: PoolSpec) -> bool:
        if not self._reserve(spec.size):
            return False  # over quota: try again later
        backing: Backing | None = None
        try:
            if spec.backing is BackingKind.HUGETLB:
                backing = HugetlbBacking.create("~warm", spec.size, spec.page_size, 0)
            else:
                backing = ShmemBacking.create("~warm", spec.size, 0, huge=spec.thp)
            strategy = plug_strategy(
                hugetlb=spec.backing is BackingKind.HUGETLB,
                requested=Strategy.AUTO,
                has_populate=self._madv_populate,
                thp=spec.thp,
            )
            whole = Range(0, spec.size)
            plan = make_plan(strategy, [whole], max_threads=self._threads, align=2 << 20)
            if strategy is Strategy.FALLOCATE:  # fallocate(2)
                self._runner.run(plan, backing.allocate, self._token)
            else:  # MADV_POPULATE_WRITE on one mapping of the memfd
                with backing.map_span(whole) as mapping:
                    self._runner.run(plan, mapping.populate_write, self._token)
        except (OSError, MemplugError) as exc:
            self._release(spec.size)
            if backing is not None:
                backing.close()
            if not self._token.cancelled:
                log.warning("warm pool %s: cannot fill: %s", spec.describe(), exc)
            return False
        with self._lock:
            self._ready[spec].append(backing)
        log.info("warm pool %s: %d ready", spec.describe(), self.ready(spec))
        return True
