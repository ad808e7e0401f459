"""Client: one method per RPC of memplugd, over its Unix socket."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc.experimental import ChannelOptions

from memplug.client import convert
from memplug.client.attach import AttachInfo, Attachment, open_region, redeem
from memplug.client.errors import error_from_rpc
from memplug.client.types import (
    OperationResult,
    RangeResult,
    Region,
    RegionHold,
    Status,
    Ticket,
)
from memplug.common.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemplugError,
    Unavailable,
)
from memplug.common.paths import default_socket
from memplug.common.ranges import Range, subtract
from memplug.common.sizes import format_size
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes)
T = TypeVar("T")


# Plug and Populate streams are read on the calling thread rather than handed
# over by the channel's spin thread: one thread switch less per message, which
# is most of what a small plug costs beyond its unary floor. cancel() from
# another thread still ends the call.
CHANNEL_OPTIONS = [(ChannelOptions.SingleThreadedUnaryStream, 1)]

# A restart or take-over leaves the sockets unserved for a moment (a take-over:
# the new daemon restoring its regions): calls that are safe to repeat are tried
# again for this long. Plug, Populate, Unplug, Discard, CreateRegion and
# DeleteRegion are not: UNAVAILABLE in the middle of one does not say whether it
# ran, and the caller decides (GetRegion tells).
RETRY_UNAVAILABLE = 3.0
_RETRY_PAUSE = 0.05


def _check_uint(value: int, bits: int, what: str) -> int:
    """value, if it fits the API's unsigned field; protobuf would raise a bare ValueError."""
    if not 0 <= value < 1 << bits:
        raise InvalidArgument(f"{what} {value} is out of range: it must be 0 to {(1 << bits) - 1}")
    return value


def _check_uints(values: list[int] | None, bits: int, what: str) -> list[int]:
    return [_check_uint(v, bits, what) for v in values or []]


def _range_request(
    name: str, offset: int, length: int | None, ranges: Iterable[tuple[int, int]] | None
) -> pb.RangeRequest:
    """Unplug's and Discard's request: one range, or a list of them."""
    return pb.RangeRequest(
        name=name,
        offset=_check_uint(offset, 64, "offset"),
        length=_check_uint(length or 0, 64, "length"),
        ranges=_ranges_to_proto(ranges),
    )


def _ranges_to_proto(ranges: Iterable[tuple[int, int]] | None) -> list[pb.Range]:
    """A list of (offset, length) for a multi-range call; the daemon checks the rest."""
    return [
        pb.Range(
            offset=_check_uint(offset, 64, f"offset of range {i}"),
            length=_check_uint(length, 64, f"length of range {i}"),
        )
        for i, (offset, length) in enumerate(ranges or ())
    ]


