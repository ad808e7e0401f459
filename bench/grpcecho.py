"""A gRPC server with no memplug code in it: the floor of grpcio alone.

It is built as memplugd builds its gRPC server (the same thread pool size and
message-size option, on a Unix socket) but without memplug's interceptors or
servicer, and serves memplug's own service with two no-op methods, so the
messages and the shapes of the calls are memplug's:

- GetRegion (unary) answers an empty Region;
- Plug (server stream) sends one Progress and ends, as a small plug does.

It runs as a process of its own, as the daemon does, so that its threads and
the benchmark's clients do not share one GIL. SIGTERM stops it.

    python -m bench.grpcecho SOCKET
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.memplugd import terminate, wait_answering
from memplug.daemon.server import GRPC_SERVER_OPTIONS, RPC_THREADS
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc


class NoOpServicer(pb_grpc.MemplugServicer):
    """Only the two methods the floors call; the others answer UNIMPLEMENTED."""

    def GetRegion(self, request: pb.GetRegionRequest, context: grpc.ServicerContext) -> pb.Region:
        return pb.Region()

    def Plug(self, request: pb.PlugRequest, context: grpc.ServicerContext) -> Iterator[pb.Progress]:
        yield pb.Progress(done_bytes=1, total_bytes=1)


def serve(socket: Path) -> None:
    """Serve on `socket` until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # As memplugd's _start_grpc, less its interceptor and services.
    server = grpc.server(
        ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="grpcecho-rpc"),
        options=GRPC_SERVER_OPTIONS,
    )
    # The generated add_ function, as memplugd registers its servicer. The stubs
    # declare every method abstract; at run time the base class answers the
    # methods left out with UNIMPLEMENTED.
    servicer = NoOpServicer()  # type: ignore[abstract]
    pb_grpc.add_MemplugServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        stop.wait()
    finally:
        server.stop(grace=1.0).wait()
        socket.unlink(missing_ok=True)


@dataclass
class GrpcEcho:
    proc: subprocess.Popen[bytes]
    socket: Path

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the exit status (0 when it stopped cleanly)."""
        return terminate(self.proc, timeout)


def start(socket: Path, timeout: float = 60.0) -> GrpcEcho:
    """Spawn the server on `socket` and wait until its GetRegion answers."""
    socket = socket.resolve()
    # bench/ is not installed: run it from the directory that holds it. Its stdout
    # would land in the markdown the benchmark prints; its stderr (a traceback) stays.
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bench.grpcecho", str(socket)]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL)
    server = GrpcEcho(proc, socket)
    try:
        wait_answering(
            proc,
            socket,
            lambda stub: stub.GetRegion(pb.GetRegionRequest(), timeout=0.2, wait_for_ready=True),
            name="bench.grpcecho",
            since=time.perf_counter(),
            timeout=timeout,
        )
    except BaseException:
        server.stop()
        raise
    return server


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
