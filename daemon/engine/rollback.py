"""Undoing a failed operation, and the error that says what was undone (engine-internal)."""

from __future__ import annotations

import logging

from memplug.common.errors import Cancelled, DeadlineExceeded, Internal, MemplugError
from memplug.common.ranges import Range, RangeList
from memplug.daemon.engine.region import Region

log = logging.getLogger("memplug.engine")

UNDONE = "rolled back: every page it allocated was released"


def release_ranges(region: Region, ranges: list[Range]) -> None:
    """Free what a failed plug allocated; blocks that held data before are kept."""
    for r in ranges:
        try:
            region.backing.release(r.offset, r.length)
        except OSError:
            # The region's seals forbid the usual causes; if it happens the
            # memory stays allocated (allocated_bytes shows it), never lost data.
            log.exception("region %s: rollback of %s failed", region.name, r)


def failure(
    region: Region, op: str, r: Range | RangeList, exc: BaseException, *, missing: int
) -> MemplugError:
    """The error a failed, rolled-back operation raises, with what was done about it."""
    if isinstance(exc, Cancelled | DeadlineExceeded):
        return type(exc)(
            f"region {region.name!r}: {op} of {r} {exc.message}; {UNDONE}", region=region.name
        )
    if isinstance(exc, OSError):
        err = region.backing.error_for(exc, missing)
        return type(err)(
            f"region {region.name!r}: {op} of {r} failed: {err.message}; {UNDONE}",
            region=region.name,
            errno=exc.errno,
            step=exc.strerror,
        )
    if isinstance(exc, MemplugError):
        return exc
    log.error("region %s: %s of %s failed unexpectedly", region.name, op, r, exc_info=exc)
    return Internal(f"region {region.name!r}: {op} of {r} failed: internal error; {UNDONE}")


def populate_failure(region: Region, r: Range, exc: BaseException) -> MemplugError:
    """The error a failed populate raises: nothing to roll back, it allocates nothing new."""
    if isinstance(exc, Cancelled | DeadlineExceeded):
        return type(exc)(f"region {region.name!r}: populate of {r} {exc.message}")
    if isinstance(exc, OSError):
        # Plugged memory failing to populate means someone punched holes
        # into it from outside (any holder of a read-write fd can).
        err = region.backing.error_for(exc, r.length)
        return type(err)(
            f"region {region.name!r}: populate of {r} failed: {err.message} "
            "(was memory discarded through a client's fd?)",
            region=region.name,
            errno=exc.errno,
        )
    return failure(region, "populate", r, exc, missing=0)
