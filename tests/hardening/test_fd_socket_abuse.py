"""The fd socket under abuse by a real unprivileged process (uid/gid 65534).

The fd socket is open to every local uid (mode 0666), so one uid must not be
able to starve the others or the daemon:
- a uid that floods it with thousands of idle connections, reconnecting as
  they are shed, leaves other uids' OPENs served;
- at a low RLIMIT_NOFILE (1024, soft and hard: a shell, many container
  runtimes) the flood does not exhaust the daemon's fds (CreateRegion works),
  the accept loop does not spin and the log stays small;
- a uid that leaves replies with fds unread (each pins an fd against the
  daemon's RLIMIT_NOFILE) is refused with a clear ERR past its limit, while
  other uids' OPENs succeed; the daemon runs with the capabilities the
  README's least-privilege set gives it (no CAP_SYS_RESOURCE);
- OPEN tells a uid outside a region's ACL nothing: a missing region and one
  it may not open get the same answer, and a lost region's reason (with its
  file's path) is not shown to it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from conftest import DaemonProcess, MiB, require, require_root, start_daemon
from hardening_kit import NOBODY, fd_count, public_dir, record, run_nobody, spawn_nobody

from memplug.client import Client, MemplugError
from memplug.client.attach import open_region

pytestmark = pytest.mark.privileged

# What the README recommends for a least-privilege daemon: root with only these.
LEAST_PRIVILEGE: Final = ["setpriv", "--bounding-set=-all,+chown,+dac_override,+ipc_lock", "--"]
LOW_NOFILE: Final = 1024
OPEN_TIMEOUT: Final = 5.0

# Runs as uid 65534 with the standard library only. argv[1] is the mode; the last
# line it prints is one JSON object (hardening_kit.run_nobody reads it).
ABUSER = r"""
import json, os, resource, select, socket, sys, time

out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
       "pid": os.getpid()}
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, path = sys.argv[1], sys.argv[2]

def connect(blocking):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(blocking)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s

