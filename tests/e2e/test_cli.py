"""The `memplug` command line as a user runs it: a subprocess talking to a real memplugd."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import DaemonProcess, GiB, MiB, require, require_root, start_daemon, stop_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_operations import free_port, scrape, value

from memplug.client import Cancelled, Client
from memplug.client.attach import redeem
from memplug.client.cli import cli

MEMPLUG = Path(sys.executable).parent / "memplug"
Factory = Callable[..., DaemonProcess]

_names = itertools.count()


def fresh() -> str:
    return f"cli{next(_names)}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("memplugd"))
    yield d
    stop_shared(d)


def env_for(socket: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPLUG_")}
    return {**env, "MEMPLUG_SOCKET": str(socket), "COLUMNS": "200"}


def memplug(socket: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MEMPLUG), *args],
        env=env_for(socket),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def ok(socket: Path, *args: str) -> str:
    proc = memplug(socket, *args)
    assert proc.returncode == 0, f"memplug {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def ok_json(socket: Path, *args: str) -> Any:
    return json.loads(ok(socket, *args, "--json"))


def fails(socket: Path, code: int, *args: str) -> str:
    """memplug ARGS exits with code and says why in one 'memplug: ' line on stderr."""
    proc = memplug(socket, *args)
    assert proc.returncode == code, (
        f"memplug {' '.join(args)}: exit {proc.returncode}, want {code}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"errors are one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("memplug: ") and len(lines[0]) > len("memplug: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- verbs


def test_create_show_ls_status_with_human_sizes(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    a, b = fresh(), fresh()
    out = ok(sock, "create", a, "512M", "-l", "suite=cli")
    assert a in out and "512 MiB" in out
    made = ok_json(sock, "create", b, "1GiB", "--block-size", "0x200000", "-l", "suite=cli")
    assert made["name"] == b and made["size"] == 1 * GiB and made["block_size"] == 2 * MiB
    assert made["backing"] == "shmem" and made["plugged"] == [] and made["labels"]["suite"] == "cli"

    shown = ok_json(sock, "show", a)
    assert shown["name"] == a and shown["size"] == 512 * MiB and shown["plugged_bytes"] == 0
    human = ok(sock, "show", b)
    assert b in human and "1 GiB" in human and "2 MiB" in human

    listed = ok_json(sock, "ls", "-l", "suite=cli")
    assert [r["name"] for r in listed] == sorted([a, b])
    table = ok(sock, "ls")
    assert a in table and b in table and "512 MiB" in table and "1 GiB" in table

    st = ok_json(sock, "status")
    assert st["regions"] >= 2 and st["socket"] == str(sock)
    assert st["fd_socket"] == str(daemon.fd_socket) and st["madv_populate"] is True
    assert "regions:" in ok(sock, "status")
    ok(sock, "rm", a, b)


def test_plug_populate_discard_unplug_rm(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "64M")
    plugged = ok_json(sock, "plug", name)  # no range: all of it
    assert plugged["bytes"] == 64 * MiB
    assert plugged["region"]["plugged"] == [[0, 64 * MiB]]
    shown = ok_json(sock, "show", name)
    assert shown["plugged_bytes"] == shown["allocated_bytes"] == 64 * MiB
    assert "plug" in ok(sock, "plug", name, "0", "2M")  # human output, nothing new

    populated = ok_json(sock, "populate", name, "--mode", "read")
    assert populated["bytes"] == 64 * MiB
    assert "populate" in ok(sock, "populate", name, "16M", "16M")

    discarded = ok_json(sock, "discard", name, "0", "4M")
    assert discarded["bytes"] == 4 * MiB
    assert discarded["region"]["plugged"] == [[0, 64 * MiB]]

    unplugged = ok_json(sock, "unplug", name, "0x2000000")  # offset only: to the end
    assert unplugged["bytes"] == 32 * MiB
    assert unplugged["region"]["plugged"] == [[0, 32 * MiB]]
    assert "released" in ok(sock, "unplug", name, "0", "2M")
    shown = ok_json(sock, "show", name)
    assert shown["plugged"] == [[2 * MiB, 30 * MiB]] and shown["allocated_bytes"] == 30 * MiB

    assert ok_json(sock, "rm", name) == {"deleted": [name]}
    fails(sock, 3, "show", name)


def rpc_lines(daemon: DaemonProcess, region: str) -> list[str]:
    """The RPCs the daemon's access log shows for region, in order (rpc=... of each line)."""
    named = re.compile(rf"\brpc=(\w+) region={re.escape(region)}(?:\s|$)")
    return [m.group(1) for m in map(named.search, daemon.log().splitlines()) if m]


