"""Evidence on real data (shared/, skipped with the reason when absent) and on the embedded
synthetic scene:

(a) rgbd_room (Kinect, 5 frames): the ``rgbd`` backend + full core pipeline WITHOUT the SLAM
    poses; relative pose errors against SLAM and the fused cloud's consistency.
(b) llff_fern / middlebury_temple (RGB only): frames + intrinsics + poses packed into rosbag2
    (sqlite3 and mcap) at test time, replayed over real ROS 2 into two in-process
    reconstruction nodes: one configured for the ``dust3r`` backend (monocular input path:
    decoding + keyframe selection, checked frame by frame against an offline KeyframeBuffer),
    one for the ``rgbd`` backend (no depth in these bags: every frame must be dropped cleanly).
    Scene publication with ``dust3r`` runs with NAVER's code (``dust3r`` clone or ``mini_dust3r``)
    and a tiny random ``.pth`` checkpoint written by the test.
(c) synthetic scene: pose and pointmap error against ground truth, with and without odometry
    priors.
"""
import time
from pathlib import Path

import numpy as np
import pytest
from wildseg3d_ros.ros.harness import SpinThread, wait_for as _harness_wait_for
import torch

from wildseg3d_ros.core.camera import bags
from wildseg3d_ros.eval import datasets
from wildseg3d_ros.core.geometry import depth_to_world, invert_pose, pose_errors
from wildseg3d_ros.core.keyframes import KeyframeBuffer, pose_delta
from wildseg3d_ros.core.config import PipelineConfig
from wildseg3d_ros.core.pipeline import ReconstructionPipeline
from wildseg3d_ros.core.types import Keyframe
from wildseg3d_ros.ros import convert

torch.set_num_threads(1)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"real data absent ({SHARED_DATA}): needs ../shared beside the repo")


def _nn_consistency(pts_i, pts_j, gate=0.25, step=3):
    """Median distance from view j's points (every ``step``-th pixel) to their nearest view-i
    point, over the overlap (pairs closer than ``gate`` m), and the overlap fraction."""
    from scipy.spatial import cKDTree

    a = pts_i[np.isfinite(pts_i).all(-1)]
    b = pts_j[::step, ::step].reshape(-1, 3)
    b = b[np.isfinite(b).all(-1)]
    d, _ = cKDTree(a).query(b, k=1, distance_upper_bound=gate, workers=1)
    ok = np.isfinite(d)
    return float(np.median(d[ok])), float(ok.mean())


