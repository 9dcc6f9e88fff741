import platform

import numpy as np
import pytest

from wildseg3d_ros.ros.memory import release_free_heap


def test_release_free_heap_returns_memory_on_glibc():
    # allocate and free many mid-size blocks (below the mmap threshold, so they stay in the heap)
    blocks = [np.ones(100_000) for _ in range(200)]
    del blocks
    released = release_free_heap()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert released is True
    else:
        assert released in (True, False)


def test_free_heap_is_kept_up_to_keep_bytes():
    from wildseg3d_ros.ros.memory import free_heap_bytes
    x = np.ones(100_000)
    del x  # freeing an mmapped block raises glibc's mmap threshold: the next ones are heap chunks
    blocks = [np.ones(100_000) for _ in range(200)]  # ~160 MB
    pin = np.ones(100_000)  # above them: their free chunks are not the heap's top (trimmed at once)
    del blocks
    free = free_heap_bytes()
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        assert free is None or free >= 0
        return
    assert free is not None and free > 100e6
    # no more free than the next scene needs: kept (nothing released)
    assert release_free_heap(keep_bytes=free + (64 << 20)) is False
    # more: released
    assert release_free_heap(keep_bytes=1 << 20) is True
    del pin


def test_heap_reserve_touches_in_steps_and_frees_at_the_end():
    from wildseg3d_ros.ros.memory import HeapReserve
    r = HeapReserve(3 << 20, block_bytes=1 << 20, step_bytes=256 << 10)
    steps = 1
    while r.step():
        steps += 1
        assert r._blocks and not r.done
    assert steps == 12 and r.done and r.touched == 3 << 20 and not r._blocks
    assert r.step() is False  # nothing more
    c = HeapReserve(3 << 20, block_bytes=1 << 20, step_bytes=256 << 10)
    c.step()
    c.cancel()
    assert c.done and not c._blocks and c.step() is False
    assert HeapReserve(0).done


RESERVE_SCRIPT = r"""
import resource, sys, threading
import numpy as np
import pytest
from wildseg3d_ros.ros.memory import HeapReserve, set_heap_thresholds
assert set_heap_thresholds(trim_threshold=256 << 20)

def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

def scene_like():  # 8 arrays of 3 MiB (below numpy's 4 MiB huge-page advice): 6144 pages
    f = faults()
    arrs = [np.empty(3 << 20, np.uint8) for _ in range(8)]
    for a in arrs:
        a.fill(7)
    del arrs
    return faults() - f

out, hold = {}, threading.Event()
def fresh():  # a thread of its own (its own arena), kept alive so the next one cannot reuse it
    out["fresh"] = scene_like()
    hold.wait()
def reserved():
    r = HeapReserve(32 << 20, step_bytes=256 << 10)
    while r.step():
        pass
    out["reserved"] = scene_like()
t1 = threading.Thread(target=fresh); t1.start()
while "fresh" not in out:
    pass
t2 = threading.Thread(target=reserved); t2.start(); t2.join()
hold.set(); t1.join()
print(out["fresh"], out["reserved"])
"""


def test_memory_reserved_ahead_is_reused_without_page_faults():
    """The mechanism of the segmentation node's memory.keep_scene_heap, in a process of its own
    (the allocator settings are process-wide): after a HeapReserve, a thread's next scene-sized
    allocations fault in (almost) no page; in a thread without one, nearly every page faults."""
    import subprocess
    import sys
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only (mallopt, per-thread arenas)")
    r = subprocess.run([sys.executable, "-c", RESERVE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    fresh, reserved = (int(x) for x in r.stdout.split()[-2:])
    assert fresh > 0.8 * 6144, (fresh, reserved)
    assert reserved < 0.05 * 6144, (fresh, reserved)
