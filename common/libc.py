"""ctypes prototypes for the libc calls Python's stdlib lacks.

Loaded once with use_errno=True. CDLL (not PyDLL) releases the GIL for the
duration of each call, so madvise/fallocate on several threads run in
parallel and a long call never stalls the gRPC threads.
"""

from __future__ import annotations

import ctypes
from typing import Final


def _load_libc() -> ctypes.CDLL:
    # glibc's soname first: ctypes.util.find_library runs `ldconfig -p` in a
    # subprocess (5-40 ms), paid by every process that imports this, the
    # allocation helpers of each charged plug included. Elsewhere (musl), ask it.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c") or "libc.so", use_errno=True)


_libc = _load_libc()

c_void_p: Final = ctypes.c_void_p
c_size_t: Final = ctypes.c_size_t
c_int: Final = ctypes.c_int
c_long: Final = ctypes.c_long
c_off_t: Final = ctypes.c_int64

madvise = _libc.madvise
madvise.argtypes = [c_void_p, c_size_t, c_int]
madvise.restype = c_int

mmap = _libc.mmap
mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_off_t]
mmap.restype = c_void_p

munmap = _libc.munmap
munmap.argtypes = [c_void_p, c_size_t]
munmap.restype = c_int

fallocate = _libc.fallocate64
fallocate.argtypes = [c_int, c_int, c_off_t, c_off_t]
fallocate.restype = c_int

memfd_create = _libc.memfd_create
memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]
memfd_create.restype = c_int

syscall = _libc.syscall
syscall.restype = c_long

mlock = _libc.mlock
mlock.argtypes = [c_void_p, c_size_t]
mlock.restype = c_int

munlock = _libc.munlock
munlock.argtypes = [c_void_p, c_size_t]
munlock.restype = c_int

MAP_FAILED: Final[int] = ctypes.c_void_p(-1).value or -1


def errno() -> int:
    return ctypes.get_errno()
