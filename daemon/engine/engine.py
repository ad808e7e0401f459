"""RegionEngine: the one façade the transports call.

Every operation runs in a fixed order:

    validate -> find region (counted as busy) -> range lock -> quota ->
    work on the worker threads -> record -> unlock

and on any failure during the work: roll back what this call did, then raise.
A plug that fails leaves the region exactly as it found it: the blocks it
allocated are punched again, blocks plugged before keep their contents, and
the quota is returned.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from memplug.common import memory
from memplug.common.cancel import CancelToken
from memplug.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemplugError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    ResourceExhausted,
)
from memplug.common.ranges import Range, subtract
from memplug.common.sizes import MiB, format_size
from memplug.daemon.backings import (
    Backing,
    BackingKind,
    FileBacking,
    HugetlbBacking,
    ShmemBacking,
)
from memplug.daemon.backings.shmem import restrict_inode
from memplug.daemon.engine.options import (
    lock_ranges,
    placed,
    prepare_backing,
    release_region,
    unlock_ranges,
)
from memplug.daemon.engine.region import (
    Access,
    Region,
    RegionInfo,
    RegionOptions,
    RegionSpec,
    check_labels,
    check_name,
)
from memplug.daemon.engine.restore import RestoreReport
from memplug.daemon.engine.restore import restore as restore_regions
from memplug.daemon.engine.runner import ProgressCallback, Runner
from memplug.daemon.engine.strategy import (
    CHUNK_BYTES,
    Method,
    Requested,
    make_plan,
    plug_method,
    populate_method,
)
from memplug.daemon.engine.tickets import Handoff, Peer, Ticket, TicketBook
from memplug.daemon.engine.warmpool import PoolSpec, WarmPool
from memplug.daemon.kernel import memcg, probe
from memplug.daemon.kernel.helper import HelperPool
from memplug.daemon.kernel.ops import iter_chunks
from memplug.daemon.state.store import MemoryStore, RegionRecord, StateStore

log = logging.getLogger("memplug.engine")

DEFAULT_BLOCK_SIZE = 2 * MiB
MAX_REGION_SIZE = 1 << 56  # 64 PiB: far beyond any machine, well inside off_t


@dataclass(frozen=True)
class OpResult:
    """Outcome of Plug and Populate."""

    bytes: int
    seconds: float
    strategy: str
    threads: int
    region: RegionInfo
    zeroing: str = ""  # plug: "done" or "deferred" (first touch zeroes)


@dataclass(frozen=True)
class EngineStatus:
    regions: int
    plugged_bytes: int
    allocated_bytes: int
    quota_bytes: int | None
    threads: int
    madv_populate: bool
    warm_pools: list[tuple[PoolSpec, int, int, int]]  # (spec, ready, hits, misses)


@dataclass(frozen=True)
class RangeOutcome:
    """Outcome of Unplug and Discard."""

    bytes: int
    seconds: float
    region: RegionInfo


class RegionListener(Protocol):
    """Told of every region created and deleted, before the call returns (fd store)."""

    def region_created(self, name: str, backing: Backing) -> None: ...

    def region_deleted(self, name: str, backing: Backing) -> None: ...


def record_of(region: Region) -> RegionRecord:
    acl = region.acl
    with region.mutex:
        plugged = tuple(region.plugged)
    return RegionRecord(
        name=region.name,
        size=region.size,
        backing=region.backing.kind.value,
        page_size=region.backing.page_size,
        block_size=region.block_size,
        path=region.backing.path,
        labels=dict(region.labels),
        acl={
            "owner_uid": [acl.owner_uid],
            "allowed_uids": sorted(acl.allowed_uids),
            "allowed_gids": sorted(acl.allowed_gids),
            "read_only_uids": sorted(acl.read_only_uids),
            "read_only_gids": sorted(acl.read_only_gids),
        },
        created_at=region.created_at,
        plugged=plugged,
        options={
            "thp": region.options.thp,
            "numa_policy": region.options.placement.policy,
            "numa_nodes": list(region.options.placement.nodes),
            "lock": region.options.lock,
            "from_warm_pool": region.options.from_warm_pool,
        },
    )


def creation_error(name: str, exc: OSError) -> MemplugError:
    """What a failed memfd_create/ftruncate/open means for CreateRegion."""
    what = f"cannot create region {name!r}: {exc.strerror}"
    if exc.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EFBIG):
        return ResourceExhausted(what, errno=exc.errno)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(what, errno=exc.errno)
    if exc.errno == errno.EINVAL:
        return InvalidArgument(what, errno=exc.errno)
    return Internal(what, errno=exc.errno)


class RegionEngine:
    def __init__(
        self,
        *,
        threads: int,
        max_bytes: int | None = None,
        allow_dirs: list[Path] | None = None,
        ticket_ttl: float = 10.0,
        store: StateStore | None = None,
        listener: RegionListener | None = None,
        warm_pools: list[PoolSpec] | None = None,
        madv_populate: bool = True,
        memcg_check: bool = True,
    ) -> None:
        """madv_populate=False plugs and populates as on a kernel without
        MADV_POPULATE_* (the fallback paths); memcg_check=False skips the cgroup
        headroom check before a plug."""
        self.threads = threads
        self.madv_populate = madv_populate and memory.has_madv_populate()
        self.memcg_check = memcg_check
        self.max_bytes = max_bytes
        self.ticket_ttl = ticket_ttl
        self.allow_dirs = [Path(d).resolve() for d in (allow_dirs or [])]
        self._runner = Runner(threads)
        self._lock = threading.Condition()
        self._regions: dict[str, Region] = {}
        self._creating: set[str] = set()
        self._plugged_total = 0
        self._running: set[CancelToken] = set()
        self._closing = False
        self._tickets = TicketBook(ticket_ttl)
        self._store: StateStore = store if store is not None else MemoryStore()
        self._listener = listener
        self._lost: dict[str, str] = {}  # regions a restart could not bring back, and why
        # Intents of finished operations whose closing write failed (state dir
        # full): closed by the region's next write, or by record_pending().
        self._unrecorded: dict[str, set[int]] = {}
        self._pool = WarmPool(
            list(warm_pools or []),
            self._runner,
            threads=threads,
            madv_populate=self.madv_populate,
            reserve=self._try_reserve,
            release=self._release_quota,
        )

    # ------------------------------------------------------------------ bookkeeping

    @property
    def plugged_total(self) -> int:
        with self._lock:
            return self._plugged_total

    def usage_by_backing(self) -> dict[str, tuple[int, int, int]]:
        """backing -> (regions, plugged bytes, allocated bytes)."""
        with self._lock:
            regions = list(self._regions.values())
        usage: dict[str, tuple[int, int, int]] = {k.value: (0, 0, 0) for k in BackingKind}
        for region in regions:
            info = region.info()
            count, plugged, allocated = usage[info.backing.value]
            usage[info.backing.value] = (
                count + 1,
                plugged + info.plugged_bytes,
                allocated + info.allocated_bytes,
            )
        return usage

    def status(self) -> EngineStatus:
        with self._lock:
            regions = list(self._regions.values())
            plugged = self._plugged_total
        return EngineStatus(
            regions=len(regions),
            plugged_bytes=plugged,
            allocated_bytes=sum(r.backing.allocated_bytes() for r in regions),
            quota_bytes=self.max_bytes,
            threads=self.threads,
            madv_populate=self.madv_populate,
            warm_pools=[
                (spec, self._pool.ready(spec), self._pool.hits[spec], self._pool.misses[spec])
                for spec in self._pool.specs
            ],
        )

    @contextmanager
    def _operation(self, name: str, token: CancelToken) -> Iterator[Region]:
        """Find the region and count the operation as in flight until it ends."""
        with self._lock:
            if self._closing:
                raise Cancelled("the daemon is shutting down")
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
            region.active += 1
            self._running.add(token)
        try:
            yield region
        finally:
            with self._lock:
                region.active -= 1
                self._running.discard(token)
                self._lock.notify_all()

    def _reserve_quota(self, region: Region, nbytes: int) -> None:
        with self._lock:
            if self.max_bytes is not None:
                # Pool memory never stands in a real request's way. Shed and
                # reserve under one hold of the lock, or the refill thread
                # would take the room back in between.
                short = self._plugged_total + nbytes - self.max_bytes
                if short > 0:
                    self._pool.shed(short)
            if self.max_bytes is not None and self._plugged_total + nbytes > self.max_bytes:
                left = max(0, self.max_bytes - self._plugged_total)
                raise QuotaExceeded(
                    f"region {region.name!r}: plugging {format_size(nbytes)} more would exceed "
                    f"the daemon's quota of {format_size(self.max_bytes)} "
                    f"({format_size(left)} left); unplug or delete regions, or raise --max-bytes",
                    region=region.name,
                )
            self._plugged_total += nbytes

    def _try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.max_bytes is not None and self._plugged_total + nbytes > self.max_bytes:
                return False
            self._plugged_total += nbytes
            return True

    def _release_quota(self, nbytes: int) -> None:
        with self._lock:
            self._plugged_total -= nbytes
        if nbytes:
            self._pool.poke()

    # ------------------------------------------------------------------ regions

    def create_region(self, spec: RegionSpec) -> RegionInfo:
        name = check_name(spec.name)
        labels = check_labels(spec.labels)
        acl = spec.acl.check()
        with self._lock:
            if self._closing:
                raise Cancelled("the daemon is shutting down")
            if name in self._regions or name in self._creating:
                raise AlreadyExists(f"a region named {name!r} already exists")
            self._creating.add(name)
        try:
            try:
                backing, block_size, options = self._make_backing(spec)
            except OSError as exc:
                raise creation_error(name, exc) from exc
            region = Region(name, backing, block_size, labels, time.time(), acl, options)
            if options.from_warm_pool:
                region.prebacked.add(Range(0, region.size))
            try:
                self._publish(region)
            except BaseException:
                release_region(region)
                self._release_quota(region.prebacked.total)
                if isinstance(backing, FileBacking):
                    backing.discard_file()
                backing.close()
                raise
        finally:
            with self._lock:
                self._creating.discard(name)
        log.info("created region %s: %s, %s", name, backing.describe(), format_size(backing.size))
        return region.info()

    def _publish(self, region: Region) -> None:
        """Apply options, persist, tell the fd store, then let clients see the region."""
        backing = region.backing
        try:
            prepare_backing(region)
        except OSError as exc:
            raise creation_error(region.name, exc) from exc
        if isinstance(backing, FileBacking):
            with self._lock:
                self._check_file_unused(backing)
        # Durable (and in systemd's fd store) before anyone hears of it.
        try:
            self._store.put_region(record_of(region))
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r} was not created: {exc.message}", region=region.name
            ) from exc
        if self._listener is not None:
            self._listener.region_created(region.name, backing)
        with self._lock:
            self._regions[region.name] = region
            self._lost.pop(region.name, None)

    def _check_file_unused(self, backing: FileBacking) -> None:
        for other in self._regions.values():
            if (
                isinstance(other.backing, FileBacking)
                and other.backing.identity == backing.identity
            ):
                raise AlreadyExists(f"{backing.path} already backs region {other.name!r}")

    def _make_backing(self, spec: RegionSpec) -> tuple[Backing, int, RegionOptions]:
        if spec.backing is None:
            raise InvalidArgument("backing is required: shmem, hugetlb or file")
        options = self._options(spec)
        if spec.backing is not BackingKind.FILE and spec.path:
            raise InvalidArgument("path is only for FILE regions")
        page_size = self._page_size(spec)
        block_size = spec.block_size or max(DEFAULT_BLOCK_SIZE, page_size)
        if block_size & (block_size - 1) or block_size < page_size:
            raise InvalidArgument(
                f"block size {block_size} must be a power of two and at least the page size "
                f"({format_size(page_size)})"
            )
        if spec.backing is BackingKind.FILE:
            if spec.size:
                self._check_size(spec.size, block_size)
            file_backing = FileBacking.open(
                spec.path, spec.size, self.allow_dirs, spec.acl.owner_uid
            )
            try:
                self._check_size(file_backing.size, block_size)
            except BaseException:
                file_backing.discard_file()
                file_backing.close()
                raise
            return file_backing, block_size, options
        self._check_size(spec.size, block_size)
        pooled = self._from_pool(spec, page_size, block_size, options)
        if pooled is not None:
            return pooled, block_size, dataclasses.replace(options, from_warm_pool=True)
        if spec.backing is BackingKind.HUGETLB:
            backing: Backing = HugetlbBacking.create(
                spec.name, spec.size, page_size, spec.acl.owner_uid
            )
        else:
            backing = ShmemBacking.create(spec.name, spec.size, spec.acl.owner_uid)
        return backing, block_size, options

    def _from_pool(
        self, spec: RegionSpec, page_size: int, block_size: int, options: RegionOptions
    ) -> Backing | None:
        """A warm-pool memfd for a plain request of a pooled shape, given to its owner."""
        if options.placement.active or options.lock or spec.backing is None:
            return None
        if block_size != max(DEFAULT_BLOCK_SIZE, page_size):
            return None
        backing = self._pool.take(spec.backing, spec.size, page_size, options.thp)
        if backing is not None:
            try:
                restrict_inode(backing.fd, spec.acl.owner_uid)
            except BaseException:
                self._release_quota(backing.size)
                backing.close()
                raise
        return backing

    @staticmethod
    def _options(spec: RegionSpec) -> RegionOptions:
        placement = spec.placement.check(probe.numa_nodes())
        if spec.backing is not BackingKind.SHMEM:
            if spec.thp:
                raise InvalidArgument(
                    "transparent huge pages are a SHMEM option: use HUGETLB for huge pages, "
                    "or mount the FILE region's tmpfs with huge="
                )
            return RegionOptions(thp=False, placement=placement, lock=spec.lock)
        allowed = probe.shmem_thp_allowed()
        if spec.thp and not allowed:
            raise FailedPrecondition(
                f"transparent huge pages for shmem are off (shmem_enabled = "
                f"{probe.shmem_thp_mode()}); {probe.SHMEM_THP_HINT}"
            )
        thp = allowed if spec.thp is None else spec.thp
        return RegionOptions(thp=thp, placement=placement, lock=spec.lock)

    @staticmethod
    def _check_size(size: int, block_size: int) -> None:
        if size <= 0:
            raise InvalidArgument("size must be > 0")
        if size > MAX_REGION_SIZE:
            raise InvalidArgument(f"size {size} is larger than {format_size(MAX_REGION_SIZE)}")
        if size % block_size:
            raise InvalidArgument(
                f"size {size} is not a multiple of the block size ({format_size(block_size)})"
            )

    @staticmethod
    def _page_size(spec: RegionSpec) -> int:
        if spec.backing is not BackingKind.HUGETLB:
            if spec.page_size not in (0, memory.BASE_PAGE_SIZE):
                raise InvalidArgument(
                    f"page size {spec.page_size} is not available for {spec.backing} regions "
                    f"(only {memory.BASE_PAGE_SIZE}); use a HUGETLB region for huge pages"
                )
            return memory.BASE_PAGE_SIZE
        offered = memory.huge_page_sizes()
        page_size = spec.page_size or memory.default_huge_page_size() or 0
        if page_size not in offered:
            sizes = ", ".join(format_size(s) for s in offered) or "none"
            raise InvalidArgument(
                f"huge page size {format_size(page_size)} is not offered by this kernel "
                f"(it offers: {sizes})"
            )
        if not probe.has_memfd_hugetlb(page_size):
            raise FailedPrecondition(
                f"this kernel cannot create hugetlb memfds of {format_size(page_size)} pages"
            )
        return page_size

    def get_region(self, name: str) -> RegionInfo:
        return self._get(name).info()

    def _get(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
        return region

    def _not_found(self, name: str) -> NotFound:
        lost = self._lost.get(name)
        if lost is not None:
            return NotFound(f"region {name!r} was lost when memplugd restarted: {lost}")
        return NotFound(f"no region named {name!r}")

    def list_regions(self, selector: Mapping[str, str] | None = None) -> list[RegionInfo]:
        with self._lock:
            regions = sorted(self._regions.values(), key=lambda r: r.name)
        return [r.info() for r in regions if r.label_match(selector or {})]

    def delete_region(self, name: str) -> None:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise self._not_found(name)
            if region.active:
                raise FailedPrecondition(
                    f"region {name!r} is busy: {region.active} operation(s) still running; "
                    "cancel them or wait, then delete"
                )
            # Recorded first, under the lock: a delete the store refuses leaves
            # the region served, counted and restorable, as the error says.
            try:
                self._store.delete_region(name)
            except MemplugError as exc:
                raise type(exc)(
                    f"region {name!r} was not deleted and is unchanged: {exc.message}",
                    region=name,
                ) from exc
            del self._regions[name]
            self._unrecorded.pop(name, None)
            with region.mutex:
                self._plugged_total -= region.plugged.total + region.prebacked.total
        self._tickets.revoke_region(name)
        release_region(region)
        if self._listener is not None:
            self._listener.region_deleted(name, region.backing)
        region.backing.close()
        log.info("deleted region %s", name)

    # ------------------------------------------------------------------ hand-off

    def attach(self, name: str, access: Access) -> Ticket:
        """A one-time ticket for the region's fd, to redeem on the fd socket."""
        return self._tickets.issue(self._get(name).name, access)

    def redeem(self, value: str, peer: Peer) -> Handoff:
        """Trade a ticket for a fresh fd, if the peer passes the region's ACL.

        The ticket is used up whatever the outcome, so it cannot be retried
        from another process.
        """
        ticket = self._tickets.redeem(value)
        return self.open_fd(ticket.region, ticket.access, peer)

    def open_fd(self, name: str, access: Access, peer: Peer) -> Handoff:
        """A fresh fd of the region for a peer that passes its ACL (no ticket needed)."""
        # Counted as an operation, so the region cannot be deleted (and its fd
        # closed) between the lookup and the reopen.
        with self._operation(name, CancelToken()) as region:
            if not region.acl.allows(peer.uid, peer.gids, access):
                raise PermissionDenied(
                    f"uid {peer.uid} may not attach region {region.name!r} "
                    f"{'read-only' if access is Access.READ_ONLY else 'read-write'}: "
                    "it is not in the region's ACL",
                    region=region.name,
                )
            backing = region.backing
            fd = backing.reopen(writable=access is Access.READ_WRITE)
        return Handoff(
            fd=fd,
            region=region.name,
            size=region.size,
            page_size=backing.page_size,
            block_size=region.block_size,
            backing=backing.kind.value,
            access=access,
            seals=backing.seals(),
        )

    # ------------------------------------------------------------------ plug

    def plug(
        self,
        name: str,
        offset: int,
        length: int,
        *,
        requested: Requested = Requested.AUTO,
        threads: int = 0,
        token: CancelToken | None = None,
        progress: ProgressCallback | None = None,
    ) -> OpResult:
        token = token or CancelToken()
        with self._operation(name, token) as region:
            r = region.range_of(offset, length, "plug")
            backing = region.backing
            method = plug_method(
                hugetlb=backing.kind is BackingKind.HUGETLB,
                requested=requested,
                has_populate=self.madv_populate,
                thp=region.options.thp,
            )
            with region.locks.hold(r, token):
                with region.mutex:
                    gaps = region.plugged.gaps(r)
                    warm = [w for g in gaps for w in region.prebacked.intersection(g)]
                new = sum(g.length for g in gaps)
                if not new:
                    if progress is not None:
                        progress(0, 0)
                    return OpResult(0, 0.0, "none", 0, region.info())
                if warm:
                    # Memory a warm-pool memfd already holds is plugged by bookkeeping.
                    self._adopt_prebacked(region, warm)
                    gaps = subtract(gaps, warm)
                    if not gaps:
                        if progress is not None:
                            progress(new, new)
                        return OpResult(new, 0.0, "warm-pool", 0, region.info(), zeroing="done")
                fresh = sum(g.length for g in gaps)
                plan = make_plan(
                    method, gaps, max_threads=threads or self.threads, align=region.block_size
                )
                room = self._memcg_room(region, r, fresh)
                before = backing.allocated_bytes()
                keep = [
                    Range(o, n) for g in gaps for o, n in backing.data_extents(g.offset, g.length)
                ]
                intent = self._begin(region, "plug", r, tuple(keep))
                try:
                    self._reserve_quota(region, fresh)
                except BaseException:
                    self._finish(region, intent, quiet=True)
                    raise
                started = time.monotonic()
                span = Range(gaps[0].offset, gaps[-1].end - gaps[0].offset)
                try:
                    with self._plug_work(backing, method, room is not None, span) as work:
                        self._runner.run(plan, placed(region, work), token, progress)
                    lock_ranges(region, gaps)
                except BaseException as exc:
                    got = max(0, backing.allocated_bytes() - before)
                    unlock_ranges(region, gaps)
                    self._rollback(region, subtract(gaps, keep))
                    self._release_quota(fresh)
                    self._finish(region, intent, quiet=True)
                    raise self._failure(region, "plug", r, exc, missing=fresh - got) from exc
                seconds = time.monotonic() - started
                with region.mutex:
                    for g in gaps:
                        region.plugged.add(g)
                try:
                    self._finish(region, intent)
                except MemplugError as exc:
                    # Unrecorded, the plug did not happen: a restart would roll it
                    # back (its intent is open), so roll it back now.
                    with region.mutex:
                        for g in gaps:
                            region.plugged.remove(g)
                    unlock_ranges(region, gaps)
                    self._rollback(region, subtract(gaps, keep))
                    self._release_quota(fresh)
                    raise type(exc)(
                        f"region {region.name!r}: plug of {r} could not be recorded: "
                        f"{exc.message}; rolled back: every page it allocated was released",
                        region=region.name,
                    ) from exc
            return OpResult(
                new,
                seconds,
                method.value,
                plan.threads,
                region.info(),
                zeroing=backing.zeroing(method.value),
            )

    def _adopt_prebacked(self, region: Region, warm: list[Range]) -> None:
        """Plug ranges whose memory is already allocated (quota was taken with the pool)."""
        lock_ranges(region, warm)
        with region.mutex:
            for w in warm:
                region.prebacked.remove(w)
                region.plugged.add(w)
        try:
            self._finish(region, None)
        except BaseException:
            with region.mutex:
                for w in warm:
                    region.plugged.remove(w)
                    region.prebacked.add(w)
            unlock_ranges(region, warm)
            raise

    def _begin(self, region: Region, op: str, r: Range, keep: tuple[Range, ...] = ()) -> int:
        """Record the intent durably before memory is touched (crash recovery)."""
        try:
            return self._store.begin(region.name, op, r, keep)
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r}: {op} of {r} was not started, nothing changed: "
                f"{exc.message}",
                region=region.name,
            ) from exc

    def _finish(self, region: Region, intent: int | None, *, quiet: bool = False) -> None:
        """Record the region's plugged set and close the intent (and any left unclosed).

        If the store refuses, the intent stays open and is remembered, so that
        a later write closes it: an open unplug or discard intent would be
        replayed by a restart. quiet: a failure is logged, not raised (the
        caller is already raising the operation's own error).
        """
        with region.mutex:
            plugged = tuple(region.plugged)
        with self._lock:
            pending = sorted(self._unrecorded.get(region.name, ()))
        try:
            for old in pending:
                self._store.finish(old, region.name, plugged)
                with self._lock:
                    self._unrecorded.get(region.name, set()).discard(old)
            self._store.finish(intent, region.name, plugged)
        except MemplugError as exc:
            if intent is not None:
                with self._lock:
                    self._unrecorded.setdefault(region.name, set()).add(intent)
            if not quiet:
                raise
            log.warning("region %s: its state could not be recorded: %s", region.name, exc)

    def record_pending(self) -> None:
        """Retry closing the intents whose closing write failed (called periodically)."""
        with self._lock:
            names = [n for n, ids in self._unrecorded.items() if ids and n in self._regions]
            waiting = [self._regions[n] for n in names]
        for region in waiting:
            self._finish(region, None, quiet=True)

    @staticmethod
    @contextmanager
    def _plug_work(
        backing: Backing, method: Method, isolate: bool, span: Range
    ) -> Iterator[Callable[[int, int], None]]:
        """The function that allocates one chunk, for the duration of one plug.

        isolate: under a memcg limit the kernel OOM-kills instead of failing,
        so sacrificial helper processes allocate and the victim is never the daemon.
        """
        if isolate:
            helpers = HelperPool(backing.fd)
            try:
                if method is Method.FALLOCATE:
                    yield lambda offset, length: helpers.get().allocate(offset, length)
                else:
                    yield lambda offset, length: helpers.get().populate(offset, length, write=True)
            finally:
                helpers.close()
        elif method is Method.FALLOCATE:
            yield backing.allocate
        else:
            with backing.populating(span, write=True) as work:
                yield work

    def _memcg_room(self, region: Region, r: Range, new: int) -> memcg.Headroom | None:
        """The cgroup headroom a plug is charged against (None: no limit); refuse misfits.

        hugetlb pages are not charged to memcg (unless the cgroup v2 hierarchy
        is mounted with memory_hugetlb_accounting, which the check then misses).
        """
        if region.backing.kind is BackingKind.HUGETLB:
            return None
        room = memcg.headroom()
        if room is None:
            return None
        if new > room.bytes and self.memcg_check:
            raise ResourceExhausted(
                f"region {region.name!r}: plug of {r} needs {format_size(new)}, but the "
                f"daemon's {room.describe()} has {format_size(room.bytes)} left; raise the "
                "cgroup's memory limit or plug less",
                region=region.name,
            )
        return room

    def _rollback(self, region: Region, ranges: list[Range]) -> None:
        """Free what a failed plug allocated; blocks that held data before are kept."""
        for r in ranges:
            try:
                region.backing.release(r.offset, r.length)
            except OSError:
                # The region's seals forbid the usual causes; if it happens the
                # memory stays allocated (allocated_bytes shows it), never lost data.
                log.exception("region %s: rollback of %s failed", region.name, r)

    def _failure(
        self, region: Region, op: str, r: Range, exc: BaseException, *, missing: int
    ) -> MemplugError:
        """The error a failed operation raises, with what was done about it."""
        undo = "rolled back: every page it allocated was released"
        if isinstance(exc, Cancelled | DeadlineExceeded):
            return type(exc)(
                f"region {region.name!r}: {op} of {r} {exc.message}; {undo}", region=region.name
            )
        if isinstance(exc, OSError):
            err = region.backing.translate(exc, missing)
            return type(err)(
                f"region {region.name!r}: {op} of {r} failed: {err.message}; {undo}",
                region=region.name,
                errno=exc.errno,
                step=exc.strerror,
            )
        if isinstance(exc, MemplugError):
            return exc
        log.error("region %s: %s of %s failed unexpectedly", region.name, op, r, exc_info=exc)
        return Internal(f"region {region.name!r}: {op} of {r} failed: internal error; {undo}")

    # ------------------------------------------------------------------ populate

    def populate(
        self,
        name: str,
        offset: int,
        length: int,
        *,
        write: bool,
        threads: int = 0,
        token: CancelToken | None = None,
        progress: ProgressCallback | None = None,
    ) -> OpResult:
        token = token or CancelToken()
        with self._operation(name, token) as region:
            r = region.range_of(offset, length, "populate")
            method = populate_method(write=write, has_populate=self.madv_populate)
            with region.locks.hold(r, token):
                self._require_plugged(region, "populate", r)
                plan = make_plan(
                    method, [r], max_threads=threads or self.threads, align=region.block_size
                )
                backing = region.backing
                started = time.monotonic()
                try:
                    if method is Method.TOUCH_READ:
                        self._runner.run(plan, placed(region, backing.touch), token, progress)
                    else:
                        with backing.populating(r, write=write) as work:
                            self._runner.run(plan, placed(region, work), token, progress)
                except BaseException as exc:
                    raise self._populate_failure(region, r, exc) from exc
                seconds = time.monotonic() - started
            return OpResult(r.length, seconds, method.value, plan.threads, region.info())

    def _populate_failure(self, region: Region, r: Range, exc: BaseException) -> MemplugError:
        # Nothing to roll back: populating plugged memory allocates nothing new.
        if isinstance(exc, Cancelled | DeadlineExceeded):
            return type(exc)(f"region {region.name!r}: populate of {r} {exc.message}")
        if isinstance(exc, OSError):
            # Plugged memory failing to populate means someone punched holes
            # into it from outside (any holder of a read-write fd can).
            err = region.backing.translate(exc, r.length)
            return type(err)(
                f"region {region.name!r}: populate of {r} failed: {err.message} "
                "(was memory discarded through a client's fd?)",
                region=region.name,
                errno=exc.errno,
            )
        return self._failure(region, "populate", r, exc, missing=0)

    def _require_plugged(self, region: Region, op: str, r: Range) -> None:
        with region.mutex:
            gaps = region.plugged.gaps(r)
        if gaps:
            raise FailedPrecondition(
                f"region {region.name!r}: {op} of {r}: {format_size(sum(g.length for g in gaps))} "
                f"of it is unplugged (first at {gaps[0]}); plug it first",
                region=region.name,
            )

    # ------------------------------------------------------------------ unplug and discard

    def unplug(
        self, name: str, offset: int, length: int, *, token: CancelToken | None = None
    ) -> RangeOutcome:
        """Punch the range and mark it unplugged, one chunk at a time.

        State is updated after each chunk, so whatever stops this midway
        leaves the record true: punched blocks are unplugged, the rest stay.
        """
        token = token or CancelToken()
        with self._operation(name, token) as region:
            r = region.range_of(offset, length, "unplug")
            with region.locks.hold(r, token):
                started = time.monotonic()
                released = 0
                intent = self._begin(region, "unplug", r)
                try:
                    for start, n in iter_chunks(r.offset, r.length, CHUNK_BYTES):
                        piece = Range(start, n)
                        unlock_ranges(region, [piece])
                        try:
                            region.backing.release(start, n)
                        except OSError as exc:
                            err = region.backing.translate(exc, 0)
                            raise type(err)(
                                f"region {region.name!r}: unplug of {r} failed at {piece}: "
                                f"{err.message}; {format_size(released)} before it were "
                                "unplugged",
                                region=region.name,
                            ) from exc
                        released += self._mark_unplugged(region, piece)
                except BaseException:
                    self._finish(region, intent, quiet=True)
                    raise
                self._finish_done(region, intent, "unplug", r)
                seconds = time.monotonic() - started
            return RangeOutcome(released, seconds, region.info())

    def _finish_done(self, region: Region, intent: int, op: str, r: Range) -> None:
        """Record an unplug or discard that is done and cannot be undone (memory punched)."""
        try:
            self._finish(region, intent)
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r}: {op} of {r} was done but could not be recorded: "
                f"{exc.message}; memplugd records it as soon as it can (a restart before "
                f"then does the {op} again)",
                region=region.name,
            ) from exc

    def _mark_unplugged(self, region: Region, r: Range) -> int:
        """Forget r's blocks (punched already); returns the plugged bytes among them."""
        with region.mutex:
            was = sum(p.length for p in region.plugged.intersection(r))
            warm = sum(p.length for p in region.prebacked.intersection(r))
            region.plugged.remove(r)
            region.prebacked.remove(r)
        self._release_quota(was + warm)
        return was

    def discard(
        self, name: str, offset: int, length: int, *, token: CancelToken | None = None
    ) -> RangeOutcome:
        """Zero plugged blocks and keep them backed: punch, then allocate again.

        Between the two calls another process could take the freed memory; a
        block that cannot be backed again is marked unplugged and reported, so
        no access to a "plugged" block can ever SIGBUS. The window is one block.
        """
        token = token or CancelToken()
        with self._operation(name, token) as region:
            r = region.range_of(offset, length, "discard")
            with region.locks.hold(r, token):
                self._require_plugged(region, "discard", r)
                started = time.monotonic()
                intent = self._begin(region, "discard", r)
                try:
                    lost, cause = self._zero_blocks(region, r)
                    if region.lock_map is not None:
                        with region.mutex:
                            relock = region.plugged.intersection(r)
                        lock_ranges(region, relock)
                except BaseException:
                    self._finish(region, intent, quiet=True)
                    raise
                self._finish_done(region, intent, "discard", r)
                seconds = time.monotonic() - started
                if cause is not None:
                    nbytes = len(lost) * region.block_size
                    raise type(cause)(
                        f"region {region.name!r}: discard of {r}: contents dropped, but "
                        f"{format_size(nbytes)} could not be backed again ({cause.message}); "
                        f"those blocks are now unplugged, first at {lost[0]}: plug them again",
                        region=region.name,
                    )
            return RangeOutcome(r.length, seconds, region.info())

    def _zero_blocks(self, region: Region, r: Range) -> tuple[list[Range], MemplugError | None]:
        """Punch and re-allocate each block; returns the blocks that lost their backing."""
        backing = region.backing
        lost: list[Range] = []
        cause: MemplugError | None = None
        for block in range(r.offset, r.end, region.block_size):
            try:
                backing.release(block, region.block_size)
            except OSError as exc:
                err = backing.translate(exc, 0)
                raise type(err)(
                    f"region {region.name!r}: discard of {r} failed at {block:#x}: {err.message}",
                    region=region.name,
                ) from exc
            try:
                backing.allocate(block, region.block_size)
            except OSError as exc:
                backing.release(block, region.block_size)  # hugetlb keeps partial pages
                self._mark_unplugged(region, Range(block, region.block_size))
                lost.append(Range(block, region.block_size))
                cause = cause or backing.translate(exc, region.block_size)
        return lost, cause

    # ------------------------------------------------------------------ start-up

    def restore(self, adopted: dict[str, int]) -> RestoreReport:
        """Bring back the regions the store remembers (see restore.py); call once, first."""
        regions, report = restore_regions(self._store, adopted, self.allow_dirs)
        with self._lock:
            for region in regions:
                self._regions[region.name] = region
                self._plugged_total += region.plugged.total
            self._lost.update(report.lost)
        self._pool.start()
        if self.max_bytes is not None and self._plugged_total > self.max_bytes:
            log.warning(
                "restored regions hold %s plugged, over the quota of %s: new plugs will fail",
                format_size(self._plugged_total),
                format_size(self.max_bytes),
            )
        return report

    def reconfigure(self, *, max_bytes: int | None, allow_dirs: list[Path]) -> None:
        """Apply a reloaded configuration; running operations are not disturbed."""
        with self._lock:
            self.max_bytes = max_bytes
            self.allow_dirs = [Path(d).resolve() for d in allow_dirs]

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every running operation, wait for their rollbacks, release everything."""
        self._pool.stop()
        with self._lock:
            self._closing = True
            for token in self._running:
                token.cancel("cancelled: the daemon is shutting down")
            deadline = time.monotonic() + timeout
            while any(r.active for r in self._regions.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("shutdown: operations still running after %.0fs", timeout)
                    break
                self._lock.wait(left)
            regions = list(self._regions.values())
            self._regions.clear()
        self._runner.shutdown()
        for region in regions:
            release_region(region)
            region.backing.close()
