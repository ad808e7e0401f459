"""What the client returns: plain dataclasses, no protobuf in the public API."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Region:
    name: str
    size: int
    backing: str  # "shmem", "hugetlb" or "file"
    page_size: int
    block_size: int
    path: str
    labels: dict[str, str]
    plugged: list[tuple[int, int]]  # (offset, length), merged, ascending
    plugged_bytes: int
    allocated_bytes: int
    created_at: float
    owner_uid: int = 0
    allowed_uids: list[int] = field(default_factory=list)
    allowed_gids: list[int] = field(default_factory=list)
    read_only_uids: list[int] = field(default_factory=list)
    read_only_gids: list[int] = field(default_factory=list)
    transparent_huge_pages: bool = False
    numa_policy: str = "default"
    numa_nodes: list[int] = field(default_factory=list)
    lock: bool = False
    from_warm_pool: bool = False
    operations_running: int = 0  # calls on the region now, rollbacks included
    damage: str = ""  # why the region can no longer be used ("": it can)
    # memory holders allocated outside plugged blocks (counted by the quota)
    allocated_outside_plugged_bytes: int = 0
    charge_cgroup: str = ""  # memory cgroup billed for its pages; "": the daemon's
    # billed to its first attacher's cgroups (charge_cgroup "" until it attaches)
    charge_to_peer: bool = False
    # hugetlb cgroup billed for its huge pages where it differs from charge_cgroup's path
    charge_hugetlb_cgroup: str = ""


@dataclass(frozen=True)
class OperationResult:
    """Outcome of plug and populate."""

    bytes: int
    seconds: float
    strategy: str
    threads: int
    region: Region
    zeroing: str = ""  # plug: "done", or "deferred" to the first touch


@dataclass(frozen=True)
class RangeResult:
    """Outcome of unplug and discard."""

    bytes: int
    seconds: float
    region: Region


@dataclass(frozen=True)
class Ticket:
    """A one-time ticket (the Attach RPC's reply): redeem it on fd_socket within expires_in s."""

    ticket: str
    fd_socket: str
    expires_in: float
    access: str
    region: Region


@dataclass(frozen=True)
class HugePool:
    page_size: int
    total: int
    free: int
    reserved: int  # kernel-wide, also on a node's pool
    surplus: int
    node: int | None = None  # None: the kernel-wide pool
    added_pages: int = 0  # added by memplugd for plugs (--hugetlb-budget), not given back yet
    budget_pages: int = 0  # the most memplugd may add (0: none)


@dataclass(frozen=True)
class WarmPool:
    backing: str
    size: int
    page_size: int
    target: int
    ready: int
    hits: int
    misses: int


@dataclass(frozen=True)
class Status:
    version: str
    uptime_seconds: float
    regions: int
    plugged_bytes: int
    allocated_bytes: int
    quota_bytes: int | None
    threads: int
    hugetlb_pools: list[HugePool]
    madv_populate: bool
    socket: str
    fd_socket: str
    shmem_thp: str = ""
    shmem_thp_allowed: bool = False
    shmem_thp_hint: str = ""
    numa_nodes: list[int] = field(default_factory=list)
    warm_pools: list[WarmPool] = field(default_factory=list)
    # memory holders allocated outside plugged blocks (counted by the quota)
    allocated_outside_plugged_bytes: int = 0
    hugetlb_node_pools: list[HugePool] = field(default_factory=list)


@dataclass(frozen=True)
class RegionHold:
    """A hold on a region: Unplug, Discard and Delete fail until it ends."""

    region: str
    holder: str
    reason: str
    expires_at: float  # seconds since the epoch
