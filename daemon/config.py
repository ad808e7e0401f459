"""Daemon configuration: embedded defaults <- TOML file (--config) <- flags, merged once."""

from __future__ import annotations

import argparse
import grp
import os
import sys
import tomllib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from memplug.common.errors import InvalidArgument, StartupError
from memplug.common.paths import FD_SOCKET_NAME, SOCKET_NAME, runtime_dir
from memplug.common.sizes import parse_size
from memplug.daemon.engine.hugegrowth import Budget
from memplug.daemon.engine.warmpool import PoolSpec
from memplug.daemon.kernel import hugepools


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/memplug")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "memplug"


@dataclass(frozen=True)
class Switches:
    """Environment switches for tests and diagnosis, read once, here and nowhere else."""

    # MEMPLUG_DISABLE_MADV_POPULATE=1: plug by fallocate and populate by touching
    # pages, as on a kernel without MADV_POPULATE_* (runs the fallback paths).
    madv_populate: bool = True
    # MEMPLUG_MEMCG_CHECK=0: skip the memory cgroup headroom check before a plug
    # (the OOM-safe helper processes still keep the daemon alive).
    memcg_check: bool = True
    # MEMPLUG_TAKEOVER_TIMEOUT=SECONDS: how long a daemon handing over waits for the
    # new one at each step before it serves again (default 30).
    takeover_timeout: float = 30.0
    # MEMPLUG_TAKEOVER_EXIT_AFTER_FDS=1: `memplugd --takeover` exits (status 3) once
    # every fd has come, before it restores: the new daemon dying mid-way.
    takeover_exit_after_fds: bool = False
    # MEMPLUG_TAKEOVER_KILL_AFTER_COMMITTED=1: `memplugd --takeover` sends itself
    # SIGKILL right after the old daemon said `committed`, before it serves: the
    # new daemon dying once the old one has let go of everything (as PID 1 of a
    # container, which its own SIGKILL spares, it exits 137 instead).
    takeover_kill_after_committed: bool = False


def environment_switches(environ: Mapping[str, str] = os.environ) -> Switches:
    try:
        takeover_timeout = float(environ.get("MEMPLUG_TAKEOVER_TIMEOUT", "30"))
    except ValueError:
        raise StartupError(
            f"MEMPLUG_TAKEOVER_TIMEOUT={environ['MEMPLUG_TAKEOVER_TIMEOUT']!r} is not a number"
        ) from None
    return Switches(
        madv_populate=environ.get("MEMPLUG_DISABLE_MADV_POPULATE") != "1",
        memcg_check=environ.get("MEMPLUG_MEMCG_CHECK", "1") != "0",
        takeover_timeout=takeover_timeout,
        takeover_exit_after_fds=environ.get("MEMPLUG_TAKEOVER_EXIT_AFTER_FDS") == "1",
        takeover_kill_after_committed=(environ.get("MEMPLUG_TAKEOVER_KILL_AFTER_COMMITTED") == "1"),
    )


def service_environment() -> MutableMapping[str, str]:
    """The process environment, where systemd passes NOTIFY_SOCKET, WATCHDOG_* and
    LISTEN_*: daemon/systemd.py reads them from what this returns, and takes
    LISTEN_* out so that children do not inherit them."""
    return os.environ


def under_journald(environ: Mapping[str, str] = os.environ) -> bool:
    """True if stderr is the journal stream systemd set up (journald stamps each line).

    systemd documents the check: $JOURNAL_STREAM is "DEVICE:INODE" of the
    stream it connected, and counts only if stderr is still that stream (a
    child whose stderr was redirected inherits the variable, not the journal).
    """
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit() or sys.stderr is None:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


