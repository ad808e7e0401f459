"""Contracts between the .proto, the servicer, the error table and the generated code."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from memplug.common import status
from memplug.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemplugError,
    NoSpace,
    NotFound,
    OutOfRange,
    PermissionDenied,
    PoolExhausted,
    QuotaExceeded,
    ResourceExhausted,
    Unavailable,
    all_error_classes,
)
from memplug.daemon.transport.servicer import MemplugServicer
from memplug.v1 import memplug_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SERVICE = pb.DESCRIPTOR.services_by_name["Memplug"]
RPCS = [m.name for m in SERVICE.methods]


def test_the_service_has_the_rpcs_this_test_knows() -> None:
    # Guards the parametrization below against an empty or renamed service.
    assert {"CreateRegion", "Plug", "Populate", "Unplug", "Discard", "GetStatus"} <= set(RPCS)


@pytest.mark.parametrize("rpc", RPCS)
def test_every_rpc_is_implemented_and_translated(rpc: str) -> None:
    method = SERVICE.methods_by_name[rpc]
    # Defined on MemplugServicer itself: the generated base class's stub only
    # answers UNIMPLEMENTED.
    impl = inspect.getattr_static(MemplugServicer, rpc, None)
    assert rpc in vars(MemplugServicer) and impl is not None, (
        f"rpc {rpc} is not implemented on MemplugServicer"
    )
    assert getattr(impl, "__memplug_translated__", False) is True, (
        f"MemplugServicer.{rpc} is not wrapped by @translate(): its errors would not map to codes"
    )
    # A streaming RPC needs the streaming wrapper (a generator): the unary one
    # would return the generator unstarted and miss every error it raises.
    assert inspect.isgeneratorfunction(impl) == method.server_streaming, (
        f"MemplugServicer.{rpc}: translate(streaming={not method.server_streaming}) "
        f"for an RPC with server_streaming={method.server_streaming}"
    )
    assert impl.__name__ == rpc


EXPECTED_CODES: dict[type[MemplugError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PoolExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Cancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
}


def test_all_error_classes_finds_the_whole_hierarchy() -> None:
    classes = all_error_classes()
    assert set(EXPECTED_CODES) <= set(classes)
    assert MemplugError not in classes
    # Most specific first: a subclass never comes after its base.
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls) or later is cls


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_maps_to_a_code_other_than_internal(cls: type[MemplugError]) -> None:
    code = status.code_for(cls("a message"))
    if cls is Internal:
        assert code is grpc.StatusCode.INTERNAL
    else:
        assert code is not grpc.StatusCode.INTERNAL, f"{cls.__name__} would be reported as a bug"
    if cls in EXPECTED_CODES:
        assert code is EXPECTED_CODES[cls]


def test_generated_code_matches_the_proto() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"gen_proto.py --check failed:\n{proc.stdout}\n{proc.stderr}"
