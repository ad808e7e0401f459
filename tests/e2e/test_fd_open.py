"""`MEMPLUG/1 OPEN <region> <rw|ro>` on the fd socket: no ticket, the region's ACL alone.

The peer is a real uid-65534 process (setpriv drops the credentials), so
the daemon's decision rests on SO_PEERCRED, as it must.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, MiB, require, require_root, start_daemon

from memplug.client import Client

NOBODY = 65534
UNPRIVILEGED_PYTHON = "/usr/bin/python3"

# Runs as uid 65534 with the standard library only: send one OPEN, report what came back.
CHILD = r"""
import fcntl, json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(("MEMPLUG/1 OPEN %s %s\n" % (sys.argv[2], sys.argv[3])).encode())
msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
report = {"line": msg.decode(errors="replace").strip(), "fds": len(fds)}
if fds:
    report["accmode"] = {os.O_RDONLY: "ro", os.O_RDWR: "rw"}[
        fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE]
print(json.dumps(report))
"""


def open_as_nobody(fd_socket: Path, name: str, access: str) -> dict[str, Any]:
    require(os.path.exists(UNPRIVILEGED_PYTHON), f"needs {UNPRIVILEGED_PYTHON} for uid 65534")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
         UNPRIVILEGED_PYTHON, "-I", "-c", CHILD, str(fd_socket), name, access],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def open_as_root(fd_socket: Path, line: bytes) -> tuple[str, list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(fd_socket))
        s.sendall(line)
        msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
    return msg.decode().strip(), fds


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon whose fd socket uid 65534 can reach (pytest's tmp dirs are 0700)."""
    require_root("runs processes as uid 65534")
    where = Path(tempfile.mkdtemp(prefix="memplug-open-", dir="/tmp"))
    where.chmod(0o755)
    d = start_daemon(tmp_path_factory.mktemp("memplugd"), "--fd-socket", str(where / "fd.sock"))
    try:
        yield d, where / "fd.sock"
    finally:
        assert d.alive(), d.log()
        assert d.stop() == 0
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize(
    ("name", "acl", "access", "expected"),
    [
        ("none", {}, "ro", "PERMISSION_DENIED"),
        ("allowed", {"allowed_uids": [NOBODY]}, "rw", "rw"),
        ("ro-only-ro", {"read_only_uids": [NOBODY]}, "ro", "ro"),
        ("ro-only-rw", {"read_only_uids": [NOBODY]}, "rw", "PERMISSION_DENIED"),
        ("owner", {"owner_uid": NOBODY}, "rw", "rw"),
    ],
)
def test_open_obeys_the_acl(
    public: tuple[DaemonProcess, Path], name: str, acl: dict[str, Any], access: str, expected: str
) -> None:
    daemon, fd_socket = public
    with Client(daemon.socket) as c:
        c.create_region(name, 8 * MiB, **acl)
    report = open_as_nobody(fd_socket, name, access)
    if expected == "PERMISSION_DENIED":
        assert report["fds"] == 0 and report["line"].startswith("ERR PERMISSION_DENIED "), report
        assert "refused pid=" in daemon.log() and f"uid={NOBODY}" in daemon.log()
    else:
        assert report["fds"] == 1 and report["line"].startswith("OK region="), report
        assert report["accmode"] == expected


def test_open_of_an_unknown_region_is_not_found(public: tuple[DaemonProcess, Path]) -> None:
    _, fd_socket = public
    line, fds = open_as_root(fd_socket, b"MEMPLUG/1 OPEN no-such-region rw\n")
    assert fds == [] and line.startswith("ERR NOT_FOUND "), line


@pytest.mark.parametrize(
    "request_line",
    [b"MEMPLUG/1 OPEN x\n", b"MEMPLUG/1 OPEN Bad rw\n", b"MEMPLUG/1 OPEN x wx\n", b"OPEN x rw\n"],
)
def test_malformed_open_is_invalid(public: tuple[DaemonProcess, Path], request_line: bytes) -> None:
    _, fd_socket = public
    line, fds = open_as_root(fd_socket, request_line)
    assert fds == [] and line.startswith("ERR INVALID_ARGUMENT "), line


def test_client_attach_uses_open_and_works_without_tickets(
    public: tuple[DaemonProcess, Path],
) -> None:
    daemon, fd_socket = public
    with Client(daemon.socket, fd_socket=fd_socket) as c:
        c.create_region("direct", 8 * MiB)
        c.plug("direct")
        with c.attach("direct", populate="write") as mem:
            assert mem.view is not None
            mem.view[0:6] = b"direct"
        with c.attach("direct", "ro") as mem:
            assert mem.view is not None and bytes(mem.view[0:6]) == b"direct"
    assert "rpc=Attach " not in daemon.log()  # no ticket was issued
