"""Replay a rosbag2 folder (sqlite3 or mcap, read with the ``rosbags`` library) over real ROS 2
from inside a Python process: a stand-in for ``ros2 bag play`` where rosbag2 itself is not
installed (the PyPI wheels have no rosbag2), used by the tests and benchmarks.

``play_bag(node, bag_path, rate=1.0, topic_map=None)`` publishes every message on ``node``'s
publishers, keeping the bag's relative timing divided by ``rate`` (``rate <= 0`` or ``inf``:
as fast as possible). Two ways of publishing:

* ``mode='raw'`` (default): the CDR bytes stored in the bag are published unchanged
  (``Publisher.publish(bytes)``), exactly what ``ros2 bag play`` does; any message type whose
  Python package is importable works.
* ``mode='numpy'``: each message is decoded to numpy (:func:`wildseg3d_ros.core.camera.bags.read_bag`)
  and rebuilt with :mod:`wildseg3d_ros.ros.convert` (``array_to_image``, ``make_camera_info``,
  ``matrix_to_pose``); colour images are republished in ``encoding`` (default: as recorded,
  padding removed), depth as recorded (16UC1 or 32FC1), compressed images keep their bytes.
  ``restamp=True`` replaces header stamps by the node's clock at publication.

``topic_map`` maps bag topic -> published topic (a topic mapped to None or ``''`` is skipped;
unmapped topics keep their names; with ``only_mapped=True`` they are skipped).
"""
from __future__ import annotations

import importlib
import math
import threading
import time
from typing import Dict, Optional

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..core.camera import bags
from . import convert

#: reliable, keep last 10: matches reliable and best-effort (sensor-data) subscribers alike
PLAYER_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


