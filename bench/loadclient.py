"""One benchmark client in its own process, for the small-operation loads.

The clients of memplugd are other processes (a VMM, an allocator), each with
its own interpreter; so are these. Threads of the benchmark process would
share one GIL, which at 4 clients on 2 cores throttled the clients more
than the daemon.

Protocol on stdin/stdout, one line each: the client sets up and runs a
warm-up round, prints "ready"; then for every "go N" line it runs its steps
N times and prints {step: [seconds, ...]} as JSON; "exit" (or EOF) ends it.

    python -m bench.loadclient WORKLOAD SOCKET ECHO REGION

SOCKET is memplugd's gRPC socket, or bench.grpcecho's for the grpcio-alone
workloads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import echo
from bench.report import MiB
from memplug.client import Client
from memplug.client.attach import open_region, redeem
from memplug.client.client import CHANNEL_OPTIONS
from memplug.daemon.kernel import ops
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

BLOCK = 2 * MiB  # the small operations work on one 2 MiB block

Step = tuple[str, Callable[[], object]]

# The workloads, by name: what one client does in one cycle.
WORKLOADS = (
    "unix",  # bare Unix-socket round trip to an echo thread
    "unix-connect",  # connect, one round trip, close
    "health",  # the gRPC no-op: grpc.health.v1 Check
    "kernel",  # raw fallocate and punch of 2 MiB in this process
    "rpc+kernel",  # a gRPC no-op, then the raw kernel work: what a Plug or Unplug cannot avoid
    "status",
    "get",
    "plug",  # Plug then Unplug of one block
    "attach",  # the fd socket's OPEN alone, then Client.attach (OPEN and GetRegion)
    "ticket",  # gRPC Attach for a ticket, then its redeem on the fd socket
    # grpcio alone, against bench.grpcecho (no memplug code in the server):
    "grpc-unary",  # GetRegion answered with an empty Region
    "grpc-stream",  # Plug answered with a stream of one Progress
)
# The workloads whose SOCKET is bench.grpcecho's rather than memplugd's.
GRPC_ALONE = ("grpc-unary", "grpc-stream")


class _Setup:
    def __init__(self, workload: str, socket: Path, echo_path: Path, region: str) -> None:
        self.closers: list[Callable[[], object]] = []
        self.steps = self._steps(workload, socket, echo_path, region)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()

    def _health(self, socket: Path) -> Callable[[], object]:
        channel = grpc.insecure_channel(f"unix:{socket}")
        self.closers.append(channel.close)
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        return lambda: stub.Check(request, timeout=30)

    def _grpc_alone(self, socket: Path) -> pb_grpc.MemplugStub:
        # memplug's client's channel options: its Plug stream is read on the calling thread.
        channel = grpc.insecure_channel(f"unix:{socket}", options=CHANNEL_OPTIONS)
        self.closers.append(channel.close)
        return pb_grpc.MemplugStub(channel)

    def _memfd(self) -> int:
        fd = ops.memfd_create("memplug-bench-client", ops.MFD_CLOEXEC)
        self.closers.append(lambda: os.close(fd))
        os.ftruncate(fd, BLOCK)
        return fd

    def _client(self, socket: Path) -> Client:
        client = Client(socket, timeout=120.0)
        self.closers.append(client.close)
        return client

    def _steps(self, workload: str, socket: Path, echo_path: Path, region: str) -> list[Step]:
        if workload == "unix":
            sock = echo.connect(echo_path)
            self.closers.append(sock.close)
            return [("unix round trip", lambda: echo.round_trip(sock))]
        if workload == "unix-connect":
            return [("unix connect + round trip", lambda: echo.connect_round_trip(echo_path))]
        if workload == "health":
            return [("gRPC health Check", self._health(socket))]
        if workload == "kernel":
            fd = self._memfd()
            return [
                ("raw fallocate 2 MiB", lambda: ops.fallocate(fd, 0, BLOCK)),
                ("raw punch 2 MiB", lambda: ops.punch_hole(fd, 0, BLOCK)),
            ]
        if workload == "rpc+kernel":
            fd, check = self._memfd(), self._health(socket)

            def then(work: Callable[[], None]) -> Callable[[], None]:
                def step() -> None:
                    check()
                    work()

                return step

            return [
                ("gRPC no-op + raw fallocate", then(lambda: ops.fallocate(fd, 0, BLOCK))),
                ("gRPC no-op + raw punch", then(lambda: ops.punch_hole(fd, 0, BLOCK))),
            ]
        if workload == "grpc-unary":
            stub, get = self._grpc_alone(socket), pb.GetRegionRequest(name=region)
            return [("grpcio unary no-op", lambda: stub.GetRegion(get, timeout=30))]
        if workload == "grpc-stream":
            stub, plug = self._grpc_alone(socket), pb.PlugRequest(name=region, length=BLOCK)
            # Read to the end of the stream, as Client.plug does.
            return [("grpcio one-message stream", lambda: list(stub.Plug(plug, timeout=30)))]
        c = self._client(socket)
        if workload == "status":
            return [("GetStatus", c.status)]
        if workload == "get":
            return [("GetRegion", lambda: c.get_region(region))]
        if workload == "plug":
            return [
                ("Plug 2 MiB", lambda: c.plug(region, 0, BLOCK)),
                ("Unplug 2 MiB", lambda: c.unplug(region, 0, BLOCK)),
            ]
        if workload == "attach":
            fd_socket = str(socket.parent / "fd.sock")  # beside the gRPC socket (bench.memplugd)

            def open_fd() -> None:
                fd, _ = open_region(fd_socket, region, "rw")
                os.close(fd)

            # The regions are partly plugged (the plug workload plugs block 0 only):
            # Client.attach asks GetRegion for the plugged ranges.
            return [
                ("fd socket OPEN", open_fd),
                ("Attach", lambda: c.attach(region, map_memory=False, sparse=True).close()),
            ]
        if workload == "ticket":

            def by_ticket() -> None:
                ticket = c.ticket(region)
                fd, _ = redeem(ticket.fd_socket, ticket.ticket)
                os.close(fd)

            return [("Attach by ticket", by_ticket)]
        raise SystemExit(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")


def run(steps: list[Step], iterations: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(iterations):
        for name, fn in steps:
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def main(argv: list[str]) -> int:
    workload, socket, echo_path, region = argv
    setup = _Setup(workload, Path(socket), Path(echo_path), region)
    try:
        run(setup.steps, 5)  # connect and warm every path once
        print("ready", flush=True)
        for line in sys.stdin:
            command, _, count = line.strip().partition(" ")
            if command != "go":
                break
            print(json.dumps(run(setup.steps, int(count))), flush=True)
    finally:
        setup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
