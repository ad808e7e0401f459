"""The Memplug gRPC service: convert, call the engine, convert back. Nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc

from memplug.common.cancel import CancelToken
from memplug.daemon import __version__, metrics
from memplug.daemon.engine.engine import OpResult, RegionEngine
from memplug.daemon.engine.runner import ProgressCallback
from memplug.daemon.transport import convert
from memplug.daemon.transport.status import translate
from memplug.daemon.transport.streaming import OperationStreamer, token_for
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc


def _progress_stream(
    op: str, events: Iterator[tuple[int, int] | OpResult]
) -> Iterator[pb.Progress]:
    for event in events:
        if isinstance(event, OpResult):
            metrics.record_work(op, event.strategy, event.bytes, event.seconds)
            total = event.bytes
            yield pb.Progress(
                done_bytes=total, total_bytes=total, result=convert.result_to_proto(event)
            )
        else:
            yield pb.Progress(done_bytes=event[0], total_bytes=event[1])


class MemplugServicer(pb_grpc.MemplugServicer):
    def __init__(
        self,
        engine: RegionEngine,
        streamer: OperationStreamer,
        *,
        socket: str = "",
        fd_socket: str = "",
    ) -> None:
        self._engine = engine
        self._streamer = streamer
        self._socket = socket
        self._fd_socket = fd_socket
        self._started = time.monotonic()

    @translate("GetStatus", read=True)
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.DaemonStatus:
        return convert.status_to_proto(
            self._engine.status(),
            version=__version__,
            uptime=time.monotonic() - self._started,
            socket=self._socket,
            fd_socket=self._fd_socket,
        )

    @translate("CreateRegion")
    def CreateRegion(
        self, request: pb.CreateRegionRequest, context: grpc.ServicerContext
    ) -> pb.Region:
        return convert.region_to_proto(self._engine.create_region(convert.spec_from_proto(request)))

    @translate("GetRegion", read=True)
    def GetRegion(self, request: pb.GetRegionRequest, context: grpc.ServicerContext) -> pb.Region:
        return convert.region_to_proto(self._engine.get_region(request.name))

    @translate("ListRegions", read=True)
    def ListRegions(
        self, request: pb.ListRegionsRequest, context: grpc.ServicerContext
    ) -> pb.ListRegionsResponse:
        regions = self._engine.list_regions(dict(request.label_selector))
        return pb.ListRegionsResponse(regions=[convert.region_to_proto(r) for r in regions])

    @translate("DeleteRegion")
    def DeleteRegion(
        self, request: pb.DeleteRegionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRegionResponse:
        self._engine.delete_region(request.name)
        return pb.DeleteRegionResponse()

    @translate("HoldRegion")
    def HoldRegion(
        self, request: pb.HoldRegionRequest, context: grpc.ServicerContext
    ) -> pb.RegionHold:
        hold = self._engine.hold_region(
            request.name, request.holder, request.reason, request.ttl_seconds
        )
        return pb.RegionHold(
            region=hold.region, holder=hold.holder, reason=hold.reason, expires_at=hold.expires_at
        )

    @translate("ReleaseRegion")
    def ReleaseRegion(
        self, request: pb.ReleaseRegionRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseRegionResponse:
        released = self._engine.release_region(request.name, request.holder)
        return pb.ReleaseRegionResponse(released=released)

    @translate("Plug", streaming=True)
    def Plug(self, request: pb.PlugRequest, context: grpc.ServicerContext) -> Iterator[pb.Progress]:
        requested = convert.strategy_from_proto(request.strategy)
        ranges = convert.ranges_from_proto(request.ranges, what=f"plug of {request.name!r}")
        yield from self._stream(
            "plug",
            context,
            sum(n for _, n in ranges) if ranges else request.length,
            lambda token, progress: self._engine.plug(
                request.name,
                request.offset,
                request.length,
                ranges=ranges,
                requested=requested,
                threads=request.threads,
                token=token,
                progress=progress,
            ),
        )

    @translate("Populate", streaming=True)
    def Populate(
        self, request: pb.PopulateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Progress]:
        write = convert.populate_write_from_proto(request.mode)
        yield from self._stream(
            "populate",
            context,
            request.length,
            lambda token, progress: self._engine.populate(
                request.name,
                request.offset,
                request.length,
                write=write,
                threads=request.threads,
                token=token,
                progress=progress,
            ),
        )

    def _stream(
        self,
        op: str,
        context: grpc.ServicerContext,
        length: int,
        call: Callable[[CancelToken, ProgressCallback], OpResult],
    ) -> Iterator[pb.Progress]:
        """Run a long engine call beside this RPC thread, streaming its progress."""
        token = token_for(context)
        events = self._streamer.stream(lambda p: call(token, p), token, length=length)
        yield from _progress_stream(op, events)

    @translate("Attach")
    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachTicket:
        access = convert.access_from_proto(request.access)
        ticket = self._engine.attach(request.name, access)
        return convert.ticket_to_proto(
            ticket,
            fd_socket=self._fd_socket,
            ttl=self._engine.ticket_ttl,
            region=self._engine.get_region(request.name),
        )

    @translate("Unplug")
    def Unplug(self, request: pb.RangeRequest, context: grpc.ServicerContext) -> pb.RangeResult:
        outcome = self._engine.unplug(
            request.name,
            request.offset,
            request.length,
            ranges=convert.ranges_from_proto(request.ranges, what=f"unplug of {request.name!r}"),
            token=token_for(context),
        )
        return convert.outcome_to_proto(outcome)

    @translate("Discard")
    def Discard(self, request: pb.RangeRequest, context: grpc.ServicerContext) -> pb.RangeResult:
        outcome = self._engine.discard(
            request.name,
            request.offset,
            request.length,
            ranges=convert.ranges_from_proto(request.ranges, what=f"discard of {request.name!r}"),
            token=token_for(context),
        )
        return convert.outcome_to_proto(outcome)