def test_plug_of_a_whole_region_is_one_rpc(daemon: DaemonProcess) -> None:
    """`memplug plug NAME` sends one Plug of length 0 ("to the end"), no GetRegion first."""
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "96M")
    assert rpc_lines(daemon, name) == ["CreateRegion"]
    plugged = ok_json(sock, "plug", name)
    assert plugged["bytes"] == 96 * MiB and plugged["region"]["plugged"] == [[0, 96 * MiB]]
    deadline = time.monotonic() + 5  # a stream's access line follows its last message
    while len(rpc_lines(daemon, name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rpc_lines(daemon, name) == ["CreateRegion", "Plug"]
    ok(sock, "rm", name)


def test_ticket_verb_issues_a_ticket_that_redeems(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "16M")
    issued = ok_json(sock, "ticket", name, "--ro")
    assert issued["access"] == "ro" and issued["fd_socket"] == str(daemon.fd_socket)
    assert issued["request_line"] == f"MEMPLUG/1 ATTACH {issued['ticket']}"
    assert issued["region"]["name"] == name
    fd, info = redeem(issued["fd_socket"], issued["ticket"])
    os.close(fd)
    assert info.region == name and info.access == "ro"
    human = ok(sock, "ticket", name)
    assert "MEMPLUG/1 ATTACH " in human and str(daemon.fd_socket) in human
    ok(sock, "rm", name)


def test_exit_codes(daemon: DaemonProcess, tmp_path: Path) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "16M")
    fails(sock, 3, "show", "no-such-region")
    fails(sock, 3, "plug", "no-such-region")
    fails(sock, 3, "rm", "no-such-region")
    fails(sock, 2, "plug", name, "0x1000", "2M")  # misaligned offset
    fails(sock, 2, "unplug", name, "0", "3M")  # misaligned length
    fails(sock, 2, "create", "Bad_Name", "16M")
    fails(sock, 4, "create", name, "16M")
    fails(sock, 5, "populate", name)  # nothing is plugged
    nowhere = tmp_path / "no-daemon.sock"
    for verb in (["ls"], ["status"], ["show", name], ["plug", name]):
        line = fails(nowhere, 8, *verb)
        assert str(nowhere) in line
    ok(sock, "rm", name)


def test_quota_exit_code(daemon_factory: Factory) -> None:
    d = daemon_factory("--max-bytes", "4M")
    ok(d.socket, "create", "q", "64M")
    assert ok_json(d.socket, "status")["quota_bytes"] == 4 * MiB
    ok(d.socket, "plug", "q", "0", "4M")
    fails(d.socket, 6, "plug", "q")
    assert ok_json(d.socket, "show", "q")["plugged"] == [[0, 4 * MiB]]


def test_exec_passes_the_fds(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    rw, ro = fresh(), f"{fresh()}.ro-x"
    ok(sock, "create", rw, "16M")
    ok(sock, "create", ro, "16M")
    env_ro = "MEMPLUG_FD_" + ro.upper().replace(".", "_").replace("-", "_")
    script = (
        f"echo $MEMPLUG_FD_{rw.upper()} {{fd:{rw}}} {{path:{rw}}}; "
        f"readlink /proc/self/fd/{{fd:{rw}}}; "
        f"grep ^flags /proc/self/fdinfo/{{fd:{rw}}}; "
        f"echo ${env_ro} {{fd:{ro}}}; "
        f"readlink {{path:{ro}}}; "
        f"grep ^flags /proc/self/fdinfo/{{fd:{ro}}}"
    )
    ok(sock, "plug", rw)
    out = ok(sock, "exec", "-r", rw, "-r", f"{ro}:ro:sparse", "--", "sh", "-c", script).splitlines()
    assert len(out) == 6, out
    fd_env, fd_arg, path = out[0].split()
    assert fd_env == fd_arg and fd_arg.isdigit() and int(fd_arg) > 2
    assert path == f"/proc/self/fd/{fd_arg}"
    assert out[1] == f"/memfd:memplug:{rw} (deleted)"
    assert int(out[2].split()[1], 8) & os.O_ACCMODE == os.O_RDWR
    ro_env, ro_arg = out[3].split()
    assert ro_env == ro_arg and ro_arg != fd_arg
    assert out[4] == f"/memfd:memplug:{ro} (deleted)"
    assert int(out[5].split()[1], 8) & os.O_ACCMODE == os.O_RDONLY

    fails(sock, 3, "exec", "-r", "no-such-region", "--", "true")
    proc = memplug(sock, "exec", "-r", rw, "--", "/nonexistent/program")
    assert proc.returncode == 127 and proc.stderr.startswith("memplug: "), proc.stderr
    ok(sock, "rm", rw, ro)


def start_plug(sock: Path, name: str) -> subprocess.Popen[str]:
    """`memplug plug NAME` in a process of its own, for a test to interrupt."""
    return subprocess.Popen(
        [str(MEMPLUG), "plug", name],
        env=env_for(sock),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_cancels_plug_and_rolls_back(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "4G")
    with Client(sock) as c:
        proc = start_plug(sock, name)
        try:
            deadline = time.monotonic() + 20
            while c.get_region(name).allocated_bytes == 0:  # the plug is under way
                assert proc.poll() is None, f"memplug plug ended early: {proc.communicate()}"
                assert time.monotonic() < deadline, "the plug never started"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, f"exit {proc.returncode}, want 130\n{err}"
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("memplug: "), err
        deadline = time.monotonic() + 5
        while True:
            region = c.get_region(name)
            if region.allocated_bytes == 0 and region.plugged_bytes == 0:
                break
            assert time.monotonic() < deadline, f"no rollback after Ctrl-C: {region}"
            time.sleep(0.05)
        c.delete_region(name)


# --------------------------------------------------------------------------- cancel accounting


def plug_cancels(daemon: DaemonProcess) -> tuple[int, int]:
    """(CANCELLED, OK) Plug RPCs in the daemon's log."""
    lines = [line for line in daemon.log().splitlines() if " rpc=Plug " in line]
    return (
        sum("status=CANCELLED" in line for line in lines),
        sum("status=OK" in line for line in lines),
    )


def test_every_cancelled_plug_is_counted_and_logged(daemon_factory: Factory) -> None:
    """Cancels landing as the plug finishes: each call is counted and logged once, truthfully.

    The client cancels the moment GetRegion shows the range plugged, as the
    result is on its way. Whichever side wins, the daemon's log line and its
    metric give the same final code for the call, and that code is what the
    daemon did: OK with the range plugged, CANCELLED with it rolled back. A
    client that got the result saw OK, and the daemon says OK too; a client
    whose cancel crossed the result on the wire sees CANCELLED for a plug that
    was done, which is what the CLI's "cancelled too late" reports.
    """
    port = free_port()
    d = daemon_factory("--metrics", f"127.0.0.1:{port}")
    size = 256 * MiB
    with Client(d.socket) as c:
        c.create_region("fin", size)
        seen = {"OK": 0, "CANCELLED": 0}
        before = (0, 0)  # (CANCELLED, OK) Plug lines in the log so far
        for i in range(12):
            cancel = threading.Event()
            outcome: list[str] = []

            def run(cancel: threading.Event = cancel, outcome: list[str] = outcome) -> None:
                try:
                    c.plug("fin", cancel=cancel)
                    outcome.append("OK")
                except Cancelled:
                    outcome.append("CANCELLED")

            worker = threading.Thread(target=run)
            worker.start()
            while c.get_region("fin").plugged_bytes < size and worker.is_alive():
                pass  # spin: cancel within a GetRegion round trip of the plug's end
            cancel.set()
            worker.join(30)
            seen[outcome[0]] += 1
            # The call's one log line comes once the daemon is done with it
            # (after the rollback, for a cancel).
            deadline = time.monotonic() + 10
            while sum(plug_cancels(d)) < i + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            cancelled, done = plug_cancels(d)
            assert cancelled + done == i + 1, d.log()
            daemon_said = "OK" if done > before[1] else "CANCELLED"
            before = (cancelled, done)
            if outcome[0] == "OK":
                assert daemon_said == "OK", "the client had the result; the daemon said CANCELLED"
            region = c.get_region("fin")
            if daemon_said == "OK":
                assert region.plugged_bytes == size
            else:
                assert region.plugged_bytes == 0 and region.allocated_bytes == 0
            c.unplug("fin")
        assert seen["OK"] + seen["CANCELLED"] == 12

        def counted() -> tuple[float, float]:
            m = scrape(port)
            return (
                value(m, "memplug_rpc_total", rpc="Plug", code="CANCELLED"),
                value(m, "memplug_rpc_total", rpc="Plug", code="OK"),
            )

        deadline = time.monotonic() + 10
        while counted() != plug_cancels(d) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counted() == plug_cancels(d), f"the client saw {seen}"


def test_ctrl_c_says_rolled_back_only_once_it_is(daemon: DaemonProcess) -> None:
    """Repeated Ctrl-C of a big plug: after "rolled back" the memory is already back."""
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "4G")
    ok(sock, "plug", name, "0", "2M")  # some memory from before that the rollback keeps
    with Client(sock) as c:
        before = c.get_region(name)
        rolled_back = 0
        for delay in (0.15, 0.3, 0.45, 0.6, 0.8, 1.0):
            proc = start_plug(sock, name)
            try:
                while c.get_region(name).allocated_bytes <= before.allocated_bytes:
                    assert proc.poll() is None, f"memplug plug ended early: {proc.communicate()}"
                    time.sleep(0.01)
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            after = c.get_region(name)  # no waiting: the CLI has waited
            if proc.returncode == 0:  # the plug was done before the signal came
                assert after.plugged_bytes == 4 * GiB, out
            else:
                assert proc.returncode == 130, f"exit {proc.returncode}, want 130\n{err}"
                lines = err.splitlines()
                assert len(lines) == 1 and lines[0].startswith("memplug: "), err
                if "rolled back" in lines[0]:
                    rolled_back += 1
                    assert after.plugged == before.plugged, lines[0]
                    assert after.allocated_bytes == before.allocated_bytes, (lines[0], after)
                else:
                    assert "too late" in lines[0] or "still rolling back" in lines[0], lines[0]
            if after.plugged_bytes > before.plugged_bytes:
                c.unplug(name, 2 * MiB)
        assert rolled_back > 0, "no Ctrl-C ever ended in a confirmed rollback"
        c.delete_region(name)


# --------------------------------------------------------------------------- bad input


def test_bad_ranges_and_sizes_are_one_line(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "64M")
    for verb in ("plug", "populate", "unplug", "discard"):
        line = fails(sock, 2, verb, name, "70M")  # offset past the end, length to the end
        assert "past the end" in line, line
        fails(sock, 2, verb, name, "64M")  # offset at the end
        line = fails(sock, 2, verb, name, "0", "66M")  # the daemon's OUT_OF_RANGE
        assert "exceeds" in line, line
        fails(sock, 2, verb, name, "0", "99999999999T")
        fails(sock, 2, verb, name, "-2M")
    fails(sock, 2, "plug", name, "--threads", "-1")
    fails(sock, 2, "plug", name, "--threads", str(1 << 32))
    line = fails(sock, 2, "create", fresh(), "99999999999T")
    assert "out of range" in line, line
    fails(sock, 2, "create", fresh(), "16M", "--owner-uid", str(1 << 32))
    fails(sock, 2, "create", fresh(), "16M", "--allow-gid", "-1")
    fails(sock, 2, "create", fresh(), "16M", "--numa-node", str(1 << 40))
    fails(sock, 2, "create", fresh(), "16M", "--block-size", "0x-1")
    fails(sock, 2, "--no-such-option", "ls")
    fails(sock, 2, "plug")  # NAME missing
    ok(sock, "rm", name)


EXIT_CODES_DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 124, 130}  # 1 is a bug
SIZE_TEXTS = ["0", "1", "2M", "64M", "70M", "1G", "0x200000", "0x0", "-1", "-0x10", "1.5M",
              "0.5K", "1e3", "inf", "nan", "", " ", "16E", "99999999999T", "18446744073709551615",
              "18446744073709551616", "2MiB", "2mb", "0x", "M", "3.0000000001G",
              "1" * 40]  # fmt: skip
CLI_NAMES = ["fz", "fz-missing", "", "Bad_Name", "a" * 64, "ü", "-x", "--json", "fz:ro", "..."]


def sizes() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(SIZE_TEXTS),
        st.integers(-(1 << 70), 1 << 70).map(str),
        st.integers(0, 1 << 70).map(hex),
        st.text(max_size=12),
    )


