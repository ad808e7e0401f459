"""Builds the daemon: engine, gRPC server on its Unix socket; start and stop order."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from memplug.daemon import __version__
from memplug.daemon.config import Config
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.ranges import format_size
from memplug.daemon.transport.fdserver import FdServer
from memplug.daemon.transport.servicer import MemplugServicer
from memplug.daemon.transport.unixsock import StartupError, claim_socket_path
from memplug.v1 import memplug_pb2_grpc as pb_grpc

log = logging.getLogger("memplug.server")

RPC_THREADS = 64  # each streaming Plug holds one while it runs; reads must still get through


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = RegionEngine(
            threads=config.threads,
            max_bytes=config.max_bytes,
            allow_dirs=list(config.allow_dirs),
            ticket_ttl=config.ticket_ttl,
        )
        self.fd_server = FdServer(config.fd_socket, self.engine, mode=config.fd_socket_mode)
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        claim_socket_path(path)
        try:
            self.fd_server.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {self.config.fd_socket}: {exc}") from exc
        server = grpc.server(
            ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="memplug-rpc"),
            options=[("grpc.max_receive_message_length", 1 << 20)],
        )
        servicer = MemplugServicer(
            self.engine, socket=str(path), fd_socket=str(self.config.fd_socket)
        )
        pb_grpc.add_MemplugServicer_to_server(servicer, server)
        # The socket is created by grpc under our umask: open no wider than the
        # final mode, even for the instant before the chmod.
        old_umask = os.umask(0o777 & ~self.config.socket_mode)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.socket_mode)
        if self.config.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
        server.start()
        self._server = server
        quota = format_size(self.config.max_bytes) if self.config.max_bytes is not None else "none"
        log.info(
            "memplugd %s serving on unix:%s, fd socket %s (threads=%d quota=%s allow_dirs=%s)",
            __version__,
            path,
            self.config.fd_socket,
            self.config.threads,
            quota,
            ",".join(map(str, self.config.allow_dirs)) or "-",
        )
        log.warning("memfd regions (shmem, hugetlb) live in this process: they do not outlive it")

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, cancel running operations (they roll back), release all."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping: refusing new calls, cancelling running operations")
        stopped = self._server.stop(grace) if self._server else None
        self.engine.shutdown(timeout=grace)
        if stopped is not None:
            stopped.wait(grace)
        self.fd_server.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
