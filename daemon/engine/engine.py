"""RegionEngine: the one façade the transports call.

Every call runs in a fixed order:

    validate -> find region (counted as busy) -> range lock -> quota ->
    work on the worker threads -> record -> unlock

The engine ties its parts together; the work is theirs: table.py (the
regions and the calls running on them), creation.py (CreateRegion's checks
and backings), quota.py, operations.py (plug, populate, unplug, discard),
rollback.py, placement.py (NUMA, mlock) and restore.py (start-up).
A plug that fails leaves the region exactly as it found it: the blocks it
allocated are punched again, blocks plugged before keep their contents, and
the quota is returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memplug.common import memory
from memplug.common.cancel import CancelToken
from memplug.common.errors import FailedPrecondition, MemplugError, PermissionDenied
from memplug.common.ranges import Range
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind, FileBacking
from memplug.daemon.engine.charging import FirstAttacher, bind_first_attacher
from memplug.daemon.engine.creation import creation_error, make_backing
from memplug.daemon.engine.holds import Holds
from memplug.daemon.engine.hugegrowth import Budget, HugePoolGrower, PoolReport
from memplug.daemon.engine.journal import Journal
from memplug.daemon.engine.operations import Operations, OpResult, RangeOutcome
from memplug.daemon.engine.placement import apply_region_options, release_region
from memplug.daemon.engine.quota import Quota
from memplug.daemon.engine.region import (
    Access,
    Region,
    RegionInfo,
    RegionSpec,
    check_labels,
    check_name,
)
from memplug.daemon.engine.restore import RestoreReport
from memplug.daemon.engine.restore import restore as restore_regions
from memplug.daemon.engine.runner import ProgressCallback, Runner
from memplug.daemon.engine.strategy import Strategy
from memplug.daemon.engine.table import RegionTable
from memplug.daemon.engine.tickets import Handoff, Peer, Ticket, TicketBook
from memplug.daemon.engine.warmpool import PoolSpec, WarmPool
from memplug.daemon.kernel import probe
from memplug.daemon.state.store import HoldRecord, MemoryStore, StateStore

__all__ = ["EngineStatus", "OpResult", "RangeOutcome", "RegionEngine", "RegionListener"]

log = logging.getLogger("memplug.engine")


@dataclass(frozen=True)
class EngineStatus:
    regions: int
    plugged_bytes: int
    allocated_bytes: int
    quota_bytes: int | None
    threads: int
    # Allocated by holders outside plugged blocks; the quota counts it.
    allocated_outside_plugged_bytes: int
    madv_populate: bool
    warm_pools: list[tuple[PoolSpec, int, int, int]]  # (spec, ready, hits, misses)
    # kernel-wide, then per node, with the pages memplug added (--hugetlb-budget)
    hugetlb_pools: list[PoolReport] = field(default_factory=list)


class RegionListener(Protocol):
    """Told of every region created and deleted, before the call returns (fd store)."""

    def region_created(self, name: str, backing: Backing) -> None: ...

    def region_deleted(self, name: str, backing: Backing) -> None: ...


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
        hugetlb_budgets: list[Budget] | None = None,
        hugetlb_keep: bool = False,
    ) -> None:
        """madv_populate=False plugs and populates as on a kernel without
        MADV_POPULATE_* (the fallback paths); memcg_check=False skips the cgroup
        headroom check before a plug. hugetlb_budgets: pools a plug may grow
        (hugegrowth.py); hugetlb_keep: never give the pages back."""
        self.threads = threads
        self.madv_populate = madv_populate and memory.has_madv_populate()
        self.memcg_check = memcg_check
        self.ticket_ttl = ticket_ttl
        self.allow_dirs = [Path(d).resolve() for d in (allow_dirs or [])]
        self._runner = Runner(threads)
        self._table = RegionTable()
        self._tickets = TicketBook(ticket_ttl)
        # One first attacher per charge_to_peer region, whoever serves the fd socket.
        self._first_attach = threading.Lock()
        self._store: StateStore = store if store is not None else MemoryStore()
        self._listener = listener
        self._quota = Quota(max_bytes)
        self._pool = WarmPool(
            list(warm_pools or []),
            self._runner,
            threads=threads,
            madv_populate=self.madv_populate,
            reserve=self._quota.try_reserve,
            release=self._release_quota,
        )
        self._journal = Journal(self._store)
        self._hugepages = HugePoolGrower(
            list(hugetlb_budgets or []), keep=hugetlb_keep, store=self._store
        )
        self._holds = Holds(self._store)
        self._ops = Operations(
            runner=self._runner,
            journal=self._journal,
            quota=self._quota,
            make_room=self._pool.shed,
            release_quota=self._release_quota,
            allocated_outside_plugged=self.allocated_outside_plugged,
            threads=threads,
            madv_populate=self.madv_populate,
            memcg_check=memcg_check,
            hugepages=self._hugepages,
        )

    # ------------------------------------------------------------------ bookkeeping

    @property
    def max_bytes(self) -> int | None:
        """The quota on plugged bytes (None: no quota)."""
        return self._quota.max_bytes

    @property
    def plugged_total(self) -> int:
        return self._quota.used

    @property
    def quota_counted(self) -> int:
        """What the quota counts now: plugged bytes and those allocated outside them."""
        return self._quota.used + self.allocated_outside_plugged()

    def allocated_outside_plugged(self) -> int:
        """Bytes holders of regions' fds allocated outside plugged blocks, all regions."""
        return sum(r.allocated_outside_plugged() for r in self._table.regions())

    def usage_by_backing(self) -> dict[str, tuple[int, int, int, int]]:
        """backing -> (regions, plugged, allocated, allocated outside plugged bytes)."""
        regions = self._table.regions()
        usage: dict[str, tuple[int, int, int, int]] = {k.value: (0, 0, 0, 0) for k in BackingKind}
        for region in regions:
            info = self._info(region)
            count, plugged, allocated, outside = usage[info.backing.value]
            usage[info.backing.value] = (
                count + 1,
                plugged + info.plugged_bytes,
                allocated + info.allocated_bytes,
                outside + info.allocated_outside_plugged,
            )
        return usage

    def status(self) -> EngineStatus:
        regions = self._table.regions()
        for region in regions:
            self._inspect(region)
        allocated = [r.backing.allocated_bytes() for r in regions]  # one fstat each
        return EngineStatus(
            regions=len(regions),
            plugged_bytes=self._quota.used,
            allocated_bytes=sum(allocated),
            quota_bytes=self._quota.max_bytes,
            allocated_outside_plugged_bytes=sum(
                r.allocated_outside_plugged(a) for r, a in zip(regions, allocated, strict=True)
            ),
            threads=self.threads,
            madv_populate=self.madv_populate,
            warm_pools=[
                (spec, self._pool.ready(spec), self._pool.hits[spec], self._pool.misses[spec])
                for spec in self._pool.specs
            ],
            hugetlb_pools=self._hugepages.report(),
        )

    def hugetlb_pools(self) -> list[PoolReport]:
        """The kernel's hugetlb pools, kernel-wide and per node, with what memplug added."""
        return self._hugepages.report()

    def _release_quota(self, nbytes: int) -> None:
        self._quota.release(nbytes)
        if nbytes:
            self._pool.poke()

    # ------------------------------------------------------------------ regions

    def create_region(self, spec: RegionSpec) -> RegionInfo:
        name = check_name(spec.name)
        labels = check_labels(spec.labels)
        acl = spec.acl.check()
        with self._table.creating(name):
            try:
                backing, block_size, options = make_backing(
                    spec,
                    allow_dirs=self.allow_dirs,
                    pool=self._pool,
                    release_quota=self._release_quota,
                )
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
        log.info("created region %s: %s, %s", name, backing.describe(), format_size(backing.size))
        return region.info()

    def _publish(self, region: Region) -> None:
        """Apply options, persist, tell the fd store, then let clients see the region."""
        backing = region.backing
        try:
            apply_region_options(region)
        except OSError as exc:
            raise creation_error(region.name, exc) from exc
        if isinstance(backing, FileBacking):
            self._table.check_file_unused(backing)
        # Durable (and in systemd's fd store) before anyone hears of it.
        try:
            self._store.put_region(region.record())
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r} was not created: {exc.message}", region=region.name
            ) from exc
        if self._listener is not None:
            self._listener.region_created(region.name, backing)
        self._table.add(region)

    def get_region(self, name: str) -> RegionInfo:
        return self._info(self._get(name))

    def _get(self, name: str) -> Region:
        return self._table.get(name)

    def list_regions(self, selector: Mapping[str, str] | None = None) -> list[RegionInfo]:
        return [self._info(r) for r in self._table.regions() if r.label_match(selector or {})]

    def _info(self, region: Region) -> RegionInfo:
        self._inspect(region)
        return region.info()

    def _inspect(self, region: Region) -> None:
        """Notice a FILE region's file resized from outside (see Region.detect_damage)."""
        lost = region.detect_damage()
        if lost:
            self._release_quota(lost)

    def _usable(self, region: Region, op: str) -> Region:
        """The region, after a look at its backing; FAILED_PRECONDITION if it is damaged."""
        self._inspect(region)
        with region.mutex:
            damage = region.damage
        if damage is not None:
            raise FailedPrecondition(
                f"region {region.name!r} is damaged, {op} refused: {damage}", region=region.name
            )
        return region

    def delete_region(self, name: str) -> None:
        region = self._table.remove_idle(name, before=self._record_deletion)
        self._journal.forget(name)
        self._holds.forget(name)
        with region.mutex:
            self._quota.release(region.plugged.total + region.prebacked.total)
        self._tickets.revoke_region(name)
        release_region(region)
        if self._listener is not None:
            self._listener.region_deleted(name, region.backing)
        region.backing.close()
        log.info("deleted region %s", name)
        # Free now unless a client still holds the memory (record_pending retries).
        self._hugepages.settle()

    def _record_deletion(self, name: str) -> None:
        # Recorded first, under the table's lock: a delete the store refuses
        # leaves the region served, counted and restorable, as the error says.
        self._holds.check(name, "delete")
        try:
            self._store.delete_region(name)
        except MemplugError as exc:
            raise type(exc)(
                f"region {name!r} was not deleted and is unchanged: {exc.message}",
                region=name,
            ) from exc

    # ------------------------------------------------------------------ hand-off

    def attach(self, name: str, access: Access) -> Ticket:
        """A one-time ticket for the region's fd, to redeem on the fd socket."""
        return self._tickets.issue(self._get(name).name, access)

    def redeem(
        self, value: str, peer: Peer, first_attacher: FirstAttacher | None = None
    ) -> Handoff:
        """Trade a ticket for a fresh fd, if the peer passes the region's ACL.

        The ticket is used up whatever the outcome, so it cannot be retried
        from another process.
        """
        ticket = self._tickets.redeem(value)
        return self.open_fd(ticket.region, ticket.access, peer, first_attacher)

    def open_fd(
        self,
        name: str,
        access: Access,
        peer: Peer,
        first_attacher: FirstAttacher | None = None,
    ) -> Handoff:
        """A fresh fd of the region for a peer that passes its ACL (no ticket needed).

        first_attacher reads the peer's cgroups: a charge_to_peer region not yet
        attached is charged to them from now on (recorded before the fd goes out).
        """
        # Counted as an operation, so the region cannot be deleted (and its fd
        # closed) between the lookup and the reopen.
        with self._table.operation(name, CancelToken()) as region:
            if not region.acl.allows(peer.uid, peer.gids, access):
                raise PermissionDenied(
                    f"uid {peer.uid} may not attach region {region.name!r} "
                    f"{'read-only' if access is Access.READ_ONLY else 'read-write'}: "
                    "it is not in the region's ACL",
                    region=region.name,
                )
            backing = region.backing
            if (
                access is Access.READ_WRITE
                and not backing.sealed_against_resize
                and peer.uid not in (0, region.acl.owner_uid)
            ):
                # FAILED_PRECONDITION, not PERMISSION_DENIED: the peer is in the ACL,
                # and the fd socket would hide the reason of a PERMISSION_DENIED.
                raise FailedPrecondition(
                    f"uid {peer.uid} may not attach FILE region {region.name!r} read-write: "
                    "a regular file cannot be sealed against truncation, so a read-write fd "
                    "would let it shrink the file under the region's other users (SIGBUS); "
                    f"only the owner (uid {region.acl.owner_uid}) and root may. Attach it "
                    "read-only, or use a shmem or hugetlb region",
                    region=region.name,
                )
            self._usable(region, "attach")
            if first_attacher is not None and region.options.awaiting_peer:
                with self._first_attach:
                    if region.options.awaiting_peer:
                        self._charge_first_attacher(region, first_attacher, peer)
            fd = backing.reopen(writable=access is Access.READ_WRITE)
            with region.mutex:
                plugged_bytes = region.plugged.total
        return Handoff(
            fd=fd,
            region=region.name,
            size=region.size,
            page_size=backing.page_size,
            block_size=region.block_size,
            backing=backing.kind.value,
            access=access,
            seals=backing.seals(),
            plugged_bytes=plugged_bytes,
        )

    def _charge_first_attacher(
        self, region: Region, first_attacher: FirstAttacher, peer: Peer
    ) -> None:
        options = bind_first_attacher(region, first_attacher)
        try:
            self._store.put_options(region.name, options)
        except MemplugError as exc:
            raise type(exc)(
                f"region {region.name!r} was not attached: its charge cgroup, the "
                f"attacher's, could not be recorded: {exc.message}",
                region=region.name,
            ) from exc
        region.options = options
        log.info(
            "region %s is charged to its first attacher (pid %d uid %d): memory cgroup %s%s",
            region.name, peer.pid, peer.uid, options.charge_cgroup,
            f", hugetlb cgroup {options.charge_hugetlb_cgroup}"
            if options.charge_hugetlb_cgroup else "",
        )  # fmt: skip

    def hold_region(self, name: str, holder: str, reason: str, ttl: float) -> HoldRecord:
        """Refuse Unplug, Discard and Delete of the region until released or expired."""
        # Counted as an operation: a delete cannot slip between the lookup and the hold.
        with self._table.operation(name, CancelToken()) as region:
            hold = self._holds.hold(region.name, holder, reason, ttl)
        log.info("region %s held by %r (%s) for %.0f s", name, hold.holder, hold.reason, ttl)
        return hold

    def release_region(self, name: str, holder: str) -> bool:
        """Drop holder's hold; False if it held none (or it had expired)."""
        region = self._get(name)
        released = self._holds.release(region.name, holder)
        log.info("region %s released by %r (%s)", name, holder, "held" if released else "not held")
        return released

    # ------------------------------------------------------------------ operations

    def plug(
        self,
        name: str,
        offset: int,
        length: int,
        *,
        ranges: Sequence[tuple[int, int]] = (),
        requested: Strategy = Strategy.AUTO,
        threads: int = 0,
        token: CancelToken | None = None,
        progress: ProgressCallback | None = None,
    ) -> OpResult:
        """Back every byte of the range (see operations.py for the strategy's syscall).

        ranges: (offset, length) pairs plugged as one (offset and length then 0).
        """
        token = token or CancelToken()
        with self._table.operation(name, token) as region:
            return self._ops.plug(
                self._usable(region, "plug"),
                offset,
                length,
                ranges=ranges,
                requested=requested,
                threads=threads,
                token=token,
                progress=progress,
            )

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
        """Prefault plugged blocks (page tables; READ warms a file's page cache)."""
        token = token or CancelToken()
        with self._table.operation(name, token) as region:
            return self._ops.populate(
                self._usable(region, "populate"),
                offset,
                length,
                write=write,
                threads=threads,
                token=token,
                progress=progress,
            )

    def unplug(
        self,
        name: str,
        offset: int,
        length: int,
        *,
        ranges: Sequence[tuple[int, int]] = (),
        token: CancelToken | None = None,
    ) -> RangeOutcome:
        """Punch the range (or the list of ranges) and mark it unplugged."""
        token = token or CancelToken()
        with self._table.operation(name, token) as region:
            self._inspect(region)  # a damaged region may still give memory back
            self._holds.check(region.name, "unplug")
            return self._ops.unplug(region, offset, length, token, ranges)

    def discard(
        self,
        name: str,
        offset: int,
        length: int,
        *,
        ranges: Sequence[tuple[int, int]] = (),
        token: CancelToken | None = None,
    ) -> RangeOutcome:
        """Zero plugged blocks (of the range or the list of ranges) and keep them backed."""
        token = token or CancelToken()
        with self._table.operation(name, token) as region:
            self._holds.check(region.name, "discard")
            return self._ops.discard(self._usable(region, "discard"), offset, length, token, ranges)

    def record_pending(self) -> None:
        """Retry closing the intents whose closing write failed (called periodically)."""
        self._journal.record_pending(self._table.regions())
        # and give back huge pages added for memory freed since (a client's last fd closed)
        self._hugepages.settle()

    # ------------------------------------------------------------------ start-up

    def restore(self, adopted: dict[str, int]) -> RestoreReport:
        """Bring back the regions the store remembers (see restore.py); call once, first."""
        regions, report = restore_regions(self._store, adopted, self.allow_dirs)
        self._table.restored(regions, report.lost)
        self._hugepages.restore()
        # Open the sysfs files GetStatus keeps open (kernel/sysfs.py) now, so that
        # the daemon's set of open fds is settled before its first call.
        self._hugepages.report()
        probe.shmem_thp_mode()
        self._holds.load()
        for region in regions:
            self._quota.add(region.plugged.total)
        self._pool.start()
        max_bytes, plugged = self._quota.max_bytes, self._quota.used
        if max_bytes is not None and plugged > max_bytes:
            log.warning(
                "restored regions hold %s plugged, over the quota of %s: new plugs will fail",
                format_size(plugged),
                format_size(max_bytes),
            )
        return report

    def reconfigure(self, *, max_bytes: int | None, allow_dirs: list[Path]) -> None:
        """Apply a reloaded configuration; running operations are not disturbed."""
        self._quota.max_bytes = max_bytes
        self.allow_dirs = [Path(d).resolve() for d in allow_dirs]

    # ------------------------------------------------------------------ shutdown

    def quiesce(self, timeout: float) -> dict[str, int]:
        """For a take-over: cancel every running operation and wait for its
        rollback, refuse new ones, and return the memfd regions' fds by name
        (FILE regions are reopened from their path). Nothing is closed: resume()
        serves again, shutdown() ends."""
        regions = self._table.pause(timeout, "memplugd is handing over to a new one")
        return {r.name: r.backing.fd for r in regions if r.backing.kind is not BackingKind.FILE}

    def resume(self) -> None:
        """Serve again after quiesce(): the take-over did not happen."""
        self._table.resume()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every running operation, wait for their rollbacks, release everything."""
        self._pool.stop()
        regions = self._table.close(timeout)
        self._runner.shutdown()
        for region in regions:
            release_region(region)
            region.backing.close()
