"""Driving the nodes from tests, benchmarks and scripts over real ROS 2 (rclpy + Fast DDS): spin
threads, message collectors, Trigger calls, timed clicks, console-script processes, a recording
logger. Not used by the nodes themselves."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Callable, List

import numpy as np


class RecordingLogger:
    """Stands in for the rclpy logger behind a node's ThrottledLogger: keeps (level, line)."""

    def __init__(self):
        self.lines = []
        self._lock = threading.Lock()

    def _add(self, level, msg):
        with self._lock:
            self.lines.append((level, msg))

    def info(self, msg):
        self._add("info", msg)

    def warning(self, msg):
        self._add("warning", msg)

    def error(self, msg):
        self._add("error", msg)


def console_script(name: str) -> str:
    """Path of an installed console script (beside this Python first); skips the test when absent."""
    import shutil
    import sys
    from pathlib import Path

    import pytest

    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"console script {name} is not installed (pip install -e . first)")
    return found


def wait_for(pred: Callable[[], bool], timeout: float, period: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return bool(pred())


class SpinThread(threading.Thread):
    """Spin an executor in a daemon thread until ``stop()``.

    ``stop()`` ends the spin loop first, joins the thread, and only then shuts the executor down:
    shutting an executor down while another thread is inside ``spin()`` races with its guard
    conditions (rclpy raises InvalidHandle in the spinning thread)."""

    def __init__(self, executor, period: float = 0.05):
        super().__init__(daemon=True, name="test_spin")
        self.executor = executor
        self.period = period
        self._halt = threading.Event()
        self.start()

    def run(self):
        while not self._halt.is_set():
            self.executor.spin_once(timeout_sec=self.period)

    def stop(self, timeout: float = 5.0):
        self._halt.set()
        self.join(timeout)
        self.executor.shutdown(timeout_sec=2.0)


@contextmanager
def spinning(nodes: List):
    """Spin every node on its own single-threaded executor in a daemon thread."""
    from rclpy.executors import SingleThreadedExecutor

    runs = []
    for n in nodes:
        ex = SingleThreadedExecutor()
        ex.add_node(n)
        runs.append(SpinThread(ex))
    try:
        yield
    finally:
        for th in runs:
            th.stop()


def call_trigger(node, name: str, timeout: float = 10.0):
    """Call a std_srvs/Trigger service from ``node`` (which must be spinning). Returns the response."""
    from std_srvs.srv import Trigger

    cli = node.create_client(Trigger, name)
    assert cli.wait_for_service(timeout_sec=timeout), f"service {name} not available"
    fut = cli.call_async(Trigger.Request())
    assert wait_for(fut.done, timeout), f"service {name} did not answer within {timeout} s"
    node.destroy_client(cli)
    return fut.result()


class Collector:
    """Subscribes to a topic and keeps every message with its arrival time."""

    def __init__(self, node, msg_type, topic, qos):
        self.msgs = []
        self._lock = threading.Lock()
        node.create_subscription(msg_type, topic, self._cb, qos)

    def _cb(self, msg):
        with self._lock:
            self.msgs.append((time.perf_counter(), msg))

    def nonempty(self):
        with self._lock:
            return [m for _, m in self.msgs if getattr(m, "width", 1) * getattr(m, "height", 1) > 0]

    def last(self):
        with self._lock:
            return self.msgs[-1][1] if self.msgs else None

    def count(self):
        with self._lock:
            return len(self.msgs)


def click_point_on_object(scene, instance_kf: np.ndarray, object_id: int, view: int = 0):
    """The 3D scene point at the most interior pixel of the object's GT mask in ``view``
    (what an rviz2 Publish Point click on the displayed scene cloud gives)."""
    import cv2

    m = (instance_kf[view] == object_id).astype(np.uint8)
    assert m.any(), f"object {object_id} not visible in keyframe {view}"
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    v, u = np.unravel_index(np.argmax(dist), dist.shape)
    return scene.pts3d[view, v, u].astype(np.float64), (int(u), int(v))


def timed_click(client, click_pub, objs: "Collector", point, frame: str = "map", timeout: float = 5.0,
                period: float = 0.0002, reset_timeout: float = 2.0):
    """Publish one rviz2-style PointStamped click and wait for a non-empty object cloud on ``objs``.

    Returns (client round trip in ms or None when no object came, points in that cloud or 0).
    Then calls ``segmentation_node/reset`` and waits for the cleared cloud (outside the timing)."""
    from geometry_msgs.msg import PointStamped

    from wildseg3d_ros.ros import convert

    k = objs.count()
    msg = PointStamped(header=convert.make_header(frame, client.get_clock().now().to_msg()))
    msg.point.x, msg.point.y, msg.point.z = (float(x) for x in point)
    t0 = time.perf_counter()
    click_pub.publish(msg)
    ok = wait_for(lambda: any(m.width > 0 for _, m in objs.msgs[k:]), timeout, period=period)
    hit = next(((t, m.width) for t, m in objs.msgs[k:] if m.width > 0), None)
    call_trigger(client, "segmentation_node/reset")
    wait_for(lambda: objs.last() is not None and objs.last().width == 0, reset_timeout, period=0.001)
    if not ok or hit is None:
        return None, 0
    return (hit[0] - t0) * 1e3, hit[1]


def start_process(args: List[str], env=None, log_path=None) -> subprocess.Popen:
    """Start a console script in its own process group (the ROS wheels re-exec Python once at
    start-up, so the whole group is signalled when stopping)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(args, env=env or os.environ.copy(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_process(p: subprocess.Popen, sig=signal.SIGINT, timeout: float = 10.0):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
        p.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)
