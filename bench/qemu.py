"""QEMU's own preallocation: the time to the QMP greeting with prealloc=on minus with it off.

QEMU 7.2 preallocates with MADV_POPULATE_WRITE over prealloc-threads threads
before it opens the monitor, so the greeting marks the end of the work.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

from bench.raw import Kind

QMP_BYE = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'


def backend(
    kind: Kind, size: int, *, prealloc: bool, threads: int = 1, directory: Path | None = None
) -> str:
    """The -object argument for a memory backend of kind (memfd, hugetlb memfd, tmpfs file)."""
    if kind == "file":
        if directory is None:
            raise ValueError("a file backend needs a directory")
        # A directory as mem-path: QEMU creates a file there and unlinks it at once.
        args = f"memory-backend-file,id=m,size={size},share=on,mem-path={directory}"
    else:
        args = f"memory-backend-memfd,id=m,size={size},share=on"
        if kind == "hugetlb":
            args += ",hugetlb=on,hugetlbsize=2M"
    if prealloc:
        args += f",prealloc=on,prealloc-threads={threads}"
    return args


def time_to_greeting(binary: str, backend_arg: str, *, timeout: float = 120.0) -> float:
    """Seconds from spawning QEMU to its QMP greeting; then quit it and wait for the exit.

    The exit (which frees the memory) is waited for but not timed, so the next
    run starts from nothing allocated.
    """
    command = [
        binary, "-machine", "none", "-nodefaults", "-nographic", "-S", "-qmp", "stdio",
        "-object", backend_arg,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = _read_line(proc.stdout.fileno(), start + timeout)
        elapsed = time.perf_counter() - start
        if b'"QMP"' not in line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise RuntimeError(
                f"QEMU did not greet ({' '.join(command[-2:])}): "
                f"{(line + err).decode(errors='replace').strip()[:500]}"
            )
        proc.stdin.write(QMP_BYE)
        proc.stdin.flush()
        proc.communicate(timeout=timeout)
        return elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_line(fd: int, deadline: float) -> bytes:
    """Bytes up to the first newline (or EOF) from a pipe, unbuffered, until deadline."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError("QEMU did not send its QMP greeting in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf
