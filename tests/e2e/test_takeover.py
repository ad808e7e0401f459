"""Take-over without systemd: `memplugd --takeover` takes every region from a running one.

Real daemons, real memfds and hugetlb pages, a real SOCK_SEQPACKET hand-over
with SCM_RIGHTS; the new daemon dying mid-way is the
MEMPLUG_TAKEOVER_EXIT_AFTER_FDS switch (it exits once every fd has come).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    MiB,
    Ranges,
    checksum,
    huge_free,
    kill_takers,
    scribble,
    serving,
    start_daemon,
    start_taker,
    state_dir,
)

from memplug.client import Client
from memplug.client.attach import Attachment
from memplug.common import memory
from memplug.common.errors import MemplugError

# Partly plugged regions: attached sparse, touched only in their plugged ranges.
LAYOUT: dict[str, Ranges] = {
    "vm-shm": [(0, 8 * MiB), (16 * MiB, 4 * MiB)],
    "vm-huge": [(0, 4 * MiB), (8 * MiB, 2 * MiB)],
    "vm-file": [(2 * MiB, 4 * MiB)],
}


def populated(d: DaemonProcess, tmp_path: Path, hugetlb_pool: Callable[[int], None]) -> None:
    in_use = memory.huge_pool(HUGE_2M).total - huge_free()  # by other tests, maybe
    hugetlb_pool(in_use + 3)
    with Client(d.socket) as c:
        c.create_region("vm-shm", 32 * MiB)
        c.create_region("vm-huge", 16 * MiB, "hugetlb")
        c.create_region("vm-file", 16 * MiB, "file", path=str(tmp_path / "files" / "vm.img"))
        for name, ranges in LAYOUT.items():
            for offset, length in ranges:
                c.plug(name, offset, length)


def sums(c: Client) -> dict[str, str]:
    out = {}
    for name, ranges in LAYOUT.items():
        with c.attach(name, sparse=True) as att:
            out[name] = checksum(att, ranges)
    return out


@pytest.fixture
def old(tmp_path: Path, hugetlb_pool: Callable[[int], None]) -> Iterator[DaemonProcess]:
    (tmp_path / "files").mkdir()
    d = start_daemon(tmp_path, "--allow-dir", str(tmp_path / "files"))
    try:
        populated(d, tmp_path, hugetlb_pool)
        yield d
    finally:
        kill_takers(d.proc)


def test_takeover_keeps_every_region_and_its_data(old: DaemonProcess) -> None:
    held: dict[str, Attachment] = {}
    with Client(old.socket) as c:
        for name, ranges in LAYOUT.items():
            held[name] = c.attach(name, sparse=True)
            scribble(held[name], ranges)
        before = c.list_regions()
        checksums = sums(c)
    takeover_sock = state_dir(old) / "takeover.sock"
    assert stat.S_IMODE(os.stat(takeover_sock).st_mode) == 0o600
    try:
        proc, log_path = start_taker(old, "new")
        assert old.proc.wait(30) == 0, old.log()
        new = serving(proc, log_path, old.socket)
        assert "handed 2 regions over" in old.log(), old.log()
        with Client(new.socket) as c:
            assert c.list_regions() == before
            assert sums(c) == checksums
            # The mappings held across the take-over are the same memory, not a copy
            # (the huge page pool is shared with other tests: its free count is no proof).
            for name, ranges in LAYOUT.items():
                view = held[name].view
                assert view is not None
                marker = os.urandom(4096)
                at = ranges[0][0]
                view[at : at + 4096] = marker
                with c.attach(name, sparse=True) as fresh:
                    assert fresh.view is not None
                    assert bytes(fresh.view[at : at + 4096]) == marker, name
            c.plug("vm-shm", 24 * MiB, 2 * MiB)  # and it serves writes
        assert stat.S_IMODE(os.stat(takeover_sock).st_mode) == 0o600
        assert new.stop() == 0
    finally:
        for att in held.values():
            att.close()


def test_taker_dying_midway_leaves_the_old_one_serving(old: DaemonProcess) -> None:
    with Client(old.socket) as c:
        before = c.list_regions()
        checksums = sums(c)
    proc, log_path = start_taker(old, "dying", env={"MEMPLUG_TAKEOVER_EXIT_AFTER_FDS": "1"})
    assert proc.wait(30) == 3, log_path.read_text()
    with Client(old.socket) as c:
        assert c.list_regions() == before
        assert sums(c) == checksums
        c.plug("vm-shm", 24 * MiB, 2 * MiB)
    assert old.alive()
    assert "serving again" in old.log(), old.log()
    # Nothing was given up: a take-over after it succeeds, with every region.
    proc, log_path = start_taker(old, "new")
    assert old.proc.wait(30) == 0, old.log()
    new = serving(proc, log_path, old.socket)
    with Client(new.socket) as c:
        assert [r.name for r in c.list_regions()] == [r.name for r in before]
        assert sums(c) == checksums
    assert new.stop() == 0


def raw_hello(path: Path, schema: int) -> tuple[socket.socket, dict[str, object]]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(str(path))
    conn.send(json.dumps({"op": "hello", "schema": schema, "version": "test", "pid": 1}).encode())
    return conn, json.loads(conn.recv(1 << 16))


def test_schema_mismatch_is_refused_before_anything_moves(old: DaemonProcess) -> None:
    with Client(old.socket) as c:
        before = c.list_regions()
        checksums = sums(c)
    conn, answer = raw_hello(state_dir(old) / "takeover.sock", schema=999)
    conn.close()
    assert answer["op"] == "refused", answer
    assert "schema" in str(answer["error"]) and "999" in str(answer["error"]), answer
    with Client(old.socket) as c:
        assert c.list_regions() == before
        assert sums(c) == checksums
    assert "handing over" not in old.log()
    assert old.stop() == 0


def test_two_takers_one_wins(old: DaemonProcess) -> None:
    with Client(old.socket) as c:
        checksums = sums(c)
    # A taker in the middle of its hello holds the old daemon: a second is refused.
    conn, answer = raw_hello(state_dir(old) / "takeover.sock", schema=_schema())
    assert answer["op"] == "offer", answer
    proc, log_path = start_taker(old, "second")
    assert proc.wait(30) == 1
    assert "taking over already" in log_path.read_text(), log_path.read_text()
    conn.close()  # the first gives up before "go": nothing moved
    with Client(old.socket) as c:
        assert sums(c) == checksums
    # Two at once: exactly one serves, the other says why it did not.
    takers = [start_taker(old, f"racer{i}") for i in range(2)]
    assert old.proc.wait(30) == 0, old.log()
    deadline = time.monotonic() + 30
    while sum(p.poll() is None for p, _ in takers) > 1 or any(
        p.poll() is None and "serving on" not in log.read_text() for p, log in takers
    ):
        assert time.monotonic() < deadline, [log.read_text() for _, log in takers]
        time.sleep(0.05)
    (winner, winner_log), (loser, loser_log) = sorted(takers, key=lambda t: t[0].poll() is not None)
    # The other was refused while the first took over, or found the old daemon's
    # take-over socket already gone and the winner's not yet listening (refused
    # too, and told so), or came after and took over from the winner.
    loser_said = loser_log.read_text()
    refused = ("taking over already", "no running memplugd to take over")
    assert (loser.returncode == 1 and any(why in loser_said for why in refused)) or (
        loser.returncode == 0 and "handed 2 regions over" in loser_said
    ), (loser.returncode, loser_said)
    new = serving(winner, winner_log, old.socket)
    with Client(new.socket) as c:
        assert sums(c) == checksums
    assert new.stop() == 0


def _schema() -> int:
    from memplug.daemon.state.sqlite import SCHEMA_VERSION

    return SCHEMA_VERSION


def test_takeover_without_a_running_daemon_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "memplug.daemon",
            "--takeover",
            "--socket",
            str(tmp_path / "m.sock"),
            "--fd-socket",
            str(tmp_path / "fd.sock"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no running memplugd to take over" in result.stderr, result.stderr


def test_client_retries_idempotent_calls_while_unavailable(tmp_path: Path) -> None:
    """A daemon that is not there yet (a take-over's gap): GetStatus waits for it."""
    sock = tmp_path / "memplug.sock"
    started: list[DaemonProcess] = []

    def start_later() -> None:
        time.sleep(0.3)
        started.append(start_daemon(tmp_path))

    # The daemon takes about a second to start here.
    thread = threading.Thread(target=start_later)
    try:
        with Client(sock, fd_socket=tmp_path / "fd.sock", retry_unavailable=15) as c:
            thread.start()
            try:
                assert c.status().regions == 0
            finally:
                thread.join()
    finally:
        for d in started:
            assert d.stop() == 0
    assert started


def test_plug_running_at_the_takeover_is_rolled_back(old: DaemonProcess) -> None:
    """The old daemon cancels a running plug and waits for its rollback before it hands over."""
    with Client(old.socket) as c:
        c.create_region("big", 2048 * MiB)
    started = threading.Event()
    outcome: list[MemplugError | None] = []

    def plug() -> None:
        with Client(old.socket) as c:
            try:
                # One thread of MADV_POPULATE_WRITE over memory never touched: seconds.
                c.plug(
                    "big",
                    strategy="populate-write",
                    threads=1,
                    progress=lambda done, _total: started.set() if done else None,
                )
                outcome.append(None)
            except MemplugError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=plug)
    thread.start()
    try:
        assert started.wait(30), "the plug never reported progress"
        proc, log_path = start_taker(old, "new")
        assert old.proc.wait(60) == 0, old.log()
    finally:
        thread.join(60)
    new = serving(proc, log_path, old.socket)
    assert len(outcome) == 1
    if outcome[0] is None:
        pytest.skip("the plug finished before the take-over began (a fast machine)")
    assert outcome[0].code == "CANCELLED", outcome[0]
    with Client(new.socket) as c:
        region = c.get_region("big")
        assert region.plugged == [] and region.allocated_bytes == 0, region
    assert new.stop() == 0


