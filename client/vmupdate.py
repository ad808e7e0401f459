"""Live update of a QEMU whose guest RAM is a memplug region: a new QEMU takes over the VM.

The old QEMU maps the region with a share=on memory backend; the new one is
started on the same region by `memplug exec` (so it gets its own fd of the
region, as the old did) with `-incoming defer`. With the migration capability
x-ignore-shared on both, `migrate` sends only the device state: the RAM is
the region both map. The region is held (HoldRegion) from before the new QEMU
starts until the old one has quit, so nobody unplugs, discards or deletes it
in between; the hold is released at the end, whatever happened.

If the new QEMU cannot start or the migration fails, the new QEMU is killed
and the old one keeps the VM: it is resumed (`cont`) if it was running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memplug.client.client import Client
from memplug.client.qmp import Qmp, QmpError

IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
POLL = 0.002  # seconds between query-migrate calls: the device state moves in ms
LOG_TAIL = 2000  # characters of the new QEMU's output quoted when it fails


class HandOverFailed(Exception):
    """The hand-over did not happen; the message says what failed and where the VM is."""


@dataclass(frozen=True)
class HandOver:
    new_pid: int
    new_log: str
    was_running: bool
    start_seconds: float  # the new QEMU started until its QMP monitor answered
    migrate_seconds: float  # `migrate` on the old until both sides completed
    downtime_seconds: float  # the VM stopped (migrate) until it ran again (cont on the new)
    total_seconds: float


def _memplug_exec_argv(socket: str | None, regions: Sequence[str]) -> list[str]:
    """`memplug exec` run by this interpreter: the memplug on PATH may be another install."""
    argv = [sys.executable, "-c", "from memplug.client.cli import main; main()"]
    if socket:
        argv += ["--socket", socket]
    argv.append("exec")
    for region in regions:
        argv += ["-r", region]
    return [*argv, "--"]


def _tail(path: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    text = text.strip()
    return text[-LOG_TAIL:] if text else ""


def _connect_new(
    proc: subprocess.Popen[bytes], path: str, log: str, timeout: float, qmp_timeout: float
) -> Qmp:
    """The new QEMU's monitor, once it listens; HandOverFailed if QEMU exits first."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            out = _tail(log)
            raise HandOverFailed(
                f"the new QEMU exited with {code} before it was ready"
                + (f": {out}" if out else f" (its output: {log})")
            )
        try:
            return Qmp.connect(path, qmp_timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise HandOverFailed(
                    f"the new QEMU did not open its QMP monitor {path} in {timeout:g} s "
                    f"(its output: {log})"
                ) from None
            time.sleep(0.02)


def _wait_migration(qmp: Qmp, side: str, deadline: float) -> None:
    """Poll query-migrate until completed; HandOverFailed on failure or timeout."""
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status", "")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", "no reason given")
            raise HandOverFailed(f"the migration {status} on the {side} QEMU: {why}")
        if time.monotonic() >= deadline:
            raise HandOverFailed(f"the migration did not complete in time ({side}: {status!r})")
        time.sleep(POLL)


def _wait_incoming(qmp: Qmp, deadline: float) -> None:
    """The new QEMU has loaded the state: it left "inmigrate"."""
    while qmp.status() == "inmigrate":
        if time.monotonic() >= deadline:
            raise HandOverFailed("the new QEMU did not finish loading the VM's state in time")
        time.sleep(POLL)


