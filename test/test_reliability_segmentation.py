"""Reliability of segmentation_node under bad prompts and bad scene messages, over real ROS 2.

A scene is reconstructed once offline (core pipeline, 96x72, 3 keyframes) and published by a test
node on wildseg3d/scene exactly like reconstruction_node does. Every bad prompt / scene message is
refused with a counter, ``last_error`` and a rate-limited log line; the selection and the scene
are kept, and a later good prompt still segments the object.
"""
from __future__ import annotations

import contextlib
import types


import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PointStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from wildseg3d_ros.ros.harness import (Collector, RecordingLogger, SpinThread, call_trigger, click_point_on_object,  # noqa: E402
                         wait_for)
from wildseg3d_ros.core.output import cloud as corecloud  # noqa: E402
from wildseg3d_ros.ros import convert  # noqa: E402
from wildseg3d_ros.ros.throttled_log import ThrottledLogger  # noqa: E402

pytestmark = pytest.mark.ros

W, H, V = 96, 72, 3


@pytest.fixture(scope="module")
def built():
    from wildseg3d_ros.core.config import PipelineConfig
    from wildseg3d_ros.core.pipeline import ReconstructionPipeline
    from wildseg3d_ros.core.types import Keyframe
    from wildseg3d_ros.sim.tabletop import render_sequence
    seq = render_sequence(n_views=V, width=W, height=H, seed=4)
    kfs = [Keyframe(index=i, stamp=float(i), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i], pose_prior=seq.poses[i])
           for i in range(V)]
    scene, _ = ReconstructionPipeline(PipelineConfig(iterations=10)).run(kfs, frame_id="map")
    return seq, scene


def scene_msg(scene, stamp=5.0):
    arr, h, w = corecloud.pack_scene_cloud(scene)
    return convert.struct_to_cloud(arr, scene.frame_id, stamp, h, w)


def point_msg(p, frame="map", stamp=1.0):
    m = PointStamped(header=convert.make_header(frame, stamp))
    m.point.x, m.point.y, m.point.z = (float(x) for x in p)
    return m


@contextlib.contextmanager
def scene_and_clicks(node, client_name: str):
    """``node`` and a client (scene and click publishers, object-cloud collector) spinning on one
    executor, discovered. ``rig.stop()`` ends the spinning and destroys the node (also on exit)."""
    client = rclpy.create_node(client_name)
    rig = types.SimpleNamespace(
        client=client, scene_pub=client.create_publisher(PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS),
        click_pub=client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS),
        objs=Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS))
    ex = MultiThreadedExecutor(num_threads=3)
    ex.add_node(node)
    ex.add_node(client)
    th = SpinThread(ex)
    stopped = []

    def stop():
        if not stopped:
            stopped.append(True)
            th.stop()
            node.destroy_node()

    rig.stop = stop
    try:
        assert wait_for(lambda: rig.scene_pub.get_subscription_count() > 0
                        and rig.click_pub.get_subscription_count() > 0, 10)
        yield rig
    finally:
        stop()
        client.destroy_node()


