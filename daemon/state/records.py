"""A region as the store keeps it, and its JSON form on disk.

The region's frozen configuration (Acl, Placement, RegionOptions) is defined
here, below the engine, so the store holds it typed; the engine builds and
checks regions with these same classes. The JSON layout is the store's
format and must stay readable by every later memplugd:

    acl:     {"owner_uid": [uid], "allowed_uids": [...], "allowed_gids": [...],
              "read_only_uids": [...], "read_only_gids": [...]}   (ids ascending)
    options: {"thp": bool, "numa_policy": str, "numa_nodes": [...], "lock": bool,
              "from_warm_pool": bool, "charge_cgroup": str, "charge_to_peer": bool,
              "charge_hugetlb_cgroup": str}

A key missing on reading takes its default (older stores wrote fewer keys); a
value of the wrong shape raises ValueError, saying which.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from memplug.common.errors import InvalidArgument
from memplug.common.ranges import Range


class Access(enum.Enum):
    READ_WRITE = "rw"
    READ_ONLY = "ro"


@dataclass(frozen=True)
class Acl:
    """Who may attach a region's fd, and how; root always may."""

    owner_uid: int = 0
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    read_only_uids: frozenset[int] = frozenset()
    read_only_gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gids: frozenset[int], access: Access) -> bool:
        if uid in (0, self.owner_uid) or uid in self.allowed_uids or gids & self.allowed_gids:
            return True
        if access is Access.READ_ONLY:
            return uid in self.read_only_uids or bool(gids & self.read_only_gids)
        return False

    def check(self) -> Acl:
        ids = (
            self.owner_uid,
            *self.allowed_uids,
            *self.allowed_gids,
            *self.read_only_uids,
            *self.read_only_gids,
        )
        for ident in ids:
            if not 0 <= ident < 0xFFFFFFFF:  # (uid_t)-1 means "no id" to the kernel
                raise InvalidArgument(f"invalid uid/gid {ident} in the region's ACL")
        return self


NUMA_POLICIES = ("default", "bind", "preferred", "interleave")


@dataclass(frozen=True)
class Placement:
    """NUMA memory policy of a region: mbind(2) modes over a set of nodes."""

    policy: str = "default"
    nodes: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.policy != "default"

    def check(self, online: list[int]) -> Placement:
        if self.policy not in NUMA_POLICIES:
            raise InvalidArgument(f"unknown NUMA policy {self.policy!r}")
        if self.active and not self.nodes:
            raise InvalidArgument(f"NUMA policy {self.policy} needs numa_nodes")
        if not self.active and self.nodes:
            raise InvalidArgument("numa_nodes given without a NUMA policy")
        offline = sorted(set(self.nodes) - set(online))
        if offline:
            raise InvalidArgument(f"NUMA nodes {offline} are not online (online: {online})")
        return self


@dataclass(frozen=True)
class RegionOptions:
    """How the region's memory is obtained; frozen at creation."""

    thp: bool = False  # effective: the kernel allows it and the region asked for it
    placement: Placement = field(default_factory=Placement)
    lock: bool = False
    from_warm_pool: bool = False
    charge_cgroup: str = ""  # memory cgroup its pages are charged to; "": the daemon's
    # Charged to the cgroups of the first process to attach it: charge_cgroup
    # stays "" until then, and is filled in (with the next field) at that attach.
    charge_to_peer: bool = False
    # The hugetlb cgroup, when it is not the path of charge_cgroup (a hybrid
    # layout puts a process in different cgroups per controller); "": the same.
    charge_hugetlb_cgroup: str = ""

    @property
    def awaiting_peer(self) -> bool:
        """Charged to its first attacher, who has not come yet."""
        return self.charge_to_peer and not self.charge_cgroup


@dataclass(frozen=True)
class RegionRecord:
    name: str
    size: int
    backing: str  # BackingKind value
    page_size: int
    block_size: int
    path: str
    labels: dict[str, str]
    acl: Acl
    created_at: float
    plugged: tuple[Range, ...] = ()
    gone: str = ""  # why a restart could not bring the region back; "" while it lives
    options: RegionOptions = field(default_factory=RegionOptions)


@dataclass(frozen=True)
class HoldRecord:
    """A hold on a region: Unplug, Discard and Delete are refused until expires_at."""

    region: str
    holder: str
    reason: str
    expires_at: float  # seconds since the epoch: a restart keeps the deadline


# --------------------------------------------------------------------------- JSON


def acl_to_json(acl: Acl) -> str:
    return json.dumps(
        {
            "owner_uid": [acl.owner_uid],
            "allowed_uids": sorted(acl.allowed_uids),
            "allowed_gids": sorted(acl.allowed_gids),
            "read_only_uids": sorted(acl.read_only_uids),
            "read_only_gids": sorted(acl.read_only_gids),
        }
    )


def acl_from_json(text: str) -> Acl:
    a = _object("acl", text)
    owner = _ids(a, "owner_uid", [0])
    if len(owner) != 1:
        raise ValueError(f"acl: owner_uid must hold one uid, not {owner!r}")
    return Acl(
        owner_uid=owner[0],
        allowed_uids=frozenset(_ids(a, "allowed_uids")),
        allowed_gids=frozenset(_ids(a, "allowed_gids")),
        read_only_uids=frozenset(_ids(a, "read_only_uids")),
        read_only_gids=frozenset(_ids(a, "read_only_gids")),
    )


def options_to_json(options: RegionOptions) -> str:
    return json.dumps(
        {
            "thp": options.thp,
            "numa_policy": options.placement.policy,
            "numa_nodes": list(options.placement.nodes),
            "lock": options.lock,
            "from_warm_pool": options.from_warm_pool,
            "charge_cgroup": options.charge_cgroup,
            "charge_to_peer": options.charge_to_peer,
            "charge_hugetlb_cgroup": options.charge_hugetlb_cgroup,
        }
    )


def options_from_json(text: str) -> RegionOptions:
    o = _object("options", text)
    charge_cgroup = _string(o, "charge_cgroup")
    charge_hugetlb_cgroup = _string(o, "charge_hugetlb_cgroup")
    return RegionOptions(
        thp=bool(o.get("thp", False)),
        placement=Placement(str(o.get("numa_policy", "default")), tuple(_ids(o, "numa_nodes"))),
        lock=bool(o.get("lock", False)),
        from_warm_pool=bool(o.get("from_warm_pool", False)),
        charge_cgroup=charge_cgroup,
        charge_to_peer=bool(o.get("charge_to_peer", False)),
        charge_hugetlb_cgroup=charge_hugetlb_cgroup,
    )


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _object(column: str, text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{column}: expected a JSON object, got {text[:40]!r}")
    return value


def _ids(obj: dict[str, Any], key: str, default: list[int] | None = None) -> list[int]:
    """obj[key] as a list of non-negative integers (ids, NUMA nodes)."""
    value = obj.get(key, [] if default is None else default)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{key}: expected a list of non-negative integers, got {value!r}")
    return value
