"""Lower the CPU priority of the calling thread (long background work yields to callbacks).

On Linux the nice value is a per-thread attribute: ``setpriority(PRIO_PROCESS, tid, n)`` on a
thread id changes only that thread, and threads it creates afterwards (torch's OpenMP workers
for its parallel regions, for example) inherit it.  Raising a nice value needs no privilege;
lowering it again does, so the caller uses a fresh thread per job.  Elsewhere (macOS, Windows)
this is a no-op that says so.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Optional

__all__ = ["lower_thread_priority", "thread_nice"]

MAX_NICE = 19


def thread_nice(native_id: Optional[int] = None) -> Optional[int]:
    """The nice value of a thread (default: the calling one); None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id() if native_id is None else int(native_id)
    return os.getpriority(os.PRIO_PROCESS, tid)


def lower_thread_priority(increment: int) -> Optional[int]:
    """Raise the calling thread's nice value by ``increment`` (capped at 19).

    Returns the thread's nice value afterwards, or None where per-thread priorities are not
    supported.  ``increment <= 0`` changes nothing."""
    if not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    cur = os.getpriority(os.PRIO_PROCESS, tid)
    if int(increment) <= 0:
        return cur
    new = min(MAX_NICE, cur + int(increment))
    os.setpriority(os.PRIO_PROCESS, tid, new)
    return os.getpriority(os.PRIO_PROCESS, tid)
