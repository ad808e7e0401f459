"""What this kernel can do for the daemon, probed once and cached.

Like QEMU's memfd probe: a feature is offered only after it was seen to work.
Page sizes, huge-page pools and MADV_POPULATE, which clients need too, are
probed in memplug.common.memory.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from pathlib import Path
from typing import Final

from memplug.daemon.kernel import ops
from memplug.daemon.kernel.sysfs import ATTRIBUTES


@functools.cache
def has_memfd_noexec_seal() -> bool:
    """True if memfd_create accepts MFD_NOEXEC_SEAL (Linux >= 6.3)."""
    try:
        fd = ops.memfd_create("memplug-probe", ops.MFD_CLOEXEC | ops.MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


@functools.cache
def has_memfd_hugetlb(page_size: int) -> bool:
    """True if a hugetlb memfd of page_size can be created (even with an empty pool)."""
    try:
        fd = ops.memfd_create("memplug-probe", ops.MFD_CLOEXEC | ops.huge_page_flag(page_size))
    except OSError:
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------- THP and NUMA

THP_SYSFS: Final = Path("/sys/kernel/mm/transparent_hugepage")
THP_SHMEM_MODES: Final = ("always", "within_size", "advise", "force")


def _selected(path: Path) -> str | None:
    """The [bracketed] choice of a sysfs multiple-choice file (read anew: root may change it)."""
    try:
        match = re.search(r"\[(\w+)\]", ATTRIBUTES.read(path))
    except OSError:
        return None
    return match.group(1) if match else None


def shmem_thp_mode() -> str:
    """Effective shmem THP mode for 2 MiB pages: the per-size knob unless it says inherit."""
    per_size = _selected(THP_SYSFS / "hugepages-2048kB" / "shmem_enabled")
    if per_size is not None and per_size != "inherit":
        return per_size
    return _selected(THP_SYSFS / "shmem_enabled") or "unsupported"


def shmem_thp_allowed(mode: str | None = None) -> bool:
    """Whether shmem THP is allowed in `mode` (default: the mode now)."""
    return (shmem_thp_mode() if mode is None else mode) in THP_SHMEM_MODES


SHMEM_THP_HINT: Final = (
    "allow them with: echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled "
    "(or within_size; the per-size knob hugepages-2048kB/shmem_enabled overrides it)"
)


def _cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def numa_nodes() -> list[int]:
    """Online NUMA nodes ([0] where the kernel has no NUMA support)."""
    return list(_online_nodes())


@functools.cache
def _online_nodes() -> tuple[int, ...]:
    # Looked up once: the NUMA layout is fixed while the daemon runs (a node
    # brought online by memory hot-plug shows after a restart).
    try:
        return tuple(_cpulist(Path("/sys/devices/system/node/online").read_text()))
    except OSError:
        return (0,)


def node_cpus(node: int) -> list[int]:
    try:
        return _cpulist(Path(f"/sys/devices/system/node/node{node}/cpulist").read_text())
    except OSError:
        return sorted(os.sched_getaffinity(0))
