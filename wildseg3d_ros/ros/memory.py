"""Heap memory of long-running nodes: given back to the OS after large transient work, or kept
(and faulted in ahead) for work that comes again.

A reconstruction allocates and frees gigabytes of numpy/torch buffers in worker threads; glibc
keeps freed chunks in per-thread arenas, so a long-running node's RSS ratchets up over cycles
without any leak. ``malloc_trim(0)`` releases them (glibc only; a no-op elsewhere).

The segmentation node does the opposite: every scene allocates the same ~40 MB of arrays again,
and a page the process touches for the first time costs a page fault (~3 ms per MiB on the
development VM, where it dominates the first scenes' preparation). ``set_heap_thresholds``
keeps buffers of up to 32 MiB in the heap (glibc serves larger ones, and by default any above
128 KiB until one was freed, by a fresh mmap: fresh pages every time) and keeps freed memory
there; ``HeapReserve`` faults in memory of the calling thread's arena ahead of use, in steps."""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import List

import numpy as np

_libc = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)


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


def set_heap_thresholds(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 256 << 20) -> bool:
    """glibc ``mallopt``: allocations below ``mmap_threshold`` bytes come from the heap (their pages
    are reused after a free) and up to ``trim_threshold`` bytes of free memory at a heap's top are
    kept instead of returned at once (``release_free_heap`` still returns it). Setting them ends
    glibc's own adjustment of both. Process-wide; False where there is no glibc ``mallopt``."""
    lib = _lib()
    if not lib:
        return False
    try:
        return bool(lib.mallopt(M_MMAP_THRESHOLD, int(min(max(mmap_threshold, 0), MMAP_THRESHOLD_MAX)))) \
            and bool(lib.mallopt(M_TRIM_THRESHOLD, int(min(max(trim_threshold, 0), (1 << 31) - 1))))
    except Exception:  # AttributeError: another libc
        return False


class HeapReserve:
    """``nbytes`` of the calling thread's heap arena faulted in ahead of use, one ``step`` at a
    time (each touches ``step_bytes``: short enough to run between two prompts), then freed
    together by the last step: the next allocations of that thread reuse pages already mapped.

    Needs ``set_heap_thresholds`` (buffers of ``block_bytes`` from the heap, freed memory kept).
    Every step must run in the thread whose allocations it prepares (glibc has an arena per
    thread). ``done`` once freed; ``cancel`` frees what was touched."""

    def __init__(self, nbytes: int, block_bytes: int = 8 << 20, step_bytes: int = 1 << 20):
        self.nbytes = max(0, int(nbytes))
        self.block_bytes = max(1, min(int(block_bytes), MMAP_THRESHOLD_MAX // 2))
        self.step_bytes = max(1, int(step_bytes))
        self.touched = 0
        self.done = self.nbytes == 0
        self._blocks: List[np.ndarray] = []
        self._filled = 0  # bytes of the last block touched

    def step(self) -> bool:
        """Touch the next ``step_bytes``; True while there is more to do."""
        if self.done:
            return False
        if not self._blocks or self._filled >= self._blocks[-1].size:
            self._blocks.append(np.empty(min(self.block_bytes, self.nbytes - self.touched), np.uint8))
            self._filled = 0
        block = self._blocks[-1]
        n = min(self.step_bytes, block.size - self._filled)
        block[self._filled:self._filled + n] = 1  # every page written: faulted in
        self._filled += n
        self.touched += n
        if self.touched >= self.nbytes:
            self.cancel()
        return not self.done

    def cancel(self) -> None:
        self._blocks.clear()
        self.done = True
