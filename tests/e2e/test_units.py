"""The shipped systemd units, checked by systemd's own tools (systemd-analyze).

verify: the units parse with no unknown keys and the command exists;
security: the hardening keeps its exposure score; the syscall filter,
expanded with systemd's own group tables, still lets the daemon make the
calls it is built on; the unit keeps what the daemon's systemd code relies on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
SERVICE, SOCKET = "memplugd.service", "memplugd-fd.socket"
SHIPPED_BINARY = "/usr/local/bin/memplugd"
MAX_EXPOSURE = 2.0

# What memplugd calls, and why; each must pass the unit's SystemCallFilter.
NEEDED_SYSCALLS = {
    "memfd_create": "every SHMEM and HUGETLB region is a memfd",
    "fallocate": "plug, unplug and discard",
    "madvise": "MADV_POPULATE_WRITE/READ",
    "mbind": "NUMA placement of plugged memory",
    "set_mempolicy": "NUMA placement of plugged memory",
    "mmap": "populate and the toucher map regions",
    "ftruncate": "regions are sized with ftruncate",
    "fcntl": "F_ADD_SEALS / F_GET_SEALS",
    "openat2": "FILE regions are opened RESOLVE_BENEATH their allowed dir",
    "fchmod": "memfd inodes are made 0600",
    "sendmsg": "fds are passed with SCM_RIGHTS",
    "recvmsg": "the fd socket reads requests",
}
# The unit grants CAP_CHOWN and passes --socket-group, so these are needed too.
NEEDED_CHOWN = {
    "fchown": "a memfd belongs to its region's owner (the reason for CAP_CHOWN)",
    "chown": "--socket-group (in ExecStart): the gRPC socket goes to the memplug group",
}


@dataclass
class Units:
    service: Path
    socket: Path
    binary: Path


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    binary = Path(sys.executable).parent / "memplugd"
    assert binary.exists(), f"{binary} is missing: run make .venv/.installed"
    service_text = (UNITS / SERVICE).read_text()
    assert SHIPPED_BINARY in service_text
    service = tmp_path / SERVICE
    service.write_text(service_text.replace(SHIPPED_BINARY, str(binary)))
    socket = tmp_path / SOCKET
    shutil.copy(UNITS / SOCKET, socket)
    yield Units(service, socket, binary)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def directives(path: Path, section: str) -> dict[str, list[str]]:
    """Every Key=Value of a section, in order; keys may repeat (systemd appends)."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == section and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own syscall groups (@name -> members, nested groups included)."""
    out = analyze("syscall-filter")
    assert out.returncode == 0, out.stderr
    groups: dict[str, list[str]] = {}
    current = None
    for raw in out.stdout.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if raw.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current is not None and raw[:1].isspace():
            groups[current].append(line.split()[0])
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        if item.startswith("@"):
            assert item in groups, f"systemd knows no syscall group {item}"
            names |= expand(groups[item], groups)
        else:
            names.add(item)
    return names


