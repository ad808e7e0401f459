"""Builds the daemon: engine, gRPC server on its Unix socket; start and stop order."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from memplug.daemon import __version__
from memplug.daemon.config import Config
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.ranges import format_size
from memplug.daemon.transport.servicer import MemplugServicer
from memplug.v1 import memplug_pb2_grpc as pb_grpc

log = logging.getLogger("memplug.server")

RPC_THREADS = 64  # each streaming Plug holds one while it runs; reads must still get through


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def claim_socket_path(path: Path) -> None:
    """Make way for our socket: replace a dead daemon's, never a live one's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket: remove it or pick another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("replaced the stale socket %s of a daemon that is gone", path)
        return
    except TimeoutError:
        raise StartupError(
            f"{path} belongs to a daemon that does not answer; stop it first"
        ) from None
    finally:
        probe.close()
    raise StartupError(f"another memplugd is already serving on {path}; stop it first")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = RegionEngine(
            threads=config.threads,
            max_bytes=config.max_bytes,
            allow_dirs=list(config.allow_dirs),
        )
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        claim_socket_path(path)
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
            "memplugd %s serving on unix:%s (threads=%d quota=%s allow_dirs=%s)",
            __version__,
            path,
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
