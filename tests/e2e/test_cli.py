"""The `memplug` command line as a user runs it: a subprocess talking to a real memplugd."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, GiB, MiB, start_daemon, stop_shared

from memplug.client import Client
from memplug.client.attach import redeem

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
    out = ok(sock, "exec", "-r", rw, "-r", f"{ro}:ro", "--", "sh", "-c", script).splitlines()
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


def test_ctrl_c_cancels_plug_and_rolls_back(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    name = fresh()
    ok(sock, "create", name, "4G")
    with Client(sock) as c:
        proc = subprocess.Popen(
            [str(MEMPLUG), "plug", name],
            env=env_for(sock),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
