"""protobuf messages -> client dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeVar

from memplug.client.types import (
    HugePool,
    OperationResult,
    RangeResult,
    Region,
    Status,
    Ticket,
    WarmPool,
)
from memplug.common.errors import InvalidArgument
from memplug.v1 import memplug_pb2 as pb

BACKINGS: Final = {
    "shmem": pb.BACKING_SHMEM,
    "hugetlb": pb.BACKING_HUGETLB,
    "file": pb.BACKING_FILE,
}
BACKING_NAMES: Final = {v: k for k, v in BACKINGS.items()}
STRATEGIES: Final = {
    "auto": pb.STRATEGY_AUTO,
    "fallocate": pb.STRATEGY_FALLOCATE,
    "populate-write": pb.STRATEGY_POPULATE_WRITE,
}
ACCESS: Final = {"rw": pb.ACCESS_READ_WRITE, "ro": pb.ACCESS_READ_ONLY}
NUMA_POLICIES: Final = {
    "default": pb.NUMA_POLICY_DEFAULT,
    "bind": pb.NUMA_POLICY_BIND,
    "preferred": pb.NUMA_POLICY_PREFERRED,
    "interleave": pb.NUMA_POLICY_INTERLEAVE,
}


T = TypeVar("T")


def pick(table: Mapping[str, T], value: str, what: str) -> T:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} {value!r}: use {', '.join(table)}") from None


def region(m: pb.Region) -> Region:
    return Region(
        name=m.name,
        size=m.size,
        backing=BACKING_NAMES.get(m.backing, "unspecified"),
        page_size=m.page_size,
        block_size=m.block_size,
        path=m.path,
        labels=dict(m.labels),
        plugged=[(r.offset, r.length) for r in m.plugged],
        plugged_bytes=m.plugged_bytes,
        allocated_bytes=m.allocated_bytes,
        created_at=m.created_at,
        owner_uid=m.owner_uid,
        allowed_uids=list(m.allowed_uids),
        allowed_gids=list(m.allowed_gids),
        read_only_uids=list(m.read_only_uids),
        read_only_gids=list(m.read_only_gids),
        transparent_huge_pages=m.transparent_huge_pages,
        numa_policy={v: k for k, v in NUMA_POLICIES.items()}.get(m.numa_policy, "default"),
        numa_nodes=list(m.numa_nodes),
        lock=m.lock,
        from_warm_pool=m.from_warm_pool,
        operations_running=m.operations_running,
        damage=m.damage,
        allocated_outside_plugged_bytes=m.allocated_outside_plugged_bytes,
        charge_cgroup=m.charge_cgroup,
        charge_to_peer=m.charge_to_peer,
        charge_hugetlb_cgroup=m.charge_hugetlb_cgroup,
    )


def ticket(m: pb.AttachTicket) -> Ticket:
    access = {v: k for k, v in ACCESS.items()}.get(m.access, "unspecified")
    return Ticket(m.ticket, m.fd_socket, m.expires_in, access, region(m.region))


def result(m: pb.OperationResult) -> OperationResult:
    return OperationResult(
        m.bytes, m.seconds, m.strategy, m.threads, region(m.region), zeroing=m.zeroing
    )


def range_result(m: pb.RangeResult) -> RangeResult:
    return RangeResult(m.bytes, m.seconds, region(m.region))


def huge_pool(p: pb.HugePagePool) -> HugePool:
    return HugePool(
        p.page_size,
        p.total,
        p.free,
        p.reserved,
        p.surplus,
        node=p.node if p.HasField("node") else None,
        added_pages=p.added_pages,
        budget_pages=p.budget_pages,
    )


def status(m: pb.DaemonStatus) -> Status:
    return Status(
        version=m.version,
        uptime_seconds=m.uptime_seconds,
        regions=m.regions,
        plugged_bytes=m.plugged_bytes,
        allocated_bytes=m.allocated_bytes,
        allocated_outside_plugged_bytes=m.allocated_outside_plugged_bytes,
        quota_bytes=m.quota_bytes or None,
        threads=m.threads,
        hugetlb_pools=[huge_pool(p) for p in m.hugetlb_pools],
        hugetlb_node_pools=[huge_pool(p) for p in m.hugetlb_node_pools],
        madv_populate=m.madv_populate,
        socket=m.socket,
        fd_socket=m.fd_socket,
        shmem_thp=m.shmem_thp,
        shmem_thp_allowed=m.shmem_thp_allowed,
        shmem_thp_hint=m.shmem_thp_hint,
        numa_nodes=list(m.numa_nodes),
        warm_pools=[
            WarmPool(BACKING_NAMES.get(p.backing, "?"), p.size, p.page_size, p.target, p.ready,
                     p.hits, p.misses)
            for p in m.warm_pools
        ],
    )  # fmt: skip
