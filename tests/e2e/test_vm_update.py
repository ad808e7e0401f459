"""`memplug vm-update`: a new QEMU takes over a running VM whose RAM is a memplug region.

Real QEMU processes (TCG, no guest OS: SeaBIOS runs and halts). A pattern is
written into guest RAM through the test's own mapping of the region; after the
hand-over the new QEMU reads it (HMP `xp`) and the old QEMU has exited. While
the hand-over runs, the region cannot be unplugged or deleted (the new QEMU's
command line first tries, through a wrapper). A new QEMU that cannot start
leaves the old one running with its RAM intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DaemonProcess, MiB, require
from test_lifecycle import Systemd, systemd_harness
from test_qemu import XP_RE

from memplug.client import Client, FailedPrecondition
from memplug.client.qmp import Qmp

MEMPLUG = Path(sys.executable).parent / "memplug"
QEMU = "qemu-system-x86_64"
RAM = 128 * MiB
PATTERN_AT = 0x4000000  # 64 MiB: far from what SeaBIOS touches
PATTERN = (0xDEADBEEF, 0x01234567, 0x89ABCDEF, 0xFEEDFACE)
AFTER = (0x11111111, 0x22222222, 0x33333333, 0x44444444)
SPARE = 0x6000000  # a block the tests unplug to see whether the region is held


def qemu_argv(qmp_socket: Path) -> list[str]:
    return [
        QEMU,
        "-machine", "pc,memory-backend=m", "-m", f"{RAM // MiB}M",
        "-object", f"memory-backend-file,id=m,size={RAM // MiB}M,share=on,mem-path={{path:vm0}}",
        "-nodefaults", "-nographic", "-display", "none", "-S",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip


def xp(qmp: Qmp, address: int) -> tuple[int, ...]:
    out = qmp.hmp(f"xp /4xw {address:#x}")
    words = tuple(int(w, 16) for m in XP_RE.finditer(out) for w in m.group(1).split())
    assert len(words) == 4, out
    return words


def write(client: Client, address: int, words: tuple[int, ...]) -> None:
    """Write into guest RAM from this process, through a mapping of the region."""
    with client.attach("vm0") as att:
        assert att.view is not None
        att.view[address : address + 16] = struct.pack("<4I", *words)


def vm_update_argv(old: Path, new_argv: list[str]) -> list[str]:
    return [str(MEMPLUG), "vm-update", "--json", "--qmp", str(old), "-r", "vm0", "--", *new_argv]


def vm_update(
    daemon: DaemonProcess, old: Path, new_argv: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vm_update_argv(old, new_argv),
        env={**os.environ, "MEMPLUG_SOCKET": str(daemon.socket)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pids_with(text: str) -> list[int]:
    """Processes whose command line mentions text (the new QEMU's own QMP socket)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@dataclass
class OldVm:
    proc: subprocess.Popen[bytes]
    socket: Path
    client: Client

    def qmp(self) -> Qmp:
        """A new connection: QEMU serves one client at a time on a QMP socket."""
        return Qmp.connect(str(self.socket), 20)


@contextlib.contextmanager
def running_vm(socket_of_daemon: Path, tmp_path: Path) -> Iterator[OldVm]:
    """A running VM on region vm0 (started by `memplug exec`), the pattern in its RAM."""
    require(shutil.which(QEMU) is not None, f"needs {QEMU}")
    client = Client(socket_of_daemon)
    client.create_region("vm0", RAM)
    client.plug("vm0")
    socket = tmp_path / "old.qmp"
    proc = subprocess.Popen(
        [str(MEMPLUG), "exec", "-r", "vm0", "--", *qemu_argv(socket)],
        env={**os.environ, "MEMPLUG_SOCKET": str(socket_of_daemon)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Qmp.connect(str(socket), 20, wait=20) as qmp:
            qmp.execute("cont")
            assert qmp.status() == "running"
            write(client, PATTERN_AT, PATTERN)
            assert xp(qmp, PATTERN_AT) == PATTERN
        yield OldVm(proc, socket, client)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
        client.close()


@pytest.fixture
def old_vm(daemon: DaemonProcess, tmp_path: Path) -> Iterator[OldVm]:
    with running_vm(daemon.socket, tmp_path) as vm:
        yield vm


def test_vm_update_hands_the_running_vm_to_a_new_qemu(
    daemon: DaemonProcess, old_vm: OldVm, tmp_path: Path
) -> None:
    new_socket = tmp_path / "new.qmp"
    probe = tmp_path / "during.txt"
    # The new QEMU's command line first tries to unplug and delete the region:
    # the hand-over holds it, so both must be refused.
    wrapper = (
        f'{MEMPLUG} unplug vm0 {SPARE:#x} 2M >>{probe} 2>&1; echo "exit $?" >>{probe}; '
        f'{MEMPLUG} rm vm0 >>{probe} 2>&1; echo "exit $?" >>{probe}; exec "$@"'
    )
    new_argv = ["sh", "-c", wrapper, "sh", *qemu_argv(new_socket)]
    done = vm_update(daemon, old_vm.socket, new_argv)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["was_running"] is True
    new_pid = result["new_pid"]
    try:
        during = probe.read_text()
        assert during.count("exit 5") == 2, during
        assert "cannot unplug region 'vm0': it is held by 'memplug vm-update pid" in during
        assert "cannot delete region 'vm0'" in during
        # The old QEMU quit; the new one runs the VM on the same memory.
        assert old_vm.proc.wait(timeout=20) == 0
        with Qmp.connect(str(new_socket)) as new:
            assert new.status() == "running"
            assert xp(new, PATTERN_AT) == PATTERN
            write(old_vm.client, PATTERN_AT, AFTER)
            assert xp(new, PATTERN_AT) == AFTER, "the new QEMU does not map the region"
        maps = Path(f"/proc/{new_pid}/maps").read_text()
        assert "/memfd:memplug:vm0" in maps
        # The hold is gone with the tool.
        assert old_vm.client.unplug("vm0", SPARE, 2 * MiB).bytes == 2 * MiB
    finally:
        os.kill(new_pid, 9)


def test_a_new_qemu_that_cannot_start_leaves_the_old_vm_running(
    daemon: DaemonProcess, old_vm: OldVm, tmp_path: Path
) -> None:
    new_socket = tmp_path / "new.qmp"
    bad = [*qemu_argv(new_socket), "-no-such-option"]
    started = time.monotonic()
    done = vm_update(daemon, old_vm.socket, bad)
    assert done.returncode == 1, done.stderr
    assert "the new QEMU exited with 1 before it was ready" in done.stderr, done.stderr
    assert "no-such-option" in done.stderr, done.stderr
    assert "the old QEMU keeps the VM (running)" in done.stderr, done.stderr
    assert time.monotonic() - started < 60
    assert old_vm.proc.poll() is None
    with old_vm.qmp() as qmp:
        assert qmp.status() == "running"
        assert xp(qmp, PATTERN_AT) == PATTERN
    assert pids_with(str(new_socket)) == []
    assert old_vm.client.unplug("vm0", SPARE, 2 * MiB).bytes == 2 * MiB  # not held any more


def test_a_failed_migration_leaves_the_old_vm_running(
    daemon: DaemonProcess, old_vm: OldVm, tmp_path: Path
) -> None:
    """A new QEMU that starts but cannot take the state (another machine type)."""
    new_socket = tmp_path / "new.qmp"
    other = qemu_argv(new_socket)
    other[other.index("pc,memory-backend=m")] = "q35,memory-backend=m"
    done = vm_update(daemon, old_vm.socket, other)
    assert done.returncode == 1, done.stderr
    assert "the old QEMU keeps the VM (running)" in done.stderr, done.stderr
    assert old_vm.proc.poll() is None
    with old_vm.qmp() as qmp:
        assert qmp.status() == "running"
        assert xp(qmp, PATTERN_AT) == PATTERN
    assert pids_with(str(new_socket)) == []
    assert old_vm.client.unplug("vm0", SPARE, 2 * MiB).bytes == 2 * MiB


@pytest.fixture
def under_systemd(tmp_path: Path) -> Iterator[Systemd]:
    """memplugd started as systemd starts it (tests/sdharness.py): its fd store, restarts."""
    with systemd_harness(tmp_path) as harness:
        yield harness


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "crash"])
def test_a_daemon_restarted_in_the_middle_of_a_hand_over_keeps_the_hold(
    under_systemd: Systemd, tmp_path: Path, sig: int
) -> None:
    """memplugd under systemd (its fd store) restarts while the new QEMU is starting.

    The new QEMU's command line waits for the test between the hold and the
    migration; meanwhile the daemon is stopped (SIGTERM, or killed) and
    started again. The restarted daemon still refuses to unplug or delete the
    region, naming the hold; the region's memory is the one both QEMUs map;
    the hand-over then completes and its release reaches the new daemon.
    """
    first = under_systemd.start()
    with running_vm(first.socket, tmp_path) as old_vm:
        new_socket = tmp_path / "new.qmp"
        ready, go = tmp_path / "ready", tmp_path / "go"
        wrapper = f'touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done; exec "$@"'
        tool = subprocess.Popen(
            vm_update_argv(old_vm.socket, ["sh", "-c", wrapper, "sh", *qemu_argv(new_socket)]),
            env={**os.environ, "MEMPLUG_SOCKET": str(first.socket)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        new_pid = 0
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert tool.poll() is None, tool.communicate()
                assert time.monotonic() < deadline, "the new QEMU's command never ran"
                time.sleep(0.02)
            second = under_systemd.restart(first, sig)
            with Client(second.socket) as c:
                with pytest.raises(FailedPrecondition, match="held by 'memplug vm-update pid"):
                    c.unplug("vm0", SPARE, 2 * MiB)
                with pytest.raises(FailedPrecondition, match="cannot delete region 'vm0'"):
                    c.delete_region("vm0")
                with c.attach("vm0") as att:
                    assert att.view is not None
                    at = PATTERN_AT
                    assert struct.unpack("<4I", att.view[at : at + 16]) == PATTERN
            go.touch()
            out, err = tool.communicate(timeout=120)
            assert tool.returncode == 0, err
            new_pid = json.loads(out)["new_pid"]
            assert old_vm.proc.wait(timeout=20) == 0
            with Qmp.connect(str(new_socket)) as new:
                assert new.status() == "running"
                assert xp(new, PATTERN_AT) == PATTERN
                with Client(second.socket) as c:
                    write(c, PATTERN_AT, AFTER)
                    assert xp(new, PATTERN_AT) == AFTER, "the new QEMU does not map the region"
                    # The tool released its hold on the restarted daemon.
                    assert c.unplug("vm0", SPARE, 2 * MiB).bytes == 2 * MiB
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.communicate()
            if new_pid:
                os.kill(new_pid, signal.SIGKILL)
