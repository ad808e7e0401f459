"""memplugd as an ordinary user: what `make run` does for a non-root developer.

The daemon and its client run as a real other uid (setpriv to 65534), with
sockets under their own $XDG_RUNTIME_DIR and state in a directory they own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, require, require_root

NOBODY = 65534

CLIENT = """
import json, os
from memplug.client import Client
with Client() as c:
    region = c.create_region("u1", 64 << 20)
    c.plug("u1")
    with c.attach("u1") as att:
        att.view[0:5] = b"hello"
    with c.attach("u1", "ro") as att:
        data = bytes(att.view[0:5])
    print(json.dumps({"owner": region.owner_uid, "plugged": c.get_region("u1").plugged_bytes,
                      "data": data.decode(), "uid": os.geteuid()}))
"""


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory uid 65534 owns (pytest's tmp_path is root's, mode 0700)."""
    require_root("runs the daemon and its client as uid 65534")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    where = Path(tempfile.mkdtemp(prefix="memplug-nonroot-"))
    os.chmod(where, 0o755)
    os.chown(where, NOBODY, NOBODY)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MEMPLUG_", "NOTIFY"))}
    return {**env, "HOME": "/root", "XDG_RUNTIME_DIR": str(home / "run"), **extra}


def test_nonroot_daemon_serves_shmem_end_to_end(home: Path) -> None:
    (home / "run").mkdir(mode=0o700)
    os.chown(home / "run", NOBODY, NOBODY)
    env = env_for(home)
    log_path = home / "memplugd.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            as_nobody(sys.executable, "-m", "memplug.daemon", "--state-dir", str(home / "state")),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        socket_path = home / "run" / "memplug" / "memplug.sock"
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        out = subprocess.run(
            as_nobody(sys.executable, "-c", CLIENT),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, f"{out.stderr}\n{log_path.read_text()}"
        result = json.loads(out.stdout)
        assert result == {"owner": NOBODY, "plugged": 64 * MiB, "data": "hello", "uid": NOBODY}
        assert (home / "state" / "memplug.db").stat().st_uid == NOBODY
    finally:
        daemon.terminate()
        code = daemon.wait(30)
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def test_nonroot_daemon_with_roots_home_names_the_flag(home: Path) -> None:
    """HOME=/root (sudo -u, setpriv): one line that says to use --state-dir."""
    out = subprocess.run(
        as_nobody(sys.executable, "-m", "memplug.daemon"),
        env=env_for(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "/root/.local/state/memplug" in last, out.stderr
    assert "--state-dir" in last, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
