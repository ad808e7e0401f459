"""`memplug vm-update`: a new QEMU takes over a running VM whose RAM is a memplug region.

Real QEMU processes (TCG, no guest OS: SeaBIOS runs and halts). A pattern is
written into guest RAM through the test's own mapping of the region; after the
hand-over the new QEMU reads it (HMP `xp`) and the old QEMU has exited. While
the hand-over runs, the region cannot be unplugged or deleted (the new QEMU's
command line first tries, through a wrapper). A new QEMU that cannot start
leaves the old one running with its RAM intact.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DaemonProcess, MiB, require
from test_qemu import XP_RE

from memplug.client import Client
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


def vm_update(
    daemon: DaemonProcess, old: Path, new_argv: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MEMPLUG), "vm-update", "--json", "--qmp", str(old), "-r", "vm0", "--", *new_argv],
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


@pytest.fixture
def old_vm(daemon: DaemonProcess, tmp_path: Path) -> Iterator[OldVm]:
    """A running VM on region vm0 (started by `memplug exec`), the pattern in its RAM."""
    require(shutil.which(QEMU) is not None, f"needs {QEMU}")
    client = Client(daemon.socket)
    client.create_region("vm0", RAM)
    client.plug("vm0")
    socket = tmp_path / "old.qmp"
    proc = subprocess.Popen(
        [str(MEMPLUG), "exec", "-r", "vm0", "--", *qemu_argv(socket)],
        env={**os.environ, "MEMPLUG_SOCKET": str(daemon.socket)},
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
