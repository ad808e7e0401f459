"""memplug client library: talk to memplugd over gRPC and take over region fds.

from memplug.client import Client

with Client() as c:
    c.create_region("vm0", 1 << 30, "hugetlb")
    c.plug("vm0")
    with c.attach("vm0", populate="write") as mem:
        mem.view[0:4] = b"hi!\\n"
"""

from memplug.client.attach import AttachInfo, Attachment
from memplug.client.client import Client
from memplug.client.errors import (
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
)
from memplug.client.local import PrivateMemory, populate_mapping
from memplug.client.types import HugePool, OperationResult, RangeResult, Region, Status

__all__ = [
    "AlreadyExists",
    "AttachInfo",
    "Attachment",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HugePool",
    "Internal",
    "InvalidArgument",
    "MemplugError",
    "NoSpace",
    "NotFound",
    "OperationResult",
    "OutOfRange",
    "PermissionDenied",
    "PoolExhausted",
    "PrivateMemory",
    "QuotaExceeded",
    "RangeResult",
    "Region",
    "ResourceExhausted",
    "Status",
    "Unavailable",
    "populate_mapping",
]
