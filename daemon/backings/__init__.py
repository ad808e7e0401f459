"""One class per kind of backing memory, one interface (QEMU hostmem style)."""

from memplug.daemon.backings.base import Backing, BackingKind, MemPolicy, SpanMapping
from memplug.daemon.backings.file import FileBacking
from memplug.daemon.backings.hugetlb import HugetlbBacking
from memplug.daemon.backings.shmem import ShmemBacking

__all__ = [
    "Backing",
    "BackingKind",
    "FileBacking",
    "HugetlbBacking",
    "MemPolicy",
    "ShmemBacking",
    "SpanMapping",
]
