"""A real memplugd subprocess on the benchmark's own sockets and state directory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from memplug.client import Client
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

# Reconnect quickly while the daemon is not there yet: gRPC's default backoff
# starts at 1 s and would dominate the time to serving.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 2),
    ("grpc.min_reconnect_backoff_ms", 2),
    ("grpc.max_reconnect_backoff_ms", 10),
]


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait up to timeout, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Memplugd:
    proc: subprocess.Popen[bytes]
    directory: Path
    socket: Path
    fd_socket: Path
    log: Path
    exec_to_serving: float  # seconds from spawning the process to its first GetStatus answer

    def client(self) -> Client:
        return Client(self.socket, timeout=120.0)

    def rss(self) -> int:
        """VmRSS of the daemon in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self, timeout: float = 60.0) -> None:
        terminate(self.proc, timeout)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(directory: Path, *extra: str, timeout: float = 60.0) -> Memplugd:
    """Spawn memplugd (default log level and threads) and wait until GetStatus answers."""
    directory.mkdir(parents=True, exist_ok=True)
    sock, fd_sock, log = directory / "memplug.sock", directory / "fd.sock", directory / "log"
    command = [
        sys.executable, "-m", "memplug.daemon",
        "--socket", str(sock), "--fd-socket", str(fd_sock),
        "--state-dir", str(directory / "state"), *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    daemon = Memplugd(proc, directory, sock, fd_sock, log, 0.0)
    try:
        daemon.exec_to_serving = _wait_serving(daemon, started, timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _wait_serving(daemon: Memplugd, started: float, timeout: float) -> float:
    wait_answering(
        daemon.proc,
        daemon.socket,
        lambda stub: stub.GetStatus(pb.GetStatusRequest(), timeout=0.2, wait_for_ready=True),
        name="memplugd",
        since=started,
        timeout=timeout,
        tail=lambda: ":\n" + daemon.tail(),
    )
    return time.perf_counter() - started


def wait_answering(
    proc: subprocess.Popen[bytes],
    socket: Path,
    ask: Callable[[pb_grpc.MemplugStub], object],
    *,
    name: str,
    since: float,
    timeout: float,
    tail: Callable[[], str] = str,
) -> None:
    """Call ask(stub) on `socket` until it answers.

    Raises if the process exits first, or `timeout` seconds after `since` (a
    time.perf_counter() value); tail() is added to the error (the log's end).
    """
    deadline = since + timeout
    with grpc.insecure_channel(f"unix:{socket}", options=FAST_RECONNECT) as channel:
        stub = pb_grpc.MemplugStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}{tail()}")
            try:
                ask(stub)
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name} did not serve in {timeout:g} s{tail()}")