# ---------------------------------------------------------------------------------------------
# (a) rgbd_room
@needs_shared
def test_rgbd_room_pipeline_without_poses_vs_slam():
    """Tolerances: the SLAM poses are an estimate, not ground truth; most keypoints lie 4-8 m
    away where Kinect depth noise is 3-10 cm, so adjacent relative poses are asserted to 2.5 deg
    / 10 cm (measured 0.15-1.6 deg / 1.4-7 cm; identity would be off by 4-26 deg / 0.2-0.7 m)
    and the whole trajectory, first frame aligned, to 3 deg / 20 cm over its 2.3 m extent.
    Sim(3) on camera centres is not used for rotation: the 5 centres are nearly collinear, so the
    rotation about that line is unconstrained (it reads ~30 deg off for a perfect trajectory).
    Consistency: view j's points against view i's nearest points (overlap = closer than 25 cm)
    must be about as tight as the cloud built from the SLAM poses with the same depth."""
    d = datasets.load_rgbd_room(SHARED_DATA / "rgbd_room")
    kfs = [Keyframe(v, float(v), d.rgb[v], d.K, d.depth[v]) for v in range(5)]  # no pose prior
    pipe = ReconstructionPipeline(PipelineConfig(backend="rgbd", iterations=100, scene_graph="complete"))
    t0 = time.perf_counter()
    scene, timings = pipe.run(kfs)
    wall = time.perf_counter() - t0
    assert scene.metric and scene.num_views == 5
    assert np.allclose(scene.poses[0], np.eye(4), atol=1e-6)  # anchored at the first keyframe
    rel_r, rel_t = [], []
    for i in range(4):
        G = invert_pose(d.poses[i]) @ d.poses[i + 1]
        E = invert_pose(scene.poses[i]) @ scene.poses[i + 1]
        dt, dr = pose_delta(G, E)
        rel_r.append(dr)
        rel_t.append(dt)
        ident_t, ident_r = pose_delta(G, np.eye(4))
        assert dr < 2.5 and dt < 0.10, (i, dr, dt)
        assert dr < 0.25 * max(ident_r, 4.0) and dt < 0.35 * ident_t
    first = pose_errors(scene.poses, d.poses, align="first")
    assert first["rot_deg_max"] < 3.0 and first["center_max"] < 0.20, first
    assert abs(first["scale"] - 1.0) < 0.08  # metric (depth) scale agrees with SLAM's

    slam_pts = np.stack([depth_to_world(d.depth[v], d.K, d.poses[v]) for v in range(5)])
    slam_pts[np.stack(d.depth) <= 0] = np.nan
    est_pts = np.where(scene.valid_mask()[..., None], scene.pts3d, np.nan)
    cons = []
    for i in range(4):
        me, fe = _nn_consistency(est_pts[i], est_pts[i + 1])
        ms, fs = _nn_consistency(slam_pts[i], slam_pts[i + 1])
        cons.append((me, fe, ms, fs))
        assert me <= 1.25 * ms + 0.005, (i, me, ms)
        assert fe >= 0.9 * fs - 0.02, (i, fe, fs)
    print(f"\nrgbd_room (no poses): rel rot err deg {np.round(rel_r, 2)}, rel trans err m {np.round(rel_t, 3)}, "
          f"first-aligned {first}; NN consistency (est median m, overlap, SLAM median m, overlap) "
          f"{np.round(cons, 4).tolist()}; pipeline {wall:.1f} s {timings}")


# ---------------------------------------------------------------------------------------------
# (b) RGB-only real datasets replayed from rosbag2 into the node
rclpy = pytest.importorskip("rclpy")

from dust3r_tiny import HAVE_DUST3R, write_tiny_checkpoint  # noqa: E402  (dust3r clone or mini_dust3r)


def _wait(pred, timeout, period=0.02):
    return _harness_wait_for(pred, timeout, period)


def _make_node(backend, compressed, namespace=None):
    from rclpy.parameter import Parameter

    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

    params = {"backend": backend, "use_tf": False, "keyframes.reconstruct_at": 0, "scene_dir": "",
              "input.use_compressed": compressed}
    kw = {}
    if namespace:  # second node: its relative topics remapped onto the shared ones
        kw = dict(namespace=namespace, cli_args=["--ros-args"] + sum(
            (["-r", f"{t}:=/{t}"] for t in ("image", "image/compressed", "depth", "camera_info", "pose", "odom")),
            []))
    node = ReconstructionNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()], **kw)
    times = []
    node.processed_stamps = []  # stamps of the frames the keyframe thread actually took

    def processed(frame, outcome, seconds):  # FrameInput seam: after every frame it handled
        node.processed_stamps.append(frame.stamp)
        times.append(seconds)

    node.frames.on_processed.append(processed)
    return node, times


TOPIC_MAP = {"/camera/image": "/image", "/camera/image/compressed": "/image/compressed",
             "/camera/camera_info": "/camera_info", "/camera/pose": "/pose", "/odom": "/odom"}
LOADERS = {"llff_fern": datasets.load_llff_fern, "middlebury_temple": datasets.load_middlebury_temple}


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("dataset,storage,fmt,pose_msg", [
    ("llff_fern", "sqlite3", "rgb8", "pose"), ("llff_fern", "mcap", "png", "odom"),
    ("middlebury_temple", "mcap", "bgr8", "odom"), ("middlebury_temple", "sqlite3", "png", "pose")])
