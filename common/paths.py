"""Where the daemon's sockets are when nobody says otherwise.

The daemon binds here and the client looks here, so both read the same
function: /run/memplug as root, $XDG_RUNTIME_DIR/memplug (or
/tmp/memplug-UID) for any other user.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "memplug.sock"
FD_SOCKET_NAME = "fd.sock"


def runtime_dir() -> Path:
    """/run/memplug as root, $XDG_RUNTIME_DIR/memplug (or /tmp/memplug-UID) otherwise."""
    if os.geteuid() == 0:
        return Path("/run/memplug")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "memplug" if xdg else Path(f"/tmp/memplug-{os.geteuid()}")


def default_socket() -> Path:
    """Where clients look for the daemon: $MEMPLUG_SOCKET, else the runtime dir."""
    env = os.environ.get("MEMPLUG_SOCKET")
    return Path(env) if env else runtime_dir() / SOCKET_NAME
