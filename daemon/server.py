"""Builds the daemon and runs it: start-up order, systemd integration, reload, stop.

Start: fds systemd handed back -> lock the state dir -> state store -> engine
restores regions -> fd socket -> gRPC socket -> metrics -> READY=1. Stop: refuse
new calls -> cancel running operations (they roll back) -> close sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import logging
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memplug.common import memory
from memplug.common.errors import MemplugError, StartupError
from memplug.common.sizes import format_size
from memplug.daemon import __version__, metrics
from memplug.daemon.backings import Backing, BackingKind
from memplug.daemon.config import Config, environment_switches, metrics_address
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.strategy import CHUNK_BYTES
from memplug.daemon.metrics_http import MetricsServer
from memplug.daemon.state.lock import StateDirBusy, StateDirLock
from memplug.daemon.state.sqlite import SqliteStore
from memplug.daemon.systemd import Notifier, listen_fds, watchdog_interval
from memplug.daemon.transport.fdserver import FdServer
from memplug.daemon.transport.interceptors import MetricsInterceptor
from memplug.daemon.transport.servicer import MemplugServicer
from memplug.daemon.transport.streaming import OperationStreamer
from memplug.daemon.transport.unixsock import claim_socket_path
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

log = logging.getLogger("memplug.server")

# Each streaming Plug holds one while it runs; reads must still get through. The
# streamer gets as many coordinator threads, so every running call has one.
RPC_THREADS = 64
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates when no watchdog asks for more
# Settings a SIGHUP cannot change: they are bound or running until a restart.
RESTART_ONLY = (
    "socket",
    "fd_socket",
    "state_dir",
    "threads",
    "warm_pools",
    "socket_mode",
    "socket_group",
    "fd_socket_mode",
    "metrics",
)


class FdStore:
    """Keeps memfd regions in systemd's fd store, so they outlive a restart."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def region_created(self, name: str, backing: Backing) -> None:
        if backing.kind is not BackingKind.FILE:
            self.notifier.store_fd(name, backing.fd)

    def region_deleted(self, name: str, backing: Backing) -> None:
        if backing.kind is not BackingKind.FILE:
            self.notifier.remove_fd(name)


def apply_hugetlb_pools(pools: tuple[tuple[int, int], ...]) -> None:
    """Size the kernel's huge page pools as configured; say what the kernel gave."""
    for page_size, pages in pools:
        path = memory.HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB" / "nr_hugepages"
        try:
            path.write_text(str(pages))
            got = int(path.read_text())
        except OSError as exc:
            log.error("cannot set the %s hugetlb pool: %s", format_size(page_size), exc)
            continue
        level = logging.INFO if got == pages else logging.WARNING
        log.log(level, "hugetlb %s pool: %d of %d pages", format_size(page_size), got, pages)


def split_inherited(fds: list[tuple[int, str]]) -> tuple[int | None, dict[str, int]]:
    """Sockets (the activated fd socket) apart from memfds (regions, by name)."""
    listen: int | None = None
    regions: dict[str, int] = {}
    for fd, name in fds:
        if stat.S_ISSOCK(os.fstat(fd).st_mode) and listen is None:
            listen = fd
        elif name in regions:
            log.warning("systemd handed back two fds named %s; keeping the first", name)
            os.close(fd)
        else:
            regions[name] = fd
    return listen, regions


