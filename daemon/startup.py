"""The process's own start-up steps, apart from building the daemon (server.py).

Directories the daemon owns, its fd limit, the huge-page pools it is told to
size, the fds systemd (or a daemon handing over) passes in, and re-executing
itself with the region fds it holds. Each step either works or raises
StartupError with one line a person can act on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import resource
import stat
import sys
from pathlib import Path

from memplug.common import memory
from memplug.common.errors import StartupError
from memplug.common.sizes import format_size
from memplug.daemon.backings import Backing, BackingKind
from memplug.daemon.systemd import Notifier

log = logging.getLogger("memplug.server")

SD_LISTEN_FDS_START = 3


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


def apply_hugetlb_pools(pools: tuple[tuple[int, int], ...]) -> list[str]:
    """Size the kernel's huge page pools as configured; say (and return) what fell short."""
    problems = []
    for page_size, pages in pools:
        path = memory.HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB" / "nr_hugepages"
        try:
            path.write_text(str(pages))
            got = int(path.read_text())
        except OSError as exc:
            log.error("cannot set the %s hugetlb pool: %s", format_size(page_size), exc)
            problems.append(f"cannot set the {format_size(page_size)} hugetlb pool: {exc}")
            continue
        level = logging.INFO if got == pages else logging.WARNING
        log.log(level, "hugetlb %s pool: %d of %d pages", format_size(page_size), got, pages)
        if got != pages:
            problems.append(f"the {format_size(page_size)} hugetlb pool got {got} of {pages} pages")
    return problems


def make_own_dir(path: Path, mode: int, flag: str) -> None:
    """mkdir -p, or one line naming the flag that puts it elsewhere.

    A non-root daemon started with another user's HOME (sudo -u, setpriv)
    derives its default directories from that HOME and cannot create them.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        user = pwd_name(os.geteuid())
        raise StartupError(
            f"cannot use {path}: {exc.strerror or exc} (running as {user}); "
            f"give a directory this user may write with {flag}"
        ) from exc


def pwd_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def raise_nofile_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (a shell's 1024 is too few for a
    daemon holding regions and connections); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps fds at fs.nr_open anyway
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            return soft
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
        return soft
    log.info("raised RLIMIT_NOFILE from %d to its hard limit %d", soft, target)
    return target


def without_takeover(argv: list[str]) -> list[str]:
    """argv with every --takeover[=MODE] / --takeover MODE taken out."""
    out: list[str] = []
    skip_mode = False
    for arg in argv:
        if skip_mode and arg in ("must", "auto"):
            skip_mode = False
            continue
        skip_mode = arg == "--takeover"
        if skip_mode or arg.startswith("--takeover="):
            continue
        out.append(arg)
    return out


def reexec_with_fds(regions: dict[str, int]) -> None:
    """Replace this process by a fresh memplugd (same argv less --takeover, same pid)
    that finds regions as systemd passes its fd store: fds 3.., LISTEN_FDS, LISTEN_FDNAMES.

    Returns only if the exec failed.
    """
    names = list(regions)
    # Out of the way of 3..3+n first: a region fd may sit where another must go.
    floor = SD_LISTEN_FDS_START + len(names) + 16
    high = [fcntl.fcntl(regions[name], fcntl.F_DUPFD_CLOEXEC, floor) for name in names]
    for slot, fd in enumerate(high, start=SD_LISTEN_FDS_START):
        os.dup2(fd, slot, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names)
    )
    argv = [sys.executable, *without_takeover(sys.orig_argv[1:])]
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        log.critical("cannot re-execute %s: %s", sys.executable, exc)


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
