"""QEMU 7.2 uses a plugged region as guest RAM through `memplug exec` (the documented path).

QEMU runs with -S (no guest code) and -qmp stdio; the test reads guest-physical
memory with HMP `xp` and checks that it is the region: a pattern written
through an attach shows up in the guest, and an Unplug from outside reads back
as zeros.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import DaemonProcess, MiB, require, require_root, start_daemon

from memplug.client import Client

MEMPLUG = Path(sys.executable).parent / "memplug"
QEMU = "qemu-system-x86_64"
WORDS_1M = (0xDEADBEEF, 0x01234567, 0x89ABCDEF, 0xFEEDFACE)
WORDS_2M = (0x11111111, 0x22222222, 0x33333333, 0x44444444)
XP_RE = re.compile(r"^\s*[0-9a-fA-F]+:((?:\s+0x[0-9a-fA-F]+)+)\s*$", re.M)


class Qmp:
    """QMP over a subprocess's stdin/stdout, every read bounded by a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.timeout = timeout
        self._in: IO[bytes] = proc.stdin
        self._out = proc.stdout
        os.set_blocking(self._out.fileno(), False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out, selectors.EVENT_READ)
        self._buf = b""

    def _line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, f"QEMU said nothing for {self.timeout} s (got {self._buf!r})"
            if self._sel.select(left):
                chunk = os.read(self._out.fileno(), 65536)
                assert chunk, f"QEMU closed its stdout (exit {self.proc.poll()})"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def message(self) -> dict[str, Any]:
        """The next message that is not an asynchronous event."""
        while True:
            line = self._line().strip()
            if not line:
                continue
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._in.write(json.dumps(request).encode() + b"\n")
        self._in.flush()
        reply = self.message()
        assert "return" in reply, f"{command}: {reply}"
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        out: str = self.execute("human-monitor-command", **{"command-line": command_line})
        return out

    def xp_words(self, address: int, count: int = 4) -> tuple[int, ...]:
        """count little-endian 32-bit words of guest-physical memory at address."""
        out = self.hmp(f"xp /{count}xw {address:#x}")
        words = [int(w, 16) for m in XP_RE.finditer(out) for w in m.group(1).split()]
        assert len(words) == count, f"unexpected xp output: {out!r}"
        return tuple(words)


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def qemu_argv(mem_path: str) -> list[str]:
    return [
        QEMU,
        "-machine", "pc,memory-backend=m",
        "-m", "256M",
        "-object", f"memory-backend-file,id=m,size=256M,share=on,mem-path={mem_path}",
        "-nodefaults", "-nographic", "-display", "none", "-S",
        "-qmp", "stdio",
    ]  # fmt: skip


@pytest.fixture
def qemu_vm(daemon: DaemonProcess) -> Iterator[tuple[subprocess.Popen[bytes], Qmp, Client]]:
    require(shutil.which(QEMU) is not None, f"needs {QEMU}")
    client = Client(daemon.socket)
    client.create_region("vm0", 256 * MiB)
    client.plug("vm0")
    with client.attach("vm0") as att:
        assert att.view is not None
        att.view[0x100000 : 0x100000 + 16] = struct.pack("<4I", *WORDS_1M)
        att.view[0x200000 : 0x200000 + 16] = struct.pack("<4I", *WORDS_2M)
    argv = [str(MEMPLUG), "exec", "-r", "vm0", "--", *qemu_argv("{path:vm0}")]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "MEMPLUG_SOCKET": str(daemon.socket)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        qmp = Qmp(proc)
        greeting = qmp.message()
        assert "QMP" in greeting, greeting
        qmp.execute("qmp_capabilities")
        yield proc, qmp, client
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=20)
        client.close()
        if err.strip():
            print(f"QEMU stderr:\n{err.decode(errors='replace')}")


def test_qemu_runs_on_the_region(
    daemon: DaemonProcess, qemu_vm: tuple[subprocess.Popen[bytes], Qmp, Client]
) -> None:
    proc, qmp, client = qemu_vm
    assert qmp.xp_words(0x100000) == WORDS_1M, "the guest does not see the region's contents"
    assert qmp.xp_words(0x200000) == WORDS_2M

    # memplug exec execs: the QEMU process is the memplug process, holding the memfd.
    exe = os.readlink(f"/proc/{proc.pid}/exe")
    assert os.path.basename(exe).startswith("qemu-system"), exe
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "/memfd:memplug:vm0" in maps, "QEMU did not map the region's memfd"

    # Unplug one block from outside: the guest reads zeros there, the rest stays.
    out = client.unplug("vm0", 0x200000, 2 * MiB)
    assert out.bytes == 2 * MiB
    assert qmp.xp_words(0x200000) == (0, 0, 0, 0)
    assert qmp.xp_words(0x100000) == WORDS_1M
    assert qmp.xp_words(0x3FFFF0) == (0, 0, 0, 0)

    # QEMU maps 256 MiB but touches only what it reads: the plugged memory is
    # the daemon's, not faulted into QEMU (no prealloc, no copy).
    status = proc_status(proc.pid)
    assert status["VmRSS"] < 200 * MiB, f"QEMU VmRSS {status['VmRSS'] // MiB} MiB"
    assert status["RssShmem"] < 16 * MiB, f"QEMU RssShmem {status['RssShmem'] // MiB} MiB"
    region = client.get_region("vm0")
    assert region.plugged == [(0, 2 * MiB), (4 * MiB, 252 * MiB)]

    qmp.execute("quit")
    assert proc.wait(timeout=20) == 0