@dataclass(frozen=True)
class Config:
    socket: Path = field(default_factory=lambda: runtime_dir() / SOCKET_NAME)
    fd_socket: Path = field(default_factory=lambda: runtime_dir() / FD_SOCKET_NAME)
    state_dir: Path = field(default_factory=default_state_dir)
    allow_dirs: tuple[Path, ...] = ()
    max_bytes: int | None = None  # quota on plugged bytes across regions; None: no quota
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    socket_mode: int = 0o660
    socket_group: str | None = None
    fd_socket_mode: int = 0o666  # the consumer plane: identity is checked per region
    ticket_ttl: float = 10.0
    hugetlb_pools: tuple[tuple[int, int], ...] = ()  # (page size, pages) set at start and reload
    hugetlb_budgets: tuple[Budget, ...] = ()  # pools a plug may grow, and by how much
    hugetlb_keep: bool = False  # keep the pages added for plugs instead of giving them back
    log_level: str = "info"
    log_format: str = "text"  # "text" (key=value) or "json"
    warm_pools: tuple[PoolSpec, ...] = ()
    metrics: str | None = None  # HOST:PORT for Prometheus; None: off

    def validate(self) -> Config:
        if self.threads < 1:
            raise InvalidArgument("threads must be >= 1")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise InvalidArgument("max-bytes must be >= 0")
        for name, mode in (
            ("socket-mode", self.socket_mode),
            ("fd-socket-mode", self.fd_socket_mode),
        ):
            if mode & ~0o777:
                raise InvalidArgument(f"{name} {mode:o} is not a file mode")
        if not 0 < self.ticket_ttl <= 3600:
            raise InvalidArgument("ticket-ttl must be between 0 and 3600 seconds")
        if self.socket_group is not None:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise InvalidArgument(
                    f"socket-group {self.socket_group!r}: no such group"
                ) from None
        for d in self.allow_dirs:
            if not d.is_dir():
                raise InvalidArgument(f"allow-dir {d} is not a directory")
        for budget in self.hugetlb_budgets:
            if not hugepools.pool_dir(budget.page_size, budget.node).is_dir():
                where = "" if budget.node is None else f" on NUMA node {budget.node}"
                raise InvalidArgument(
                    f"hugetlb-budget: the kernel offers no pool of {budget.page_size // 1024} KiB "
                    f"pages{where} (see /sys/kernel/mm/hugepages and "
                    "/sys/devices/system/node/node*/hugepages)"
                )
        if self.log_format not in ("text", "json"):
            raise InvalidArgument(f"log-format {self.log_format!r}: use text or json")
        if self.metrics is not None:
            metrics_address(self.metrics)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise InvalidArgument(
                f"log-level {self.log_level!r}: use debug, info, warning or error"
            )
        return self


def metrics_address(text: str) -> tuple[str, int]:
    """'9464' or ':9464' -> loopback; 'HOST:PORT' as given."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"metrics {text!r}: use PORT or HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _coerce(key: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type."""
    if key in ("socket", "fd_socket", "state_dir"):
        return Path(value)
    if key == "allow_dirs":
        values = [value] if isinstance(value, str) else list(value)
        return tuple(Path(v).resolve() for v in values)
    if key == "max_bytes":
        return (
            None
            if value in (None, "", "none")
            else (value if isinstance(value, int) else parse_size(str(value)))
        )
    if key == "threads":
        return int(value)
    if key == "warm_pools":
        values = [value] if isinstance(value, str) else list(value)
        return tuple(PoolSpec.parse(str(v)) for v in values)
    if key == "hugetlb_pools":
        values = [value] if isinstance(value, str) else list(value)
        return tuple(_pool(v) for v in values)
    if key == "hugetlb_budgets":
        values = [value] if isinstance(value, str) else list(value)
        return tuple(Budget.parse(str(v)) for v in values)
    if key == "hugetlb_keep":
        if not isinstance(value, bool):
            raise InvalidArgument(f"hugetlb-keep {value!r}: use true or false")
        return value
    if key == "ticket_ttl":
        return float(value)
    if key in ("socket_mode", "fd_socket_mode"):
        return value if isinstance(value, int) else int(str(value), 8)
    return value