def effective_allowed(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """The syscalls a list of SystemCallFilter= assignments lets through.

    As systemd reads them: the first one being an allow-list makes the filter an
    allow-list (seeded with @default); each later assignment adds its calls,
    or removes them when it starts with '~'.
    """
    assert filters, "no SystemCallFilter="
    assert not filters[0].startswith("~"), "expected an allow-list SystemCallFilter= first"
    allowed = expand(["@default"], groups)
    for value in filters:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_units_verify(units: Units) -> None:
    out = analyze("verify", str(units.service), str(units.socket))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    bad = [
        line
        for line in text.splitlines()
        if re.search(r"Unknown (key|section|lvalue)|Failed|failed|not executable|Invalid", line)
    ]
    assert not bad, text


def test_verify_catches_a_broken_unit(units: Units) -> None:
    """The check above can fail: an unknown key and a missing binary are reported."""
    text = units.service.read_text()
    units.service.write_text(
        text.replace(str(units.binary), "/nonexistent/memplugd").replace(
            "[Service]\n", "[Service]\nWatchdogSecs=5\n"
        )
    )
    out = analyze("verify", str(units.service), str(units.socket))
    assert out.returncode != 0
    assert "Unknown key" in out.stdout + out.stderr


def test_security_exposure(units: Units) -> None:
    out = analyze("security", "--offline=true", str(units.service))
    text = out.stdout + out.stderr
    match = re.search(r"Overall exposure level for memplugd\.service: (\d+\.\d+)", text)
    assert match, text
    assert float(match.group(1)) <= MAX_EXPOSURE, text


def test_service_keeps_what_the_daemon_relies_on(units: Units) -> None:
    service = directives(units.service, "Service")
    assert service["Type"] == ["notify"]  # READY=1 is sent once the sockets serve
    assert service.get("NotifyAccess", ["main"])[-1] in ("main", "all")
    assert int(service["WatchdogSec"][-1]) > 0
    assert int(service["FileDescriptorStoreMax"][-1]) > 0  # memfd regions live there
    socket = directives(units.socket, "Socket")
    argv = shlex.split(service["ExecStart"][-1])
    assert argv[0] == str(units.binary)
    fd_socket = argv[argv.index("--fd-socket") + 1]
    assert socket["ListenStream"] == [fd_socket], "the socket unit must bind the --fd-socket"
    assert socket["FileDescriptorName"] == ["fd-socket"]
    assert socket["Service"] == [SERVICE]


def test_reload_waits_for_the_daemon(units: Units) -> None:
    """systemd 252 has no Type=notify-reload: ExecReload= itself must wait and fail.

    `kill -HUP` returns before the daemon has reloaded and never reports a refusal;
    `memplugd --reload-running $MAINPID` waits for the answer in the daemon's state dir.
    """
    service = directives(units.service, "Service")
    (reload,) = service["ExecReload"]
    argv, start = shlex.split(reload), shlex.split(service["ExecStart"][-1])
    assert argv[:3] == [str(units.binary), "--reload-running", "$MAINPID"], argv
    assert argv[argv.index("--state-dir") + 1] == start[start.index("--state-dir") + 1]


def test_socket_outlives_restarts_of_the_daemon(units: Units) -> None:
    """PartOf= on the socket re-creates it at every restart (crash and watchdog too),
    resetting consumers that wait in its backlog. Requires= on the service keeps
    `systemctl stop memplugd-fd.socket` stopping both.
    """
    socket_unit = directives(units.socket, "Unit")
    assert "PartOf" not in socket_unit, socket_unit
    assert "BindsTo" not in socket_unit, socket_unit
    service_unit = directives(units.service, "Unit")
    required = " ".join(service_unit.get("Requires", [])).split()
    assert SOCKET in required, service_unit
    out = analyze("verify", str(units.service), str(units.socket))
    assert out.returncode == 0, out.stdout + out.stderr


def test_user_unit_verifies(tmp_path: Path) -> None:
    """packaging/systemd/user/memplugd.service, for `systemctl --user`."""
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    binary = Path(sys.executable).parent / "memplugd"
    text = (UNITS / "user" / SERVICE).read_text()
    assert SHIPPED_BINARY in text
    service = tmp_path / SERVICE
    service.write_text(text.replace(SHIPPED_BINARY, str(binary)))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    out = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    text_out = out.stdout + out.stderr
    assert out.returncode == 0, text_out
    assert not re.search(r"Unknown|[Ff]ailed|not executable|Invalid", text_out), text_out
    unit = directives(service, "Service")
    assert unit["Type"] == ["notify"]
    assert "User" not in unit, "a user unit runs as its user"
    assert "--reload-running" in unit["ExecReload"][-1]
    assert "--state-dir" in unit["ExecStart"][-1]


def test_fd_store_preserve_drop_in(units: Units) -> None:
    """The drop-in for systemd >= 254; older versions ignore its one key."""
    dropin_dir = units.service.parent / f"{SERVICE}.d"
    dropin_dir.mkdir()
    shutil.copy(UNITS / "fdstore-preserve.conf", dropin_dir / "fdstore-preserve.conf")
    assert directives(dropin_dir / "fdstore-preserve.conf", "Service") == {
        "FileDescriptorStorePreserve": ["yes"]
    }
    out = analyze("verify", str(units.service), str(units.socket))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    complaints = [line for line in text.splitlines() if line.strip()]
    version = int(analyze("--version").stdout.split()[1])
    if version < 254:
        assert complaints, "systemd-analyze never read the drop-in"
        assert all("Unknown key 'FileDescriptorStorePreserve'" in c for c in complaints), text
    else:
        assert not complaints, text


def test_syscall_groups_hold_what_the_daemon_needs() -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    groups = syscall_groups()
    service = expand(["@system-service"], groups)
    resources = expand(["@resources"], groups)
    assert {"madvise", "memfd_create"} <= service
    assert {"mbind", "set_mempolicy"} <= resources
    # and as systemd-analyze prints a single group
    for group, names in (("@system-service", ["madvise"]), ("@resources", ["mbind"])):
        out = analyze("syscall-filter", group)
        assert out.returncode == 0, out.stderr
        listed = {line.strip() for line in out.stdout.splitlines()}
        assert set(names) <= listed, out.stdout


def blocked_by_unit(units: Units, needed: dict[str, str]) -> dict[str, str]:
    service = directives(units.service, "Service")
    allowed = effective_allowed(service["SystemCallFilter"], syscall_groups())
    return {name: why for name, why in needed.items() if name not in allowed}


def test_syscall_filter_allows_what_the_daemon_calls(units: Units) -> None:
    assert {"madvise", "memfd_create", "mbind"} <= NEEDED_SYSCALLS.keys()
    blocked = blocked_by_unit(units, NEEDED_SYSCALLS)
    assert not blocked, (
        f"the unit's SystemCallFilter= blocks (EPERM) calls memplugd makes: {blocked}"
    )


def test_syscall_filter_allows_chown(units: Units) -> None:
    """~@privileged includes @chown: the unit would deny what CAP_CHOWN is granted for.

    With SystemCallErrorNumber=EPERM, os.chown of the gRPC socket (--socket-group,
    as ExecStart passes it) fails and memplugd exits at start; a region with
    another owner_uid fails with a misleading "needs CAP_CHOWN".
    """
    service = directives(units.service, "Service")
    assert "CAP_CHOWN" in service["AmbientCapabilities"][-1].split()
    assert "--socket-group" in service["ExecStart"][-1]
    blocked = blocked_by_unit(units, NEEDED_CHOWN)
    assert not blocked, (
        f"SystemCallFilter= {service['SystemCallFilter']} blocks (EPERM) calls memplugd "
        f"makes: {blocked}"
    )