def invocations() -> st.SearchStrategy[list[str]]:
    name = st.one_of(st.sampled_from(CLI_NAMES), st.text(max_size=10))
    number = st.one_of(st.integers(-(1 << 40), 1 << 40).map(str), st.text(max_size=6))
    ranged = st.tuples(
        st.sampled_from(["plug", "populate", "unplug", "discard"]),
        name,
        st.lists(sizes(), max_size=3),
        st.lists(
            st.one_of(
                st.tuples(st.just("--threads"), number),
                st.tuples(st.just("--strategy"), st.sampled_from(["auto", "fallocate", "x"])),
                st.tuples(st.just("--mode"), st.sampled_from(["read", "write", ""])),
                st.tuples(st.just("--json")),
                st.tuples(
                    st.just("--range"),
                    st.tuples(sizes(), sizes()).map(":".join) | st.text(max_size=8),
                ),
            ),
            max_size=2,
        ),
    ).map(lambda t: [t[0], t[1], *t[2], *(a for opt in t[3] for a in opt)])
    create = st.tuples(
        name,
        st.lists(sizes(), max_size=2),
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["--page-size", "--block-size"]), sizes()),
                st.tuples(
                    st.sampled_from(
                        ["--owner-uid", "--allow-uid", "--allow-gid", "--ro-uid", "--numa-node"]
                    ),
                    number,
                ),
                st.tuples(st.just("-b"), st.sampled_from(["shmem", "hugetlb", "file", "x"])),
                st.tuples(st.just("-l"), st.text(max_size=8)),
                st.tuples(st.sampled_from(["--thp", "--no-thp", "--lock", "--bogus"])),
            ),
            max_size=3,
        ),
    ).map(lambda t: ["create", t[0], *t[1], *(a for opt in t[2] for a in opt)])
    other = st.tuples(
        st.sampled_from(["show", "rm", "attach", "ls", "status", "nosuchverb"]), name
    ).map(list)
    return st.one_of(ranged, create, other)


