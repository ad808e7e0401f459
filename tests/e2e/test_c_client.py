"""examples/attach.c, the reference C client of the fd socket, against a real memplugd."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, MiB, require, start_daemon, stop_shared

from memplug.client import Client

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "attach.c"
PATTERN = bytes.fromhex("00112233445566778899aabbccddeeff") + b"memplug!" * 2


@pytest.fixture(scope="module")
def attach_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc")
    require(cc is not None, "needs a C compiler (cc)")
    assert cc is not None
    out = tmp_path_factory.mktemp("attach") / "attach"
    build = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, f"examples/attach.c does not build cleanly:\n{build.stderr}"
    return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("memplugd"))
    yield d
    stop_shared(d)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        c.create_region("vm0", 16 * MiB)
        c.plug("vm0", 0, 2 * MiB)
        with c.attach("vm0", sparse=True) as att:
            assert att.view is not None
            att.view[: len(PATTERN)] = PATTERN
        yield c


def run_attach(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("access", ["rw", "ro"])
def test_c_client_attaches_and_reads(attach_bin: Path, client: Client, access: str) -> None:
    ticket = client.ticket("vm0", access)
    proc = run_attach(attach_bin, ticket.fd_socket, ticket.ticket, str(len(PATTERN)))
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith("OK region=vm0 ")
    fields = dict(item.split("=", 1) for item in lines[0][3:].split())
    assert fields["size"] == str(16 * MiB) and fields["access"] == access
    assert fields["backing"] == "shmem"
    assert lines[1] == PATTERN.hex()


def test_c_client_default_length(attach_bin: Path, client: Client) -> None:
    ticket = client.ticket("vm0", "ro")
    proc = run_attach(attach_bin, ticket.fd_socket, ticket.ticket)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == PATTERN[:16].hex()


def test_c_client_used_ticket_is_refused(attach_bin: Path, client: Client) -> None:
    ticket = client.ticket("vm0")
    first = run_attach(attach_bin, ticket.fd_socket, ticket.ticket)
    assert first.returncode == 0, first.stderr
    again = run_attach(attach_bin, ticket.fd_socket, ticket.ticket)
    assert again.returncode == 1
    assert again.stdout == ""
    assert "refused: ERR PERMISSION_DENIED" in again.stderr, again.stderr


def test_c_client_bad_socket(attach_bin: Path, tmp_path: Path) -> None:
    proc = run_attach(attach_bin, str(tmp_path / "nothing.sock"), "A" * 32)
    assert proc.returncode == 1
    assert "connect" in proc.stderr
    usage = run_attach(attach_bin)
    assert usage.returncode == 2 and "usage" in usage.stderr
