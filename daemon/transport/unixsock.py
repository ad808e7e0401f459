"""Unix socket paths: claim one from a dead daemon, never from a live one."""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from memplug.common.errors import StartupError

log = logging.getLogger("memplug.server")


def claim_socket_path(path: Path) -> None:
    """Make way for our socket: replace a dead daemon's, never a live one's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket: remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("replaced the stale socket %s of a daemon that is gone", path)
        return
    except TimeoutError:
        raise StartupError(
            f"{path} belongs to a daemon that does not answer; stop it first"
        ) from None
    finally:
        probe.close()
    raise StartupError(f"another memplugd is already serving on {path}; stop it first")