def test_rgb_dataset_bag_replay_into_node(ros, tmp_path, dataset, storage, fmt, pose_msg):
    from rclpy.executors import MultiThreadedExecutor

    from wildseg3d_ros.ros.bag_player import BagPlayerNode

    data = LOADERS[dataset](SHARED_DATA / dataset)
    # the stream: every view, with every third view repeated (a camera at rest: the repeat must
    # be rejected by the pose-motion rule without decoding), 0.5 s apart
    order = []
    for v in range(len(data.rgb)):
        order += [v, v] if v % 3 == 1 else [v]
    order = np.array(order)
    n = len(order)
    rgb = [data.rgb[v] for v in order]
    poses = data.poses[order]
    period = 0.5
    stamps = 10.0 + period * np.arange(n)
    bag = tmp_path / f"{dataset}_{storage}"
    t0 = time.perf_counter()
    bags.write_bag(bag, rgb, stamps, data.K, poses=poses, storage=storage, image_format=fmt,
                   pose_msgs=(pose_msg,), frame_id="camera", world_frame="map", info_lead_s=0.3)
    write_s = time.perf_counter() - t0
    info = bags.bag_info(bag)
    assert info["storage"] == storage and info["message_count"] == 3 * n + 2
    compressed = fmt == "png"
    node_a, times_a = _make_node("dust3r", compressed)  # monocular input path (keyframe selection)
    node_b, times_b = _make_node("rgbd", compressed, namespace="b")  # needs depth: none in this bag
    ex = MultiThreadedExecutor(num_threads=3)
    for nd in (node_a, node_b):
        ex.add_node(nd)
    th = SpinThread(ex)
    player = BagPlayerNode(node_name="real_data_player")
    rate = 1.0  # 0.5 s between frames (leaves room for a loaded 2-core CI machine)
    try:
        res = player.play(bag, rate=rate, wait_for_subscribers_s=10.0, min_subscribers=2, topic_map=TOPIC_MAP)
        assert res["subscribers_ready"], f"nodes not discovered: {res}"
        assert sum(res["published"].values()) == 3 * n + 2, res
        # the player keeps the bag's timing (scaled): it never runs ahead of the schedule, and it ends
        # late only by what it reports as its worst delay (the schedule is absolute, so one late
        # message on a loaded 2-core machine does not delay the rest). Its exact timing is checked
        # in test_bags on an idle process; here two nodes share the process (GIL) with it.
        assert res["bag_s"] == pytest.approx(stamps[-1] - stamps[0] + 0.3, abs=1e-6), res
        span = res["bag_s"] / rate
        assert span - 0.05 <= res["wall_s"] <= span + res["max_late_s"] + 1.0, res
        assert res["max_late_s"] < 5.0, res
        def done(nd):
            handled = sum(v for k, v in nd.stats.items() if k.startswith(("keyframe_", "dropped_", "rejected_",
                                                                           "bad_")))
            return nd.stats["images_received"] == n and \
                handled + nd.stats["images_superseded"] + nd.stats["frame_errors"] >= n

        assert _wait(lambda: done(node_a) and done(node_b), 15.0), (dict(node_a.stats), dict(node_b.stats))

        # --- node A: decoding + keyframe selection, frame by frame as an offline buffer decides
        sa = node_a.stats
        assert sa["frame_errors"] == 0 and sa["bad_image"] == 0, dict(sa)
        assert sa["dropped_no_camera_info"] == 0, dict(sa)
        # a live node keeps only the newest frame when its keyframe thread is busy: under CPU
        # contention (or a catch-up burst of the player) a frame can be superseded. The offline
        # reference sees exactly the frames the node processed; superseded ones must be rare.
        processed = node_a.processed_stamps
        assert len(processed) + sa["images_superseded"] == n and sa["images_superseded"] <= 2, dict(sa)
        ref = KeyframeBuffer(node_a._buffer.policy)
        for v in range(n):
            if np.min(np.abs(np.asarray(processed) - stamps[v])) < 1e-6:
                ref.offer(rgb[v], stamps[v], data.K, pose=poses[v])
        kfs = node_a._buffer.keyframes()
        assert [kf.stamp for kf in kfs] == pytest.approx(ref.stamps(), abs=1e-6), (dict(sa), ref.stats())
        accepted = sa["keyframe_accepted"]
        assert accepted == ref.stats().get("accepted", 0) and accepted >= 3
        repeats = n - len(data.rgb)
        assert sa["rejected_too_little_motion"] + sa["keyframe_too_little_motion"] >= \
            repeats - sa["images_superseded"], dict(sa)
        assert len(kfs) == min(accepted, node_a._buffer.policy.max_keyframes)
        for kf in kfs:
            v = int(np.argmin(np.abs(stamps - kf.stamp)))
            assert np.array_equal(kf.rgb, rgb[v]), f"keyframe {v} decoded content differs"
            assert np.allclose(kf.pose_prior, poses[v], atol=1e-9)
            assert np.allclose(kf.K, data.K)
        # --- node B (rgbd backend): no depth in these bags -> every frame dropped, nothing buffered
        sb = node_b.stats
        assert sb["frame_errors"] == 0 and len(node_b._buffer) == 0, dict(sb)
        assert sb["dropped_no_depth"] + sb["images_superseded"] + sum(
            v for k, v in sb.items() if k.startswith("rejected_")) == n, dict(sb)
        assert sb["dropped_no_depth"] >= 1
        # --- timing is reported, not asserted (speed: benchmarks/bench_image_callback.py); that the
        # keyframe thread keeps up with the 0.5 s period is asserted above (superseded frames <= 2)
        pa, pb = np.percentile(times_a, 95), np.percentile(times_b, 95)
        if not HAVE_DUST3R:  # the dust3r pipeline cannot be built: reported, node keeps running
            assert _wait(lambda: node_a._pipeline_error is not None, 10.0)
            assert "dust3r" in node_a._pipeline_error
        print(f"\n{dataset} {storage} {fmt}/{pose_msg}: bag write {write_s:.2f} s, replay {res['wall_s']:.2f} s "
              f"(max late {res['max_late_s'] * 1e3:.1f} ms); node A stats {dict(sa)} "
              f"frame p50/p95 {np.percentile(times_a, 50) * 1e3:.1f}/{pa * 1e3:.1f} ms; "
              f"node B stats {dict(sb)} frame p95 {pb * 1e3:.1f} ms")
    finally:
        th.stop()
        player.destroy_node()
        node_a.destroy_node()
        node_b.destroy_node()


