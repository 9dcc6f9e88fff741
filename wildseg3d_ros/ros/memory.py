"""Return freed heap memory to the OS after large transient work.

A reconstruction allocates and frees gigabytes of numpy/torch buffers in worker threads; glibc
keeps freed chunks in per-thread arenas, so a long-running node's RSS ratchets up over cycles
without any leak. ``malloc_trim(0)`` releases them (glibc only; a no-op elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


def release_free_heap() -> bool:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    try:
        return bool(_libc.malloc_trim(0))
    except Exception:
        return False