def hand_over(
    client: Client,
    *,
    regions: Sequence[str],
    old_qmp: str,
    new_argv: Sequence[str],
    socket: str | None = None,
    new_qmp: str | None = None,
    new_log: str | None = None,
    hold_ttl: float = 300.0,
    timeout: float = 60.0,
    say: Callable[[str], None] = lambda _: None,
) -> HandOver:
    """Move the VM behind old_qmp to a new QEMU run as new_argv on the same regions.

    new_argv may use {path:NAME} and {fd:NAME} as in `memplug exec`; the tool
    appends `-incoming defer` and a QMP monitor of its own (new_qmp, else a
    private one removed afterwards). The new QEMU's output goes to new_log
    (else a file in the temp dir, named in the result).
    """
    started = time.monotonic()
    deadline = started + timeout
    workdir = tempfile.mkdtemp(prefix="memplug-vm-update-")
    control = new_qmp or os.path.join(workdir, "qmp.sock")
    migration = os.path.join(workdir, "migrate.sock")
    if new_log is None:
        fd, new_log = tempfile.mkstemp(prefix="memplug-vm-update-", suffix=".log")
        os.close(fd)
    holder = f"memplug vm-update pid {os.getpid()}"
    held: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    new: Qmp | None = None
    old: Qmp | None = None
    was_running = False
    try:
        try:
            old = Qmp.connect(old_qmp)
        except (OSError, QmpError) as exc:
            raise HandOverFailed(
                f"cannot reach the old QEMU's monitor {old_qmp}: {exc} (QEMU serves one "
                "client at a time on a QMP socket: disconnect the others, or give QEMU a "
                "second -qmp for this tool)"
            ) from None
        was_running = old.status() == "running"
        if old.execute("query-migrate").get("status", "none") not in (
            "none",
            "completed",
            "failed",
            "cancelled",
        ):
            raise HandOverFailed("the old QEMU is migrating already; wait for it, then retry")
        for region in regions:
            client.hold_region(region, holder, f"live update of the VM behind {old_qmp}", hold_ttl)
            held.append(region)
        say(f"holding {', '.join(regions)} as {holder!r}")

        argv = [
            *_memplug_exec_argv(socket, regions),
            *new_argv,
            "-incoming", "defer",
            "-qmp", f"unix:{control},server=on,wait=off",
        ]  # fmt: skip
        t0 = time.monotonic()
        with open(new_log, "ab") as out:
            # A session of its own: the new VM outlives this tool and its terminal.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        new = _connect_new(proc, control, new_log, deadline - time.monotonic(), old.timeout)
        start_seconds = time.monotonic() - t0
        say(f"new QEMU pid {proc.pid} ready in {start_seconds * 1e3:.0f} ms")

        old.execute("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        new.execute("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        new.execute("migrate-incoming", uri=f"unix:{migration}")
        t1 = time.monotonic()
        old.execute("migrate", uri=f"unix:{migration}")
        _wait_migration(old, "old", deadline)
        _wait_incoming(new, deadline)
        migrate_seconds = time.monotonic() - t1
        if was_running:
            new.execute("cont")
        downtime = time.monotonic() - t1 if was_running else 0.0
        say(f"migrated in {migrate_seconds * 1e3:.1f} ms; the new QEMU has the VM")
        try:
            old.execute("quit")
            old.wait_closed(10.0)
        except QmpError:
            pass  # it went already: what matters is that it no longer runs the VM
        return HandOver(
            new_pid=proc.pid,
            new_log=new_log,
            was_running=was_running,
            start_seconds=start_seconds,
            migrate_seconds=migrate_seconds,
            downtime_seconds=downtime,
            total_seconds=time.monotonic() - started,
        )
    except (HandOverFailed, QmpError, OSError) as exc:
        where = _roll_back(old, proc, was_running=was_running)
        raise HandOverFailed(f"{exc}; {where}") from None
    except BaseException:  # Ctrl-C, a daemon error taking the hold: same rollback
        _roll_back(old, proc, was_running=was_running)
        raise
    finally:
        for region in held:
            with contextlib.suppress(Exception):  # it expires anyway
                client.release_region(region, holder)
        if new is not None:
            new.close()
        if old is not None:
            old.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _roll_back(old: Qmp | None, proc: subprocess.Popen[bytes] | None, *, was_running: bool) -> str:
    """Kill the new QEMU and give the VM back to the old one; says where the VM is."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if old is None:
        return "nothing was changed"
    try:
        migration = old.execute("query-migrate").get("status", "none")
        if migration not in ("none", "completed", "failed", "cancelled"):
            old.execute("migrate_cancel")
        status = old.status()
        if was_running and status != "running":
            old.execute("cont")
            status = old.status()
        return f"the new QEMU was killed; the old QEMU keeps the VM ({status})"
    except QmpError as exc:
        return f"the new QEMU was killed; the old QEMU did not answer ({exc}): check it"
