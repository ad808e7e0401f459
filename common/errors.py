"""The one exception hierarchy of memplug, shared by the daemon and the client.

    MemplugError                      never raised bare
    ├── InvalidArgument               INVALID_ARGUMENT     misaligned, zero, unknown values
    ├── OutOfRange                    OUT_OF_RANGE         range past the region's end
    ├── NotFound                      NOT_FOUND            no such region
    ├── AlreadyExists                 ALREADY_EXISTS       name or file already in use
    ├── FailedPrecondition            FAILED_PRECONDITION  region busy, blocks unplugged,
    │                                                      backing missing on this kernel
    ├── ResourceExhausted             RESOURCE_EXHAUSTED   (plug rolled back)
    │   ├── PoolExhausted                                  hugetlb pool too small
    │   ├── NoSpace                                        tmpfs / filesystem full
    │   └── QuotaExceeded                                  the daemon's --max-bytes
    ├── PermissionDenied              PERMISSION_DENIED    path outside the allowed dirs
    ├── Cancelled                     CANCELLED            rollback already done
    ├── DeadlineExceeded              DEADLINE_EXCEEDED    rollback already done
    ├── Unavailable                   UNAVAILABLE          (client side) daemon unreachable
    └── Internal                      INTERNAL             a bug in memplug

The mapping to gRPC codes lives in one table, memplug.common.status; the
daemon raises these classes and the client raises them again from the status.
"""

from __future__ import annotations


class MemplugError(Exception):
    """Base class. `message` is for people: what failed, on what, what to do.

    `code` is the gRPC status name ("RESOURCE_EXHAUSTED") when the error came
    over the wire; the client sets it.
    """

    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        region: str | None = None,
        errno: int | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.region = region
        self.errno = errno
        self.step = step

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(MemplugError):
    pass


class OutOfRange(MemplugError):
    pass


class NotFound(MemplugError):
    pass


class AlreadyExists(MemplugError):
    pass


class FailedPrecondition(MemplugError):
    pass


class ResourceExhausted(MemplugError):
    pass


class PoolExhausted(ResourceExhausted):
    pass


class NoSpace(ResourceExhausted):
    pass


class QuotaExceeded(ResourceExhausted):
    pass


class PermissionDenied(MemplugError):
    pass


class Cancelled(MemplugError):
    pass


class DeadlineExceeded(MemplugError):
    pass


class Unavailable(MemplugError):
    pass


class Internal(MemplugError):
    pass


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do.

    Not a MemplugError: no RPC answers with it, memplugd prints it and exits.
    """


def all_error_classes() -> list[type[MemplugError]]:
    """Every concrete class, most specific first (for name lookups and tests)."""
    found: list[type[MemplugError]] = []
    pending: list[type[MemplugError]] = [MemplugError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            pending.append(sub)
    return sorted(found, key=lambda c: -len(c.__mro__))
