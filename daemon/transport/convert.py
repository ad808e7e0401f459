"""Engine types <-> protobuf messages. The only module that knows both."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from memplug.common.errors import InvalidArgument
from memplug.common.ranges import Range, check_count
from memplug.daemon.backings import BackingKind
from memplug.daemon.engine.engine import EngineStatus, OpResult, RangeOutcome
from memplug.daemon.engine.region import Access, Acl, Placement, RegionInfo, RegionSpec
from memplug.daemon.engine.strategy import Strategy
from memplug.daemon.engine.tickets import Ticket
from memplug.daemon.kernel import probe
from memplug.v1 import memplug_pb2 as pb

BACKING_TO_PROTO: Final = {
    BackingKind.SHMEM: pb.BACKING_SHMEM,
    BackingKind.HUGETLB: pb.BACKING_HUGETLB,
    BackingKind.FILE: pb.BACKING_FILE,
}
BACKING_FROM_PROTO: Final = {v: k for k, v in BACKING_TO_PROTO.items()}

ACCESS_TO_PROTO: Final = {
    Access.READ_WRITE: pb.ACCESS_READ_WRITE,
    Access.READ_ONLY: pb.ACCESS_READ_ONLY,
}
ACCESS_FROM_PROTO: Final = {v: k for k, v in ACCESS_TO_PROTO.items()}

POLICY_TO_PROTO: Final = {
    "default": pb.NUMA_POLICY_DEFAULT,
    "bind": pb.NUMA_POLICY_BIND,
    "preferred": pb.NUMA_POLICY_PREFERRED,
    "interleave": pb.NUMA_POLICY_INTERLEAVE,
}
POLICY_FROM_PROTO: Final = {v: k for k, v in POLICY_TO_PROTO.items()}


def policy_from_proto(value: int) -> str:
    if value not in POLICY_FROM_PROTO:
        raise InvalidArgument(
            f"unknown NUMA policy {value}: use default, bind, preferred, interleave"
        )
    return POLICY_FROM_PROTO[value]  # type: ignore[index]


STRATEGY_FROM_PROTO: Final = {
    pb.STRATEGY_AUTO: Strategy.AUTO,
    pb.STRATEGY_FALLOCATE: Strategy.FALLOCATE,
    pb.STRATEGY_POPULATE_WRITE: Strategy.POPULATE_WRITE,
}


def range_to_proto(r: Range) -> pb.Range:
    return pb.Range(offset=r.offset, length=r.length)


def ranges_from_proto(ranges: Sequence[pb.Range], *, what: str) -> list[tuple[int, int]]:
    """A request's list of ranges as (offset, length) pairs; the engine checks them.

    Too long a list is refused before it is copied: a refusal costs next to nothing.
    """
    check_count(len(ranges), what=what)
    return [(r.offset, r.length) for r in ranges]


def region_to_proto(info: RegionInfo) -> pb.Region:
    return pb.Region(
        name=info.name,
        size=info.size,
        backing=BACKING_TO_PROTO[info.backing],
        page_size=info.page_size,
        block_size=info.block_size,
        path=info.path,
        labels=dict(info.labels),
        plugged=[range_to_proto(r) for r in info.plugged],
        plugged_bytes=info.plugged_bytes,
        allocated_bytes=info.allocated_bytes,
        created_at=info.created_at,
        owner_uid=info.acl.owner_uid,
        allowed_uids=sorted(info.acl.allowed_uids),
        allowed_gids=sorted(info.acl.allowed_gids),
        read_only_uids=sorted(info.acl.read_only_uids),
        read_only_gids=sorted(info.acl.read_only_gids),
        transparent_huge_pages=info.options.thp,
        numa_policy=POLICY_TO_PROTO[info.options.placement.policy],
        numa_nodes=list(info.options.placement.nodes),
        lock=info.options.lock,
        from_warm_pool=info.options.from_warm_pool,
        operations_running=info.operations_running,
        damage=info.damage,
        allocated_outside_plugged_bytes=info.allocated_outside_plugged,
        charge_cgroup=info.options.charge_cgroup,
        charge_to_peer=info.options.charge_to_peer,
        # Only huge pages are charged to a hugetlb cgroup: on another backing
        # the recorded path (the first attacher's) bills nothing.
        charge_hugetlb_cgroup=(
            info.options.charge_hugetlb_cgroup if info.backing is BackingKind.HUGETLB else ""
        ),
    )


def spec_from_proto(request: pb.CreateRegionRequest) -> RegionSpec:
    backing: BackingKind | None = None
    if request.backing != pb.BACKING_UNSPECIFIED:
        if request.backing not in BACKING_FROM_PROTO:
            raise InvalidArgument(f"unknown backing {request.backing}: use shmem, hugetlb or file")
        backing = BACKING_FROM_PROTO[request.backing]
    return RegionSpec(
        name=request.name,
        size=request.size,
        backing=backing,
        page_size=request.page_size,
        block_size=request.block_size,
        path=request.path,
        labels=dict(request.labels),
        acl=Acl(
            # gRPC cannot tell who calls (no SO_PEERCRED through grpcio): unset means
            # the daemon's own uid, root under systemd, the user of a non-root daemon.
            owner_uid=request.owner_uid if request.HasField("owner_uid") else os.geteuid(),
            allowed_uids=frozenset(request.allowed_uids),
            allowed_gids=frozenset(request.allowed_gids),
            read_only_uids=frozenset(request.read_only_uids),
            read_only_gids=frozenset(request.read_only_gids),
        ),
        thp=request.transparent_huge_pages if request.HasField("transparent_huge_pages") else None,
        placement=Placement(policy_from_proto(request.numa_policy), tuple(request.numa_nodes)),
        lock=request.lock,
        charge_cgroup=request.charge_cgroup,
        charge_to_peer=request.charge_to_peer,
    )


def strategy_from_proto(value: int) -> Strategy:
    if value not in STRATEGY_FROM_PROTO:
        raise InvalidArgument(f"unknown strategy {value}: use auto, fallocate or populate-write")
    return STRATEGY_FROM_PROTO[value]  # type: ignore[index]


def populate_write_from_proto(mode: int) -> bool:
    if mode == pb.POPULATE_MODE_READ:
        return False
    if mode == pb.POPULATE_MODE_WRITE:
        return True
    raise InvalidArgument(f"populate mode {mode} is not READ or WRITE: say which")


def access_from_proto(value: int) -> Access:
    if value not in ACCESS_FROM_PROTO:
        raise InvalidArgument(f"access {value} is not READ_WRITE or READ_ONLY: say which")
    return ACCESS_FROM_PROTO[value]  # type: ignore[index]


def ticket_to_proto(
    ticket: Ticket, *, fd_socket: str, ttl: float, region: RegionInfo
) -> pb.AttachTicket:
    return pb.AttachTicket(
        ticket=ticket.value,
        fd_socket=fd_socket,
        expires_in=ttl,
        access=ACCESS_TO_PROTO[ticket.access],
        region=region_to_proto(region),
    )


def result_to_proto(result: OpResult) -> pb.OperationResult:
    return pb.OperationResult(
        bytes=result.bytes,
        seconds=result.seconds,
        strategy=result.strategy,
        threads=result.threads,
        region=region_to_proto(result.region),
        zeroing=result.zeroing,
    )


def outcome_to_proto(outcome: RangeOutcome) -> pb.RangeResult:
    return pb.RangeResult(
        bytes=outcome.bytes, seconds=outcome.seconds, region=region_to_proto(outcome.region)
    )


def status_to_proto(
    status: EngineStatus, *, version: str, uptime: float, socket: str, fd_socket: str
) -> pb.DaemonStatus:
    pools = [
        pb.HugePagePool(
            page_size=p.page_size,
            total=p.total,
            free=p.free,
            reserved=p.reserved,
            surplus=p.surplus,
            node=p.node,
            added_pages=p.added,
            budget_pages=p.budget_pages,
        )
        for p in status.hugetlb_pools
    ]
    thp_mode = probe.shmem_thp_mode()
    thp_allowed = probe.shmem_thp_allowed(thp_mode)
    return pb.DaemonStatus(
        version=version,
        uptime_seconds=uptime,
        regions=status.regions,
        plugged_bytes=status.plugged_bytes,
        allocated_bytes=status.allocated_bytes,
        quota_bytes=status.quota_bytes or 0,
        allocated_outside_plugged_bytes=status.allocated_outside_plugged_bytes,
        threads=status.threads,
        hugetlb_pools=[p for p in pools if not p.HasField("node")],
        hugetlb_node_pools=[p for p in pools if p.HasField("node")],
        madv_populate=status.madv_populate,
        socket=socket,
        fd_socket=fd_socket,
        shmem_thp=thp_mode,
        shmem_thp_allowed=thp_allowed,
        shmem_thp_hint="" if thp_allowed else probe.SHMEM_THP_HINT,
        numa_nodes=probe.numa_nodes(),
        warm_pools=[
            pb.WarmPool(
                backing=BACKING_TO_PROTO[spec.backing],
                size=spec.size,
                page_size=spec.page_size,
                target=spec.count,
                ready=ready,
                hits=hits,
                misses=misses,
            )
            for spec, ready, hits, misses in status.warm_pools
        ],
    )
