"""One daemon per state dir: an exclusive flock on a lock file inside it.

Two daemons on one store would each believe they own its regions: one's
unplug or delete would rewrite the other's records, and the next restart would
bring back neither's truth. The lock is taken before the daemon touches
anything else (sockets, pools, the store), and the kernel drops it when the
process ends, however it ends. The holder writes its pid into the file so
that the one refused can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "memplugd.lock"


class StateDirBusy(Exception):
    """Another live process holds the state dir's lock."""

    def __init__(self, message: str, holder: str = "unknown") -> None:
        super().__init__(message)
        self.holder = holder  # the pid written in the lock file, as text


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateDirBusy(
                f"the state dir {state_dir} is in use by another memplugd (pid {holder}, "
                f"lock {self.path}): stop it first, or give this one its own --state-dir",
                holder,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    @classmethod
    def adopt(cls, fd: int, state_dir: Path) -> StateDirLock:
        """Share the lock of a daemon that handed its lock fd over (a take-over).

        flock belongs to the open file description, which the fd passed over
        SCM_RIGHTS shares: both processes hold the one lock until the last of
        them closes it, so the state dir is never unlocked between them.
        """
        lock = cls.__new__(cls)
        lock.path = state_dir / LOCK_NAME
        try:
            if os.fstat(fd).st_ino != os.stat(lock.path).st_ino:
                raise StateDirBusy(f"the lock handed over is not {lock.path}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: succeeds at once
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(f"the lock handed over is not held on {lock.path}") from None
        except BaseException:
            os.close(fd)
            raise
        lock._fd = fd
        return lock

    def claim(self) -> None:
        """Write our pid into the lock file (after a take-over: it named the old daemon)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    @property
    def fd(self) -> int | None:
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"
