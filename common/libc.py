"""ctypes prototypes for the libc calls Python's stdlib lacks.

Loaded once with use_errno=True. CDLL (not PyDLL) releases the GIL for the
duration of each call, so madvise/fallocate on several threads run in
parallel and a long call never stalls the gRPC threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

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
