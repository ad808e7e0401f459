"""A small QMP (QEMU Machine Protocol) client over a Unix socket; the standard library only.

    with Qmp.connect("/run/vm0/qmp.sock") as qmp:
        qmp.execute("query-status")          # {"running": True, "status": "running", ...}

connect() reads the greeting and negotiates capabilities (qmp_capabilities).
Every read is bounded by the timeout; asynchronous events are kept in
`events`, not returned as replies. A command QEMU refuses raises QmpError
with QEMU's error class and description.
"""

from __future__ import annotations

import json
import socket
import time
from types import TracebackType
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error, or the monitor went away."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class Qmp:
    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        self._sock = sock
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, *, wait: float = 0.0) -> Qmp:
        """Connect to the monitor at path and negotiate; wait: seconds to retry a
        socket that is not there or not listening yet (a QEMU still starting)."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise
        qmp = cls(sock, path, timeout)
        try:
            qmp.greeting = qmp._message()
            if "QMP" not in qmp.greeting:
                raise QmpError(f"{path} is not a QMP monitor: it said {qmp.greeting!r}")
            qmp.execute("qmp_capabilities")
        except BaseException:
            qmp.close()
            raise
        return qmp

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"QMP {self.path}: no answer in {self.timeout:g} s") from None
            except OSError as exc:
                raise QmpError(f"QMP {self.path}: {exc.strerror or exc}") from None
            if not chunk:
                raise QmpError(f"QMP {self.path}: QEMU closed the monitor (has it exited?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its "return" value; QmpError if QEMU refused it."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP {self.path}: {exc.strerror or exc}") from None
        while True:
            reply = self._message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                error = reply["error"]
                raise QmpError(
                    f"{command}: {error.get('desc', error)}", str(error.get("class", ""))
                )
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """A human monitor command (e.g. "xp /4xw 0x100000"); its text output."""
        out: str = self.execute("human-monitor-command", **{"command-line": command_line})
        return out

    def status(self) -> str:
        """The VM's run state: "running", "paused", "prelaunch", "inmigrate", ..."""
        return str(self.execute("query-status")["status"])

    def wait_closed(self, timeout: float) -> bool:
        """Wait for QEMU to close the monitor (it exited); True if it did in time."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                return True
            if not chunk:
                return True
