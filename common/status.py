"""The one table from memplug's error classes to gRPC status codes.

The daemon answers with code_for(error) and names the class in the trailing
metadata key ERROR_CLASS_KEY; the client reads the table backwards to raise
the same class again. A contract test checks that every class maps to a code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc

from memplug.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemplugError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

ERROR_CLASS_KEY: Final = "memplug-error"  # trailing metadata: the error's class name

STATUS: Final[Mapping[type[MemplugError], grpc.StatusCode]] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Cancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
}


def code_for(exc: MemplugError) -> grpc.StatusCode:
    """The code of the most specific class in the table (subclasses inherit)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL
