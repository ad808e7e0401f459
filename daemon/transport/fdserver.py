"""The fd socket's server: one thread accepts, reads one request, hands over an fd (SCM_RIGHTS).

Wire protocol (proto/memplug/v1/fd-protocol.md): the client sends one line,

    MEMPLUG/1 ATTACH <ticket>\\n         (a ticket from the Attach RPC), or
    MEMPLUG/1 OPEN <region> <rw|ro>\\n   (no ticket: the ACL alone decides)

and receives one message, then the daemon shuts down its side of the connection:

    OK region=<name> size=<bytes> page_size=<bytes> block_size=<bytes> \\
       backing=<shmem|hugetlb|file> access=<rw|ro> seals=<int>\\n     + one fd
    ERR <GRPC_STATUS_NAME> <message>\\n                                  no fd

One thread multiplexes every connection, so thousands of idle or slow
clients cost a socket each, not a thread; each has READ_TIMEOUT to finish its
line and MAX_REQUEST bytes to do it in.

The socket is open to every local uid, so what one uid can hold is bounded
(FdLimits, sized from RLIMIT_NOFILE): connections per uid and in all, counted
from accept (SO_PEERCRED); and replies whose fd the peer has not read yet. An
fd in a reply nobody has read counts against the daemon's own RLIMIT_NOFILE
(the kernel refuses further SCM_RIGHTS sends with ETOOMANYREFS unless the
daemon has CAP_SYS_RESOURCE), so such a connection stays open, and counted
against its uid, until SIOCOUTQ says the peer has read the reply or the peer
closes it.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import resource
import selectors
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from memplug.common.errors import (
    InvalidArgument,
    MemplugError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from memplug.daemon import metrics
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.region import Access
from memplug.daemon.engine.tickets import Peer
from memplug.daemon.kernel import cgroup
from memplug.daemon.ratelog import RateLimitedLog
from memplug.daemon.transport.fdlimits import (
    ACCEPT_BACKOFF,
    SHED_BURST,
    SHED_WINDOW,
    UNREAD_RECHECK,
    FdLimits,
    unsent_bytes,
)
from memplug.daemon.transport.fdwire import (
    ATTACH_REQUEST,
    MAX_REQUEST,
    OPEN_REQUEST,
    PROTOCOL,
    err_line,
    hidden_refusal,
    ok_line,
)
from memplug.daemon.transport.peercred import peer_cgroups, peer_cred, peer_of
from memplug.daemon.transport.unixsock import claim_socket_path

log = logging.getLogger("memplug.fdserver")

READ_TIMEOUT: Final = 5.0  # seconds a connection has to send its request line
# Short on purpose: under a flood the backlog is full of the flooder's connects, and a
# client that waits for room (a blocking connect) waits behind all of them.
LISTEN_BACKLOG: Final = 128
ACCEPT_BATCH: Final = 64  # accepts per turn of the loop, so connections already in get served


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    cred: tuple[int, int, int]  # (pid, uid, gid) by SO_PEERCRED at accept
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    unread: bool = False  # a reply with an fd is sent; the peer has not read it yet
    recheck: float = UNREAD_RECHECK[0]

    @property
    def uid(self) -> int:
        return self.cred[1]


class FdServer:
    def __init__(
        self,
        path: Path,
        engine: RegionEngine,
        *,
        mode: int = 0o666,
        read_timeout: float = READ_TIMEOUT,
        listen_fd: int | None = None,
        limits: FdLimits | None = None,
    ) -> None:
        self.path = path
        self._engine = engine
        self._mode = mode
        self._read_timeout = read_timeout
        self._listen_fd = listen_fd
        self.limits = limits or FdLimits.for_nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._per_uid: Counter[int] = Counter()
        self._unread_per_uid: Counter[int] = Counter()
        self._reading: deque[_Conn] = deque()  # in accept order, so in deadline order
        self._unread: list[tuple[float, int, _Conn]] = []  # heap: next SIOCOUTQ poll
        self._seq = 0
        self._accept_paused_until: float | None = None
        self._accept_backoff = ACCEPT_BACKOFF[0]
        self._shed_window = 0.0  # when the current window of sheds began
        self._shed_count = 0
        self._ratelog = RateLimitedLog(log)
        # Root and the daemon's own uid: they see why an OPEN failed (others could probe
        # names with it), and only the limit on all connections bounds them (they can
        # stop the daemon anyway; their tools may hold many hand-offs at once).
        self._insiders = frozenset({0, os.geteuid()})
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
            listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="memplug-fdserver", daemon=True)
        self._thread.start()
        log.info("fd socket listening on %s (%s)", self.path, self.limits.describe())

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
                events = self._sel.select(timeout=self._timeout(time.monotonic()))
            except InterruptedError:
                continue
            for key, _ in events:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                else:
                    self._try_readable(key.data)
            now = time.monotonic()
            self._expire(now)
            self._check_unread(now)
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._resume_accepting()

    def _timeout(self, now: float) -> float:
        """Sleep until the next thing that is due: an expiry, an unread poll, a resume."""
        due = [now + 0.5]
        if self._reading:
            due.append(self._reading[0].deadline)
        if self._unread:
            due.append(self._unread[0][0])
        if self._accept_paused_until is not None:
            due.append(self._accept_paused_until)
        return max(0.0, min(due) - now)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE (and ENOBUFS/ENOMEM) leave the listener readable: retrying
                # at once would spin. Pause accepting; the connects wait in the backlog.
                self._pause_accepting(exc)
                return
            self._accept_backoff = ACCEPT_BACKOFF[0]
            try:
                cred = peer_cred(sock)
                uid = cred[1]
            except OSError:
                sock.close()
                continue
            refusal = self._over_limit(uid)
            if refusal is not None:
                with contextlib.suppress(OSError):
                    sock.send(err_line(refusal), socket.MSG_DONTWAIT)
                sock.close()
                if self._shed_budget_spent():
                    return
                continue
            sock.setblocking(False)
            conn = _Conn(sock, cred, time.monotonic() + self._read_timeout)
            self._conns[sock.fileno()] = conn
            self._per_uid[uid] += 1
            self._reading.append(conn)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            # A client sends its request line right after connecting, so it is
            # usually there already: serving it now saves a turn of the loop (a
            # wake-up of this thread, an epoll_wait) per hand-off. If it is not,
            # recv says EAGAIN and the selector reports the line when it comes.
            self._try_readable(conn)

    def _try_readable(self, conn: _Conn) -> None:
        try:
            self._readable(conn)
        except Exception:  # a bug must not take the hand-off down
            log.exception("fd socket: failed serving a connection")
            self._close(conn)

    def _over_limit(self, uid: int) -> ResourceExhausted | None:
        limits = self.limits
        if self._per_uid[uid] >= limits.per_uid and uid not in self._insiders:
            self._ratelog.warning(
                ("uid-full", uid),
                "fd socket: shed a connection of uid=%d: it holds %d, the limit per uid",
                uid, limits.per_uid,
            )  # fmt: skip
            return ResourceExhausted(
                f"uid {uid} has {limits.per_uid} connections open to the fd socket, the "
                "limit per uid: finish or close some (each must send its request line "
                "and read its reply), then try again"
            )
        if len(self._conns) >= limits.connections:
            self._ratelog.warning(
                "full",
                "fd socket: shed a connection of uid=%d: %d connections open, the limit",
                uid, limits.connections,
            )  # fmt: skip
            return ResourceExhausted(
                f"the fd socket has {limits.connections} connections open, its limit; "
                "try again shortly"
            )
        return None

    def _shed_budget_spent(self) -> bool:
        """Count a shed connection; past SHED_BURST in a window, pause accepting."""
        now = time.monotonic()
        if now - self._shed_window >= SHED_WINDOW:
            self._shed_window, self._shed_count = now, 0
        self._shed_count += 1
        if self._shed_count < SHED_BURST:
            return False
        self._pause_until(self._shed_window + SHED_WINDOW)
        return True

    def _pause_accepting(self, exc: OSError) -> None:
        pause = self._accept_backoff
        self._accept_backoff = min(ACCEPT_BACKOFF[1], pause * 2)
        self._ratelog.warning(
            ("accept", exc.errno),
            "fd socket: cannot accept (%s); pausing accepts for %.2f s (%d connections open)",
            exc.strerror, pause, len(self._conns),
        )  # fmt: skip
        self._pause_until(time.monotonic() + pause)

    def _pause_until(self, until: float) -> None:
        assert self._listener is not None
        if self._accept_paused_until is None:
            self._sel.unregister(self._listener)
        self._accept_paused_until = until

    def _resume_accepting(self) -> None:
        assert self._listener is not None
        self._accept_paused_until = None
        self._sel.register(self._listener, selectors.EVENT_READ, None)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if conn.unread:
            if not data and not self._read_by_peer(conn):
                # Closed by the peer's side with the reply still queued (a half-close):
                # EOF stays readable, so leave it to the SIOCOUTQ polls.
                self._sel.unregister(conn.sock)
            return  # bytes after the request are ignored
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
        peer = peer_of(conn.sock, conn.cred)
        text = line.decode("ascii", errors="replace").rstrip("\r")
        attach, open_ = ATTACH_REQUEST.fullmatch(text), OPEN_REQUEST.fullmatch(text)
        if attach is None and open_ is None:
            metrics.ATTACHES.labels("malformed").inc()
            self._ratelog.warning(
                ("malformed", peer.uid, peer.pid),
                "fd socket: malformed request from pid=%d uid=%d", peer.pid, peer.uid,
            )  # fmt: skip
            self._reply_error(
                conn,
                InvalidArgument(
                    f"expected '{PROTOCOL} ATTACH <ticket>' or '{PROTOCOL} OPEN <region> <rw|ro>'"
                ),
            )
            return
        unread = self._unread_per_uid[peer.uid]
        if unread >= self.limits.unread_per_uid and peer.uid not in self._insiders:
            metrics.ATTACHES.labels("refused").inc()
            self._ratelog.warning(
                ("unread", peer.uid, peer.pid),
                "fd socket: refused pid=%d uid=%d: %d replies with fds not read yet",
                peer.pid, peer.uid, unread,
            )  # fmt: skip
            self._reply_error(
                conn,
                ResourceExhausted(
                    f"uid {peer.uid} has {unread} replies with fds it has not read yet, the "
                    "limit per uid: read them (recvmsg) or close those connections, then "
                    "try again"
                ),
            )
            return
        try:
            # Read only if the region is charged to its first attacher and has none yet.
            def first_attacher() -> cgroup.ProcessCgroups:
                return peer_cgroups(conn.sock)

            if attach is not None:
                handoff = self._engine.redeem(attach.group(1), peer, first_attacher)
            else:
                assert open_ is not None
                handoff = self._engine.open_fd(
                    open_.group(1), Access(open_.group(2)), peer, first_attacher
                )
        except MemplugError as exc:
            metrics.ATTACHES.labels("refused").inc()
            self._log_refusal(peer, exc)  # the full reason stays in the daemon's log
            answer = exc
            if (
                open_ is not None
                and isinstance(exc, NotFound | PermissionDenied)
                and peer.uid not in self._insiders
            ):
                answer = hidden_refusal(peer.uid, open_.group(1), Access(open_.group(2)))
            self._reply_error(conn, answer)
            return
        try:
            socket.send_fds(conn.sock, [ok_line(handoff)], [handoff.fd], socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:
                self._ratelog.warning(
                    "inflight",
                    "fd socket: the kernel refused to pass an fd: too many fds sent by this "
                    "daemon's uid are unread (RLIMIT_NOFILE %d)", self.limits.nofile,
                )  # fmt: skip
                self._reply_error(
                    conn,
                    ResourceExhausted(
                        "too many fds sent by the daemon are still unread by their "
                        "receivers; try again shortly"
                    ),
                )
            else:
                self._ratelog.warning(
                    ("left", peer.uid),
                    "fd socket: pid=%d left before its fd was sent: %s", peer.pid, exc,
                )  # fmt: skip
                self._close(conn)
            return
        finally:
            os.close(handoff.fd)
        metrics.ATTACHES.labels("ok").inc()
        # Not rate-limited: the audit trail of hand-offs, which only uids in a region's
        # ACL can make (like the access log of the gRPC socket).
        log.info(
            "fd socket: attached region=%s access=%s pid=%d uid=%d",
            handoff.region, handoff.access.value, peer.pid, peer.uid,
        )  # fmt: skip
        self._await_read(conn)

    def _log_refusal(self, peer: Peer, exc: MemplugError) -> None:
        self._ratelog.warning(
            ("refused", peer.uid, peer.pid),
            "fd socket: refused pid=%d uid=%d gids=%s: %s",
            peer.pid, peer.uid, ",".join(map(str, sorted(peer.gids))), exc.message,
        )  # fmt: skip

    def _reply_error(self, conn: _Conn, exc: MemplugError) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(err_line(exc), socket.MSG_DONTWAIT)
        self._close(conn)

    # ------------------------------------------------------------------ unread replies

    def _await_read(self, conn: _Conn) -> None:
        """Keep the connection, counted against its uid, until the peer reads the reply."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)  # the peer sees EOF after the reply
        conn.unread = True
        self._unread_per_uid[conn.uid] += 1
        if not self._read_by_peer(conn):
            self._recheck_later(conn, time.monotonic())

    def _read_by_peer(self, conn: _Conn) -> bool:
        """Close the connection if the peer has read the reply (or is gone); True if so."""
        try:
            pending = unsent_bytes(conn.sock)
        except OSError:
            pending = 0
        if pending:
            return False
        self._close(conn)
        return True

    def _recheck_later(self, conn: _Conn, now: float) -> None:
        # Backs off: a reply left unread for long is polled about once a second.
        self._seq += 1
        heapq.heappush(self._unread, (now + conn.recheck, self._seq, conn))
        conn.recheck = min(UNREAD_RECHECK[1], conn.recheck * 2)

    def _check_unread(self, now: float) -> None:
        while self._unread and self._unread[0][0] <= now:
            _, _, conn = heapq.heappop(self._unread)
            if conn.sock.fileno() >= 0 and not self._read_by_peer(conn):
                self._recheck_later(conn, now)

    # ------------------------------------------------------------------ closing

    def _expire(self, now: float) -> None:
        if len(self._reading) > 2 * len(self._conns) + ACCEPT_BATCH:
            # Connections answered or closed early pile up behind one still reading.
            self._reading = deque(c for c in self._reading if self._still_reading(c))
        while self._reading and (
            self._reading[0].deadline < now or not self._still_reading(self._reading[0])
        ):
            conn = self._reading.popleft()
            if not self._still_reading(conn):
                continue
            self._ratelog.debug(
                ("idle", conn.uid),
                "fd socket: closing a connection of uid=%d idle past %.0f s",
                conn.uid, self._read_timeout,
            )  # fmt: skip
            self._close(conn)

    @staticmethod
    def _still_reading(conn: _Conn) -> bool:
        return not conn.unread and conn.sock.fileno() >= 0

    def _close(self, conn: _Conn) -> None:
        fileno = conn.sock.fileno()
        if fileno >= 0 and self._conns.pop(fileno, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
            self._per_uid[conn.uid] -= 1
            if self._per_uid[conn.uid] <= 0:
                del self._per_uid[conn.uid]
            if conn.unread:
                self._unread_per_uid[conn.uid] -= 1
                if self._unread_per_uid[conn.uid] <= 0:
                    del self._unread_per_uid[conn.uid]
        conn.sock.close()
