"""Return freed heap memory to the OS after large transient work.

A reconstruction allocates and frees gigabytes of numpy/torch buffers in worker threads; glibc
keeps freed chunks in per-thread arenas, so a long-running node's RSS ratchets up over cycles
without any leak. ``malloc_trim(0)`` releases them (glibc only; a no-op elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _lib():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def free_heap_bytes():
    """Bytes the allocator holds free (glibc >= 2.33 ``mallinfo2().fordblks``, all arenas), or
    None where that is unknown."""
    lib = _lib()
    if not lib:
        return None
    try:
        fn = lib.mallinfo2
        fn.restype = _Mallinfo2
        return int(fn().fordblks)
    except Exception:  # AttributeError: glibc < 2.33 / another libc
        return None


def release_free_heap(keep_bytes: int = 0) -> bool:
    """malloc_trim(0): give the freed heap back to the OS. With ``keep_bytes`` > 0 nothing is
    released while the allocator holds no more than that free (memory about to be used again,
    e.g. for the next scene of the same size; always released when that amount is unknown).
    Returns True when memory was released."""
    lib = _lib()
    if not lib:
        return False
    if keep_bytes > 0:
        free = free_heap_bytes()
        if free is not None and free <= keep_bytes:
            return False
    try:
        return bool(lib.malloc_trim(0))
    except Exception:
        return False