# --------------------------------------------------------------------------- QEMU unprivileged

NOBODY = 65534
UNPRIVILEGED_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root
# Runs as uid 65534: redeem the ticket itself (the daemon checks *its* credentials),
# then exec QEMU with the fd, as a VMM launcher would. argv: fd_socket ticket qemu...
LAUNCHER = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(("MEMPLUG/1 ATTACH %s\n" % sys.argv[2]).encode())
msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
if not fds:
    sys.stderr.write("launcher: refused: %s" % msg.decode(errors="replace"))
    sys.exit(3)
os.set_inheritable(fds[0], True)
argv = [a.replace("{path}", "/proc/self/fd/%d" % fds[0]) for a in sys.argv[3:]]
os.execvp(argv[0], argv)
"""


@pytest.fixture(scope="module")
def public_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon whose fd socket uid 65534 can reach (pytest's tmp dirs are 0700)."""
    require_root("runs QEMU as uid 65534")
    public = Path(tempfile.mkdtemp(prefix="memplug-qemu-", dir="/tmp"))
    try:
        public.chmod(0o755)
        d = start_daemon(
            tmp_path_factory.mktemp("memplugd"), "--fd-socket", str(public / "fd.sock")
        )
        yield d
        assert d.alive(), d.log()
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), f"memplugd logged a traceback:\n{d.log()}"
    finally:
        shutil.rmtree(public, ignore_errors=True)


def launch_unprivileged(ticket_socket: str, ticket: str) -> subprocess.Popen[bytes]:
    require(shutil.which(QEMU) is not None, f"needs {QEMU}")
    require(os.path.exists(UNPRIVILEGED_PYTHON), f"needs {UNPRIVILEGED_PYTHON}")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    argv = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
        UNPRIVILEGED_PYTHON, "-I", "-c", LAUNCHER, ticket_socket, ticket,
        *qemu_argv("{path}"),
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("access", ["rw", "ro"])
def test_qemu_as_the_owner(public_daemon: DaemonProcess, access: str) -> None:
    """The owner may reopen /proc/self/fd/N read-write, as QEMU's mem-path does."""
    name = f"owned-{access}"
    with Client(public_daemon.socket) as c:
        c.create_region(name, 256 * MiB, owner_uid=NOBODY)
        c.plug(name, 0, 4 * MiB)
        with c.attach(name, sparse=True) as att:
            assert att.view is not None
            att.view[0x100000 : 0x100000 + 16] = struct.pack("<4I", *WORDS_1M)
        ticket = c.ticket(name, access)
        proc = launch_unprivileged(ticket.fd_socket, ticket.ticket)
        try:
            qmp = Qmp(proc)
            assert "QMP" in qmp.message()
            qmp.execute("qmp_capabilities")
            assert qmp.xp_words(0x100000) == WORDS_1M
            assert proc_status(proc.pid).get("VmRSS", 0) < 200 * MiB
            assert os.stat(f"/proc/{proc.pid}").st_uid == NOBODY
            qmp.execute("quit")
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=20)
        c.delete_region(name)


def test_qemu_as_a_non_owner_cannot_reopen(public_daemon: DaemonProcess) -> None:
    """Allowed to attach, but not the inode's owner: QEMU's reopen of mem-path fails."""
    with Client(public_daemon.socket) as c:
        c.create_region("shared-ro", 256 * MiB, read_only_uids=[NOBODY])
        c.plug("shared-ro", 0, 4 * MiB)
        ticket = c.ticket("shared-ro", "ro")
        proc = launch_unprivileged(ticket.fd_socket, ticket.ticket)
        try:
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=20)
        text = err.decode(errors="replace")
        assert proc.returncode not in (0, 3), f"exit {proc.returncode}: {text}"
        assert "Permission denied" in text, text
        assert c.get_region("shared-ro").allocated_bytes == 4 * MiB
        c.delete_region("shared-ro")
