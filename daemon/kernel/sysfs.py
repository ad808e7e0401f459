"""sysfs attribute files opened once and re-read with one pread each.

sysfs renders an attribute anew for every read at offset 0, so a file kept
open shows the value of the moment: the same answer as opening it again, for
one syscall instead of six (open, fstat, ioctl, lseek, read, close, as
Path.read_text makes them). GetStatus reads about twenty such values.

The files stay open for the life of the process (O_CLOEXEC): a few per
huge-page pool and THP knob, opened at most once each.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Final

MAX_VALUE: Final = 4096  # a sysfs attribute is at most a page


class KeptOpen:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # only to open a file once
        self._fds: dict[Path, int] = {}

    def read(self, path: Path) -> str:
        """The attribute's text now; OSError (FileNotFoundError) as open(2) gives it."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
        return os.pread(fd, MAX_VALUE, 0).decode()

    def read_int(self, path: Path) -> int:
        return int(self.read(path))

    def _open(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


ATTRIBUTES: Final = KeptOpen()  # one set of files per process: they are the kernel's