def test_bad_prompts_and_bad_scenes_are_refused(ros, built, tmp_path):
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    seq, scene = built
    # tiny 3-view scene: keep every mapped point (the MGM consistency filter is tested elsewhere)
    node = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=str(tmp_path)),
                                                 Parameter("mgm.min_consistency", value=0.0),
                                                 Parameter("diagnostics_period_s", value=0.2)])
    rec = RecordingLogger()
    node.log = ThrottledLogger(rec, period_s=2.0)
    client = rclpy.create_node("seg_reliability_client")
    scene_pub = client.create_publisher(PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    pubs = {t: client.create_publisher(PointStamped, t, convert.PROMPT_QOS)
            for t in ("clicked_point", "wildseg3d/negative_point", "wildseg3d/new_object_point",
                      "wildseg3d/pixel_prompt", "wildseg3d/pixel_prompt_negative")}
    objs = Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
    diag = Collector(client, DiagnosticArray, "/diagnostics", 10)
    ex = MultiThreadedExecutor(num_threads=3)
    ex.add_node(node)
    ex.add_node(client)
    th = SpinThread(ex)
    try:
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs.values())
                        and scene_pub.get_subscription_count() > 0, 10)

        def refused(topic, msg, counter, needle):
            n0 = node.stats[counter]
            pubs[topic].publish(msg)
            assert wait_for(lambda: node.stats[counter] == n0 + 1, 10), (topic, counter, dict(node.stats))
            assert needle in node.last_error, (needle, node.last_error)
            assert any(needle in m for _, m in rec.lines), f"nothing logged with {needle!r}"

        # prompts before any scene
        refused("clicked_point", point_msg([0, 0, 1]), "prompts_without_scene", "no scene has been reconstructed")
        refused("wildseg3d/pixel_prompt", point_msg([3, 3, 0], "keyframe_0"), "prompts_without_scene",
                "no scene has been reconstructed")

        # scene messages with inconsistent fields (before a good scene)
        good = scene_msg(scene)
        arr = convert.cloud_to_struct(good).copy()
        arr["keyframe"][H: H + 3] = 2  # rows of keyframe 1 claim to be keyframe 2
        bad_kf = convert.struct_to_cloud(arr, "map", 5.0, arr.shape[0], arr.shape[1])
        short = scene_msg(scene)
        short.data = bytes(short.data)[:-7]
        nofield = scene_msg(scene)
        nofield.fields = [f for f in nofield.fields if f.name != "keyframe"]
        n_bad = 0
        for m, needle in ((bad_kf, "inconsistent"), (short, "refused"), (nofield, "keyframe")):
            scene_pub.publish(m)
            n_bad += 1
            assert wait_for(lambda: node.stats["bad_scene"] == n_bad, 10), dict(node.stats)
            assert "scene message refused" in node.last_error and needle in node.last_error, node.last_error
            assert node.scene is None

        # the good scene
        scene_pub.publish(good)
        assert wait_for(lambda: node.session is not None, 20)
        labels = scene.mask_cache.labels
        objs_in_gt = [o for o in seq.scene.object_ids if (seq.instance[0] == o).any()]
        # a cached object that covers a ground-truth object in keyframe 0, clicked at its centre
        lbl = max((int(x) for x in np.unique(labels[0]) if x > 0),
                  key=lambda x: max(((labels[0] == x) & (seq.instance[0] == o)).sum() for o in objs_in_gt))
        p_obj, (u, v) = click_point_on_object(scene, labels, lbl, view=0)
        assert int(labels[0, v, u]) == lbl and np.isfinite(p_obj).all()

        refused("wildseg3d/negative_point", point_msg(p_obj), "prompts_refused", "needs")
        refused("clicked_point", point_msg(p_obj, "some_robot_frame"), "prompts_refused", "some_robot_frame")
        refused("clicked_point", point_msg([50.0, 50.0, 50.0]), "prompts_refused", "3D prompt")
        c0 = scene.poses[0][:3, 3]
        behind = c0 - 0.5 * scene.poses[0][:3, 2]  # half a metre behind keyframe 0
        refused("clicked_point", point_msg(behind), "prompts_refused", "3D prompt")
        refused("clicked_point", point_msg([float("nan"), 0, 0]), "prompts_refused", "finite")
        refused("wildseg3d/pixel_prompt", point_msg([W + 50, 10, 0], "keyframe_0"), "prompts_refused", "outside")
        refused("wildseg3d/pixel_prompt", point_msg([-1, 10, 0], "keyframe_1"), "prompts_refused", "outside")
        refused("wildseg3d/pixel_prompt", point_msg([5, 5, 0], "keyframe_99"), "prompts_refused", "out of range")
        refused("wildseg3d/pixel_prompt", point_msg([5, 5, 0], "camera"), "prompts_refused", "does not name a keyframe")
        refused("wildseg3d/pixel_prompt_negative", point_msg([u, v, 0], "keyframe_0"), "prompts_refused", "needs")
        assert node.stats["prompts_answered"] == 0 and node.prompt_log == []

        # rate limit: 10 far-away clicks log at most one more line
        n_lines = sum("3D prompt" in m for _, m in rec.lines)
        n0 = node.stats["prompts_refused"]
        for _ in range(10):
            pubs["clicked_point"].publish(point_msg([50.0, 50.0, 50.0]))
        assert wait_for(lambda: node.stats["prompts_refused"] == n0 + 10, 10)
        assert sum("3D prompt" in m for _, m in rec.lines) <= n_lines + 1

        # a good click still works
        pubs["clicked_point"].publish(point_msg(p_obj))
        assert wait_for(lambda: node.stats["prompts_answered"] == 1, 10)
        assert wait_for(lambda: len(objs.nonempty()) >= 1, 10), [(l, len(s.points)) for l, s in node.session.results()]
        n_pts = objs.nonempty()[-1].width
        assert n_pts > 20
        # a bad scene afterwards does not lose the scene or the selection
        scene_pub.publish(bad_kf)
        assert wait_for(lambda: node.stats["bad_scene"] == n_bad + 1, 10)
        assert node.session is not None and len(node.prompt_log) == 1
        assert len(node.session.results()) == 1
        # ... and the same good scene republished (e.g. a restarted reconstruction node) keeps it too
        scene_pub.publish(scene_msg(scene, stamp=9.0))
        assert wait_for(lambda: node.stats["scene_republished"] == 1, 10)
        assert len(node.prompt_log) == 1 and objs.nonempty()[-1].width == n_pts

        # diagnostics: prompt latency percentiles, status keys
        def seg_status():
            m = diag.last()
            sts = [s for s in (m.status if m else []) if s.name == "wildseg3d: segmentation_node"]
            return {v.key: v.value for v in sts[0].values} if sts else None
        assert wait_for(lambda: (seg_status() or {}).get("prompts") == "1", 5)
        kv = seg_status()
        for key in ("segmenter", "segmenter_status", "device", "queue", "scene", "scene_id",
                    "prompt_latency_p50_ms", "prompt_latency_p95_ms", "last_error", "prompts_refused", "bad_scene"):
            assert key in kv, key
        assert float(kv["prompt_latency_p95_ms"]) >= float(kv["prompt_latency_p50_ms"]) > 0
        assert kv["scene"].startswith(f"{V} keyframes") and kv["objects"] == "1"
        assert int(kv["prompts_refused"]) == node.stats["prompts_refused"] >= 20
        assert node.stats["worker_errors"] == 0
        # ~/reset answers and clears; services keep working
        assert call_trigger(client, "/segmentation_node/reset").success
        assert wait_for(lambda: node.prompt_log == [] and objs.last().width == 0, 10)
        # another scene replaces this one: the replaced scene is freed once the worker is idle
        # (not inside the new scene's preparation, not held until the next click)
        import dataclasses
        import weakref
        old = weakref.ref(node.scene.pts3d)
        other = dataclasses.replace(built[1], pts3d=built[1].pts3d + np.float32(0.01))
        n_loaded = node.stats["scenes_loaded"]
        scene_pub.publish(scene_msg(other, stamp=11.0))
        assert wait_for(lambda: node.stats["scenes_loaded"] == n_loaded + 1, 10)
        assert wait_for(lambda: old() is None and not node._retired, 5)
    finally:
        th.stop()
        node.destroy_node()
        client.destroy_node()


