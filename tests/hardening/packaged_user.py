"""memplugd as packaging/systemd/memplugd.service runs it: a system uid, not root, with
only the unit's capabilities (ambient and bounding set alike), and a low RLIMIT_NOFILE.

`wrapper()` is the command start_daemon(..., wrapper=...) puts before the daemon;
`owned_dir()` a directory that uid owns, for its state dir and sockets.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Final

from conftest import require, require_root

UNIT: Final = Path(__file__).resolve().parents[2] / "packaging/systemd/memplugd.service"
# The unit's User=memplug is made by systemd-sysusers at install time; the tests use
# a fixed system uid no account on the machine has, so they need no account of their own.
PACKAGED_UID: Final = 65533
LOW_NOFILE: Final = 1024


def unit_capabilities(key: str = "AmbientCapabilities") -> list[str]:
    """The unit's capabilities under `key`, as setpriv names them (chown, dac_override...)."""
    for line in UNIT.read_text().splitlines():
        if match := re.fullmatch(rf"{key}=(.*)", line.strip()):
            return [c.removeprefix("CAP_").lower() for c in match.group(1).split()]
    raise LookupError(f"no {key}= in {UNIT}")


def wrapper(nofile: int = LOW_NOFILE) -> list[str]:
    """prlimit + setpriv: uid/gid PACKAGED_UID, no groups, the unit's capabilities only."""
    require_root("starts memplugd as another uid")
    for tool in ("prlimit", "setpriv"):
        require(shutil.which(tool) is not None, f"needs {tool} (util-linux)")
    ambient = unit_capabilities("AmbientCapabilities")
    bounding = unit_capabilities("CapabilityBoundingSet")
    assert set(ambient) <= set(bounding), (ambient, bounding)
    caps = ",".join(f"+{c}" for c in ambient)
    return [
        "prlimit",
        f"--nofile={nofile}:{nofile}",
        "setpriv",
        f"--reuid={PACKAGED_UID}",
        f"--regid={PACKAGED_UID}",
        "--clear-groups",
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps=-all,{caps}",
        "--bounding-set=-all," + ",".join(f"+{c}" for c in bounding),
        "--",
    ]


def owned_dir(path: Path) -> Path:
    """path made (0755: other uids reach the fd socket in it) and given to PACKAGED_UID."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(path, PACKAGED_UID, PACKAGED_UID)
    return path


def assert_runs_packaged(pid: int) -> None:
    """The daemon really runs as PACKAGED_UID with the unit's capabilities and nothing more."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and set(uids.group(1).split()) == {str(PACKAGED_UID)}, uids
    effective = re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M)
    assert effective is not None
    want = 0
    for cap in unit_capabilities():
        want |= 1 << CAPABILITY_BITS[cap]
    assert int(effective.group(1), 16) == want, f"CapEff {effective.group(1)}, want {want:x}"
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(rf"Max open files\s+{LOW_NOFILE}\s+{LOW_NOFILE}\s", limits), limits


# linux/capability.h numbers of the capabilities a unit may grant memplugd.
CAPABILITY_BITS: Final = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "ipc_lock": 14,
    "ipc_owner": 15,
    "sys_admin": 21,
    "sys_resource": 24,
}
