"""The client raises the daemon's own exception classes, restored from the status.

The daemon names the class in the trailing metadata key "memplug-error"; the
gRPC code alone picks the base class when it does not (or names one unknown).
"""

from __future__ import annotations

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
from memplug.common.status import ERROR_CLASS_KEY, STATUS

# The daemon's one class -> code table, read backwards: a code names its base class.
BY_CODE: Final[dict[grpc.StatusCode, type[MemplugError]]] = {
    code: cls for cls, code in STATUS.items()
}
BY_NAME: Final = {cls.__name__: cls for cls in all_error_classes()}


def error_from_rpc(exc: grpc.RpcError, *, target: str = "") -> MemplugError:
    """The MemplugError a failed call stands for, with .code set."""
    call: grpc.Call = exc  # type: ignore[assignment]  # every RpcError raised by a stub is a Call
    code = call.code()
    base = BY_CODE.get(code, Internal)
    named = None
    for key, value in call.trailing_metadata() or ():
        if key == ERROR_CLASS_KEY:
            named = BY_NAME.get(str(value))
    cls = named if named is not None and issubclass(named, base) else base
    details = call.details() or code.name.lower()
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach memplugd at {target or 'its socket'}: is it running? ({details})"
    err = cls(details)
    err.code = code.name
    return err


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MemplugError",
    "NoSpace",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PoolExhausted",
    "QuotaExceeded",
    "ResourceExhausted",
    "Unavailable",
    "error_from_rpc",
]
