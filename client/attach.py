"""The consumer side of the fd socket: redeem a ticket or open a region, receive its fd.

The wire protocol is documented in proto/memplug/v1/fd-protocol.md.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass

import grpc

from memplug.client.errors import BY_CODE
from memplug.client.local import populate_mapping
from memplug.common import memory
from memplug.common.errors import DeadlineExceeded, Internal, MemplugError, Unavailable

PROTOCOL = "MEMPLUG/1"
MAX_REPLY = 4096


@dataclass(frozen=True)
class AttachInfo:
    """What the daemon says about the fd it passed."""

    region: str
    size: int
    page_size: int
    block_size: int
    backing: str
    access: str  # "rw" or "ro"
    seals: int
    plugged_bytes: int | None = None  # at the hand-off; None from a daemon that does not say


def redeem(
    fd_socket: str, ticket: str, *, timeout: float = 10.0, retry: float = 0.0
) -> tuple[int, AttachInfo]:
    """Redeem a ticket for the region's fd on the daemon's fd socket (MEMPLUG/1 ATTACH).

    retry: seconds for which a socket that is not there or refuses (a daemon
    restarting) is tried again; nothing was sent, so nothing is repeated.
    """
    return _exchange(fd_socket, f"{PROTOCOL} ATTACH {ticket}\n", timeout, retry)


def open_region(
    fd_socket: str, name: str, access: str, *, timeout: float = 10.0, retry: float = 0.0
) -> tuple[int, AttachInfo]:
    """Open the region on the fd socket, no ticket (MEMPLUG/1 OPEN); the region's ACL decides."""
    return _exchange(fd_socket, f"{PROTOCOL} OPEN {name} {access}\n", timeout, retry)


def _connect(sock: socket.socket, fd_socket: str, retry: float) -> None:
    deadline = time.monotonic() + retry
    while True:
        try:
            sock.connect(fd_socket)
            return
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() + 0.05 > deadline:
                raise Unavailable(
                    f"cannot reach the fd socket {fd_socket}: {exc.strerror}"
                ) from exc
            time.sleep(0.05)
        except OSError as exc:
            raise Unavailable(f"cannot reach the fd socket {fd_socket}: {exc.strerror}") from exc


def _exchange(
    fd_socket: str, request: str, timeout: float, retry: float = 0.0
) -> tuple[int, AttachInfo]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # A blocking connect with a send timeout waits in the kernel for room in a
        # full listen backlog (first in line when the daemon accepts); with
        # settimeout() the socket is non-blocking and would fail at once with EAGAIN.
        seconds = int(timeout)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000)),
        )
        _connect(sock, fd_socket, retry)
        sock.settimeout(timeout)
        try:
            sock.sendall(request.encode())
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REPLY, 1, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"the fd socket {fd_socket} did not answer within {timeout:g} s"
            ) from exc
        except OSError as exc:
            # A connection accepted into the backlog is reset when its listening
            # socket goes away (the daemon or systemd closing it): try again.
            raise Unavailable(
                f"the fd socket {fd_socket} dropped the connection ({exc.strerror or exc}): "
                "is memplugd restarting? try again"
            ) from exc
    finally:
        sock.close()
    if not msg and not fds:
        raise Unavailable(
            f"the fd socket {fd_socket} closed the connection without an answer: "
            "is memplugd stopping? try again"
        )
    line = msg.decode(errors="replace").rstrip("\n")
    if line.startswith("OK ") and len(fds) == 1:
        fields = dict(item.split("=", 1) for item in line[3:].split())
        return fds[0], AttachInfo(
            region=fields["region"],
            size=int(fields["size"]),
            page_size=int(fields["page_size"]),
            block_size=int(fields["block_size"]),
            backing=fields["backing"],
            access=fields["access"],
            seals=int(fields["seals"]),
            plugged_bytes=int(fields["plugged_bytes"]) if "plugged_bytes" in fields else None,
        )
    for fd in fds:
        os.close(fd)
    if line.startswith("ERR "):
        _, code, message = [*line.split(" ", 2), ""][:3]

        cls = BY_CODE.get(getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL), Internal)
        err: MemplugError = cls(message)
        err.code = code
        raise err
    raise Internal(f"unexpected reply on the fd socket: {line[:200]!r}")


class Attachment:
    """A region's fd, mapped into this process; close it (or use `with`) when done.

    `view` is a memoryview of the whole region (read-only for "ro"). `plugged`
    lists the plugged ranges (offset, length) as they were at the hand-off: all
    of the region unless it was attached with sparse=True. Touching unplugged
    blocks is undefined: they may read as zero, allocate memory (which the
    daemon's quota counts against everyone) or raise SIGBUS. `populated_bytes`
    is what populate= faulted in: the plugged ranges only.
    """

    def __init__(
        self,
        fd: int,
        info: AttachInfo,
        *,
        plugged: list[tuple[int, int]],
        populate: str | None = None,
        map_memory: bool = True,
    ) -> None:
        self.fd = fd
        self.info = info
        self.plugged = plugged
        self.populated_bytes = 0
        self.mmap: mmap.mmap | None = None
        self.view: memoryview | None = None
        self._views: list[memoryview] = []
        if map_memory:
            self._map(populate)

    @property
    def name(self) -> str:
        return self.info.region

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def writable(self) -> bool:
        return self.info.access == "rw"

    def _map(self, populate: str | None) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        # MAP_NORESERVE: a hugetlb region is sparse; without it mmap would try
        # to reserve huge pages for every unplugged block too.
        flags = mmap.MAP_SHARED | memory.MAP_NORESERVE
        self.mmap = mmap.mmap(self.fd, self.size, flags=flags, prot=prot)
        try:
            if populate is not None:
                if populate not in ("read", "write"):
                    raise ValueError("populate must be None, 'read' or 'write'")
                # Only plugged blocks: faulting an unplugged hugetlb block could
                # allocate pages the daemon does not account for.
                self.populated_bytes = populate_mapping(
                    self.mmap,
                    self.plugged,
                    write=populate == "write",
                    page_size=self.info.page_size,
                    hugetlb=self.info.backing == "hugetlb",
                )
        except BaseException:
            self.mmap.close()
            raise
        base = memoryview(self.mmap)
        self.view = base if self.writable else base.toreadonly()
        self._views = [self.view, base]

    def detach_fd(self) -> int:
        """Hand the fd over to the caller (who then closes it); unmaps if mapped."""
        fd, self.fd = self.fd, -1
        self._unmap()
        return fd

    def _unmap(self) -> None:
        for view in self._views:
            view.release()
        self._views, self.view = [], None
        if self.mmap is not None:
            self.mmap.close()
            self.mmap = None

    def close(self) -> None:
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