def message_class(msgtype: str):
    """rclpy message class of a ROS 2 type name such as 'sensor_msgs/msg/Image'."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise ValueError(f"not a ROS 2 message type name: {msgtype!r}")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"message type {msgtype} is not importable in this Python: {e}") from None


def to_ros_message(m: "bags.BagMessage", encoding: Optional[str] = None, stamp=None):
    """rclpy message rebuilt from a decoded :class:`~wildseg3d_ros.core.camera.bags.BagMessage`
    (numpy path); None for types this module does not rebuild."""
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import CompressedImage

    h = getattr(m.msg, "header", None)
    frame_id = h.frame_id if h is not None else ""
    st = stamp if stamp is not None else convert.sec_to_stamp(m.stamp)
    if m.msgtype == bags.IMAGE_T:
        src_enc = m.msg.encoding
        if m.value.ndim == 2:  # depth (float32 metres): back to the recorded encoding
            enc = src_enc if src_enc.upper() in ("16UC1", "32FC1") else "32FC1"
        else:
            enc = encoding or (src_enc if src_enc.lower() in ("rgb8", "bgr8", "rgba8", "bgra8") else "rgb8")
        return convert.array_to_image(m.value, enc, st, frame_id)
    if m.msgtype == bags.COMPRESSED_T:
        out = CompressedImage(header=convert.make_header(frame_id, st), format=m.msg.format)
        out.data = bytes(m.msg.data)
        return out
    if m.msgtype == bags.INFO_T:
        info = m.value
        msg = convert.make_camera_info(info.K, info.width, info.height, st, frame_id)
        msg.distortion_model = info.distortion_model
        msg.d = [float(x) for x in info.D]
        return msg
    if m.msgtype == bags.POSE_T:
        return PoseStamped(header=convert.make_header(frame_id, st), pose=convert.matrix_to_pose(m.value))
    if m.msgtype == bags.ODOM_T:
        out = Odometry(header=convert.make_header(frame_id, st), child_frame_id=m.msg.child_frame_id)
        out.pose.pose = convert.matrix_to_pose(m.value)
        return out
    return None


def play_bag(node: Node, bag_path, rate: float = 1.0, topic_map: Optional[Dict[str, Optional[str]]] = None,
             mode: str = "raw", only_mapped: bool = False, wait_for_subscribers_s: float = 0.0,
             encoding: Optional[str] = None, restamp: bool = False, stop: Optional[threading.Event] = None,
             min_subscribers: int = 1,
             publishers: Optional[dict] = None, qos: QoSProfile = PLAYER_QOS) -> Dict[str, object]:
    """Publish the messages of ``bag_path`` on ``node`` (see the module docstring).

    wait_for_subscribers_s: wait up to this long for every publisher to see ``min_subscribers``
    subscribers before starting (discovery). stop: an Event that ends the replay early. publishers: a dict
    reused across calls (topic -> publisher). Returns stats: ``published`` per output topic,
    ``wall_s``, ``bag_s`` (bag time span), ``max_late_s`` (worst delay of a completed publication
    behind its schedule), ``skipped`` (topics not published), ``subscribers_ready``.
    """
    if mode not in ("raw", "numpy"):
        raise ValueError(f"mode must be 'raw' or 'numpy', got {mode!r}")
    rate = float(rate)
    realtime = rate > 0 and math.isfinite(rate)
    topic_map = dict(topic_map or {})
    pubs = publishers if publishers is not None else {}
    info = bags.bag_info(bag_path)
    out_topic = {}
    skipped = []
    for t, (msgtype, _n) in info["topics"].items():
        dst = topic_map.get(t, None if only_mapped else t)
        if not dst:
            skipped.append(t)
            continue
        if dst not in pubs:
            pubs[dst] = node.create_publisher(message_class(msgtype), dst, qos)
        out_topic[t] = dst
    ready = True
    if wait_for_subscribers_s > 0:
        deadline = time.monotonic() + wait_for_subscribers_s
        while time.monotonic() < deadline:
            if all(pubs[d].get_subscription_count() >= min_subscribers for d in out_topic.values()):
                break
            time.sleep(0.02)
        ready = all(pubs[d].get_subscription_count() >= min_subscribers for d in out_topic.values())
    published: Dict[str, int] = {d: 0 for d in out_topic.values()}
    max_late = 0.0
    t_wall0 = None
    t_bag0 = None
    t_start = time.perf_counter()
    for m in bags.read_bag(bag_path, topics=list(out_topic), decode=(mode == "numpy")):
        if stop is not None and stop.is_set():
            break
        if t_bag0 is None:
            t_bag0, t_wall0 = m.log_time_ns, time.perf_counter()
        if realtime:
            due = t_wall0 + (m.log_time_ns - t_bag0) * 1e-9 / rate
            delay = due - time.perf_counter()
            if delay > 0:
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
        dst = out_topic[m.topic]
        payload = m.raw
        if mode == "numpy":
            st = node.get_clock().now().to_msg() if restamp else None
            rebuilt = to_ros_message(m, encoding=encoding, stamp=st)
            if rebuilt is not None:
                payload = rebuilt
        pubs[dst].publish(payload)
        published[dst] += 1
        if realtime:  # lateness of the completed publication (a publish can block under load)
            max_late = max(max_late, time.perf_counter() - due)
    return {"published": published, "wall_s": time.perf_counter() - t_start, "bag_s": info["duration_s"],
            "max_late_s": max_late, "skipped": skipped, "subscribers_ready": ready, "storage": info["storage"]}


class BagPlayerNode(Node):
    """A node that replays one bag (``play()``, blocking, or ``start()`` in a thread).

    The node must be spun by an executor elsewhere only if something else on it needs
    callbacks; publishing does not."""

    def __init__(self, bag_path=None, rate: float = 1.0, topic_map=None, mode: str = "raw",
                 node_name: str = "bag_player", **kwargs):
        super().__init__(node_name, **kwargs)
        self.bag_path, self.rate, self.topic_map, self.mode = bag_path, rate, topic_map, mode
        self._pubs: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.result: Optional[dict] = None

    def play(self, bag_path=None, **kw) -> dict:
        kw.setdefault("rate", self.rate)
        kw.setdefault("topic_map", self.topic_map)
        kw.setdefault("mode", self.mode)
        self.result = play_bag(self, bag_path or self.bag_path, publishers=self._pubs, stop=self._stop, **kw)
        return self.result

    def start(self, bag_path=None, **kw) -> threading.Thread:
        self._stop.clear()
        self._thread = threading.Thread(target=self.play, args=(bag_path,), kwargs=kw, name="bag_player",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: Optional[float] = None) -> Optional[dict]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def destroy_node(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        return super().destroy_node()