def test_with_the_filter_sent_the_warm_up_waits_for_the_first_click(ros, built, tmp_path):
    """A scene that comes with Multi-view Group Mapping's filter (as reconstruction_node sends
    it): the default-settings node cuts every object while preparing, and its warm-up (KD-tree,
    negative keys, freeing the replaced scene) waits until the first click is answered, so that
    click has the CPU and the GIL to itself."""
    import dataclasses
    import time

    from wildseg3d_ros.core.group_mapping import precompute_kept
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    _, scene = built
    sc = dataclasses.replace(scene, mask_cache=dataclasses.replace(scene.mask_cache))
    kept = precompute_kept(sc)
    labels = sc.mask_cache.labels
    if not ((labels > 0) & ~kept).any():  # make sure one filtered pixel marks the filter as sent
        kept[tuple(np.argwhere(labels > 0)[0])] = False
    node = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=str(tmp_path))])
    node.WARM_DELAY_S = 60.0  # only a click starts the warm-up here
    with scene_and_clicks(node, "seg_warm_client") as rig:
        rig.scene_pub.publish(scene_msg(sc))
        assert wait_for(lambda: node.session is not None, 20)
        mapper = node.session.mapper
        assert mapper.uses_kept and not mapper.pending_objects()  # every object cut while preparing
        time.sleep(0.5)
        assert mapper._tree is None  # the warm-up waits for the first click
        obj = max(mapper.object_ids(), key=lambda o: int((labels[0] == o).sum()))
        p, _ = click_point_on_object(sc, labels, obj)
        rig.click_pub.publish(point_msg(p, stamp=7.0))
        assert wait_for(lambda: rig.objs.count() > 0 and rig.objs.last().width > 0, 10)
        assert wait_for(lambda: mapper._tree is not None, 10)  # then it runs
        assert node.stats["worker_errors"] == 0