class Daemon:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.notifier = Notifier()
        self._server: grpc.Server | None = None
        self._store: SqliteStore | None = None
        self._stopped = threading.Event()
        self._health: threading.Thread | None = None
        self._health_servicer: health.HealthServicer | None = None
        self._metrics_server: MetricsServer | None = None
        self._state_lock: StateDirLock | None = None
        self.engine: RegionEngine
        self.fd_server: FdServer

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        config = self.config
        # First, before anything opens an fd: 3.. are systemd's.
        listen_fd, adopted = split_inherited(listen_fds())
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Before anything else is touched: a second daemon on this state must
        # change nothing (no socket, no pool, no store write), only refuse.
        try:
            self._state_lock = StateDirLock(config.state_dir)
        except StateDirBusy as exc:
            raise StartupError(str(exc)) from None
        config.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        claim_socket_path(config.socket)
        apply_hugetlb_pools(config.hugetlb_pools)
        try:
            self._store = SqliteStore(config.state_dir / "memplug.db")
        except Exception as exc:
            raise StartupError(f"cannot open the state in {config.state_dir}: {exc}") from exc
        switches = environment_switches()
        self.engine = RegionEngine(
            threads=config.threads,
            max_bytes=config.max_bytes,
            allow_dirs=list(config.allow_dirs),
            ticket_ttl=config.ticket_ttl,
            store=self._store,
            listener=FdStore(self.notifier),
            warm_pools=list(config.warm_pools),
            madv_populate=switches.madv_populate,
            memcg_check=switches.memcg_check,
        )
        metrics.REGISTRY.register(metrics.EngineCollector(self.engine))
        try:
            report = self.engine.restore(adopted)
        except MemplugError as exc:  # the store refused a reconciliation write
            raise StartupError(f"cannot restore the state in {config.state_dir}: {exc}") from exc
        for name in report.stray_fds:
            log.warning("systemd kept an fd named %s that matches no region: dropped", name)
            self.notifier.remove_fd(name)
        self.fd_server = FdServer(
            config.fd_socket, self.engine, mode=config.fd_socket_mode, listen_fd=listen_fd
        )
        try:
            self.fd_server.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.fd_socket}: {exc}") from exc
        self._start_grpc()
        if self.notifier.enabled:
            log.info("memfd regions are kept in systemd's fd store across restarts")
        else:
            log.warning(
                "no systemd (NOTIFY_SOCKET unset): memfd regions (shmem, hugetlb) will not "
                "outlive this process; file regions will"
            )
        self.notifier.ready(self.status_line())
        self._health = threading.Thread(
            target=self._health_loop, name="memplug-health", daemon=True
        )
        self._health.start()

    def _start_grpc(self) -> None:
        config, path = self.config, self.config.socket
        server = grpc.server(
            ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="memplug-rpc"),
            interceptors=[MetricsInterceptor()],
            options=[("grpc.max_receive_message_length", 1 << 20)],
        )
        streamer = OperationStreamer(coordinators=RPC_THREADS, inline_max_bytes=CHUNK_BYTES)
        servicer = MemplugServicer(
            self.engine, streamer, socket=str(path), fd_socket=str(config.fd_socket)
        )
        pb_grpc.add_MemplugServicer_to_server(servicer, server)
        # Stock health and reflection: grpcurl and grpc_health_probe work with no .proto.
        self._health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, server)
        services = (
            pb.DESCRIPTOR.services_by_name["Memplug"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        # grpc creates the socket under our umask: open no wider than the final
        # mode, even for the instant before the chmod.
        old_umask = os.umask(0o777 & ~config.socket_mode)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, config.socket_mode)
        if config.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(config.socket_group).gr_gid)
        server.start()
        self._server = server
        for service in ("", services[0]):
            self._health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics is not None:
            host, port = metrics_address(config.metrics)
            try:
                self._metrics_server = MetricsServer(host, port, metrics.REGISTRY)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {config.metrics}: {exc}") from exc
            self._metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", host, port)
        quota = format_size(config.max_bytes) if config.max_bytes is not None else "none"
        log.info(
            "memplugd %s serving on unix:%s, fd socket %s (threads=%d quota=%s allow_dirs=%s)",
            __version__,
            path,
            config.fd_socket,
            config.threads,
            quota,
            ",".join(map(str, config.allow_dirs)) or "-",
        )

    # ------------------------------------------------------------------ running

    def status_line(self) -> str:
        st = self.engine.status()
        return f"{st.regions} regions, {format_size(st.plugged_bytes)} plugged"

    def _serving(self) -> bool:
        """True if the gRPC socket answers a real call (what the watchdog vouches for)."""
        try:
            with grpc.insecure_channel(f"unix:{self.config.socket}") as channel:
                pb_grpc.MemplugStub(channel).GetStatus(pb.GetStatusRequest(), timeout=2.0)
            return True
        except grpc.RpcError as exc:
            log.error("health check: the gRPC socket does not answer: %s", exc)
            return False

    def _health_loop(self) -> None:
        interval = watchdog_interval()
        period = min(interval, STATUS_INTERVAL) if interval else STATUS_INTERVAL
        while not self._stopped.wait(period):
            if interval is not None:
                if not self._serving():
                    continue  # no ping: systemd restarts us when the watchdog runs out
                self.notifier.watchdog()
            self.engine.record_pending()
            self.notifier.status(self.status_line())

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; quota, allowed dirs and pools change live."""
        if self._reload_config is None:
            return
        self.notifier.reloading()
        try:
            new = self._reload_config()
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        else:
            self.engine.reconfigure(max_bytes=new.max_bytes, allow_dirs=list(new.allow_dirs))
            apply_hugetlb_pools(new.hugetlb_pools)
            later = [f for f in RESTART_ONLY if getattr(new, f) != getattr(self.config, f)]
            if later:
                log.warning("reload: %s take effect only after a restart", ", ".join(later))
            # Keep what is bound or running: the watchdog probes, and stop()
            # unlinks, the socket this process serves, not the configured one.
            self.config = dataclasses.replace(
                new, **{f: getattr(self.config, f) for f in RESTART_ONLY}
            )
            log.info("reloaded the configuration")
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------------ stop

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, cancel running operations (they roll back), release all."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._state_lock is None:
            return  # refused before touching anything: nothing to stop
        self.notifier.stopping()
        log.info("stopping: refusing new calls, cancelling running operations")
        if self._health_servicer is not None:
            self._health_servicer.enter_graceful_shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        stopped = self._server.stop(grace) if self._server else None
        if hasattr(self, "engine"):
            self.engine.shutdown(timeout=grace)
        if stopped is not None:
            stopped.wait(grace)
        if hasattr(self, "fd_server"):
            self.fd_server.stop()
        if self._store is not None:
            self._store.close()
        if self._state_lock is not None:
            self._state_lock.release()
        if self._server is not None:  # never unlink a socket we did not bind (a live daemon's)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
