"""Take-over: a new memplugd takes every region from a running one, without systemd.

The running daemon listens on <state-dir>/takeover.sock (mode 0600, in the
0700 state dir; SO_PEERCRED admits only its own uid and root). A new daemon
started with --takeover connects and the two speak JSON messages over a
SOCK_SEQPACKET connection (one message per datagram; fds ride on them with
SCM_RIGHTS):

    new -> old   hello      {schema, version, pid}
    old -> new   offer      {schema, version, pid, regions}   or refused {error}
    new -> old   go                                           or abort {error}
                 (old: stops accepting calls, cancels and waits for running
                  operations, which roll back, closes and unlinks its sockets)
    old -> new   lock       + the state-dir lock's fd
    old -> new   fds        {names} + up to FD_BATCH region fds, repeated
    old -> new   sent       {count}
                 (new: shares the lock, restores from the store with the fds)
    new -> old   ready
    old -> new   committed
                 (old: closes its take-over socket, engine, store and lock, but
                  keeps a copy of every region fd; new: serves on the sockets)
    new -> old   serving
                 (old: closes its copies and exits 0)

Until the old daemon reads `ready` nothing is given up: the fds sent are
copies (the old daemon keeps its own), the lock is shared (flock belongs to the
open file description, which both now hold), and the store is only read and
reconciled by the new one to what the old one holds. If the new daemon dies,
says abort, or is not ready within the timeout, the old one closes the
connection and serves again on new sockets; the new one, finding no
`committed`, exits without serving.

Between `committed` and `serving` the new daemon owns the store and may already
change it, so the old one cannot simply serve again from what it knew. If the
new one dies there (the connection ends without `serving`), the old process
starts afresh on the store with the copies it kept: it re-executes itself with
them as fds 3.. and LISTEN_FDS/LISTEN_FDNAMES, as systemd hands its fd store
to a restarted service (same pid, so a container's PID 1 stays), and restores
as after any restart. Once `serving` is read the regions live in the new daemon
alone. The schemas are compared in the hello and the offer, before anything
moves; one take-over runs at a time, others are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from memplug.common.errors import StartupError
from memplug.daemon.transport.peercred import peer_of

log = logging.getLogger("memplug.takeover")

TAKEOVER_SOCKET: Final = "takeover.sock"
# The kernel takes at most 253 fds in one SCM_RIGHTS message (SCM_MAX_FD).
FD_BATCH: Final = 250
MAX_MESSAGE: Final = 1 << 20
# The new daemon needs this many fds beyond the regions' (store, sockets, threads' pipes).
FD_HEADROOM: Final = 64
DEFAULT_TIMEOUT: Final = 30.0


class TakeoverError(StartupError):
    """A take-over that did not happen; the running daemon keeps serving."""


class NoDaemonToTakeOver(TakeoverError):
    """Nothing listens on the take-over socket: no daemon runs, or none is ready to hand over."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / TAKEOVER_SOCKET


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One message and its fds; EOF, a truncated or malformed message raise TakeoverError."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds, socket.MSG_CMSG_CLOEXEC)
    try:
        if not data:
            raise TakeoverError("the other memplugd closed the connection")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise TakeoverError("a take-over message was truncated")
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise TakeoverError(f"not a take-over message: {data[:80]!r}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _expect(message: dict[str, Any], op: str) -> None:
    if message["op"] == op:
        return
    if message["op"] in ("refused", "abort"):
        raise TakeoverError(str(message.get("error", "refused")))
    raise TakeoverError(f"expected {op!r}, the other memplugd sent {message['op']!r}")


# --------------------------------------------------------------------------- the old daemon


class Handover(Protocol):
    """What the running daemon does at each step of a take-over it gives."""

    def region_count(self) -> int:
        """How many memfd regions (fds) a take-over would hand over now."""
        ...

    def quiesce(self) -> tuple[int, dict[str, int]]:
        """Stop serving, keep everything: (the state-dir lock's fd, region fds by name)."""
        ...

    def resume(self, why: str) -> None:
        """The take-over failed: serve again."""
        ...

    def commit(self) -> None:
        """The new daemon owns the state now: close the engine, the store and the lock."""
        ...

    def finish(self) -> None:
        """The new daemon serves: let the process exit 0."""
        ...

    def revive(self, regions: dict[str, int]) -> None:
        """The new daemon died after commit(): start this process afresh with these
        fds (it re-executes itself; returns only if it could not)."""
        ...


class TakeoverListener:
    """The running daemon's side: accepts one take-over at a time on a private socket."""

    def __init__(
        self,
        path: Path,
        handover: Handover,
        *,
        schema: int,
        version: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = path
        self._handover = handover
        self._schema = schema
        self._version = version
        self._timeout = timeout
        self._busy = threading.Lock()
        self._taker_pid = 0
        self._listener: socket.socket | None = None
        self._inode = 0  # of the socket we bound: stop() never unlinks a successor's
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        # The state-dir lock is ours: a socket left here is a dead daemon's.
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise StartupError(f"{self.path} exists and is not a socket: remove it")
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # 0600 from the start, not after a chmod
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self._inode = os.lstat(self.path).st_ino
        listener.listen(4)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept_loop, name="memplug-takeover", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close and unlink the socket (the daemon stops, or has handed over)."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # EMFILE and the like: try again, do not spin
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="memplug-takeover-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self._timeout)
            try:
                # Read the hello first: a refusal sent before it would meet a
                # closed connection, and the taker would see EPIPE, not why.
                hello, _ = _recv(conn)
                _expect(hello, "hello")
                peer = peer_of(conn)
                pid, uid = peer.pid, peer.uid
                if uid not in (0, os.geteuid()):
                    raise TakeoverError(
                        f"uid {uid} may not take over this memplugd: only uid {os.geteuid()} "
                        "or root"
                    )
                if not self._busy.acquire(blocking=False):
                    raise TakeoverError(
                        f"another memplugd (pid {self._taker_pid}) is taking over already; "
                        "one take-over at a time"
                    )
            except (OSError, TakeoverError) as exc:
                log.warning("take-over refused: %s", exc)
                with contextlib.suppress(OSError):
                    _send(conn, {"op": "refused", "error": str(exc)})
                return
            try:
                self._taker_pid = pid
                self._give(conn, pid, hello)
            finally:
                self._taker_pid = 0
                self._busy.release()

    def _give(self, conn: socket.socket, pid: int, hello: dict[str, Any]) -> None:
        # 1. Agree, before anything moves.
        try:
            theirs = hello.get("schema")
            if theirs != self._schema:
                _send(
                    conn,
                    {
                        "op": "refused",
                        "error": f"this memplugd {self._version} keeps state schema "
                        f"{self._schema}, the new one (version {hello.get('version')}) speaks "
                        f"schema {theirs}: they cannot agree on the state; upgrade through a "
                        "version that reads both, or stop this one and start the new one",
                    },
                )
                log.warning(
                    "take-over by pid %d refused: schema %s, ours %d", pid, theirs, self._schema
                )
                return
            _send(
                conn,
                {
                    "op": "offer",
                    "schema": self._schema,
                    "version": self._version,
                    "pid": os.getpid(),
                    "regions": self._handover.region_count(),
                },
            )
            answer, _ = _recv(conn)
            _expect(answer, "go")
        except (OSError, TakeoverError) as exc:
            log.warning("take-over by pid %d did not start: %s", pid, exc)
            return
        # 2. Stop serving, hand over copies of everything.
        log.info("handing over to memplugd pid %d: stopping calls", pid)
        started = time.monotonic()
        try:
            lock_fd, regions = self._handover.quiesce()
        except Exception as exc:
            log.error("take-over by pid %d: cannot stop serving: %s", pid, exc)
            with contextlib.suppress(OSError):
                _send(conn, {"op": "refused", "error": f"the old memplugd cannot hand over: {exc}"})
            self._handover.resume(str(exc))
            return
        try:
            _send(conn, {"op": "lock"}, [lock_fd])
            names = list(regions)
            for first in range(0, len(names), FD_BATCH):
                batch = names[first : first + FD_BATCH]
                _send(conn, {"op": "fds", "names": batch}, [regions[n] for n in batch])
            _send(conn, {"op": "sent", "count": len(names)})
            ready, _ = _recv(conn)
            _expect(ready, "ready")
            # Copies that outlive commit() (which closes the engine's fds) until
            # the new daemon serves: if it dies before, this process restarts on them.
            kept = {name: os.dup(fd) for name, fd in regions.items()}
            try:
                _send(conn, {"op": "committed"})
            except BaseException:
                for fd in kept.values():
                    os.close(fd)
                raise
        except (OSError, TakeoverError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            log.error("take-over by pid %d failed (%s): serving again", pid, why)
            self._handover.resume(why)
            return
        log.info(
            "handed %d regions over to memplugd pid %d in %.0f ms: waiting until it serves",
            len(regions),
            pid,
            (time.monotonic() - started) * 1000,
        )
        self.stop()
        self._handover.commit()
        try:
            serving, _ = _recv(conn)
            _expect(serving, "serving")
        except TimeoutError:
            # Alive but slow: it holds the lock and the regions; a restart here
            # would only be refused the state dir.
            log.error(
                "memplugd pid %d did not say it serves within %.0f s: leaving the regions to it",
                pid,
                self._timeout,
            )
        except (OSError, TakeoverError) as exc:
            log.critical(
                "memplugd pid %d ended before it served (%s): starting this one again on the "
                "state with every region",
                pid,
                exc,
            )
            self._handover.revive(kept)
            log.critical("could not start again: the regions are lost")
        else:
            log.info("memplugd pid %d serves: exiting", pid)
        for fd in kept.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handover.finish()


# --------------------------------------------------------------------------- the new daemon


@dataclass
class Taken:
    """What a take-over brought: the old daemon's lock and region fds, and the open line."""

    conn: socket.socket
    old_pid: int
    old_version: str
    lock_fd: int
    regions: dict[str, int]

    def close_fds(self) -> None:
        for fd in (self.lock_fd, *self.regions.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.regions.clear()

    def confirm(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Tell the old daemon we are ready; return once it has let go of the state
        (it keeps copies of the region fds until serving() says we serve)."""
        self.conn.settimeout(timeout)
        try:
            _send(self.conn, {"op": "ready"})
            committed, _ = _recv(self.conn)
            _expect(committed, "committed")
        except (OSError, TakeoverError) as exc:
            self.conn.close()
            raise TakeoverError(
                f"the old memplugd (pid {self.old_pid}) did not let go ({exc}): it serves on; "
                "this one exits without serving"
            ) from exc

    def serving(self) -> None:
        """Tell the old daemon we serve: it drops its copies and exits."""
        try:
            _send(self.conn, {"op": "serving"})
        except OSError as exc:  # it gave up waiting: the regions are ours alone anyway
            log.warning("could not tell the old memplugd (pid %d) we serve: %s", self.old_pid, exc)
        finally:
            self.conn.close()


def take_over(
    state_dir: Path,
    *,
    schema: int,
    version: str,
    nofile: int,
    timeout: float = DEFAULT_TIMEOUT,
    after_fds: Callable[[], None] | None = None,
) -> Taken:
    """Ask the memplugd of state_dir to hand over; return its fds once all have come.

    after_fds runs once every fd has come (a test switch that exits there).
    """
    path = socket_path(state_dir)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except OSError as exc:
        conn.close()
        raise NoDaemonToTakeOver(
            f"no running memplugd to take over at {path} ({exc.strerror or exc}): is one "
            "running with this --state-dir? start without --takeover (or with "
            "--takeover=auto) if none is"
        ) from None
    lock_fd = -1
    regions: dict[str, int] = {}
    try:
        _send(conn, {"op": "hello", "schema": schema, "version": version, "pid": os.getpid()})
        offer, _ = _recv(conn)
        _expect(offer, "offer")
        old_pid = int(offer.get("pid", 0))
        if offer.get("schema") != schema:
            raise TakeoverError(
                f"the running memplugd (pid {old_pid}) keeps state schema {offer.get('schema')}, "
                f"this one speaks {schema}: they cannot agree on the state"
            )
        count = int(offer.get("regions", 0))
        if count + FD_HEADROOM > nofile:
            error = (
                f"{count} regions to take over need more fds than RLIMIT_NOFILE {nofile} "
                f"allows (plus {FD_HEADROOM}): raise the limit (ulimit -n, LimitNOFILE=)"
            )
            _send(conn, {"op": "abort", "error": error})
            raise TakeoverError(error)
        _send(conn, {"op": "go"})
        message, fds = _recv(conn, 1)
        _expect(message, "lock")
        if len(fds) != 1:
            raise TakeoverError("the state-dir lock did not come")
        lock_fd = fds[0]
        while True:
            message, fds = _recv(conn, FD_BATCH)
            if message["op"] == "sent":
                break
            names = message.get("names")
            if message["op"] != "fds" or not isinstance(names, list) or len(names) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise TakeoverError(f"a malformed batch of fds: {message['op']!r}")
            regions.update(zip((str(n) for n in names), fds, strict=True))
        if int(message.get("count", -1)) != len(regions):
            raise TakeoverError(f"{message.get('count')} fds announced, {len(regions)} came")
    except BaseException as exc:
        for fd in (lock_fd, *regions.values()):
            if fd >= 0:
                os.close(fd)
        conn.close()
        if isinstance(exc, OSError):
            raise TakeoverError(f"the take-over failed: {exc}") from exc
        raise
    log.info(
        "took %d region fds over from memplugd %s (pid %d)",
        len(regions),
        offer.get("version"),
        old_pid,
    )
    if after_fds is not None:
        after_fds()
    return Taken(conn, old_pid, str(offer.get("version")), lock_fd, regions)
