"""Integration tests over real ROS 2 (rclpy + Fast DDS, no fakes): camera stream -> reconstruction
-> scene topic -> prompts -> segmented object clouds, services, reset, and the console scripts
as separate processes.

IoU threshold: the demo reaches a mean 3D-segment IoU of about 0.9 at 512x384 on this scene;
these tests run at 256x192 with a short alignment (40 iterations) to stay fast on a 2-core CI
machine, where object masks are only a few hundred pixels and one pixel of boundary error costs
~10 % IoU. A mean IoU >= 0.6 over the keyframes still fails for a wrong or merged object (which
gives < 0.4) and for a cloud in the wrong frame (~0).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")

from geometry_msgs.msg import PointStamped, PoseArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from wildseg3d_ros.ros.harness import (Collector, call_trigger, click_point_on_object, console_script, spinning,  # noqa: E402
                         start_process,
                         stop_process, wait_for)
from wildseg3d_ros.core.output.cloud import unpack_rgb  # noqa: E402
from wildseg3d_ros.eval.metrics import match_frames, segment_iou_per_view  # noqa: E402
from wildseg3d_ros.core.output.scene_codec import scene_from_cloud_array  # noqa: E402
from wildseg3d_ros.ros import convert  # noqa: E402

pytestmark = pytest.mark.ros

W, H, FRAMES, ITERS = 256, 192, 5, 40


def _cam(seed=0, name=None):
    from wildseg3d_ros.ros.camera_sim_node import CameraSimNode
    kw = {"cli_args": ["--ros-args", "-r", f"__node:={name}"]} if name else {}
    return CameraSimNode(parameter_overrides=[
        Parameter("width", value=W), Parameter("height", value=H), Parameter("num_frames", value=FRAMES),
        Parameter("seed", value=seed), Parameter("rate_hz", value=5.0), Parameter("start_delay_s", value=1.0)], **kw)


def _rec():
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode
    return ReconstructionNode(parameter_overrides=[
        Parameter("keyframes.reconstruct_at", value=FRAMES), Parameter("keyframes.min_interval_s", value=0.1),
        Parameter("dga.iterations", value=ITERS)])


def _seg():
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode
    return SegmentationNode()


def _object_points(msg):
    arr = convert.cloud_to_struct(msg).reshape(-1)
    return np.stack([arr["x"], arr["y"], arr["z"]], -1), arr


def _click(pub, node, p, frame):
    msg = PointStamped(header=convert.make_header(frame, node.get_clock().now().to_msg()))
    msg.point.x, msg.point.y, msg.point.z = (float(x) for x in p)
    pub.publish(msg)


def test_end_to_end_click_refine_reset_and_new_stream(ros):
    cam, rec, seg = _cam(), _rec(), _seg()
    client = rclpy.create_node("test_client")
    scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    poses = Collector(client, PoseArray, "wildseg3d/keyframe_poses", convert.LATCHED_QOS)
    objs = Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
    labelled = Collector(client, PointCloud2, "wildseg3d/object_cloud_labelled", convert.LATCHED_QOS)
    markers = Collector(client, MarkerArray, "wildseg3d/object_markers", convert.LATCHED_QOS)
    click_pub = client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
    new_pub = client.create_publisher(PointStamped, "wildseg3d/new_object_point", convert.PROMPT_QOS)
    pix_pub = client.create_publisher(PointStamped, "wildseg3d/pixel_prompt", convert.PROMPT_QOS)
    nodes = [cam, rec, seg, client]
    try:
        with spinning(nodes):
            assert wait_for(lambda: scenes.nonempty(), 240), \
                f"no scene: last error {rec.last_error!r}, stats {dict(rec.stats)}"
            msg = scenes.nonempty()[-1]
            # organised scene cloud, standard fields, keyframe poses beside it
            assert msg.header.frame_id == "map"  # camera poses known (odometry) -> world frame
            assert (msg.height, msg.width) == (FRAMES * H, W)
            names = [f.name for f in msg.fields]
            assert names[:4] == ["x", "y", "z", "rgb"] and {"confidence", "keyframe", "label"} <= set(names)
            assert wait_for(lambda: poses.count() > 0 and len(poses.last().poses) == FRAMES, 10)
            scene = scene_from_cloud_array(convert.cloud_to_struct(msg), msg.header.frame_id)
            seq = cam.seq
            fidx = match_frames(scene.rgb, seq.rgb)
            assert sorted(fidx.tolist()) == list(range(FRAMES))
            gt = seq.instance[fidx]
            assert wait_for(lambda: seg.session is not None, 30)
            # Multi-view Group Mapping's filter came with the scene (negative labels): the
            # segmentation node (default settings) cut its objects from it while preparing
            assert scene.mask_cache.kept is not None and seg.session.mapper.uses_kept
            # the node computes the new scene's objects while idle, so no click pays for them
            assert wait_for(lambda: seg.session.mapper.pending_work() == 0, 10)

            # --- one click on the largest object of keyframe 0
            areas = {o: int((gt[0] == o).sum()) for o in seq.scene.object_ids}
            first, second = sorted(areas, key=lambda o: -areas[o])[:2]
            p, _ = click_point_on_object(scene, gt, first)
            n0 = objs.count()
            _click(click_pub, client, p, "map")
            assert wait_for(lambda: objs.count() > n0 and objs.last().width > 0, 20)
            out = objs.last()
            assert out.header.frame_id == "map" and out.point_step == 16
            assert [(f.name, f.offset) for f in out.fields] == [("x", 0), ("y", 4), ("z", 8), ("rgb", 12)]
            pts, arr = _object_points(out)
            assert np.isfinite(pts).all() and len(pts) > 100
            ious, _ = segment_iou_per_view(pts, scene, gt == first)
            assert ious.mean() >= 0.6, f"IoU per keyframe {ious}"
            # colours come from the object (not the whole image): compare with GT pixels' colours
            obj_col = seq.rgb[fidx][gt == first].mean(0)
            assert np.abs(unpack_rgb(arr["rgb"]).mean(0) - obj_col).max() < 40
            assert wait_for(lambda: markers.count() > 0 and any(m.type == Marker.LINE_LIST
                                                                 for m in markers.last().markers), 10)

            # --- a second object, started explicitly, gets label 2 in the labelled cloud
            p2, _ = click_point_on_object(scene, gt, second)
            n1 = labelled.count()
            _click(new_pub, client, p2, "map")
            assert wait_for(lambda: labelled.count() > n1, 20)
            lab = convert.cloud_to_struct(labelled.last()).reshape(-1)
            assert labelled.last().point_step == 20 and set(np.unique(lab["label"]).tolist()) == {1, 2}

            # --- a pixel prompt on keyframe 1 refines / answers too
            _, (u, v) = click_point_on_object(scene, gt, second, view=1)
            m = PointStamped(header=convert.make_header("keyframe_1", client.get_clock().now().to_msg()))
            m.point.x, m.point.y = float(u), float(v)
            n2 = objs.count()
            pix_pub.publish(m)
            assert wait_for(lambda: objs.count() > n2, 20)
            assert seg.stats["prompts_refused"] == 0

            # --- ~/resegment replays the prompts and republishes the same selection
            n3 = labelled.count()
            r = call_trigger(client, "segmentation_node/resegment")
            assert r.success, r.message
            assert wait_for(lambda: labelled.count() > n3, 30)
            lab2 = convert.cloud_to_struct(labelled.last()).reshape(-1)
            assert set(np.unique(lab2["label"]).tolist()) == {1, 2}

            # --- segmentation ~/reset clears the selection (empty cloud published)
            r = call_trigger(client, "segmentation_node/reset")
            assert r.success
            assert wait_for(lambda: objs.last().width == 0, 10)

            # --- reconstruction ~/reset empties the scene; prompts then get a clear refusal
            n_sc = scenes.count()
            r = call_trigger(client, "reconstruction_node/reset")
            assert r.success
            assert wait_for(lambda: scenes.count() > n_sc and scenes.last().width == 0, 10)
            assert wait_for(lambda: seg.session is None, 10)
            before = seg.stats["prompts_without_scene"]
            _click(click_pub, client, p, "map")
            assert wait_for(lambda: seg.stats["prompts_without_scene"] == before + 1, 10)

            # --- a new stream (another scene) gives a new, different scene
            cam2 = _cam(seed=3, name="camera_sim_2")
            with spinning([cam2]):
                assert wait_for(lambda: len(scenes.nonempty()) >= 2, 240), \
                    f"no second scene: {rec.last_error!r} {dict(rec.stats)}"
            cam2.destroy_node()
            new = scene_from_cloud_array(convert.cloud_to_struct(scenes.nonempty()[-1]), "map")
            assert not np.array_equal(new.rgb, scene.rgb)
            assert match_frames(new.rgb, cam2.seq.rgb).tolist() == list(range(FRAMES))
    finally:
        for n in nodes:
            n.destroy_node()


def test_prompt_before_any_scene_is_refused_clearly(ros):
    seg = _seg()
    client = rclpy.create_node("test_client_noscene")
    pub = client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
    pix = client.create_publisher(PointStamped, "wildseg3d/pixel_prompt", convert.PROMPT_QOS)
    try:
        with spinning([seg, client]):
            assert wait_for(lambda: pub.get_subscription_count() > 0, 10)
            _click(pub, client, [0.1, 0.2, 0.3], "map")
            m = PointStamped(header=convert.make_header("keyframe_0", client.get_clock().now().to_msg()))
            pix.publish(m)
            assert wait_for(lambda: seg.stats["prompts_without_scene"] == 2, 10)
            assert call_trigger(client, "segmentation_node/reset").success
            r = call_trigger(client, "segmentation_node/resegment")
            assert not r.success and "no scene" in r.message
            assert seg._worker.is_alive()
    finally:
        seg.destroy_node()
        client.destroy_node()


def _script(name):
    return [console_script(name)]


def test_console_scripts_as_separate_processes(ros, tmp_path):
    """The three nodes as real processes (their console scripts); this test process only clicks."""
    env = os.environ.copy()
    procs = [
        start_process(_script("reconstruction_node") + ["--ros-args", "-p", f"keyframes.reconstruct_at:={FRAMES}",
                                                       "-p", "keyframes.min_interval_s:=0.1",
                                                       "-p", f"dga.iterations:={ITERS}"], env, tmp_path / "rec.log"),
        start_process(_script("segmentation_node"), env, tmp_path / "seg.log"),
    ]
    client = rclpy.create_node("test_client_procs")
    scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    objs = Collector(client, PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
    pub = client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
    try:
        # the camera plays its frames once: start it only when the reconstruction process is up
        # (a loaded machine can take many seconds to import torch in a new process)
        from std_srvs.srv import Trigger
        ready = client.create_client(Trigger, "reconstruction_node/reconstruct")
        assert ready.wait_for_service(timeout_sec=120), "reconstruction_node process did not come up"
        procs.append(start_process(_script("camera_sim_node") + [
            "--ros-args", "-p", f"width:={W}", "-p", f"height:={H}", "-p", f"num_frames:={FRAMES}",
            "-p", "rate_hz:=5.0", "-p", "start_delay_s:=2.0",
            # looping: a frame lost between processes on a loaded machine (best-effort sensor QoS)
            # is played again, so the automatic reconstruction still gets its 5 keyframes
            "-p", "loop:=true"], env, tmp_path / "cam.log"))
        with spinning([client]):
            ok = wait_for(lambda: scenes.nonempty(), 300)
            logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
            assert ok, f"no scene from the reconstruction_node process; logs: {logs}"
            msg = scenes.nonempty()[-1]
            scene = scene_from_cloud_array(convert.cloud_to_struct(msg), msg.header.frame_id)
            from wildseg3d_ros.sim import tabletop as synthetic
            seq = synthetic.render_sequence(n_views=FRAMES, width=W, height=H, seed=0)
            gt = seq.instance[match_frames(scene.rgb, seq.rgb)]
            target = max(seq.scene.object_ids, key=lambda o: (gt[0] == o).sum())
            p, _ = click_point_on_object(scene, gt, target)
            # the segmentation process prepares the scene after receiving it; click until answered
            deadline = time.monotonic() + 60
            while not objs.nonempty() and time.monotonic() < deadline:
                _click(pub, client, p, msg.header.frame_id)
                wait_for(lambda: bool(objs.nonempty()), 2.0)
            logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
            assert objs.nonempty(), f"no object cloud from the segmentation_node process; logs {logs}"
            pts, _ = _object_points(objs.nonempty()[-1])
            ious, _ = segment_iou_per_view(pts, scene, gt == target)
            assert ious.mean() >= 0.6, f"IoU {ious}"
            assert all(p.poll() is None for p in procs), "a node process died"
    finally:
        client.destroy_node()
        for p in procs:
            stop_process(p)
    # nodes shut down cleanly on SIGINT
    assert all(p.returncode is not None for p in procs)
