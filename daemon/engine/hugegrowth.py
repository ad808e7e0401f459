"""hugetlb pools that follow demand: grown for a plug within a budget, given back after.

With --hugetlb-budget PAGESIZE:MAX[@NODE] a hugetlb plug that needs more pages
than its pool has free grows the pool by exactly the shortfall, up to the
budget, and the pages memplug added are given back when they are free again
(after an unplug, a delete, a failed plug; checked again every few seconds
for memory a client still held). The pool of a region bound (numa_policy
bind) to one node is that node's pool; any other region's is the kernel-wide
pool. A budget with @NODE covers that node's pool; one without covers every
pool of that page size together.

Rules that keep other users of the pool safe:
- free pages are free_hugepages - resv_hugepages (another process's
  reservation is used memory) - pages promised to plugs still running;
- a pool is shrunk only by pages memplug added and that are free now, so it
  never goes below its size before memplug grew it or below what others use;
- growth and shrinking of one page size are serialised by one lock;
- how many pages memplug added per pool is in the state store, so a restarted
  daemon still gives them back (and still counts them against the budget).

Growth is all or nothing: if the budget cannot cover the whole shortfall or
the kernel cannot find the pages (fragmented memory, even after compaction),
the plug fails with RESOURCE_EXHAUSTED and the pool is put back as it was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from memplug.common.errors import FailedPrecondition, InvalidArgument, MemplugError, PoolExhausted
from memplug.common.sizes import format_size, parse_size
from memplug.daemon.backings import BackingKind
from memplug.daemon.engine.region import Region
from memplug.daemon.kernel import hugepools
from memplug.daemon.state.store import PoolKey, StateStore

log = logging.getLogger("memplug.hugepools")

GIB = 1 << 30


@dataclass(frozen=True)
class Budget:
    """At most max_bytes of page_size pages added by memplug (node None: all nodes)."""

    page_size: int
    max_bytes: int
    node: int | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        spec, at, node = str(text).partition("@")
        size, sep, most = spec.partition(":")
        usage = f"hugetlb-budget {text!r}: use PAGESIZE:MAX[@NODE], e.g. 2M:8G or 1G:16G@0"
        if not sep or (at and not node.isdigit()):
            raise InvalidArgument(usage)
        try:
            page_size, max_bytes = parse_size(size), parse_size(most)
        except (InvalidArgument, ValueError):
            raise InvalidArgument(usage) from None
        if page_size <= 0 or page_size & (page_size - 1):
            raise InvalidArgument(f"{usage}: page size {size!r} is not a power of two")
        return cls(page_size, max_bytes, int(node) if at else None)

    def pages(self) -> int:
        return self.max_bytes // self.page_size

    def flag(self) -> str:
        """As --hugetlb-budget takes it, e.g. 2M:256M@0."""
        node = "" if self.node is None else f"@{self.node}"
        return f"{_short_size(self.page_size)}:{_short_size(self.max_bytes)}{node}"


def _short_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


@dataclass(frozen=True)
class PoolReport:
    """One pool as GetStatus and the metrics show it (node None: kernel-wide)."""

    page_size: int
    node: int | None
    total: int
    free: int
    reserved: int
    surplus: int
    added: int  # pages memplug added and has not given back
    budget_pages: int  # 0: no budget, memplug never grows this pool


@dataclass
class Growth:
    """A plug's claim on a pool's free pages while it runs; end() it whatever happens."""

    grower: HugePoolGrower | None
    key: PoolKey | None = None
    pages: int = 0  # pages the plug will take
    grown: int = 0  # pages added to the pool for it
    ended: bool = field(default=False)

    def end(self, *, failed: bool = False) -> None:
        """The plug is over; failed: its pages are free again, give back what they allow."""
        if self.ended or self.grower is None or self.key is None:
            return
        self.ended = True
        self.grower.release(self, failed=failed)


class HugePoolGrower:
    def __init__(self, budgets: list[Budget], *, keep: bool, store: StateStore) -> None:
        self._budgets = {(b.page_size, b.node): b for b in budgets}
        self._keep = keep
        self._store = store
        self._lock = threading.Lock()  # one for every pool: they share the memory
        self._added: dict[PoolKey, int] = {}
        self._pending: dict[int, int] = {}  # page size -> pages promised to running plugs

    @property
    def enabled(self) -> bool:
        return bool(self._budgets) or bool(self._added)

    def restore(self) -> None:
        """Read what an earlier run added; give back what is free (unless --hugetlb-keep)."""
        self._added = {k: v for k, v in self._store.load_hugetlb_added().items() if v > 0}
        for (page_size, node), pages in sorted(self._added.items(), key=str):
            log.info(
                "%s: %d pages added by memplug before the restart",
                hugepools.describe(page_size, node),
                pages,
            )
        self.settle()

    # ------------------------------------------------------------------ plug

    def pool_of(self, region: Region) -> PoolKey | None:
        """The pool a region's pages come from (None: not hugetlb)."""
        if region.backing.kind is not BackingKind.HUGETLB:
            return None
        placement = region.options.placement
        node = (
            placement.nodes[0] if placement.policy == "bind" and len(placement.nodes) == 1 else None
        )
        return (region.backing.page_size, node)

    def grow_for(self, region: Region, nbytes: int) -> Growth:
        """Make sure a plug of nbytes of region finds its pages free; grow within the budget.

        Raises PoolExhausted (pool unchanged) if the budget or the kernel cannot
        supply the shortfall; growth stays out of the way when no budget is set.
        """
        key = self.pool_of(region)
        if key is None or not nbytes or self._budget_for(key) is None:
            return Growth(None)
        page_size, node = key
        pages = -(-nbytes // page_size)
        with self._lock:
            pool = hugepools.read(page_size, node)
            pending = self._pending.get(page_size, 0)
            available = max(0, pool.free - pool.reserved - pending)
            shortfall = max(0, pages - available)
            if shortfall:
                self._check_budget(region, key, shortfall, pool, available)
                self._grow(region, key, pool.total, shortfall)
            self._pending[page_size] = pending + pages
        return Growth(self, key, pages, shortfall)

    def _budget_for(self, key: PoolKey) -> Budget | None:
        return self._budgets.get(key) or self._budgets.get((key[0], None))

    def _check_budget(
        self,
        region: Region,
        key: PoolKey,
        shortfall: int,
        pool: hugepools.PoolCounts,
        available: int,
    ) -> None:
        budget = self._budget_for(key)
        assert budget is not None
        if budget.node is None:
            added = sum(v for (size, _), v in self._added.items() if size == budget.page_size)
        else:
            added = self._added.get(key, 0)
        if added + shortfall <= budget.pages():
            return
        page_size, node = key
        flag = budget.flag()
        raise PoolExhausted(
            f"region {region.name!r}: {hugepools.describe(page_size, node)} has {available} "
            f"free pages (of {pool.total}, {pool.reserved} reserved), {shortfall} short for "
            f"this plug, but the budget --hugetlb-budget {flag} ({budget.pages()} pages) allows "
            f"memplug to add only {max(0, budget.pages() - added)} more ({added} added "
            "already); raise the budget, unplug or delete other regions, or plug less. "
            "The pool was not changed",
            region=region.name,
        )

    def _grow(self, region: Region, key: PoolKey, before: int, shortfall: int) -> None:
        """nr_hugepages += shortfall, compacting and retrying once; all or nothing."""
        page_size, node = key
        want = before + shortfall
        try:
            got = hugepools.set_total(page_size, node, want)
            if got < want:
                log.info(
                    "%s: the kernel found %d of %d pages; compacting and retrying",
                    hugepools.describe(page_size, node),
                    got - before,
                    shortfall,
                )
                hugepools.compact(node)
                got = hugepools.set_total(page_size, node, want)
        except OSError as exc:
            self._put_back(key, before)
            raise FailedPrecondition(
                f"region {region.name!r}: cannot grow the {hugepools.describe(page_size, node)} "
                f"by {shortfall} pages: {exc} (the daemon must run as root to size pools)",
                region=region.name,
            ) from exc
        if got < want:
            self._put_back(key, before)
            raise PoolExhausted(self._fragmented(region, key, got - before, shortfall, want))
        try:
            self._record(key, self._added.get(key, 0) + shortfall)
        except MemplugError:
            self._put_back(key, before)
            raise
        log.info(
            "%s: grew by %d pages to %d for region %s",
            hugepools.describe(page_size, node),
            shortfall,
            got,
            region.name,
        )

    def _fragmented(
        self, region: Region, key: PoolKey, found: int, shortfall: int, want: int
    ) -> str:
        page_size, node = key
        where = "" if node is None else f" on node {node}"
        message = (
            f"region {region.name!r}: the {hugepools.describe(page_size, node)} could not grow "
            f"by {shortfall} pages: the kernel found only {max(0, found)} free "
            f"{format_size(page_size)} pages{where} even after compacting memory, "
            f"{shortfall - max(0, found)} pages missing: memory is fragmented. The pool was put "
            "back as it was"
        )
        if page_size >= GIB:
            message += (
                f"; {format_size(page_size)} pages are best reserved at boot: kernel command line "
                f"`hugepagesz={_short_size(page_size)} hugepages={want}` (or `hugetlb_cma=SIZE` "
                "to let the kernel allocate them at run time from a CMA area)"
            )
        return message

    def _put_back(self, key: PoolKey, before: int) -> None:
        """Undo a growth that failed: the kernel's pool to its size before it."""
        page_size, node = key
        try:
            now = hugepools.read(page_size, node).total
            if now > before:
                hugepools.set_total(page_size, node, before)
        except OSError as exc:
            log.error("%s: cannot put the pool back: %s", hugepools.describe(page_size, node), exc)

    def release(self, growth: Growth, *, failed: bool) -> None:
        assert growth.key is not None
        page_size = growth.key[0]
        with self._lock:
            self._pending[page_size] = max(0, self._pending.get(page_size, 0) - growth.pages)
        if failed:
            self.settle()

    @contextmanager
    def holding(self, region: Region, nbytes: int) -> Iterator[None]:
        """Keep nbytes of region's pool from being given back meanwhile (discard's refill)."""
        key = self.pool_of(region)
        if key is None or not self.enabled:
            yield
            return
        pages = -(-nbytes // key[0])
        with self._lock:
            self._pending[key[0]] = self._pending.get(key[0], 0) + pages
        try:
            yield
        finally:
            with self._lock:
                self._pending[key[0]] = max(0, self._pending.get(key[0], 0) - pages)

    # ------------------------------------------------------------------ giving back

    def settle(self) -> None:
        """Give back the added pages that are free now (never others'); all pools."""
        if self._keep:
            return
        with self._lock:
            for key in [k for k, v in self._added.items() if v > 0]:
                try:
                    self._give_back(key)
                except (OSError, MemplugError) as exc:
                    page_size, node = key
                    log.warning(
                        "%s: cannot give back pages yet: %s",
                        hugepools.describe(page_size, node),
                        exc,
                    )

    def _give_back(self, key: PoolKey) -> None:
        page_size, node = key
        pool = hugepools.read(page_size, node)
        spare = pool.free - pool.reserved - self._pending.get(page_size, 0)
        give = min(self._added[key], spare)
        if give <= 0:
            return
        now = hugepools.set_total(page_size, node, pool.total - give)
        given = max(0, pool.total - now)
        if not given:
            return
        # Memory first: a store that cannot be written must not make the
        # next settle give back the same pages twice.
        self._added[key] = max(0, self._added[key] - given)
        log.info(
            "%s: gave back %d pages (%d still added by memplug)",
            hugepools.describe(page_size, node),
            given,
            self._added[key],
        )
        self._store.put_hugetlb_added(key, self._added[key])

    def _record(self, key: PoolKey, pages: int) -> None:
        self._store.put_hugetlb_added(key, max(0, pages))
        self._added[key] = max(0, pages)

    # ------------------------------------------------------------------ status

    def report(self) -> list[PoolReport]:
        """Every pool the kernel offers, kernel-wide then per node, with memplug's share."""
        reports = []
        for page_size, node in hugepools.layout():
            try:
                pool = hugepools.read(page_size, node)
            except OSError:
                continue
            if node is None:
                added = sum(v for (s, _), v in self._added.items() if s == page_size)
            else:
                added = self._added.get((page_size, node), 0)
            budget = self._budgets.get((page_size, node))
            reports.append(
                PoolReport(
                    page_size=page_size,
                    node=node,
                    total=pool.total,
                    free=pool.free,
                    reserved=pool.reserved,
                    surplus=pool.surplus,
                    added=added,
                    budget_pages=budget.pages() if budget is not None else 0,
                )
            )
        return reports
