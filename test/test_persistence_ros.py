"""Persistence over real process restarts: nothing reconstructed is lost.

1. reconstruction_node runs as a separate process (console script) with scene_dir; the test
   streams RGB-D frames into it and calls ~/reconstruct: scene A is published and saved.
2. segmentation_node (process) gets scene A, the test clicks an object: object cloud O1; the
   prompt is saved in the session.
3. A second reconstruction (long alignment) is started and the reconstruction process is killed
   with SIGKILL while it runs (seen on /diagnostics); the segmentation process is killed too.
4. Both are restarted with load_last_scene / load_last_session: the scene received again is
   bit-identical to A (PointCloud2 data bytes) and the segmentation node republishes an object
   cloud bit-identical to O1 without any new prompt.
Plus node-level refusal of corrupt / foreign saved files (the node stays up and says why).
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PointStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from wildseg3d_ros.ros.harness import (Collector, SpinThread, call_trigger, click_point_on_object, console_script,  # noqa: E402
                         start_process, stop_process, wait_for)
from wildseg3d_ros.core.output import store  # noqa: E402
from wildseg3d_ros.core.output.scene_codec import scene_from_cloud_array  # noqa: E402
from wildseg3d_ros.ros import convert  # noqa: E402

pytestmark = pytest.mark.ros

W, H, N = 96, 72, 4


def _script(name):
    return console_script(name)


def _diag_value(col, node_name, key):
    """``key`` from the newest /diagnostics status of ``node_name`` (both nodes publish on the
    topic at different rates, so the newest message overall may be the other node's)."""
    with col._lock:
        msgs = [m for _, m in col.msgs[-50:]]
    for m in reversed(msgs):
        for st in m.status:
            if st.name == f"wildseg3d: {node_name}":
                return {v.key: v.value for v in st.values}.get(key)
    return None


@pytest.mark.slow
def test_sigkill_mid_reconstruction_then_restore_bit_identical(ros, tmp_path):
    from wildseg3d_ros.sim.tabletop import render_sequence
    seq = render_sequence(n_views=N, width=W, height=H, seed=5)
    sdir = tmp_path / "scenes"
    rec_args = [_script("reconstruction_node"), "--ros-args", "-p", f"scene_dir:={sdir}",
                "-p", "keyframes.reconstruct_at:=0", "-p", "keyframes.min_interval_s:=0.0",
                "-p", "keyframes.min_sharpness:=0.0", "-p", "keyframes.min_translation_m:=0.0",
                "-p", "keyframes.min_rotation_deg:=0.0", "-p", "dga.iterations:=10", "-p", "use_tf:=false",
                "-p", "diagnostics_period_s:=0.2"]
    seg_args = [_script("segmentation_node"), "--ros-args", "-p", f"scene_dir:={sdir}",
                "-p", "load_last_session:=true", "-p", "mgm.min_consistency:=0.0"]
    procs = []

    def start(args, log):
        p = start_process(args, log_path=str(tmp_path / log))
        procs.append(p)
        return p

    client = rclpy.create_node("persistence_test_client")
    rel = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = {"image": client.create_publisher(Image, "image", rel),
           "depth": client.create_publisher(Image, "depth", rel),
           "info": client.create_publisher(CameraInfo, "camera_info", rel),
           "odom": client.create_publisher(Odometry, "odom", rel)}
    click_pub = client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
    scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    objs = Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
    diag = Collector(client, DiagnosticArray, "/diagnostics", 20)
    ex = SingleThreadedExecutor()
    ex.add_node(client)
    th = SpinThread(ex)
    try:
        rec = start(rec_args + ["-p", "load_last_scene:=true"], "rec1.log")
        seg = start(seg_args, "seg1.log")
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in pub.values()), 30), \
            "reconstruction_node process not discovered"
        assert wait_for(lambda: _diag_value(diag, "reconstruction_node", "buffer_fill") is not None, 20)
        t = 100.0
        for i in range(N):
            t += 0.5
            pub["info"].publish(convert.make_camera_info(seq.K, W, H, t, "camera"))
            pub["depth"].publish(convert.array_to_image(seq.depth[i], "32FC1", t, "camera"))
            od = Odometry(header=convert.make_header("map", t), child_frame_id="camera")
            od.pose.pose = convert.matrix_to_pose(seq.poses[i])
            pub["odom"].publish(od)
            time.sleep(0.1)
            pub["image"].publish(convert.array_to_image(seq.rgb[i], "rgb8", t, "camera"))
            assert wait_for(lambda: _diag_value(diag, "reconstruction_node", "buffer_fill") == f"{i + 1}/8", 10), \
                (i, _diag_value(diag, "reconstruction_node", "buffer_fill"))
        r = call_trigger(client, "/reconstruction_node/reconstruct", 10)
        assert r.success, r.message
        assert wait_for(lambda: len(scenes.nonempty()) == 1, 90), "no scene A"
        scene_a = scenes.nonempty()[0]
        assert wait_for(lambda: _diag_value(diag, "reconstruction_node", "scenes_saved") == "1", 20)
        files = sorted(p.name for p in sdir.glob("scene-*.npz"))
        assert len(files) == 1

        # segmentation: click an object of scene A
        sc = scene_from_cloud_array(convert.cloud_to_struct(scene_a), scene_a.header.frame_id)
        labels = sc.mask_cache.labels
        lbl = int(np.bincount(labels[0][labels[0] > 0]).argmax())
        p_obj, _ = click_point_on_object(sc, labels, lbl, view=0)
        assert wait_for(lambda: click_pub.get_subscription_count() > 0, 20)
        assert wait_for(lambda: _diag_value(diag, "segmentation_node", "scene") not in (None, "none"), 30)
        m = PointStamped(header=convert.make_header(scene_a.header.frame_id, 1.0))
        m.point.x, m.point.y, m.point.z = (float(x) for x in p_obj)
        click_pub.publish(m)
        assert wait_for(lambda: len(objs.nonempty()) >= 1, 20), "no object cloud"
        obj1 = objs.nonempty()[-1]
        assert obj1.width > 10
        assert wait_for(lambda: int(_diag_value(diag, "segmentation_node", "sessions_saved") or 0) >= 1, 20), \
            _diag_value(diag, "segmentation_node", "sessions_saved")

        # second reconstruction with a long alignment, killed mid-way
        scli = client.create_client(SetParameters, "/reconstruction_node/set_parameters")
        assert scli.wait_for_service(timeout_sec=10)
        # (Adam for 10000 steps: Gauss-Newton converges in a few iterations whatever the cap)
        fut = scli.call_async(SetParameters.Request(parameters=[
            Parameter("dga.iterations", value=10000).to_parameter_msg(),
            Parameter("dga.optimizer", value="adam").to_parameter_msg()]))
        assert wait_for(fut.done, 10) and all(r.successful for r in fut.result().results)
        assert call_trigger(client, "/reconstruction_node/reconstruct", 10).success
        assert wait_for(lambda: _diag_value(diag, "reconstruction_node", "reconstruction_running") == "True", 10)
        time.sleep(1.0)
        os.killpg(rec.pid, signal.SIGKILL)
        rec.wait(10)
        os.killpg(seg.pid, signal.SIGKILL)
        seg.wait(10)
        assert sorted(p.name for p in sdir.glob("scene-*.npz")) == files  # nothing new, nothing torn
        loaded, _ = store.load_latest(sdir)
        assert loaded.num_views == N

        # restart both: scene A back bit-identical, the object cloud republished without a prompt
        n_scenes, n_objs = len(scenes.nonempty()), len(objs.nonempty())
        start(rec_args + ["-p", "load_last_scene:=true"], "rec2.log")
        start(seg_args, "seg2.log")
        assert wait_for(lambda: len(scenes.nonempty()) > n_scenes, 60), "restored scene not received"
        scene_b = scenes.nonempty()[-1]
        assert (scene_b.height, scene_b.width, scene_b.point_step, scene_b.header.frame_id) == \
            (scene_a.height, scene_a.width, scene_a.point_step, scene_a.header.frame_id)
        assert [(f.name, f.offset, f.datatype) for f in scene_b.fields] == \
            [(f.name, f.offset, f.datatype) for f in scene_a.fields]
        assert bytes(scene_b.data) == bytes(scene_a.data), "restored scene is not bit-identical"
        assert wait_for(lambda: len(objs.nonempty()) > n_objs, 60), "segmentation not restored"
        obj2 = objs.nonempty()[-1]
        assert obj2.width == obj1.width and bytes(obj2.data) == bytes(obj1.data)
        assert wait_for(lambda: int(_diag_value(diag, "segmentation_node", "sessions_restored") or 0) >= 1, 20)
    finally:
        for p in procs:
            stop_process(p)
        th.stop()
        client.destroy_node()


