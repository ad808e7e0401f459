from __future__ import annotations

from conftest import DaemonProcess, MiB

from memplug.v1 import memplug_pb2 as pb


def test_create_plug_unplug_roundtrip(daemon: DaemonProcess) -> None:
    region = daemon.stub.CreateRegion(
        pb.CreateRegionRequest(name="vm0", size=64 * MiB, backing=pb.BACKING_SHMEM)
    )
    assert region.plugged_bytes == 0 and region.allocated_bytes == 0
    result = daemon.plug("vm0", 0, 32 * MiB)
    assert result.bytes == 32 * MiB
    assert result.region.allocated_bytes == 32 * MiB
    assert [(r.offset, r.length) for r in result.region.plugged] == [(0, 32 * MiB)]
    out = daemon.stub.Unplug(pb.RangeRequest(name="vm0", offset=0, length=64 * MiB))
    assert out.bytes == 32 * MiB and out.region.allocated_bytes == 0
