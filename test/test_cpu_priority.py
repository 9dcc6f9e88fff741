"""core.cpu_priority: a worker thread lowers its own priority, not the process's."""
import sys
import threading

import pytest

from wildseg3d_ros.core.cpu_priority import lower_thread_priority, thread_nice

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux-only")


@linux
def test_only_the_calling_thread_and_its_children_are_lowered():
    main_before = thread_nice()
    seen = {}

    def child():
        seen["child"] = thread_nice()

    def worker():
        seen["returned"] = lower_thread_priority(5)
        seen["worker"] = thread_nice()
        t = threading.Thread(target=child)  # created after lowering: inherits the nice value
        t.start()
        t.join()
        seen["again"] = lower_thread_priority(100)  # capped at 19

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    expect = min(19, main_before + 5)
    assert seen["returned"] == seen["worker"] == expect
    assert seen["child"] == expect
    assert seen["again"] == 19
    assert thread_nice() == main_before  # the calling (main) thread is untouched


@linux
def test_zero_or_negative_increment_changes_nothing():
    out = {}

    def worker():
        before = thread_nice()
        out["r"] = (before, lower_thread_priority(0), lower_thread_priority(-3), thread_nice())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    before, a, b, after = out["r"]
    assert a == b == after == before