def test_corrupt_or_foreign_saved_files_are_refused_node_stays_up(ros, tmp_path):
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    sdir = tmp_path / "scenes"
    sdir.mkdir()
    (sdir / "scene-20250101T000000000000Z-000001.npz").write_bytes(b"PK\x03\x04 this is not a real archive")
    np.savez(sdir / "scene-20250101T000000000001Z-000002.npz", x=np.zeros(3))  # foreign npz
    (sdir / "session.json").write_text('{"magic": "something-else", "version": 1}')
    node = ReconstructionNode(parameter_overrides=[Parameter("scene_dir", value=str(sdir)),
                                                   Parameter("load_last_scene", value=True)])
    seg = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=str(sdir)),
                                                Parameter("load_last_session", value=True)])
    client = rclpy.create_node("persistence_corrupt_client")
    scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    scene_pub = client.create_publisher(PointCloud2, "wildseg3d/scene_test", convert.LATCHED_QOS)  # unused
    ex = SingleThreadedExecutor()
    for n in (node, seg, client):
        ex.add_node(n)
    th = SpinThread(ex)
    try:
        assert node.restored.wait(20)
        assert node.stats["load_errors"] == 1 and node._scene is None
        assert "load_last_scene" in node.last_error and "no loadable scene" in node.last_error
        assert "corrupt" in node.last_error and "foreign" in node.last_error
        assert node.diagnostics_values()["last_error"].startswith("load_last_scene")
        assert call_trigger(client, "/reconstruction_node/reconstruct").message.startswith("too few")
        time.sleep(0.3)
        assert not scenes.nonempty()
        # the segmentation node refuses the foreign session when a scene arrives and stays up
        from wildseg3d_ros.core.output import cloud as corecloud
        from wildseg3d_ros.sim.tabletop import render_sequence
        from wildseg3d_ros.core.types import AlignedScene, MaskCache
        sq = render_sequence(n_views=2, width=64, height=48, seed=1)
        from wildseg3d_ros.core.geometry import transform_points
        pts = np.stack([transform_points(sq.poses[v], _backproject(sq.depth[v], sq.K)) for v in range(2)])
        sc = AlignedScene(pts3d=pts.astype(np.float32), conf=(sq.depth > 0).astype(np.float32),
                          poses=sq.poses, K=np.stack([sq.K] * 2), rgb=sq.rgb,
                          mask_cache=MaskCache(labels=sq.instance.astype(np.int32),
                                               soft=(sq.instance > 0).astype(np.float32)))
        arr, h, w = corecloud.pack_scene_cloud(sc)
        node.scene_pub.publish(convert.struct_to_cloud(arr, "map", 1.0, h, w))
        assert wait_for(lambda: seg.stats["session_load_errors"] == 1, 20), dict(seg.stats)
        assert "saved session refused" in seg.last_error and seg.session is not None
        del scene_pub
    finally:
        th.stop()
        for n in (node, seg, client):
            n.destroy_node()


def _backproject(depth, K):
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    z = depth
    x = (u - K[0, 2]) / K[0, 0] * z
    y = (v - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], -1)
