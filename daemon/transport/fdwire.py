"""The fd socket's wire protocol: one request line in, one reply line (and an fd) out.

The words and their meaning are documented in proto/memplug/v1/fd-protocol.md;
examples/attach.c speaks them from C.
"""

from __future__ import annotations

import re
from typing import Final

from memplug.common.errors import MemplugError, PermissionDenied
from memplug.common.status import code_for
from memplug.daemon.engine.region import Access
from memplug.daemon.engine.tickets import Handoff

PROTOCOL: Final = "MEMPLUG/1"
MAX_REQUEST: Final = 512  # bytes of one request line
ATTACH_REQUEST: Final = re.compile(rf"{re.escape(PROTOCOL)} ATTACH ([A-Za-z0-9_-]{{16,128}})")
OPEN_REQUEST: Final = re.compile(
    rf"{re.escape(PROTOCOL)} OPEN ([a-z0-9][a-z0-9._-]{{0,62}}) (rw|ro)"
)


def ok_line(h: Handoff) -> bytes:
    return (
        f"OK region={h.region} size={h.size} page_size={h.page_size} "
        f"block_size={h.block_size} backing={h.backing} access={h.access.value} "
        f"seals={h.seals} plugged_bytes={h.plugged_bytes}\n"
    ).encode()


def err_line(exc: MemplugError) -> bytes:
    message = exc.message.replace("\n", " ")
    return f"ERR {code_for(exc).name} {message}\n".encode()


def hidden_refusal(uid: int, name: str, access: Access) -> PermissionDenied:
    """One answer for 'no such region' and 'not yours', so the socket tells no one
    outside a region's ACL that it exists, nor why a region was lost."""
    how = "read-only" if access is Access.READ_ONLY else "read-write"
    return PermissionDenied(
        f"uid {uid} may not open region {name!r} {how}: there is no such region, or its "
        f"ACL does not admit uid {uid} {how}; ask the region's owner",
        region=name,
    )
