"""A stand-in for systemd that speaks its real protocol, for tests without a running systemd.

- NOTIFY_SOCKET: a datagram socket; every message is recorded, FDSTORE=1 fds
  (SCM_RIGHTS) are kept by FDNAME and FDSTOREREMOVE=1 drops them.
- Starting the service hands the stored fds back as systemd does: dup'ed to
  3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set to the
  service's own pid (a tiny launcher arranges that, then execs memplugd).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from conftest import DaemonProcess

from memplug.v1 import memplug_pb2_grpc as pb_grpc

# Runs in the child: move the inherited fds to 3.., set LISTEN_PID to itself, exec.
LAUNCHER = """
import os, sys
n = int(sys.argv[1]); fds = [int(x) for x in sys.argv[2:2 + n]]; argv = sys.argv[2 + n:]
tmp = [os.dup(fd) for fd in fds]
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)  # dup2(fd, fd) is a no-op that keeps CLOEXEC
for fd in tmp:
    if fd >= 3 + n:
        os.close(fd)
if n:
    os.environ["LISTEN_FDS"] = str(n)
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(argv[0], argv)
"""


class FakeSystemd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.notify_path = workdir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.messages: list[dict[str, str]] = []
        self.fdstore: dict[str, int] = {}
        self.extra_fds: list[tuple[int, str]] = []  # e.g. an activated listening socket
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    for fd in fds:
                        old = self.fdstore.pop(name, None)
                        if old is not None:
                            os.close(old)
                        self.fdstore[name] = fd
                elif fds:
                    for fd in fds:
                        os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    old = self.fdstore.pop(fields.get("FDNAME", ""), None)
                    if old is not None:
                        os.close(old)
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 15
    ) -> dict[str, str]:
        """The first message (from now on or already received) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching sd_notify message; got {self.messages}")
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def start(
        self,
        tmp: Path,
        *extra: str,
        watchdog_usec: int | None = None,
        env: dict[str, str] | None = None,
    ) -> DaemonProcess:
        """Start memplugd as systemd would, handing back the fd store; wait for READY=1."""
        tmp.mkdir(parents=True, exist_ok=True)
        sock, fd_sock, log_path = tmp / "memplug.sock", tmp / "fd.sock", tmp / "memplugd.log"
        with self._cond:
            passed = [*self.fdstore.items()]
        passed_fds = [fd for _, fd in passed] + [fd for fd, _ in self.extra_fds]
        names = [name for name, _ in passed] + [name for _, name in self.extra_fds]
        daemon_argv = [
            sys.executable, "-m", "memplug.daemon",
            "--socket", str(sock), "--fd-socket", str(fd_sock),
            "--state-dir", str(self.workdir / "state"), "--log-level", "debug", *extra,
        ]  # fmt: skip
        child_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        if names:
            child_env["LISTEN_FDNAMES"] = ":".join(names)
        if watchdog_usec:
            child_env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.clear()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(len(passed_fds)),
                 *map(str, passed_fds), *daemon_argv],
                pass_fds=passed_fds, stdout=log, stderr=subprocess.STDOUT, env=child_env,
            )  # fmt: skip
        try:
            self.wait_for(lambda m: m.get("READY") == "1")
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"memplugd never sent READY=1:\n{log_path.read_text()}") from None
        channel = grpc.insecure_channel(f"unix:{sock}")
        return DaemonProcess(
            proc, sock, fd_sock, log_path, channel, pb_grpc.MemplugStub(channel), daemon_argv
        )

    def empty_fd_store(self) -> None:
        """What systemd does at `systemctl stop` (before 254's FileDescriptorStorePreserve=)."""
        with self._cond:
            for fd in self.fdstore.values():
                os.close(fd)
            self.fdstore.clear()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        for fd in self.fdstore.values():
            os.close(fd)
        self.fdstore.clear()