@settings(
    max_examples=int(os.environ.get("MEMPLUG_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(args=invocations())
def test_fuzz_cli_arguments(daemon: DaemonProcess, args: list[str]) -> None:
    """Any arguments: an exit code from the documented set, never a traceback; an error
    is one 'memplug: ' line on stderr. Runs the CLI in-process (CliRunner)."""
    with Client(daemon.socket) as c:
        if "fz" not in {r.name for r in c.list_regions()}:
            c.create_region("fz", 64 * MiB)
        result = CliRunner().invoke(cli, ["--socket", str(daemon.socket), *args])
        for r in c.list_regions():  # back to the one region, nothing plugged
            if r.name != "fz":
                c.delete_region(r.name)
            elif r.plugged:
                c.unplug("fz")
    shown = f"memplug {args!r}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        shown,
        "".join(traceback.format_exception(result.exception)),
    )
    assert result.exit_code in EXIT_CODES_DOCUMENTED, shown
    assert "Traceback" not in result.output, shown
    if result.exit_code != 0:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("memplug: "), shown


# --------------------------------------------------------------------------- first steps


def test_version_is_the_package_version() -> None:
    proc = subprocess.run([str(MEMPLUG), "--version"], capture_output=True, text=True, check=False)
    daemon = subprocess.run(
        [str(MEMPLUG.parent / "memplugd"), "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    version = daemon.stdout.split()[1]
    assert proc.stdout.split() == ["memplug", version], (proc.stdout, daemon.stdout)


def test_range_verbs_explain_offset_length_and_strategy() -> None:
    for verb in ("plug", "populate", "unplug", "discard"):
        text = " ".join(subprocess.run(
            [str(MEMPLUG), verb, "--help"], capture_output=True, text=True, check=True
        ).stdout.split())  # fmt: skip
        for said in ("512M", "0x200000", "No OFFSET: the whole region", "No LENGTH: from OFFSET"):
            assert said in text, (verb, said, text)
        if verb == "plug":
            for said in ("auto (default)", "fallocate(2)", "MADV_POPULATE_WRITE"):
                assert said in text, (said, text)


def test_create_needs_a_size_except_to_adopt_a_file(daemon_factory: Factory) -> None:
    allowed = Path(tempfile.mkdtemp(prefix="memplug-cli-"))
    try:
        d = daemon_factory("--allow-dir", str(allowed))
        sock = d.socket
        for backing in ("shmem", "hugetlb"):
            line = fails(sock, 2, "create", "nosize", "-b", backing)
            assert "missing argument SIZE" in line and backing in line, line
        line = fails(sock, 2, "create", "neg", "-1G")
        assert "-1G" in line and "negative" in line and "No such option" not in line, line
        line = fails(sock, 2, "plug", "neg", "0", "-0x200000")
        assert "-0x200000" in line and "negative" in line, line
        with Client(sock) as c:
            assert c.list_regions() == []
        (allowed / "disk").write_bytes(b"")
        os.truncate(allowed / "disk", 4 * MiB)
        adopted = ok_json(sock, "create", "adopted", "-b", "file", "--path", "disk")
        assert adopted["size"] == 4 * MiB and adopted["backing"] == "file"
        ok(sock, "rm", "adopted")
    finally:
        shutil.rmtree(allowed, ignore_errors=True)


def test_rm_deletes_nothing_when_a_name_is_missing(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    a1, a2 = fresh(), fresh()
    ok(sock, "create", a1, "16M")
    ok(sock, "create", a2, "16M")
    line = fails(sock, 3, "rm", a1, "nonexist", a2, "gone-too")
    assert "nonexist, gone-too" in line and "nothing deleted" in line, line
    assert ok_json(sock, "show", a1)["name"] == a1 and ok_json(sock, "show", a2)["name"] == a2
    assert ok_json(sock, "rm", a1, a2, a1) == {"deleted": [a1, a2]}
    fails(sock, 3, "show", a1)


def test_exec_names_the_variable_two_regions_share(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    dotted, dashed = "ab.x", "ab-x"
    ok(sock, "create", dotted, "16M")
    ok(sock, "create", dashed, "16M")
    ok(sock, "plug", dotted)
    line = fails(sock, 2, "exec", "-r", dotted, "-r", dashed, "--", "true")
    assert f"{dotted} and --region {dashed}" in line and "MEMPLUG_FD_AB_X" in line, line
    line = fails(sock, 2, "exec", "-r", dotted, "-r", f"{dotted}:ro", "--", "true")
    assert "given twice" in line, line
    # A variable inherited from the caller (a nested exec) is replaced, not "given twice".
    proc = subprocess.run(
        [str(MEMPLUG), "exec", "-r", dotted, "--", "sh", "-c", "echo $MEMPLUG_FD_AB_X {fd:ab.x}"],
        env={**env_for(sock), "MEMPLUG_FD_AB_X": "99"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    fd_env, fd_arg = proc.stdout.split()
    assert fd_env == fd_arg != "99"
    ok(sock, "rm", dotted, dashed)


def test_rates_are_in_binary_units(daemon: DaemonProcess) -> None:
    """The result line and the progress bar's speed speak GiB/s, as every size does."""
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "64M")
    out = ok(sock, "plug", name)
    assert re.search(r"\(\d+\.\d\d GiB/s, ", out) and "GB/s" not in out, out
    ok(sock, "rm", name)

    from rich.console import Console
    from rich.progress import Progress

    from memplug.client.cli import progress_columns

    now = [0.0]
    bar = Progress(*progress_columns(), get_time=lambda: now[0], auto_refresh=False)
    task = bar.add_task("plug x", total=4 * GiB)
    for at, done in ((0.5, 1 * GiB), (1.5, 3 * GiB)):  # 2 GiB in the second between
        now[0] = at
        bar.update(task, completed=done)
    screen = io.StringIO()
    Console(file=screen, width=120).print(bar.make_tasks_table(bar.tasks))
    shown = screen.getvalue()
    assert "2.00 GiB/s" in shown and "GB/s" not in shown, shown


def test_a_socket_without_permission_says_which_group() -> None:
    """The CLI as uid 65534 on a root:root 0660 socket: exit 7, naming the socket and its group."""
    require_root("runs the CLI as uid 65534 against root's daemon")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    where = Path(tempfile.mkdtemp(prefix="memplug-perm-", dir="/tmp"))
    where.chmod(0o755)  # only the socket's own mode stands in the way
    d = start_daemon(where, "--socket-mode", "660")
    try:
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660 and os.stat(d.socket).st_gid == 0
        for verb in (["ls"], ["create", "p1", "16M"], ["plug", "p1"]):
            proc = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                 str(MEMPLUG), "--socket", str(d.socket), *verb],
                env=env_for(d.socket), cwd="/", capture_output=True, text=True, timeout=60,
                check=False,
            )  # fmt: skip
            assert proc.returncode == 7, (verb, proc.returncode, proc.stderr)
            lines = proc.stderr.splitlines()
            assert len(lines) == 1, proc.stderr
            assert lines[0].startswith(f"memplug: permission denied on {d.socket}: "), lines[0]
            assert "in group root (the socket's group" in lines[0], lines[0]
        ok(d.socket, "ls")  # root still reaches it
    finally:
        stop_shared(d)
        shutil.rmtree(where, ignore_errors=True)
