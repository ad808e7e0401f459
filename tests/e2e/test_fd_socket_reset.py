"""A consumer whose fd-socket connection is dropped gets Unavailable, never a raw OSError.

A connection that waits in the backlog of a listening socket is reset when
that socket is closed: what a consumer saw when a restart of memplugd tore the
activated socket down. The kernel does it here for real, on a real socket.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from memplug.client import Client
from memplug.client.attach import open_region
from memplug.common.errors import MemplugError, Unavailable


def attach_against_vanishing_listener(
    path: Path, attach: Callable[[], object]
) -> BaseException | None:
    """Run attach() while path listens; close the listener under the waiting connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    caught: list[BaseException | None] = [None]

    def run() -> None:
        try:
            attach()
        except BaseException as exc:
            caught[0] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Readable = a connection is pending in the backlog; never accepted.
        ready, _, _ = select.select([listener], [], [], 10)
        assert ready, "the client never connected"
    finally:
        listener.close()
    thread.join(15)
    assert not thread.is_alive()
    return caught[0]


def test_open_region_reset_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "fd.sock"
    exc = attach_against_vanishing_listener(path, lambda: open_region(str(path), "vm0", "rw"))
    assert isinstance(exc, Unavailable), repr(exc)
    assert str(path) in exc.message and "try again" in exc.message, exc.message


def test_client_attach_reset_is_a_memplug_error(tmp_path: Path) -> None:
    path = tmp_path / "fd.sock"
    with Client(tmp_path / "memplug.sock", fd_socket=path) as c:
        exc = attach_against_vanishing_listener(path, lambda: c.attach("vm0"))
    assert isinstance(exc, MemplugError), repr(exc)
    assert isinstance(exc, Unavailable), repr(exc)


def test_closed_without_an_answer_is_unavailable(tmp_path: Path) -> None:
    """Accepted, then closed with no reply (a daemon stopping): Unavailable, not Internal."""
    path = tmp_path / "fd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(Unavailable, match="without an answer"):
            open_region(str(path), "vm0", "rw")
    finally:
        thread.join(10)
        listener.close()