@pytest.mark.parametrize("keep", [True, False])
def test_heap_is_faulted_in_ahead_at_start_and_after_the_first_scene(ros, built, tmp_path, keep):
    """memory.keep_scene_heap: the worker faults in memory for the first scene once it has warmed
    up, and again after the first scene (the second is prepared while the first is still held), in
    steps between prompts: a click sent right behind the scene is answered meanwhile. Off: no
    reserve, the same answers."""
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    seq, scene = built
    node = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=str(tmp_path)),
                                                 Parameter("memory.keep_scene_heap", value=keep),
                                                 Parameter("memory.first_scene_reserve_mb", value=16)])
    node.RESERVE_STEP_BYTES = 64 << 10  # many steps: the click lands between two of them
    with scene_and_clicks(node, "seg_reserve_client") as rig:
        if keep:
            assert wait_for(lambda: node.stats["heap_reserves"] == 1, 20)  # the start-up reserve
        assert node.diagnostics_values()["heap"] == ("kept for the next scene" if keep else "glibc defaults")
        rig.scene_pub.publish(scene_msg(scene))
        assert wait_for(lambda: node.session is not None, 20)
        labels = scene.mask_cache.labels
        obj = max(scene.mask_cache.object_ids(), key=lambda o: int((labels[0] == o).sum()))
        p, _ = click_point_on_object(scene, labels, obj)
        rig.click_pub.publish(point_msg(p, stamp=7.0))
        assert wait_for(lambda: rig.objs.count() > 0 and rig.objs.last().width > 0, 10)
        if keep:
            assert wait_for(lambda: node.stats["heap_reserves"] == 2 and node._reserve is None, 20)
            # 2.5x the scene message after the first scene
            assert node.stats["heap_reserved_bytes"] == (16 << 20) + int(2.5 * len(scene_msg(scene).data))
        else:
            assert node._reserve is None and node.stats["heap_reserves"] == 0
        assert node.stats["worker_errors"] == 0


def test_a_slow_disk_does_not_delay_clicks_and_the_last_session_is_written(ros, built, tmp_path, monkeypatch):
    """The session file is fsync-ed after every prompt: on its own thread, so a disk that takes
    0.4 s per save delays no click, saves that pile up are coalesced (the newest is written), and
    destroy_node waits for the last one (nothing lost on a restart)."""
    import json
    import time

    from wildseg3d_ros.core.output import store
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    real_save = store.save_session
    calls = []

    def slow_save(d, body):
        time.sleep(0.4)
        calls.append(len(body["prompts"]))
        return real_save(d, body)

    monkeypatch.setattr(store, "save_session", slow_save)
    _, scene = built
    node = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=str(tmp_path)),
                                                 Parameter("memory.keep_scene_heap", value=False)])
    with scene_and_clicks(node, "seg_slow_disk_client") as rig:
        rig.scene_pub.publish(scene_msg(scene))
        assert wait_for(lambda: node.session is not None, 20)
        labels = scene.mask_cache.labels
        valid = np.flatnonzero(((labels > 0) & np.isfinite(scene.pts3d).all(-1)).ravel())
        pts = scene.pts3d.reshape(-1, 3)[np.random.default_rng(0).choice(valid, 6)]
        for k, p in enumerate(pts):  # one object refined by six clicks, 0.1 s apart
            rig.click_pub.publish(point_msg(p, stamp=7.0 + k))
            time.sleep(0.1)
        assert wait_for(lambda: len(node.prompt_log) == 6 and node._q.empty(), 10)
        assert len(node.latencies_ms) == 6 and max(node.latencies_ms) < 300, list(node.latencies_ms)
        assert len(calls) < 6  # coalesced: fewer writes than prompts
        rig.stop()  # destroy_node waits for the last save
        assert calls[-1] == 6
        body = json.loads((tmp_path / "session.json").read_text())
        assert len(body["session"]["prompts"]) == 6, body
        assert node.stats["session_save_errors"] == 0
