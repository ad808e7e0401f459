"""A tiny Unix-socket echo server on one selector thread: the bare round-trip floor.

One thread multiplexes every connection, as memplugd's fd socket server does.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from pathlib import Path


class EchoServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(path))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="bench-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select():
                if key.fileobj is self._listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listener.accept()
                        self._sel.register(conn, selectors.EVENT_READ)
                elif key.fileobj == self._wake_r:
                    return
                elif isinstance(key.fileobj, socket.socket):
                    self._echo(key.fileobj)

    def _echo(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = conn.recv(4096)
        if data:
            conn.sendall(data)
        else:
            self._sel.unregister(conn)
            conn.close()

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.path.unlink(missing_ok=True)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    return sock


def round_trip(sock: socket.socket) -> None:
    sock.sendall(b"x")
    if sock.recv(1) != b"x":
        raise RuntimeError("echo server closed the connection")


def connect_round_trip(path: Path) -> None:
    """What the fd socket's hand-off costs at least: connect, one exchange, close."""
    with connect(path) as sock:
        round_trip(sock)
