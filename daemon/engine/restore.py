"""Bring regions back at start-up and make the store agree with the kernel.

For each region the store remembers:
1. find its memory: memfd regions in the fds systemd's fd store handed back
   (matched by name, then checked: the memfd's own name, size, seals and page
   size must be the ones recorded); FILE regions by reopening the file;
2. replay what a crash interrupted (intents): a plug is rolled back (its
   unplugged blocks punched, keeping data that predated it), an unplug and a
   discard are rolled forward (the client asked for them);
3. check every block recorded as plugged is backed, allocating again what is
   not (fallocate is a no-op where memory is there); a block that cannot be
   backed is marked unplugged and reported, never silently assumed.
A FILE region whose file was resized while the daemon was away comes back
damaged (see Region.detect_damage), with why: it can be shown and deleted.
A region whose memory cannot be found is marked gone in the store, with why.
A record this daemon cannot use (malformed, as the store reports it, or of a
backing it does not know, as after a downgrade) is reported lost and left as it
is, in the store and in systemd's fd store, for a daemon that can use it.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from memplug.common.errors import MemplugError
from memplug.common.ranges import IntervalSet, Range, RangeList, subtract
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind, FileBacking, HugetlbBacking, ShmemBacking
from memplug.daemon.engine.placement import apply_region_options, mem_policy
from memplug.daemon.engine.region import Region
from memplug.daemon.kernel import ops
from memplug.daemon.kernel.memfd import REGION_SEALS
from memplug.daemon.state.store import Intent, RegionRecord, StateStore

log = logging.getLogger("memplug.restore")

# Why a memfd region's fd may not come back, as systemd really behaves: its fd
# store outlives restarts of the service but not a stop (before systemd 254).
NO_FD_STORE = (
    "a memfd region's memory lives only in its fds; systemd's fd store keeps them across "
    "restarts (systemctl restart, a crash, the watchdog) but empties it at `systemctl stop` "
    "and at reboot, unless the unit sets FileDescriptorStorePreserve=yes (systemd >= 254); "
    "without systemd they end with the daemon process unless a new one takes them over "
    "(memplugd --takeover). Use `systemctl restart memplugd`, not stop and start, or a file "
    "region (--allow-dir) for memory that must outlive a stop"
)


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)  # what reconciliation changed
    stray_fds: list[str] = field(default_factory=list)  # fds with no region: dropped


def _check_memfd(fd: int, record: RegionRecord) -> str | None:
    """Why fd is not the memfd of record, or None if it is."""
    try:
        st = os.fstat(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        seals = ops.get_seals(fd)
    except OSError as exc:
        return f"cannot inspect the fd: {exc.strerror}"
    # A region served from the warm pool keeps its memfd's pool name.
    names = (f"/memfd:memplug:{record.name} ", "/memfd:memplug:~warm ")
    if not stat.S_ISREG(st.st_mode) or not target.startswith(names):
        return f"the fd is {target}, not the memfd of region {record.name}"
    if st.st_size != record.size:
        return f"its size is {st.st_size}, the store says {record.size}"
    if seals & REGION_SEALS != REGION_SEALS:
        return f"its seals are {seals:#x}, missing some of {REGION_SEALS:#x}"
    # hugetlbfs reports its page size as the block size of its files
    if st.st_blksize != record.page_size:
        return f"its page size is {st.st_blksize}, the store says {record.page_size}"
    return None


@dataclass(frozen=True)
class Unavailable:
    """Why a region's memory cannot be had; permanent unless it may come back later."""

    reason: str
    permanent: bool = True
    rejected_fd: bool = False  # an fd came back under its name and was not its memfd


def _open_backing(
    record: RegionRecord, adopted: dict[str, int], allow_dirs: list[Path]
) -> Backing | Unavailable:
    """The region's backing, or why it cannot be had."""
    kind = BackingKind(record.backing)
    mpol = mem_policy(record.options.placement)
    if kind is BackingKind.FILE:
        owner = record.acl.owner_uid
        try:
            # Whatever its size now: a file resized outside memplugd makes a
            # damaged region, shown with why, not a region silently gone.
            return FileBacking.open(
                record.path, record.size, allow_dirs, owner, create=False, mpol=mpol, any_size=True
            )
        except MemplugError as exc:
            # Only a vanished file is gone for good; a missing --allow-dir or a
            # permission problem may be fixed by the next start.
            gone = not os.path.lexists(record.path)
            return Unavailable(f"its file cannot be reopened: {exc.message}", permanent=gone)
    fd = adopted.pop(record.name, None)
    if fd is None:
        return Unavailable(f"no fd came back for it: {NO_FD_STORE}")
    why = _check_memfd(fd, record)
    if why is not None:
        os.close(fd)
        return Unavailable(f"the fd handed back does not match: {why}", rejected_fd=True)
    if kind is BackingKind.HUGETLB:
        return HugetlbBacking(fd, record.size, record.page_size, mpol=mpol)
    return ShmemBacking(fd, record.size, record.page_size, huge=record.options.thp, mpol=mpol)