# --------------------------------------------------------------------------- the taker dying late


def test_taker_killed_after_committed_leaves_the_old_one_serving_every_region(
    old: DaemonProcess,
) -> None:
    """SIGKILL of the taker once the old daemon has let go of its state, before it serves:
    the old process starts afresh (same pid) on the store with the fds it kept."""
    held: dict[str, Attachment] = {}
    with Client(old.socket) as c:
        for name, ranges in LAYOUT.items():
            held[name] = c.attach(name, sparse=True)
            scribble(held[name], ranges)
        before = c.list_regions()
        checksums = sums(c)
    try:
        proc, log_path = start_taker(
            old, "killed", env={"MEMPLUG_TAKEOVER_KILL_AFTER_COMMITTED": "1"}
        )
        assert proc.wait(30) == -signal.SIGKILL, log_path.read_text()
        revived = serving(old.proc, old.log_path, old.socket)
        assert "ended before it served" in old.log(), old.log()
        with Client(revived.socket) as c:
            assert c.list_regions() == before
            assert sums(c) == checksums
            for name, ranges in LAYOUT.items():  # the same memory, not a copy
                view = held[name].view
                assert view is not None
                marker = os.urandom(4096)
                at = ranges[0][0]
                view[at : at + 4096] = marker
                with c.attach(name, sparse=True) as fresh:
                    assert fresh.view is not None
                    assert bytes(fresh.view[at : at + 4096]) == marker, name
            c.plug("vm-shm", 24 * MiB, 2 * MiB)
            checksums = sums(c)
        # It listens for a take-over again, and that one succeeds.
        proc, log_path = start_taker(old, "new")
        assert old.proc.wait(30) == 0, old.log()
        new = serving(proc, log_path, old.socket)
        with Client(new.socket) as c:
            assert sums(c) == checksums
        assert "Traceback" not in old.log(), old.log()
        assert new.stop() == 0
    finally:
        for att in held.values():
            att.close()