@needs_shared
@pytest.mark.skipif(not HAVE_DUST3R, reason="neither dust3r nor mini_dust3r is importable (scripts/run.sh "
                    "installs mini-dust3r): scene publication with the dust3r backend cannot be checked")
def test_dust3r_scene_publication_from_bag(ros, tmp_path):
    """Real temple photos from a rosbag2 (mcap, png) replayed into a reconstruction node with the
    dust3r backend and a real .pth checkpoint (a tiny random network: the weights are not what
    is tested, the path is): keyframes -> DUSt3R inference -> DGA -> scene published at the
    network resolution, in the world frame of the bag's poses."""
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from wildseg3d_ros.ros.harness import Collector
    from wildseg3d_ros.ros.bag_player import BagPlayerNode
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

    data = datasets.load_middlebury_temple(SHARED_DATA / "middlebury_temple")
    views = [0, 1, 9]  # neighbours on the ring
    rgb = [data.rgb[v] for v in views]
    stamps = 10.0 + 0.5 * np.arange(len(views))
    bag = tmp_path / "temple_mcap"
    bags.write_bag(bag, rgb, stamps, data.K, poses=data.poses[views], storage="mcap", image_format="png",
                   pose_msgs=("pose",), frame_id="camera", world_frame="map", info_lead_s=0.3)
    ck = write_tiny_checkpoint(tmp_path / "tiny.pth")
    params = {"backend": "dust3r", "dust3r.checkpoint": str(ck), "dust3r.image_size": 224, "use_tf": False,
              "keyframes.reconstruct_at": len(views), "keyframes.min_interval_s": 0.1, "dga.iterations": 10,
              "scene_dir": "", "input.use_compressed": True}
    node = ReconstructionNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    client = rclpy.create_node("dust3r_bag_client")
    scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
    ex = MultiThreadedExecutor(num_threads=3)
    for nd in (node, client):
        ex.add_node(nd)
    th = SpinThread(ex)
    player = BagPlayerNode(node_name="dust3r_bag_player")
    try:
        res = player.play(bag, rate=1.0, wait_for_subscribers_s=10.0, min_subscribers=1, topic_map=TOPIC_MAP)
        assert res["subscribers_ready"], res
        assert _wait(lambda: scenes.nonempty(), 180), (node.last_error, dict(node.stats))
        msg = scenes.nonempty()[-1]
        assert msg.header.frame_id == "map"  # the bag's camera poses place the scene in the world
        assert (msg.height, msg.width) == (len(views) * 224, 224)
        assert node.stats["reconstructions_done"] == 1 and node.stats["keyframe_accepted"] == len(views)
    finally:
        th.stop()
        player.destroy_node()
        node.destroy_node()
        client.destroy_node()


