"""The fd socket: trade an attach ticket for a region's fd (SCM_RIGHTS).

Wire protocol (proto/memplug/v1/fd-protocol.md): the client sends one line,

    MEMPLUG/1 ATTACH <ticket>\\n         (a ticket from the Attach RPC), or
    MEMPLUG/1 OPEN <region> <rw|ro>\\n   (no ticket: the ACL alone decides)

and receives one message, then the daemon closes the connection:

    OK region=<name> size=<bytes> page_size=<bytes> block_size=<bytes> \\
       backing=<shmem|hugetlb|file> access=<rw|ro> seals=<int>\\n     + one fd
    ERR <GRPC_STATUS_NAME> <message>\\n                                  no fd

One thread multiplexes every connection, so thousands of idle or slow
clients cost a socket each, not a thread; each has READ_TIMEOUT to finish its
line and MAX_REQUEST bytes to do it in.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from memplug.common.errors import InvalidArgument, MemplugError
from memplug.common.status import code_for
from memplug.daemon import metrics
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.region import Access
from memplug.daemon.engine.tickets import Handoff
from memplug.daemon.transport.peercred import peer_of
from memplug.daemon.transport.unixsock import claim_socket_path

log = logging.getLogger("memplug.fdserver")

PROTOCOL: Final = "MEMPLUG/1"
MAX_REQUEST: Final = 512
READ_TIMEOUT: Final = 5.0
MAX_CONNECTIONS: Final = 4096
_ATTACH_RE: Final = re.compile(rf"{re.escape(PROTOCOL)} ATTACH ([A-Za-z0-9_-]{{16,128}})")
_OPEN_RE: Final = re.compile(rf"{re.escape(PROTOCOL)} OPEN ([a-z0-9][a-z0-9._-]{{0,62}}) (rw|ro)")


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


def ok_line(h: Handoff) -> bytes:
    return (
        f"OK region={h.region} size={h.size} page_size={h.page_size} "
        f"block_size={h.block_size} backing={h.backing} access={h.access.value} "
        f"seals={h.seals}\n"
    ).encode()


def err_line(exc: MemplugError) -> bytes:
    message = exc.message.replace("\n", " ")
    return f"ERR {code_for(exc).name} {message}\n".encode()


class FdServer:
    def __init__(
        self,
        path: Path,
        engine: RegionEngine,
        *,
        mode: int = 0o666,
        read_timeout: float = READ_TIMEOUT,
        listen_fd: int | None = None,
    ) -> None:
        self.path = path
        self._engine = engine
        self._mode = mode
        self._read_timeout = read_timeout
        self._listen_fd = listen_fd
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        if self._listen_fd is not None:  # socket-activated: systemd bound it
            listener = socket.socket(fileno=self._listen_fd)
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            claim_socket_path(self.path)
            old = os.umask(0o777 & ~self._mode)
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, self._mode)
            listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="memplug-fdserver", daemon=True)
        self._thread.start()
        log.info("fd socket listening on %s", self.path)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(10)
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener is not None:
            self._listener.close()
            if self._listen_fd is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._sel.close()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.5)
            except InterruptedError:
                continue
            for key, _ in events:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                else:
                    conn = key.data
                    try:
                        self._readable(conn)
                    except Exception:  # a bug must not take the hand-off down
                        log.exception("fd socket: failed serving a connection")
                        self._close(conn)
            self._expire(time.monotonic())

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("fd socket: cannot accept: %s", exc.strerror)
                    return
                raise
            if len(self._conns) >= MAX_CONNECTIONS:
                sock.close()  # at capacity: shed the newest, keep serving the rest
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self._read_timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        if b"\n" not in conn.buf:
            if len(conn.buf) >= MAX_REQUEST:
                self._reply_error(conn, InvalidArgument("request line too long"))
            return
        line = bytes(conn.buf.split(b"\n", 1)[0])
        self._serve(conn, line)

    def _serve(self, conn: _Conn, line: bytes) -> None:
        peer = peer_of(conn.sock)
        text = line.decode("ascii", errors="replace").rstrip("\r")
        attach, open_ = _ATTACH_RE.fullmatch(text), _OPEN_RE.fullmatch(text)
        if attach is None and open_ is None:
            metrics.ATTACHES.labels("malformed").inc()
            log.warning("fd socket: malformed request from pid=%d uid=%d", peer.pid, peer.uid)
            self._reply_error(
                conn,
                InvalidArgument(
                    f"expected '{PROTOCOL} ATTACH <ticket>' or '{PROTOCOL} OPEN <region> <rw|ro>'"
                ),
            )
            return
        try:
            if attach is not None:
                handoff = self._engine.redeem(attach.group(1), peer)
            else:
                assert open_ is not None
                handoff = self._engine.open_fd(open_.group(1), Access(open_.group(2)), peer)
        except MemplugError as exc:
            metrics.ATTACHES.labels("refused").inc()
            log.warning(
                "fd socket: refused pid=%d uid=%d gids=%s: %s",
                peer.pid, peer.uid, ",".join(map(str, sorted(peer.gids))), exc.message,
            )  # fmt: skip
            self._reply_error(conn, exc)
            return
        try:
            socket.send_fds(conn.sock, [ok_line(handoff)], [handoff.fd])
            metrics.ATTACHES.labels("ok").inc()
            log.info(
                "fd socket: attached region=%s access=%s pid=%d uid=%d",
                handoff.region, handoff.access.value, peer.pid, peer.uid,
            )  # fmt: skip
        except OSError as exc:
            log.warning("fd socket: pid=%d left before its fd was sent: %s", peer.pid, exc)
        finally:
            os.close(handoff.fd)
            self._close(conn)

    def _reply_error(self, conn: _Conn, exc: MemplugError) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(err_line(exc))
        self._close(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline < now]:
            log.debug("fd socket: closing a connection idle past %.0f s", self._read_timeout)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fileno = conn.sock.fileno()
        if fileno >= 0 and self._conns.pop(fileno, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.sock.close()