if mode == "flood":
    # Hold `target` connections, idle, reconnecting each one the daemon drops,
    # until stdin closes.
    target = int(sys.argv[3])
    ep = select.epoll()
    ep.register(0, select.EPOLLIN)
    held = {}
    connects = drops = busy = 0
    peak = 0
    ready_at = time.monotonic() + 3
    ready = False
    while True:
        while len(held) < target:
            try:
                s = connect(False)
            except BlockingIOError:  # the listen backlog is full
                busy += 1
                break
            held[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            connects += 1
        peak = max(peak, len(held))
        if not ready and (len(held) >= target or time.monotonic() > ready_at):
            print("ready", flush=True)
            ready = True
        done = False
        for fd, _ in ep.poll(0.002 if len(held) < target else 0.2):
            if fd == 0:
                done = not os.read(0, 64)
                continue
            s = held.pop(fd)
            ep.unregister(fd)
            s.close()
            drops += 1
        if done:
            break
    out.update(connects=connects, drops=drops, busy=busy, peak=peak, held=len(held))

elif mode == "unread":
    # Send `count` OPENs and read none of the replies until stdin closes; then read
    # them all and say what they were.
    name, count = sys.argv[3], int(sys.argv[4])
    socks, failed = [], 0
    for _ in range(count):
        deadline = time.monotonic() + 5
        while True:
            try:
                s = connect(True)
                s.sendall(("MEMPLUG/1 OPEN %s ro\n" % name).encode())
                socks.append(s)
                break
            except OSError:
                if time.monotonic() > deadline:
                    failed += 1
                    break
                time.sleep(0.001)
    time.sleep(0.5)  # let the daemon answer every request
    print("ready", flush=True)
    sys.stdin.read()
    lines = {}
    fds_received = 0
    for s in socks:
        s.settimeout(5)
        try:
            msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
        except OSError as exc:
            msg, fds = ("no reply: %s" % exc).encode(), []
        fds_received += len(fds)
        for fd in fds:
            os.close(fd)
        key = msg.decode(errors="replace").strip()
        key = " ".join(key.split()[:2]) if key.startswith("OK ") else key
        lines[key] = lines.get(key, 0) + 1
        s.close()
    out.update(sent=len(socks), failed=failed, fds=fds_received, lines=lines)

elif mode == "open":
    out["replies"] = []
    for name in sys.argv[3:]:
        s = connect(True)
        s.settimeout(10)
        s.sendall(("MEMPLUG/1 OPEN %s rw\n" % name).encode())
        msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
        for fd in fds:
            os.close(fd)
        out["replies"].append({"line": msg.decode(errors="replace"), "fds": len(fds)})
        s.close()

print(json.dumps(out))
"""


@dataclass
class Usage:
    """The daemon's CPU time, fds and threads, sampled from /proc."""

    pid: int

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise LookupError(f"no Threads: for pid {self.pid}")


class Flood:
    """A uid-65534 process holding `target` connections to the fd socket, reconnecting."""

    def __init__(self, fd_socket: Path, target: int) -> None:
        self.proc = spawn_nobody(ABUSER, "flood", str(fd_socket), str(target))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"the flooder did not start: {line!r} {self.proc.stderr}"

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.stdin = None
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert report["uid"] == NOBODY and report["groups"] == [], report
        return report


@pytest.fixture
def public() -> Iterator[Path]:
    require_root("runs abusers as uid 65534")
    with public_dir("memplug-fdsock-") as root:
        yield root


def started(root: Path, *extra: str, wrapper: list[str] | None = None) -> DaemonProcess:
    if wrapper:
        require(shutil.which(wrapper[0]) is not None, f"needs {wrapper[0]} (util-linux)")
    return start_daemon(root / "daemon", *extra, wrapper=wrapper or ())


def stopped(d: DaemonProcess) -> None:
    assert d.alive(), f"memplugd died under abuse:\n{d.log()[-4000:]}"
    code = d.stop()
    assert code == 0, f"memplugd exited with {code}:\n{d.log()[-4000:]}"
    assert "Traceback" not in d.log(), d.log()[-4000:]


def open_many(d: DaemonProcess, name: str, count: int) -> tuple[int, dict[str, int]]:
    """count OPENs of name by this (root) process with the project's client."""
    ok, failures = 0, dict[str, int]()
    for _ in range(count):
        try:
            fd, _ = open_region(str(d.fd_socket), name, "rw", timeout=OPEN_TIMEOUT)
        except (MemplugError, OSError) as exc:
            key = f"{exc.code}: {exc.message[:80]}" if isinstance(exc, MemplugError) else str(exc)
            failures[key] = failures.get(key, 0) + 1
            continue
        os.close(fd)
        ok += 1
    return ok, failures


def test_a_flooding_uid_leaves_other_uids_served(public: Path) -> None:
    d = started(public)
    usage = Usage(d.proc.pid)
    try:
        with Client(d.socket) as c:
            c.create_region("shared", 4 * MiB)
        fds_before, threads_before = fd_count(d.proc.pid), usage.threads()
        flood = Flood(d.fd_socket, 5000)
        try:
            cpu0, t0 = usage.cpu_seconds(), time.monotonic()
            attempts = 100
            ok, failures = open_many(d, "shared", attempts)
            cpu = (usage.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            fds, threads = fd_count(d.proc.pid), usage.threads()
        finally:
            report = flood.stop()
        fds_after, threads_after = fd_count(d.proc.pid), usage.threads()
        rate = ok / attempts
        record("fd_flood_success_rate", rate, flood="5000 connections by one uid")
        record("fd_flood_daemon_cpu", cpu, unit="cores")
        for phase, n_fds, n_threads in (
            ("before", fds_before, threads_before),
            ("during", fds, threads),
            ("after", fds_after, threads_after),
        ):
            record("fd_flood_daemon_fds", n_fds, phase=phase)
            record("fd_flood_daemon_threads", n_threads, phase=phase)
        record("fd_flood_reconnects", report["connects"])
        print(f"flood: {ok}/{attempts} OPENs ok, daemon cpu {cpu:.2f} cores, {fds} fds, "
              f"{threads} threads; flooder {report}; failures {failures}")  # fmt: skip
        assert report["connects"] >= 5000, f"the flooder did not flood: {report}"
        assert rate >= 0.95, f"only {ok} of {attempts} OPENs succeeded: {failures}"
        assert "limit per uid" in d.log(), "the shed connections were not logged"
    finally:
        stopped(d)


def test_a_flood_at_a_low_nofile_limit_leaves_fds_for_regions(public: Path) -> None:
    nofile = f"--nofile={LOW_NOFILE}:{LOW_NOFILE}"
    d = started(public, wrapper=["prlimit", nofile, "--"])
    usage = Usage(d.proc.pid)
    try:
        with Client(d.socket) as c:
            c.create_region("shared", 4 * MiB)
            fds_before, threads_before = fd_count(d.proc.pid), usage.threads()
            flood = Flood(d.fd_socket, 1100)
            try:
                # The flood alone: what it costs the daemon in CPU and log lines.
                log0, cpu0, t0 = d.log_path.stat().st_size, usage.cpu_seconds(), time.monotonic()
                time.sleep(3)
                cpu = (usage.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                logged = d.log_path.stat().st_size - log0
                fds, threads = fd_count(d.proc.pid), usage.threads()
                # The daemon's own work and other uids' hand-offs go on meanwhile.
                names = [f"r{i}" for i in range(64)]
                for name in names:
                    c.create_region(name, 2 * MiB)
                    c.plug(name)
                created = len(c.list_regions())
                ok, failures = open_many(d, "shared", 100)
                for name in names:
                    c.delete_region(name)
            finally:
                report = flood.stop()
        record("fd_flood_low_nofile_daemon_cpu", cpu, unit="cores")
        record("fd_flood_low_nofile_log_bytes", logged, seconds="3")
        record("fd_flood_low_nofile_daemon_fds", fds_before, phase="before")
        record("fd_flood_low_nofile_daemon_fds", fds, phase="during")
        record("fd_flood_low_nofile_daemon_threads", threads_before, phase="before")
        record("fd_flood_low_nofile_daemon_threads", threads, phase="during")
        record("fd_flood_low_nofile_success_rate", ok / 100)
        print(f"low nofile flood: daemon cpu {cpu:.2f} cores, {logged} log bytes in 3 s, "
              f"{fds} fds, {threads} threads, {ok}/100 OPENs ok; flooder {report}")  # fmt: skip
        assert report["connects"] >= 1100, f"the flooder did not flood: {report}"
        assert created == 65
        assert ok == 100, failures
        assert cpu < 0.5, f"the daemon used {cpu:.2f} cores while flooded"
        assert logged < 16 * 1024, f"the flood wrote {logged} bytes of log in 3 s"
        assert fds < LOW_NOFILE - 64, f"the daemon holds {fds} fds of {LOW_NOFILE}"
        assert f"RLIMIT_NOFILE {LOW_NOFILE}:" in d.log(), "the limits were not sized from it"
    finally:
        stopped(d)


def test_unread_replies_of_one_uid_leave_other_uids_served(public: Path) -> None:
    nofile = f"--nofile={LOW_NOFILE}:{LOW_NOFILE}"
    d = started(public, wrapper=["prlimit", nofile, *LEAST_PRIVILEGE])
    try:
        with Client(d.socket) as c:
            c.create_region("ro", 4 * MiB, read_only_uids=[NOBODY])
            c.create_region("mine", 4 * MiB)
        hoarder = spawn_nobody(ABUSER, "unread", str(d.fd_socket), "ro", "1100")
        assert hoarder.stdout is not None and hoarder.stdin is not None
        line = hoarder.stdout.readline().strip()
        assert line == "ready", f"{line!r} {hoarder.stderr.read() if hoarder.stderr else ''}"
        try:
            fds = fd_count(d.proc.pid)
            ok, failures = open_many(d, "mine", 50)
        finally:
            hoarder.stdin.close()
            hoarder.stdin = None
            out, err = hoarder.communicate(timeout=60)
        assert hoarder.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["uid"] == NOBODY and report["groups"] == [], report
        record("fd_unread_other_uid_success_rate", ok / 50)
        record("fd_unread_hoarder_fds", report["fds"])
        record("fd_unread_daemon_fds", fds)
        print(f"unread replies: {ok}/50 other-uid OPENs ok, daemon {fds} fds; hoarder {report}")
        assert ok == 50, f"another uid's OPENs failed: {failures}"
        lines: dict[str, int] = report["lines"]
        refusals = {k: n for k, n in lines.items() if not k.startswith("OK ")}
        assert lines.get("OK region=ro", 0) == report["fds"] > 0, lines
        assert report["fds"] <= 1100 // 4, f"one uid held {report['fds']} unread fds"
        assert report["sent"] + report["failed"] == 1100, report
        for text in refusals:
            assert text.startswith("ERR RESOURCE_EXHAUSTED uid 65534 has "), refusals
            assert "not read yet" in text or "connections open" in text, refusals
        assert any("not read yet" in text for text in refusals), refusals
    finally:
        stopped(d)


def test_open_tells_outsiders_nothing(public: Path) -> None:
    allow = public / "allow"
    allow.mkdir(mode=0o755)
    d = started(public, "--allow-dir", str(allow))
    with Client(d.socket) as c:
        c.create_region("disk", 4 * MiB, "file", path="disk.img")
    stopped(d)
    (allow / "disk.img").unlink()  # lost at the next start, for a reason with a path
    d = started(public, "--allow-dir", str(allow))
    try:
        with Client(d.socket) as c:
            c.create_region("hidden", 4 * MiB, owner_uid=1000, allowed_uids=[1001])
        report = run_nobody(ABUSER, "open", str(d.fd_socket), "hidden", "absent", "disk")
        replies = {
            name: reply["line"].replace(name, "NAME")
            for name, reply in zip(("hidden", "absent", "disk"), report["replies"], strict=True)
        }
        assert all(reply["fds"] == 0 for reply in report["replies"]), report
        print(f"outsider's answers: {replies}")
        assert replies["hidden"] == replies["absent"] == replies["disk"], replies
        assert replies["hidden"].startswith("ERR PERMISSION_DENIED "), replies
        assert str(allow) not in replies["disk"] and "lost" not in replies["disk"], replies
        # Root (and the region's own tools over gRPC) still learn what happened.
        fd, line = root_open(d.fd_socket, "disk")
        assert fd is None and line.startswith("ERR NOT_FOUND ") and "lost" in line, line
        assert str(allow / "disk.img") in line, line
        fd, line = root_open(d.fd_socket, "absent")
        assert fd is None and line.startswith("ERR NOT_FOUND "), line
        assert f"refused pid={report['pid']} uid={NOBODY}" in d.log(), "refusals not logged"
    finally:
        stopped(d)


def root_open(fd_socket: Path, name: str) -> tuple[int | None, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(fd_socket))
        s.sendall(f"MEMPLUG/1 OPEN {name} rw\n".encode())
        msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
    for fd in fds[1:]:
        os.close(fd)
    return (fds[0] if fds else None), msg.decode(errors="replace").strip()
