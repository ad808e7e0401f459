"""The /metrics endpoint: one thread, one selector, few connections, short timeouts.

prometheus_client's own server gives every TCP connection a thread and waits on
it with no timeout, so idle connections pile up threads and fds until the
process runs out. Here one thread serves every connection; at most
MAX_CONNECTIONS are open at once (a new one closes the oldest, so a scrape gets
through however many idle connections someone holds), and a connection that
has not sent its request, or not taken its answer, within TIMEOUT seconds is
closed. Each answer closes its connection (HTTP/1.1 with Connection: close).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("memplug.metrics")

MAX_CONNECTIONS: Final = 16
TIMEOUT: Final = 5.0  # seconds to send the request, and again to read the answer
MAX_REQUEST: Final = 8192  # bytes of request line and headers; a scrape sends a few hundred


@dataclass
class _Connection:
    sock: socket.socket
    opened: float
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class MetricsServer:
    """Serves GET /metrics (and /) from a registry until stop()."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = TIMEOUT,
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.timeout = timeout
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(64)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._connections: dict[socket.socket, _Connection] = {}
        self._thread = threading.Thread(target=self._serve, name="memplug-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(5)
        for conn in list(self._connections.values()):
            self._close(conn)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        while True:
            now = time.monotonic()
            deadlines = [c.deadline for c in self._connections.values()]
            wait = max(0.0, min(deadlines) - now) if deadlines else None
            for key, events in self._selector.select(wait):
                if key.data == "wake":
                    return
                if key.data == "listen":
                    self._accept()
                    continue
                conn = self._connections.get(key.fileobj)  # type: ignore[call-overload]
                if conn is None:
                    continue  # closed earlier in this round (evicted)
                try:
                    if events & selectors.EVENT_READ:
                        self._read(conn)
                    elif events & selectors.EVENT_WRITE:
                        self._write(conn)
                except OSError:
                    self._close(conn)  # reset by the peer
            now = time.monotonic()
            for conn in [c for c in self._connections.values() if c.deadline <= now]:
                self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next round tries again
                log.warning("metrics: cannot accept a connection: %s", exc)
                return
            if len(self._connections) >= self.max_connections:
                self._close(min(self._connections.values(), key=lambda c: c.opened))
            sock.setblocking(False)
            now = time.monotonic()
            self._connections[sock] = _Connection(sock, now, now + self.timeout)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Connection) -> None:
        data = conn.sock.recv(4096)
        if not data:
            self._close(conn)
            return
        conn.request += data
        if b"\r\n\r\n" in conn.request:
            self._answer(conn, self._handle(bytes(conn.request)))
        elif len(conn.request) > MAX_REQUEST:
            self._answer(conn, _response("431 Request Header Fields Too Large", b""))

    def _handle(self, request: bytes) -> bytes:
        line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) != 3:
            return _response("400 Bad Request", b"bad request line\n")
        method, target, _ = line
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET\n")
        if target.split("?", 1)[0] not in ("/metrics", "/"):
            return _response("404 Not Found", b"metrics are on /metrics\n")
        try:
            body = generate_latest(self.registry)
        except Exception:
            log.exception("metrics: collecting failed")
            return _response("500 Internal Server Error", b"collecting failed\n")
        answer = _response("200 OK", body, CONTENT_TYPE_LATEST)
        return answer[: len(answer) - len(body)] if method == "HEAD" else answer

    def _answer(self, conn: _Connection, answer: bytes) -> None:
        conn.answer = memoryview(answer)
        conn.deadline = time.monotonic() + self.timeout
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.answer is not None
        try:
            sent = conn.sock.send(conn.answer)
        except BlockingIOError:
            return
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self._connections.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