def _pool(text: str) -> tuple[int, int]:
    size, sep, count = str(text).partition(":")
    if not sep or not count.isdigit():
        raise InvalidArgument(f"hugetlb-pool {text!r}: use PAGESIZE:PAGES, e.g. 2M:512")
    return parse_size(size), int(count)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memplugd",
        description="memplug daemon: plugs and populates memfd-backed memory regions "
        "and hands them to other processes.",
    )
    p.add_argument("--config", type=Path, help="TOML file; its keys are these flags' names")
    p.add_argument(
        "--socket",
        help="gRPC Unix socket (default /run/memplug/memplug.sock as root)",
        default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--fd-socket", dest="fd_socket", default=argparse.SUPPRESS, help="fd hand-off Unix socket"
    )
    p.add_argument(
        "--state-dir",
        dest="state_dir",
        default=argparse.SUPPRESS,
        help="directory for the daemon's state",
    )
    p.add_argument(
        "--allow-dir",
        dest="allow_dirs",
        action="append",
        default=argparse.SUPPRESS,
        help="directory where FILE regions may live (repeatable)",
    )
    p.add_argument(
        "--max-bytes",
        dest="max_bytes",
        default=argparse.SUPPRESS,
        help="quota on plugged bytes across all regions, e.g. 64G",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=argparse.SUPPRESS,
        help="worker threads for plug and populate (default: CPUs available)",
    )
    p.add_argument(
        "--socket-mode",
        dest="socket_mode",
        default=argparse.SUPPRESS,
        help="octal mode of the gRPC socket (default 660)",
    )
    p.add_argument(
        "--socket-group",
        dest="socket_group",
        default=argparse.SUPPRESS,
        help="group owning the gRPC socket (its members manage regions)",
    )
    p.add_argument(
        "--log-level",
        dest="log_level",
        default=argparse.SUPPRESS,
        help="debug, info, warning or error (default info)",
    )
    p.add_argument(
        "--fd-socket-mode",
        dest="fd_socket_mode",
        default=argparse.SUPPRESS,
        help="octal mode of the fd socket (default 666: the ACL decides per region)",
    )
    p.add_argument(
        "--ticket-ttl",
        dest="ticket_ttl",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds an attach ticket stays valid (default 10)",
    )
    p.add_argument(
        "--hugetlb-pool",
        dest="hugetlb_pools",
        action="append",
        default=argparse.SUPPRESS,
        help="PAGESIZE:PAGES, e.g. 2M:512: size the kernel's pool at start and on SIGHUP "
        "(repeatable)",
    )
    p.add_argument(
        "--hugetlb-budget",
        dest="hugetlb_budgets",
        action="append",
        default=argparse.SUPPRESS,
        help="PAGESIZE:MAX[@NODE], e.g. 2M:8G or 1G:16G@0: a hugetlb plug may grow that pool "
        "by the pages it lacks, up to MAX in all; they are given back once free (repeatable)",
    )
    p.add_argument(
        "--hugetlb-keep",
        dest="hugetlb_keep",
        action="store_true",
        default=argparse.SUPPRESS,
        help="keep the huge pages added under --hugetlb-budget in the pool once free",
    )
    p.add_argument(
        "--metrics",
        default=argparse.SUPPRESS,
        help="serve Prometheus metrics on [HOST:]PORT (default off; host 127.0.0.1)",
    )
    p.add_argument(
        "--log-format",
        dest="log_format",
        choices=["text", "json"],
        default=argparse.SUPPRESS,
        help="one line per event: key=value (default) or JSON",
    )
    p.add_argument(
        "--warm-pool",
        dest="warm_pools",
        action="append",
        default=argparse.SUPPRESS,
        help="BACKING:SIZE:COUNT[:PAGESIZE], e.g. shmem:1G:2: keep COUNT pre-plugged memfds "
        "ready for matching CreateRegion calls (repeatable; within the quota)",
    )
    p.add_argument(
        "--reload-running",
        dest="reload_running",
        type=int,
        metavar="PID",
        default=None,
        help="ask the running memplugd PID (same --state-dir) to reload its configuration, "
        "wait for its answer and exit 0 if it was applied, 1 if not (for ExecReload=)",
    )
    p.add_argument(
        "--takeover",
        nargs="?",
        const="must",
        default="no",
        choices=["must", "auto"],
        help="take every region over from the memplugd running on this --state-dir (an "
        "upgrade or restart without systemd): it hands over and exits, this one serves on "
        "the same sockets; --takeover=auto takes over if one runs and starts normally if "
        "none does (a container or DaemonSet entrypoint)",
    )
    p.add_argument(
        "--after-handover",
        dest="after_handover",
        choices=["exit", "wait"],
        default="exit",
        help="what this daemon does once it has handed over to a new one: exit 0 (default), "
        "or wait idle for SIGTERM (under a supervisor that restarts a container that exits, "
        "such as a Kubernetes DaemonSet)",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def load(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args = parser().parse_args(argv)
    settings: dict[str, Any] = {}
    names = {f.name for f in fields(Config)}
    if args.config is not None:
        try:
            with args.config.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read config {args.config}: {exc}") from exc
        for key, value in data.items():
            norm = key.replace("-", "_")
            norm = {
                "allow_dir": "allow_dirs",
                "hugetlb_pool": "hugetlb_pools",
                "hugetlb_budget": "hugetlb_budgets",
                "warm_pool": "warm_pools",
            }.get(norm, norm)
            if norm not in names:
                raise InvalidArgument(f"config {args.config}: unknown key {key!r}")
            settings[norm] = value
    for name in names:
        if name in vars(args):
            settings[name] = getattr(args, name)
    config = replace(Config(), **{k: _coerce(k, v) for k, v in settings.items()})
    return config.validate(), args
