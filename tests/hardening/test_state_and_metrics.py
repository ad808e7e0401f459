"""The state dir and the metrics port under abuse, on a real memplugd.

- the metrics port held open by many idle TCP connections: threads and fds stay
  bounded, idle connections are closed after the timeout, a scrape still works;
- a second daemon on the same state dir refuses at once, naming the holder, and
  changes nothing;
- a full state dir (a small tmpfs): every mutating RPC fails with NoSpace and
  leaves memory, quota and state as they were; the retry works once space is
  back, and a restart shows what the answers said;
- malformed rows in the store: those regions are reported lost, the rest served.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import DaemonProcess, MiB
from hardening_kit import (
    Baseline,
    alive,
    assert_consistent,
    assert_serving,
    connect,
    digest,
    fault,
    fd_count,
    fill,
    record,
    wait_until,
)
from hardening_kit import stop as kit_stop
from sdharness import FakeSystemd

from memplug.client import NoSpace, NotFound
from memplug.daemon.metrics_http import MAX_CONNECTIONS, TIMEOUT

Factory = Callable[..., DaemonProcess]


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    sd = FakeSystemd(tmp_path / "sd")
    try:
        yield sd
    finally:
        sd.close()


def stop(d: DaemonProcess) -> None:
    kit_stop(d, no_traceback=True)


# --------------------------------------------------------------------------- metrics


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text: str = resp.read().decode()
        return text


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise LookupError(f"no Threads line for pid {pid}")


def test_idle_metrics_connections_cannot_exhaust_the_daemon(daemon_factory: Factory) -> None:
    port = free_port()
    d = daemon_factory("--metrics", f"127.0.0.1:{port}")
    pid = d.proc.pid
    wait_until(lambda: "metrics on http" in d.log(), 10, "the metrics listener")
    assert "memplug_regions" in scrape(port)
    threads_before, fds_before = threads_of(pid), fd_count(pid)

    fault("400 idle TCP connections to the metrics port")
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(400)]
    try:
        time.sleep(1.0)  # let the daemon accept (and, before the fix, spawn) for all of them
        threads_during, fds_during = threads_of(pid), fd_count(pid)
        during = scrape(port)  # a real scrape gets through the idle crowd
        record("metrics_abuse_threads", threads_before, phase="before")
        record("metrics_abuse_threads", threads_during, phase="during")
        record("metrics_abuse_fds", fds_before, phase="before")
        record("metrics_abuse_fds", fds_during, phase="during")
        assert "memplug_regions" in during
        assert threads_during <= threads_before + 1, (
            f"threads {threads_before} -> {threads_during} with 400 idle connections"
        )
        assert fds_during <= fds_before + MAX_CONNECTIONS, (
            f"fds {fds_before} -> {fds_during} with 400 idle connections"
        )
        # Idle connections are closed by the daemon once the timeout passes.
        wait_until(lambda: fd_count(pid) <= fds_before, TIMEOUT + 5, "idle connections closed")
        for sock in held[-MAX_CONNECTIONS:]:
            assert sock.recv(1) == b"", "an idle connection was still open after the timeout"
        threads_after, fds_after = threads_of(pid), fd_count(pid)
        record("metrics_abuse_threads", threads_after, phase="after")
        record("metrics_abuse_fds", fds_after, phase="after")
        assert threads_after <= threads_before + 1
    finally:
        for sock in held:
            sock.close()
    assert "memplug_regions" in scrape(port)
    alive(d)


# --------------------------------------------------------------------------- state dir lock


def state_files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file()}


@pytest.mark.parametrize("sockets", ["own sockets", "the same fd socket"])
def test_a_second_daemon_on_the_same_state_dir_refuses_and_changes_nothing(
    daemon_factory: Factory, tmp_path: Path, sockets: str
) -> None:
    state = tmp_path / "shared-state"
    first = daemon_factory("--state-dir", str(state))
    with connect(first) as c:
        c.create_region("mine", 8 * MiB)
        c.plug("mine", 0, 4 * MiB)
        want = fill(c, "mine", [(0, 4 * MiB)], seed=3)
    before = state_files(state)

    other = tmp_path / "second"
    other.mkdir()
    fd_socket = first.fd_socket if sockets == "the same fd socket" else other / "fd.sock"
    fault(f"second daemon on the same state dir ({sockets})")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "memplug.daemon", "--socket", str(other / "memplug.sock"),
             "--fd-socket", str(fd_socket), "--state-dir", str(state)],
            check=False, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("a second memplugd on the same state dir started and kept running")
    lines = second.stderr.strip().splitlines()
    assert second.returncode != 0, f"the second daemon exited 0:\n{second.stderr}"
    assert len(lines) == 1, f"expected one line, got:\n{second.stderr}"
    assert f"pid {first.proc.pid}" in lines[0] and str(state) in lines[0], lines[0]
    assert state_files(state) == before, "the refused daemon changed the state dir"

    with connect(first) as c:
        assert c.get_region("mine").plugged == [(0, 4 * MiB)]
        assert digest(c, "mine", [(0, 4 * MiB)]) == want
        assert c.plug("mine").bytes == 4 * MiB
        assert_serving(c)


# --------------------------------------------------------------------------- full state dir


def fill_up(mount: Path) -> Path:
    """A file that takes every free byte of the mount."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096):
            try:
                while True:
                    os.write(fd, b"\xff" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


@pytest.mark.privileged
def test_a_full_state_dir_changes_nothing_and_the_retry_works(
    systemd: FakeSystemd, tmp_path: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    mount = small_tmpfs("4M")
    state, files = mount / "state", tmp_path / "files"
    files.mkdir()
    flags = ("--state-dir", str(state), "--allow-dir", str(files))
    run = tmp_path / "run"
    d = systemd.start(run, *flags)
    with connect(d) as c:
        c.create_region("keep", 16 * MiB)
        c.plug("keep", 0, 8 * MiB)
        data = fill(c, "keep", [(0, 8 * MiB)], seed=5)
        c.create_region("drop", 4 * MiB)
        c.create_region("file", 8 * MiB, "file", path="f.img")
        c.plug("file", 0, 4 * MiB)
        filler = fill_up(mount)
        base = Baseline(c, ["keep", "drop", "file"])
        base.remember("keep", data)
        fault("state dir full")
        attempts: list[tuple[str, Callable[[], object]]] = [
            ("create", lambda: c.create_region("new", 4 * MiB)),
            ("delete memfd region", lambda: c.delete_region("drop")),
            ("delete file region", lambda: c.delete_region("file")),
            ("plug", lambda: c.plug("keep", 8 * MiB, 8 * MiB)),
            ("unplug", lambda: c.unplug("keep", 0, 2 * MiB)),
            ("discard", lambda: c.discard("keep", 2 * MiB, 2 * MiB)),
        ]
        for what, call in attempts:
            with pytest.raises(NoSpace) as caught:
                call()
            record("state_full_refused", 1, rpc=what, code=str(caught.value.code))
            assert caught.value.code == "RESOURCE_EXHAUSTED", what
            assert str(state) in str(caught.value), f"{what}: {caught.value}"
        with pytest.raises(NotFound):
            c.get_region("new")
        assert c.populate("keep", 0, 8 * MiB).bytes == 8 * MiB  # writes nothing: works
        base.verify()
        alive(d)

        filler.unlink()
        c.create_region("new", 4 * MiB)
        c.delete_region("drop")
        c.delete_region("file")
        assert c.plug("keep", 8 * MiB, 8 * MiB).bytes == 8 * MiB
        assert c.unplug("keep", 0, 2 * MiB).bytes == 2 * MiB
        assert c.discard("keep", 2 * MiB, 2 * MiB).bytes == 2 * MiB
        record("state_full_retried", len(attempts), outcome="served")
        answered = {r.name: r.plugged for r in c.list_regions()}
        kept = digest(c, "keep", [(4 * MiB, 4 * MiB)])  # untouched by the unplug and discard
    assert answered == {"keep": [(2 * MiB, 14 * MiB)], "new": []}
    stop(d)

    d2 = systemd.start(run, *flags)
    try:
        with connect(d2) as c:
            regions = assert_consistent(c, state / "memplug.db")
            assert {n: r.plugged for n, r in regions.items()} == answered
            assert digest(c, "keep", [(4 * MiB, 4 * MiB)]) == kept
            assert_serving(c)
    finally:
        stop(d2)


# --------------------------------------------------------------------------- malformed rows


@pytest.mark.privileged
def test_malformed_rows_cost_their_regions_only(systemd: FakeSystemd, tmp_path: Path) -> None:
    run = tmp_path / "run"
    d = systemd.start(run)
    db = systemd.workdir / "state" / "memplug.db"
    with connect(d) as c:
        for name in ("good", "truncated", "newer", "bad-intent"):
            c.create_region(name, 4 * MiB)
            c.plug(name, 0, 2 * MiB)
        want = fill(c, "good", [(0, 2 * MiB)], seed=11)
    stop(d)

    fault("malformed state rows")
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("UPDATE regions SET labels = '{\"app\": \"te' WHERE name = 'truncated'")
        conn.execute("UPDATE regions SET backing = 'cxl' WHERE name = 'newer'")
        conn.execute(
            "INSERT INTO intents (region, op, offset, length, keep, started) "
            "VALUES ('bad-intent', 'plug', 0, 2097152, '[[0, ', 1.0)"
        )
        rows_before = conn.execute("SELECT * FROM regions ORDER BY name").fetchall()

    d2 = systemd.start(run)
    try:
        with connect(d2) as c:
            assert [r.name for r in c.list_regions()] == ["good"]
            assert c.get_region("good").plugged == [(0, 2 * MiB)]
            assert digest(c, "good", [(0, 2 * MiB)]) == want
            for name, why in (
                ("truncated", "malformed"),
                ("newer", "unknown"),
                ("bad-intent", "malformed"),
            ):
                with pytest.raises(NotFound, match=f"lost when memplugd restarted: .*{why}"):
                    c.get_region(name)
            assert_serving(c)
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows_after = conn.execute("SELECT * FROM regions ORDER BY name").fetchall()
        assert [r for r in rows_after if r[0] != "good"] == [
            r for r in rows_before if r[0] != "good"
        ], "the malformed rows were changed"
    finally:
        stop(d2)