class Client:
    """A connection to memplugd.

    socket: the daemon's gRPC socket; default $MEMPLUG_SOCKET, else
    /run/memplug/memplug.sock as root, $XDG_RUNTIME_DIR/memplug/memplug.sock
    otherwise. timeout: seconds for short calls (plug and populate take the
    per-call timeout, default none). retry_unavailable: seconds for which the
    calls safe to repeat (GetRegion, ListRegions, GetStatus, Attach and the fd
    socket's connect) are tried again while the daemon is unavailable, as in a
    restart or take-over; 0 never. Errors are MemplugError subclasses with
    .code set to the gRPC status name.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        fd_socket: str | os.PathLike[str] | None = None,
        retry_unavailable: float = RETRY_UNAVAILABLE,
    ):
        self.socket = Path(socket) if socket is not None else default_socket()
        env_fd = os.environ.get("MEMPLUG_FD_SOCKET")
        self.fd_socket = Path(fd_socket) if fd_socket else Path(env_fd) if env_fd else None
        self.timeout = timeout
        self.retry_unavailable = retry_unavailable
        self._channel = grpc.insecure_channel(f"unix:{self.socket}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.MemplugStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, target=str(self.socket)) from None

    def _idempotent(self, method: Callable[..., T], request: Any) -> T:
        """_unary, tried again while the daemon is unavailable (for calls safe to repeat)."""
        deadline = time.monotonic() + self.retry_unavailable
        while True:
            try:
                return self._unary(method, request)
            except Unavailable:
                if time.monotonic() + _RETRY_PAUSE > deadline:
                    raise
                time.sleep(_RETRY_PAUSE)

    # ------------------------------------------------------------------ regions

    def create_region(
        self,
        name: str,
        size: int,
        backing: str = "shmem",
        *,
        page_size: int = 0,
        block_size: int = 0,
        path: str = "",
        labels: Mapping[str, str] | None = None,
        owner_uid: int | None = None,
        allowed_uids: list[int] | None = None,
        allowed_gids: list[int] | None = None,
        read_only_uids: list[int] | None = None,
        read_only_gids: list[int] | None = None,
        transparent_huge_pages: bool | None = None,
        numa_policy: str = "default",
        numa_nodes: list[int] | None = None,
        lock: bool = False,
        charge_cgroup: str = "",
        charge_to_peer: bool = False,
    ) -> Region:
        """charge_cgroup: the memory cgroup billed for the region (a path as
        /proc/PID/cgroup prints it); empty: the daemon's own. charge_to_peer:
        bill the cgroups of the process that first attaches it instead."""
        request = pb.CreateRegionRequest(
            name=name,
            size=_check_uint(size, 64, "size"),
            backing=convert.pick(convert.BACKINGS, backing, "backing"),
            page_size=_check_uint(page_size, 64, "page size"),
            block_size=_check_uint(block_size, 64, "block size"),
            path=path,
            labels=dict(labels or {}),
            owner_uid=None if owner_uid is None else _check_uint(owner_uid, 32, "owner uid"),
            allowed_uids=_check_uints(allowed_uids, 32, "uid"),
            allowed_gids=_check_uints(allowed_gids, 32, "gid"),
            read_only_uids=_check_uints(read_only_uids, 32, "uid"),
            read_only_gids=_check_uints(read_only_gids, 32, "gid"),
            transparent_huge_pages=transparent_huge_pages,
            numa_policy=convert.pick(convert.NUMA_POLICIES, numa_policy, "NUMA policy"),
            numa_nodes=_check_uints(numa_nodes, 32, "NUMA node"),
            lock=lock,
            charge_cgroup=charge_cgroup,
            charge_to_peer=charge_to_peer,
        )
        return convert.region(self._unary(self._stub.CreateRegion, request))

    def get_region(self, name: str) -> Region:
        return convert.region(
            self._idempotent(self._stub.GetRegion, pb.GetRegionRequest(name=name))
        )

    def list_regions(self, labels: Mapping[str, str] | None = None) -> list[Region]:
        request = pb.ListRegionsRequest(label_selector=dict(labels or {}))
        return [
            convert.region(r) for r in self._idempotent(self._stub.ListRegions, request).regions
        ]

    def delete_region(self, name: str) -> None:
        self._unary(self._stub.DeleteRegion, pb.DeleteRegionRequest(name=name))

    def hold_region(
        self, name: str, holder: str, reason: str = "", ttl: float = 300.0
    ) -> RegionHold:
        """Refuse Unplug, Discard and Delete of the region until released or ttl seconds pass."""
        request = pb.HoldRegionRequest(name=name, holder=holder, reason=reason, ttl_seconds=ttl)
        h = self._unary(self._stub.HoldRegion, request)
        return RegionHold(h.region, h.holder, h.reason, h.expires_at)

    def release_region(self, name: str, holder: str) -> bool:
        """Drop holder's hold on the region; False if it held none."""
        request = pb.ReleaseRegionRequest(name=name, holder=holder)
        return bool(self._unary(self._stub.ReleaseRegion, request).released)

    def health(self, service: str = "memplug.v1.Memplug") -> str:
        """The grpc.health.v1 status of the daemon: "SERVING", "NOT_SERVING", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def status(self) -> Status:
        return convert.status(self._idempotent(self._stub.GetStatus, pb.GetStatusRequest()))

    # ------------------------------------------------------------------ ranges
    # length None (or 0) means "to the end of the region": the request carries
    # length 0 and the daemon works out the rest, one RPC in all.

    def plug(
        self,
        name: str,
        offset: int = 0,
        length: int | None = None,
        *,
        ranges: Iterable[tuple[int, int]] | None = None,
        strategy: str = "auto",
        threads: int = 0,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> OperationResult:
        """Plug [offset, offset+length) (default: to the end); blocks until done.

        ranges: [(offset, length), ...] plugged in one call, all or nothing,
        instead of offset and length (leave those out).
        strategy: "auto", "fallocate" or "populate-write" (the proto's Strategy).
        Setting `cancel` (or Ctrl-C) cancels the call; the daemon then releases
        whatever it allocated and this raises Cancelled.
        """
        request = pb.PlugRequest(
            name=name,
            offset=_check_uint(offset, 64, "offset"),
            length=_check_uint(length or 0, 64, "length"),
            strategy=convert.pick(convert.STRATEGIES, strategy, "strategy"),
            threads=_check_uint(threads, 32, "threads"),
            ranges=_ranges_to_proto(ranges),
        )
        return self._stream(self._stub.Plug, request, progress, cancel, timeout)

    def populate(
        self,
        name: str,
        offset: int = 0,
        length: int | None = None,
        *,
        mode: str = "write",
        threads: int = 0,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> OperationResult:
        modes = {"read": pb.POPULATE_MODE_READ, "write": pb.POPULATE_MODE_WRITE}
        request = pb.PopulateRequest(
            name=name,
            offset=_check_uint(offset, 64, "offset"),
            length=_check_uint(length or 0, 64, "length"),
            mode=convert.pick(modes, mode, "populate mode"),
            threads=_check_uint(threads, 32, "threads"),
        )
        return self._stream(self._stub.Populate, request, progress, cancel, timeout)

    def _stream(
        self,
        method: Callable[..., Any],
        request: Any,
        progress: Progress | None,
        cancel: threading.Event | None,
        timeout: float | None,
    ) -> OperationResult:
        call: Any = method(request, timeout=timeout)
        finished = threading.Event()
        answered = threading.Event()
        if cancel is not None:

            def watch() -> None:
                while not finished.is_set():
                    if cancel.wait(0.05):
                        # Once the result is here the work is done: cancelling
                        # now would only turn the daemon's OK into CANCELLED.
                        if not answered.is_set():
                            call.cancel()
                        return

            threading.Thread(target=watch, name="memplug-cancel", daemon=True).start()
        result: OperationResult | None = None
        try:
            # Read on to the end of the stream after the result: the call then
            # ends with its status, and the daemon records it as OK. Leaving
            # early would cancel a call that has succeeded.
            for message in call:
                if progress is not None:
                    progress(message.done_bytes, message.total_bytes)
                if message.HasField("result"):
                    result = convert.result(message.result)
                    answered.set()
            if result is not None:
                return result
        except grpc.RpcError as exc:
            if result is not None:
                return result  # the work was done; a cancel or error came after the answer
            if exc.code() is grpc.StatusCode.CANCELLED and (cancel is None or cancel.is_set()):
                err: MemplugError = Cancelled(
                    f"{request.name}: cancelled; the daemon releases what it had allocated"
                )
                err.code = "CANCELLED"
                raise err from None
            raise error_from_rpc(exc, target=str(self.socket)) from None
        except BaseException:
            call.cancel()  # Ctrl-C and friends: tell the daemon to roll back
            raise
        finally:
            finished.set()
        err = Internal("the daemon ended the stream without a result")
        err.code = "INTERNAL"
        raise err

    def unplug(
        self,
        name: str,
        offset: int = 0,
        length: int | None = None,
        *,
        ranges: Iterable[tuple[int, int]] | None = None,
    ) -> RangeResult:
        """Unplug [offset, offset+length) (default: to the end), or every range of
        `ranges` ([(offset, length), ...]) in one call."""
        request = _range_request(name, offset, length, ranges)
        return convert.range_result(self._unary(self._stub.Unplug, request))

    def discard(
        self,
        name: str,
        offset: int = 0,
        length: int | None = None,
        *,
        ranges: Iterable[tuple[int, int]] | None = None,
    ) -> RangeResult:
        """Zero [offset, offset+length) (default: to the end), or every range of
        `ranges`, in one call; the blocks stay plugged."""
        request = _range_request(name, offset, length, ranges)
        return convert.range_result(self._unary(self._stub.Discard, request))

    # ------------------------------------------------------------------ hand-off

    def _direct_fd_socket(self) -> Path | None:
        """The fd socket, when known without asking the daemon: given, or beside its socket.

        A client reaching the daemon through a bind mount (a sidecar's socket
        volume) finds it beside the gRPC socket; otherwise attach falls back to
        issuing a ticket, which names the fd socket as the daemon sees it.
        """
        if self.fd_socket is not None:
            return self.fd_socket
        sibling = self.socket.parent / "fd.sock"
        return sibling if sibling.exists() else None

    def ticket(self, name: str, access: str = "rw") -> Ticket:
        """Issue a one-time ticket (the Attach RPC) for a process to redeem on the fd socket.

        The way to hand a region to a process that cannot reach the gRPC socket;
        the daemon checks the redeeming process against the region's ACL.
        """
        request = pb.AttachRequest(
            name=name,
            access=convert.pick(convert.ACCESS, access, "access"),
        )
        return convert.ticket(self._idempotent(self._stub.Attach, request))

    def attach(
        self,
        name: str,
        access: str = "rw",
        *,
        populate: str | None = None,
        map_memory: bool = True,
        sparse: bool = False,
    ) -> Attachment:
        """Attach the region: take its fd and (by default) map it; use as a context manager.

        Opens the region on the fd socket directly when this client knows where
        that socket is (one round trip, no gRPC); otherwise issues a ticket and
        redeems it. Either way the fd socket checks this process against the
        region's ACL.

        A region with unplugged blocks is refused with FailedPrecondition naming
        them (plug it first), because touching an unplugged block can raise
        SIGBUS (an empty hugetlb pool, a full filesystem) or allocate memory
        outside the plugged set; the daemon's plugged set at the hand-off
        decides. sparse=True takes a partly plugged region (a VMM that plugs and
        unplugs under its guest): the Attachment's `plugged` lists the plugged
        ranges, and it is the caller's job to touch only those. An owner who
        unplugs blocks after the hand-off does so under its consumers' feet, as
        the owner's deliberate act; nothing here can stop that.

        populate="write" or "read" prefaults this process's page tables for the
        plugged blocks only (MADV_POPULATE_*), so first touches take no faults;
        the Attachment's `populated_bytes` says how much that was.
        """
        convert.pick(convert.ACCESS, access, "access")  # a clear error for a bad value
        direct = self._direct_fd_socket()
        known: list[tuple[int, int]] | None = None
        if direct is not None:
            fd, info = open_region(str(direct), name, access, retry=self.retry_unavailable)
        else:
            ticket = self.ticket(name, access)
            fd, info = redeem(ticket.fd_socket, ticket.ticket, retry=self.retry_unavailable)
            known = ticket.region.plugged
        try:
            plugged = self._plugged_at_handoff(name, info, known, sparse=sparse)
            return Attachment(fd, info, plugged=plugged, populate=populate, map_memory=map_memory)
        except BaseException:
            os.close(fd)
            raise

    def _plugged_at_handoff(
        self,
        name: str,
        info: AttachInfo,
        known: list[tuple[int, int]] | None,
        *,
        sparse: bool,
    ) -> list[tuple[int, int]]:
        """The plugged ranges of a region just handed over; refuse a partly plugged
        one unless sparse. known: the ranges the ticket came with."""
        if info.plugged_bytes == info.size:
            return [(0, info.size)]
        # Partly plugged (or a daemon that does not say): the ranges, from the
        # ticket when they agree with the hand-off, else from the daemon now.
        if known is not None and sum(n for _, n in known) == info.plugged_bytes:
            plugged = known
        else:
            plugged = self.get_region(name).plugged
        plugged_bytes = sum(n for _, n in plugged)
        if sparse or plugged_bytes == info.size:  # plugged since the hand-off: fine too
            return plugged
        holes = subtract([Range(0, info.size)], [Range(o, n) for o, n in plugged])
        shown = ", ".join(str(h) for h in holes[:4]) + (", ..." if len(holes) > 4 else "")
        err = FailedPrecondition(
            f"region {name!r} has unplugged blocks: {shown} "
            f"({format_size(info.size - plugged_bytes)} of "
            f"{format_size(info.size)} unplugged); touching them can raise SIGBUS or allocate "
            "memory outside the plugged set: plug them first, or attach with sparse=True "
            f"(memplug exec -r {name}:sparse) and touch only the plugged ranges",
            region=name,
        )
        err.code = "FAILED_PRECONDITION"
        raise err
