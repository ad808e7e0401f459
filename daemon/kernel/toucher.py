"""Touch pages in a short-lived helper process, for kernels without MADV_POPULATE_*.

Reading a page that cannot be backed (hugetlb pool empty after a client
punched a hole, a truncated file) raises SIGBUS. The daemon must never take
that signal itself, so the reads happen here: the helper dies instead, and
the daemon turns its death into an error.

    python -m memplug.daemon.kernel.toucher FD OFFSET LENGTH PAGE_SIZE
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys

from memplug.common.memory import MAP_NORESERVE


def touch_in_helper(fd: int, offset: int, length: int, page_size: int) -> None:
    """Read one byte of every page of [offset, offset+length) in a child process."""
    proc = subprocess.run(
        [sys.executable, "-I", "-m", __name__, str(fd), str(offset), str(length), str(page_size)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode == -signal.SIGBUS:
        raise OSError(14, "touch-read: SIGBUS in the helper (page cannot be backed)")  # EFAULT
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise OSError(5, f"touch-read helper exited with {proc.returncode}: {detail[0]}")  # EIO


def _touch(fd: int, offset: int, length: int, page_size: int) -> None:
    with mmap.mmap(
        fd, length, flags=mmap.MAP_SHARED | MAP_NORESERVE, prot=mmap.PROT_READ, offset=offset
    ) as m:
        for pos in range(0, length, page_size):
            m[pos]


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:5]]
    _touch(*args)
    os._exit(0)