# ---------------------------------------------------------------------------------------------
# (c) synthetic scene with ground truth
@pytest.fixture(scope="module")
def syn():
    from wildseg3d_ros.sim.tabletop import render_sequence

    return render_sequence(n_views=4, width=320, height=240, seed=0)


@pytest.mark.parametrize("with_priors", [False, True])
def test_synthetic_rgbd_pipeline_vs_ground_truth(syn, with_priors):
    """Registration is odometry-independent: with or without the drifted odometry (up to
    2 deg / 5 cm off) the relative trajectory is within 0.1 deg / 5 mm of ground truth and the
    fused pointmaps within 5 mm (median) of the true surface. With priors the scene is
    expressed in the odometry frame (rigid fit to the drifted poses), so its absolute error is
    bounded by the odometry's own drift, not added to it.

    The swin-1-noncyclic graph is used: on this scene the complete graph gives two wrong but
    'registered' non-adjacent pairs (56 deg and 9 deg off) that drag DGA far off (see the
    helper report)."""
    s = syn
    V = s.num_views
    kfs = [Keyframe(v, float(s.stamps[v]), s.rgb[v], s.K, s.depth[v], s.odom_poses[v] if with_priors else None)
           for v in range(V)]
    pipe = ReconstructionPipeline(PipelineConfig(backend="rgbd", iterations=100, scene_graph="swin-1-noncyclic"))
    scene, timings = pipe.run(kfs)
    first = pose_errors(scene.poses, s.poses, align="first")
    odom = pose_errors(s.odom_poses, s.poses, align="first")
    assert first["rot_deg_max"] < 0.1 and first["center_max"] < 0.005, first
    assert odom["rot_deg_max"] > 10 * first["rot_deg_max"]  # the priors really are worse
    gt = np.stack([depth_to_world(s.depth[v], s.K, s.poses[v]) for v in range(V)])
    valid = scene.valid_mask()
    if with_priors:
        absolute = pose_errors(scene.poses, s.poses, align="none")
        assert absolute["center_max"] <= odom["center_max"] + 0.005
        assert absolute["rot_deg_max"] <= odom["rot_deg_max"] + 0.1
        M = s.poses[0] @ invert_pose(scene.poses[0])  # compare shapes in the GT frame
    else:
        assert np.allclose(scene.poses[0], np.eye(4), atol=1e-6)
        M = s.poses[0]
    pts = scene.pts3d @ M[:3, :3].T + M[:3, 3]
    err = np.linalg.norm(pts - gt, axis=-1)[valid]
    assert valid.mean() > 0.9
    print(f"\nsynthetic rgbd priors={with_priors}: {first}; odometry {odom}; pointmap err median "
          f"{np.median(err) * 1e3:.2f} mm p90 {np.percentile(err, 90) * 1e3:.2f} mm; {timings}")
    rescaled = with_priors and abs(first["scale"] - 1.0) > 1e-3
    if rescaled:
        # shape check with the scale error removed (about camera 0), then report the known issue
        c = s.poses[0][:3, 3]
        err = np.linalg.norm((pts - c) * first["scale"] + c - gt, axis=-1)[valid]
    assert np.median(err) < 0.005 and np.percentile(err, 90) < 0.01, (np.median(err), np.percentile(err, 90))
    if rescaled:
        pytest.xfail(f"pipeline rescales the metric rgbd reconstruction to the drifted odometry (scale "
                     f"{1 / first['scale']:.5f}): ReconstructionPipeline.run sets scene.metric only after "
                     "_express_in_world, so umeyama fits a scale")