def _replay(region: Region, intent: Intent, report: RestoreReport) -> None:
    """Undo or complete one interrupted operation over every range it recorded."""
    backing, parts = region.backing, intent.parts
    what = RangeList(parts)
    if intent.op == "plug":
        undo = subtract([g for r in parts for g in region.plugged.gaps(r)], intent.keep)
        for piece in undo:
            backing.release(piece.offset, piece.length)
        report.repaired.append(f"{region.name}: rolled back an interrupted plug of {what}")
    elif intent.op == "unplug":
        for r in parts:
            backing.release(r.offset, r.length)
            region.plugged.remove(r)
        report.repaired.append(f"{region.name}: completed an interrupted unplug of {what}")
    elif intent.op == "discard":
        for r in parts:
            for inside in region.plugged.intersection(r):
                backing.release(inside.offset, inside.length)
        report.repaired.append(f"{region.name}: completed an interrupted discard of {what}")
    else:
        log.error("region %s: unknown intent %r ignored", region.name, intent.op)


def _ensure_backed(region: Region, report: RestoreReport) -> None:
    """Allocate every plugged block again; unplug (and report) those that cannot be."""
    backing = region.backing
    for r in list(region.plugged):
        try:
            backing.allocate(r.offset, r.length)
            continue
        except OSError:
            pass
        for block in range(r.offset, r.end, region.block_size):
            try:
                backing.allocate(block, region.block_size)
            except OSError as exc:
                backing.release(block, region.block_size)
                region.plugged.remove(Range(block, region.block_size))
                report.repaired.append(
                    f"{region.name}: block {Range(block, region.block_size)} was plugged but "
                    f"cannot be backed ({exc.strerror}); it is now unplugged"
                )


def restore(
    store: StateStore,
    adopted: dict[str, int],
    allow_dirs: list[Path],
) -> tuple[list[Region], RestoreReport]:
    """Regions to install, and what happened. Consumes (or closes) every adopted fd."""
    records, intents = store.load()
    report = RestoreReport()
    regions = []
    for record in records:
        if record.gone:
            report.lost[record.name] = record.gone
            continue
        if record.backing not in {k.value for k in BackingKind}:
            why = (
                f"its backing {record.backing!r} is unknown to this memplugd (written by a "
                "newer one?); its record and memory are kept for a memplugd that knows it"
            )
            fd = adopted.pop(record.name, None)
            if fd is not None:
                os.close(fd)  # systemd's fd store keeps its own copy
            report.lost[record.name] = why
            log.warning("region %s is lost: %s", record.name, why)
            continue
        backing = _open_backing(record, adopted, allow_dirs)
        if isinstance(backing, Unavailable):
            if backing.permanent:
                store.mark_gone(record.name, backing.reason)
            if backing.rejected_fd:
                report.stray_fds.append(record.name)  # out of systemd's fd store too
            report.lost[record.name] = backing.reason
            log.warning("region %s is lost: %s", record.name, backing.reason)
            continue
        region = Region(
            record.name,
            backing,
            record.block_size,
            record.labels,
            record.created_at,
            record.acl,
            record.options,
        )
        region.plugged = IntervalSet(record.plugged)
        if region.options.from_warm_pool:
            # The pool's extra memory in unplugged blocks is not tracked across a
            # restart: give it back (unplugged contents are undefined anyway).
            for gap in region.plugged.gaps(Range(0, record.size)):
                backing.release(gap.offset, gap.length)
        mine = [i for i in intents if i.region == record.name]
        region.detect_damage()  # forgets plugged blocks past a truncated end
        if region.damage is not None:
            # Nothing is replayed or allocated again: that would extend the file.
            report.repaired.append(f"{region.name}: the region is damaged: {region.damage}")
        else:
            for intent in mine:
                _replay(region, intent, report)
            _ensure_backed(region, report)
        for intent in mine:
            store.finish(intent.id, region.name, tuple(region.plugged))
        store.finish(None, region.name, tuple(region.plugged))
        try:
            apply_region_options(region)  # NUMA policy, re-lock plugged blocks
        except OSError as exc:
            report.repaired.append(f"{region.name}: its options could not be reapplied: {exc}")
        regions.append(region)
        report.restored.append(record.name)
        log.info(
            "restored region %s: %s, %s plugged of %s",
            record.name,
            backing.describe(),
            format_size(region.plugged.total),
            format_size(record.size),
        )
    for name, fd in adopted.items():
        report.stray_fds.append(name)
        os.close(fd)
    for line in report.repaired:
        log.warning("reconciled: %s", line)
    return regions, report