# --------------------------------------------------------------------------- --takeover=auto


def test_auto_takes_over_when_a_daemon_runs(old: DaemonProcess) -> None:
    with Client(old.socket) as c:
        before = c.list_regions()
        checksums = sums(c)
    proc, log_path = start_taker(old, "auto", mode="auto")
    assert old.proc.wait(30) == 0, old.log()
    new = serving(proc, log_path, old.socket)
    assert "took 2 region fds over" in new.log(), new.log()
    with Client(new.socket) as c:
        assert c.list_regions() == before
        assert sums(c) == checksums
    assert new.stop() == 0


def test_auto_starts_afresh_over_a_dead_daemons_sockets(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            c.create_region("gone", 4 * MiB)
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        left = [state_dir(d) / "takeover.sock", d.socket, d.fd_socket]
        assert all(stat.S_ISSOCK(os.lstat(p).st_mode) for p in left), "stale sockets stay"
        proc, log_path = start_taker(d, "auto", mode="auto")
        new = serving(proc, log_path, d.socket)
        assert "no memplugd runs" in new.log(), new.log()
        with Client(new.socket) as c:
            c.create_region("fresh", 4 * MiB)
            c.plug("fresh")
        # It takes take-overs itself: the next auto start takes over from it.
        proc, log_path = start_taker(new, "next", mode="auto")
        assert new.proc.wait(30) == 0, new.log()
        last = serving(proc, log_path, d.socket)
        with Client(last.socket) as c:
            assert c.get_region("fresh").plugged_bytes == 4 * MiB
        assert last.stop() == 0
    finally:
        kill_takers(d.proc)


def test_two_auto_starters_at_once_one_serves_the_other_refuses_cleanly(tmp_path: Path) -> None:
    """No daemon runs; two start together: the state-dir lock lets one start, the other
    takes over from it once it listens or is refused with one line, never both serve."""
    sock = tmp_path / "memplug.sock"
    args = [
        sys.executable,
        "-m",
        "memplug.daemon",
        "--socket",
        str(sock),
        "--fd-socket",
        str(tmp_path / "fd.sock"),
        "--state-dir",
        str(tmp_path / "state"),
        "--takeover=auto",
    ]
    logs = [tmp_path / f"starter{i}.log" for i in range(2)]
    procs = []
    try:
        for log in logs:
            with log.open("wb") as out:
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        pairs = list(zip(procs, logs, strict=True))
        while sum(p.poll() is None for p in procs) > 1 or not any(
            p.poll() is None and "serving on" in log.read_text() for p, log in pairs
        ):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.05)
        (winner, winner_log), (loser, loser_log) = sorted(
            pairs, key=lambda t: t[0].poll() is not None
        )
        said = loser_log.read_text()
        # Refused while the first started, or it took over from the first (which
        # then handed over and exited 0) and the first is the loser here.
        assert (loser.returncode == 1 and "try again in a moment" in said) or (
            loser.returncode == 0 and "handed 0 regions over" in said
        ), (loser.returncode, said)
        if loser.returncode == 1:
            assert said.strip().splitlines()[-1].startswith("memplugd: cannot start:"), said
        new = serving(winner, winner_log, sock)
        with Client(new.socket) as c:
            assert c.status().regions == 0
        assert new.stop() == 0
        assert not any("Traceback" in log.read_text() for log in logs)
    finally:
        kill_takers(*procs)


def test_after_handover_wait_stays_idle_till_sigterm_and_touches_nothing(
    tmp_path: Path,
) -> None:
    """--after-handover wait (a DaemonSet's old pod): the old process stays after the
    hand-over, and its SIGTERM later leaves the new daemon's regions alone."""
    d = start_daemon(tmp_path, "--after-handover", "wait")
    try:
        with Client(d.socket) as c:
            c.create_region("vm", 8 * MiB)
            c.plug("vm")
            with c.attach("vm") as att:
                scribble(att, [(0, 8 * MiB)])
                before = checksum(att, [(0, 8 * MiB)])
        proc, log_path = start_taker(d, "new", mode="auto")
        new = serving(proc, log_path, d.socket)
        deadline = time.monotonic() + 30
        while "idle until SIGTERM" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert d.alive()
        assert d.stop() == 0
        with Client(new.socket) as c:
            assert c.get_region("vm").plugged_bytes == 8 * MiB
            with c.attach("vm") as att:
                assert checksum(att, [(0, 8 * MiB)]) == before
            c.plug("vm")  # it still writes the store
        assert "stopping" not in d.log().split("idle until SIGTERM")[1], d.log()
        assert new.stop() == 0
    finally:
        kill_takers(d.proc)
