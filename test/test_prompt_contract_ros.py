"""The segmentation node's answer contract, with a client that clicks at the instant a scene
appears: in the callback of its own wildseg3d/scene subscription, for the first scene and for a
scene that replaces one whose object is shown. The first object cloud the client receives after
its click must be the answer (non-empty, header.stamp = the click's stamp; no empty cloud before
it), wildseg3d/prompt_status must say "answered" for that stamp, and nothing clears the answer
afterwards. Run with the node in another process (console script) and in this process.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")

from geometry_msgs.msg import PointStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from wildseg3d_ros.ros.harness import (Collector, SpinThread, click_point_on_object, console_script, start_process,  # noqa: E402
                         stop_process, wait_for)
from wildseg3d_ros.core.output import cloud as corecloud  # noqa: E402
from wildseg3d_ros.ros import convert  # noqa: E402

W, H, V = 96, 72, 3


def _scene(seed):
    from wildseg3d_ros.core.config import PipelineConfig
    from wildseg3d_ros.core.pipeline import ReconstructionPipeline
    from wildseg3d_ros.core.types import Keyframe
    from wildseg3d_ros.sim.tabletop import render_sequence
    seq = render_sequence(n_views=V, width=W, height=H, seed=seed)
    kfs = [Keyframe(index=i, stamp=float(i), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i], pose_prior=seq.poses[i])
           for i in range(V)]
    scene, _ = ReconstructionPipeline(PipelineConfig(iterations=10)).run(kfs, frame_id="map")
    labels = scene.mask_cache.labels
    lbl = max((int(x) for x in np.unique(labels[0]) if x > 0), key=lambda x: (labels[0] == x).sum())
    p, _ = click_point_on_object(scene, labels, lbl)
    arr, h, w = corecloud.pack_scene_cloud(scene)
    return convert.struct_to_cloud(arr, "map", 0.0, h, w), p  # stamped when published


@pytest.fixture(scope="module")
def scenes():
    return _scene(4), _scene(6)


class InstantClicker:
    """Subscribes to wildseg3d/scene; when a scene in ``armed`` arrives, clicks at once."""

    def __init__(self, node):
        self.node = node
        self.pub = node.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
        self.armed = {}        # scene stamp (sec, nanosec) -> point to click
        self.clicks = []       # (perf_counter, stamp)
        self._lock = threading.Lock()
        node.create_subscription(PointCloud2, "wildseg3d/scene", self._on_scene, convert.LATCHED_QOS)

    def _on_scene(self, msg):
        p = self.armed.pop((msg.header.stamp.sec, msg.header.stamp.nanosec), None)
        if p is None:
            return
        st = self.node.get_clock().now().to_msg()  # the click is stamped now, like rviz2's
        m = PointStamped(header=convert.make_header("map", st))
        m.point.x, m.point.y, m.point.z = (float(x) for x in p)
        with self._lock:
            self.clicks.append((time.perf_counter(), st))
        self.pub.publish(m)


@pytest.mark.parametrize("where", ["process", "in_process"])
def test_click_at_the_instant_the_scene_appears_is_answered_first(ros, scenes, tmp_path, where):
    (scene_a, p_a), (scene_b, p_b) = scenes
    seg_node, proc = None, None
    params = {"scene_dir": "", "mgm.min_consistency": 0.0}
    if where == "process":
        proc = start_process([console_script("segmentation_node"), "--ros-args"] +
                             sum((["-p", f"{k}:={v if v != '' else chr(39) * 2}"] for k, v in params.items()), []),
                             log_path=str(tmp_path / "seg.log"))
    else:
        from wildseg3d_ros.ros.segmentation_node import SegmentationNode
        seg_node = SegmentationNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    client = rclpy.create_node("instant_click_client")
    publisher = rclpy.create_node("scene_source")  # stands in for reconstruction_node
    scene_pub = publisher.create_publisher(PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    clicker = InstantClicker(client)
    objs = Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
    status = Collector(client, String, "wildseg3d/prompt_status", 50)
    ex = MultiThreadedExecutor(num_threads=3)
    for n in [client, publisher] + ([seg_node] if seg_node else []):
        ex.add_node(n)
    th = SpinThread(ex)
    log = (lambda: (tmp_path / "seg.log").read_text()[-3000:]) if proc else (lambda: "")

    def first_cloud_after(t_click):
        with objs._lock:
            return next((m for t, m in objs.msgs if t >= t_click), None)

    def answered(st):
        for _, m in status.msgs:
            d = json.loads(m.data)
            if d["prompt_stamp"] == {"sec": st.sec, "nanosec": st.nanosec}:
                return d
        return None

    try:
        assert wait_for(lambda: clicker.pub.get_subscription_count() > 0 and scene_pub.get_subscription_count() >= 2,
                        60), f"segmentation node not discovered {log()}"
        for k, (msg, p) in enumerate(((scene_a, p_a), (scene_b, p_b))):
            msg.header.stamp = publisher.get_clock().now().to_msg()  # as reconstruction_node stamps it
            clicker.armed[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = p
            scene_pub.publish(msg)
            assert wait_for(lambda: len(clicker.clicks) == k + 1, 20), "the client never saw its scene"
            t_click, st = clicker.clicks[k]
            assert wait_for(lambda: first_cloud_after(t_click) is not None, 30), f"no object cloud {log()}"
            first = first_cloud_after(t_click)
            assert first.width > 0, f"scene {k}: an empty object cloud came before the answer"
            assert first.header.stamp == st, f"scene {k}: the first cloud does not answer the click"
            assert wait_for(lambda: answered(st) is not None, 10)
            d = answered(st)
            assert d["status"] == "answered" and d["points"] == first.width, d
            time.sleep(1.0)  # nothing clears the answer afterwards (no stale-scene clear after it)
            assert objs.last().header.stamp == st and objs.last().width > 0
        if proc is not None:
            assert proc.poll() is None, log()
    finally:
        th.stop()
        client.destroy_node()
        publisher.destroy_node()
        if seg_node is not None:
            seg_node.destroy_node()
        if proc is not None:
            stop_process(proc)
