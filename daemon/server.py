"""Builds the daemon and runs it: start-up order, systemd integration, reload, stop.

Start: fds systemd handed back -> lock the state dir -> state store -> engine
restores regions -> fd socket -> gRPC socket -> metrics -> READY=1. Stop: refuse
new calls -> cancel running operations (they roll back) -> close sockets.
With --takeover the fds and the lock come from the running daemon instead
(takeover.py), and the sockets are claimed once it has let go; --takeover=auto
does that when a daemon holds the state dir's lock and starts normally when
none does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memplug.common.errors import MemplugError, StartupError
from memplug.common.sizes import format_size
from memplug.daemon import __version__, metrics
from memplug.daemon.backings import BackingKind
from memplug.daemon.config import (
    Config,
    environment_switches,
    metrics_address,
    service_environment,
)
from memplug.daemon.engine.engine import RegionEngine
from memplug.daemon.engine.strategy import CHUNK_BYTES
from memplug.daemon.metrics_http import MetricsServer
from memplug.daemon.startup import (
    FdStore,
    apply_hugetlb_pools,
    make_own_dir,
    pwd_name,
    raise_nofile_limit,
    reexec_with_fds,
    split_inherited,
)
from memplug.daemon.state.lock import StateDirBusy, StateDirLock
from memplug.daemon.state.sqlite import SCHEMA_VERSION, SqliteStore
from memplug.daemon.systemd import (
    Notifier,
    listen_fds,
    watchdog_interval,
    write_reload_result,
)
from memplug.daemon.takeover import (
    NoDaemonToTakeOver,
    Taken,
    TakeoverListener,
    socket_path,
    take_over,
)
from memplug.daemon.transport.fdlimits import FdLimits
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
# A request larger than this is refused before it is parsed; the longest list of
# ranges a call may carry (4096) encodes in under 128 KiB.
GRPC_SERVER_OPTIONS = [("grpc.max_receive_message_length", 1 << 20)]
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates when no watchdog asks for more
# Settings a SIGHUP cannot change: they are bound or running until a restart.
RESTART_ONLY = (
    "socket",
    "fd_socket",
    "state_dir",
    "threads",
    "warm_pools",
    "hugetlb_budgets",
    "hugetlb_keep",
    "socket_mode",
    "socket_group",
    "fd_socket_mode",
    "metrics",
)
# Seconds a daemon handing over gives running calls to finish or roll back.
HANDOVER_GRACE = 10.0
# `memplugd --takeover` with MEMPLUG_TAKEOVER_EXIT_AFTER_FDS=1 exits with this.
EXIT_AFTER_FDS = 3
# --takeover: no (start normally), must (take over or fail), auto (take over if one runs).
TakeoverMode = Literal["no", "must", "auto"]


class Daemon:
    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        *,
        takeover: TakeoverMode = "no",
    ) -> None:
        self.config = config
        self._takeover = takeover
        self._takeover_listener: TakeoverListener | None = None
        self._handing_over = threading.Event()
        self.handed_over = threading.Event()  # the process may exit 0: a new one serves
        self._nofile = 0
        self._reload_config = reload_config
        self.notifier = Notifier(service_environment())
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
        listen_fd, adopted = split_inherited(listen_fds(service_environment()))
        nofile = self._nofile = raise_nofile_limit()
        make_own_dir(config.state_dir, 0o700, "--state-dir DIR (or set XDG_STATE_HOME)")
        switches = environment_switches()
        taken: Taken | None = None
        if self._takeover == "must":
            taken = self._take_over(
                adopted,
                nofile,
                switches.takeover_timeout,
                exit_after_fds=switches.takeover_exit_after_fds,
            )
        elif self._takeover == "auto":
            taken = self._take_over_if_running(
                adopted,
                nofile,
                switches.takeover_timeout,
                exit_after_fds=switches.takeover_exit_after_fds,
            )
        if taken is None:
            # Before anything else is touched: a second daemon on this state must
            # change nothing (no socket, no pool, no store write), only refuse.
            if self._state_lock is None:
                try:
                    self._state_lock = StateDirLock(config.state_dir)
                except StateDirBusy as exc:
                    raise StartupError(str(exc)) from None
            make_own_dir(config.socket.parent, 0o755, "--socket PATH (or set XDG_RUNTIME_DIR)")
            claim_socket_path(config.socket)
        apply_hugetlb_pools(config.hugetlb_pools)
        try:
            self._store = SqliteStore(config.state_dir / "memplug.db")
        except Exception as exc:
            raise StartupError(
                f"cannot open the state in {config.state_dir}: {exc} (running as "
                f"{pwd_name(os.geteuid())}); give a directory this user may write with "
                "--state-dir DIR"
            ) from exc
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
            hugetlb_budgets=list(config.hugetlb_budgets),
            hugetlb_keep=config.hugetlb_keep,
        )
        metrics.REGISTRY.register(metrics.EngineCollector(self.engine))
        try:
            report = self.engine.restore(adopted)
        except MemplugError as exc:  # the store refused a reconciliation write
            raise StartupError(f"cannot restore the state in {config.state_dir}: {exc}") from exc
        for name in report.stray_fds:
            log.warning("systemd kept an fd named %s that matches no region: dropped", name)
            self.notifier.remove_fd(name)
        if taken is not None:
            # Every region is ours now: the old daemon closes its copies and exits.
            taken.confirm(switches.takeover_timeout)
            if switches.takeover_kill_after_committed:
                os.kill(os.getpid(), signal.SIGKILL)
                os._exit(128 + signal.SIGKILL)  # PID 1 of a container ignores its own SIGKILL
            assert self._state_lock is not None
            self._state_lock.claim()
            make_own_dir(config.socket.parent, 0o755, "--socket PATH (or set XDG_RUNTIME_DIR)")
            claim_socket_path(config.socket)
        self._start_fd_server(listen_fd)
        self._start_grpc()
        self._start_metrics()
        self._takeover_listener = TakeoverListener(
            socket_path(config.state_dir),
            self,
            schema=SCHEMA_VERSION,
            version=__version__,
            timeout=switches.takeover_timeout,
        )
        try:
            self._takeover_listener.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {self._takeover_listener.path}: {exc}") from exc
        if taken is not None:
            taken.serving()  # the old daemon drops its copies of the regions and exits
        if self.notifier.enabled:
            log.info(
                "memfd regions are kept in systemd's fd store across restarts; systemd "
                "empties it at `systemctl stop` unless FileDescriptorStorePreserve=yes "
                "(systemd >= 254)"
            )
        else:
            log.warning(
                "no systemd (NOTIFY_SOCKET unset): memfd regions (shmem, hugetlb) will not "
                "outlive this process, except by a take-over (memplugd --takeover); file "
                "regions will"
            )
        self.notifier.ready(self.status_line())
        self._health = threading.Thread(
            target=self._health_loop, name="memplug-health", daemon=True
        )
        self._health.start()

    def _take_over_if_running(
        self, adopted: dict[str, int], nofile: int, timeout: float, *, exit_after_fds: bool
    ) -> Taken | None:
        """--takeover=auto: the state-dir lock says whether a daemon runs.

        Free: none does (a dead one's sockets are stale), start normally holding
        it. Held: take over from its holder. Of two starters at once the lock
        lets one start; the other finds it held and takes over from the first
        once that one listens, or is refused.
        """
        state_dir = self.config.state_dir
        try:
            self._state_lock = StateDirLock(state_dir)
        except StateDirBusy:
            pass
        else:
            log.info("--takeover=auto: no memplugd runs on %s: starting afresh", state_dir)
            return None
        try:
            return self._take_over(adopted, nofile, timeout, exit_after_fds=exit_after_fds)
        except NoDaemonToTakeOver:
            pass
        # The holder may have ended between the two steps: then the lock is free now.
        try:
            self._state_lock = StateDirLock(state_dir)
        except StateDirBusy as exc:
            raise StartupError(
                f"the state dir {state_dir} is held by memplugd pid {exc.holder}, which does "
                f"not take a take-over now (it is starting, or handing over to another "
                f"memplugd): try again in a moment"
            ) from None
        log.info("--takeover=auto: the memplugd on %s ended meanwhile: starting afresh", state_dir)
        return None

    def _take_over(
        self, adopted: dict[str, int], nofile: int, timeout: float, *, exit_after_fds: bool
    ) -> Taken:
        """Take the running daemon's lock and region fds (into adopted)."""
        taken = take_over(
            self.config.state_dir,
            schema=SCHEMA_VERSION,
            version=__version__,
            nofile=nofile,
            timeout=timeout,
            after_fds=(lambda: os._exit(EXIT_AFTER_FDS)) if exit_after_fds else None,
        )
        for name, fd in taken.regions.items():
            stale = adopted.pop(name, None)
            if stale is not None:  # the running daemon's fd is the region's memory now
                os.close(stale)
            adopted[name] = fd
        taken.regions = {}  # restore() owns (and closes) them from here
        try:
            self._state_lock = StateDirLock.adopt(taken.lock_fd, self.config.state_dir)
        except (StateDirBusy, OSError) as exc:
            taken.conn.close()
            raise StartupError(f"cannot take the state dir's lock over: {exc}") from exc
        return taken

    def _start_fd_server(self, listen_fd: int | None) -> None:
        config = self.config
        self.fd_server = FdServer(
            config.fd_socket,
            self.engine,
            mode=config.fd_socket_mode,
            listen_fd=listen_fd,
            limits=FdLimits.for_nofile(self._nofile),
        )
        try:
            self.fd_server.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.fd_socket}: {exc}") from exc

    def _start_grpc(self) -> None:
        config, path = self.config, self.config.socket
        server = grpc.server(
            ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="memplug-rpc"),
            interceptors=[MetricsInterceptor()],
            options=GRPC_SERVER_OPTIONS,
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

    def _start_metrics(self) -> None:
        config = self.config
        if config.metrics is not None:
            host, port = metrics_address(config.metrics)
            try:
                self._metrics_server = MetricsServer(host, port, metrics.REGISTRY)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {config.metrics}: {exc}") from exc
            self._metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", host, port)

    # ------------------------------------------------------------------ take-over given

    def region_count(self) -> int:
        return sum(1 for r in self.engine.list_regions() if r.backing is not BackingKind.FILE)

    def quiesce(self) -> tuple[int, dict[str, int]]:
        """Stop serving as stop() does, but keep the regions, the store and the lock."""
        assert self._state_lock is not None and self._state_lock.fd is not None
        self._handing_over.set()
        if self._health_servicer is not None:
            self._health_servicer.enter_graceful_shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        stopped = self._server.stop(HANDOVER_GRACE) if self._server else None
        self._server = None
        try:
            regions = self.engine.quiesce(HANDOVER_GRACE)
        finally:
            if stopped is not None:
                stopped.wait(HANDOVER_GRACE)
            self.fd_server.stop()
            del self.fd_server  # stopped for good: stop() must not stop it again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        return self._state_lock.fd, regions

    def resume(self, why: str) -> None:
        """The take-over failed: serve again on fresh sockets, with every region."""
        self.engine.resume()
        try:
            self._start_fd_server(None)
            claim_socket_path(self.config.socket)
            self._start_grpc()
            self._start_metrics()
        except (StartupError, OSError) as exc:
            log.critical("cannot serve again after a failed take-over: %s; exiting", exc)
            self.notifier.stopping()
            os._exit(1)  # a daemon that serves nothing must not look alive
        self._handing_over.clear()
        log.warning("serving again: the take-over failed (%s)", why)

    def commit(self) -> None:
        """A new daemon owns the state now: close the engine, the store and our lock."""
        self._stopped.set()
        self.engine.shutdown(timeout=HANDOVER_GRACE)
        if self._store is not None:
            self._store.close()
        if self._state_lock is not None:
            self._state_lock.release()  # the new daemon's copy of the lock stays held

    def finish(self) -> None:
        """A new daemon serves every region: let the process exit 0."""
        log.info("handed over: exiting")
        self.handed_over.set()

    def revive(self, regions: dict[str, int]) -> None:
        """The new daemon died between commit() and serving: this process starts
        afresh on the store with the region fds it kept (returns if it cannot)."""
        reexec_with_fds(regions)

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
        interval = watchdog_interval(service_environment())
        period = min(interval, STATUS_INTERVAL) if interval else STATUS_INTERVAL
        while not self._stopped.wait(period):
            if interval is not None:
                if not self._serving():
                    continue  # no ping: systemd restarts us when the watchdog runs out
                self.notifier.watchdog()
            if not self._handing_over.is_set():  # the store may be another daemon's now
                self.engine.record_pending()
            self.notifier.status(self.status_line())

    def reload(self) -> tuple[bool, str]:
        """SIGHUP: re-read the configuration; quota, allowed dirs and pools change live.

        Returns (applied, what happened), also written to the state dir for
        `memplugd --reload-running` (ExecReload=) to report.
        """
        started_ns = time.monotonic_ns()
        if self._reload_config is None:
            return True, "nothing to reload"
        self.notifier.reloading()
        ok, message = self._reload()
        write_reload_result(self.config.state_dir, started_ns=started_ns, ok=ok, message=message)
        self.notifier.ready(self.status_line())
        return ok, message

    def _reload(self) -> tuple[bool, str]:
        assert self._reload_config is not None
        try:
            new = self._reload_config()
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False, f"reload failed, keeping the running configuration: {exc}"
        self.engine.reconfigure(max_bytes=new.max_bytes, allow_dirs=list(new.allow_dirs))
        problems = apply_hugetlb_pools(new.hugetlb_pools)
        later = [f for f in RESTART_ONLY if getattr(new, f) != getattr(self.config, f)]
        notes = []
        if later:
            note = f"{', '.join(later)} take effect only after a restart"
            log.warning("reload: %s", note)
            notes.append(note)
        # Keep what is bound or running: the watchdog probes, and stop()
        # unlinks, the socket this process serves, not the configured one.
        self.config = dataclasses.replace(new, **{f: getattr(self.config, f) for f in RESTART_ONLY})
        if problems:
            return False, "reloaded the configuration, but " + "; ".join(problems + notes)
        log.info("reloaded the configuration")
        return True, "; ".join(["reloaded the configuration", *notes])

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
        if self._takeover_listener is not None:
            self._takeover_listener.stop()
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
