"""`wildseg3d demo`: the whole system on the embedded scene, over real ROS 2.

Starts camera_sim_node, reconstruction_node and segmentation_node (one process, one executor
thread each: every message still goes through DDS), waits for the scene, clicks on one object
like rviz2's "Publish Point" would (a point of the displayed scene cloud), waits for the
segmented PointCloud2 and writes into the output folder:
  object.ply, scene.ply, montage.png, metrics.json
metrics.json: 3D-segment IoU against ground truth projected into each keyframe, keyframe pose
error against ground truth, reconstruction time, click-to-PointCloud2 latency.

``backend='sfm'`` is the RGB-only variant: the camera publishes colour and camera info only (no
depth is used, no odometry is published), the reconstruction node registers the keyframes by
structure from motion and builds the pointmaps by dense stereo (no weights, CPU); the scene is
then in the reconstruction frame at SfM scale, so poses are compared after anchoring both
trajectories at keyframe 0 (and fitting the scale).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path


import numpy as np

from ..eval.metrics import match_frames, segment_iou_per_view
from ..core.geometry import finite_points


def _log(msg: str):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(out_dir: str = "demo_out", width: int = 512, height: int = 384, num_frames: int = 5,
             seed: int = 0, target_rank: int = 0, iterations: int = 500, segmenter: str = "auto",
             timeout_s: float = 110.0, refine_clicks: int = 0, backend: str = "rgbd",
             rate_hz: float = 2.0) -> dict:
    import rclpy
    from geometry_msgs.msg import PointStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from ..core.output import montage, ply
    from ..core.geometry import pose_errors
    from ..core.output.scene_codec import scene_from_cloud_array
    from ..ros import convert
    from ..ros.camera_sim_node import CameraSimNode
    from ..ros.reconstruction_node import ReconstructionNode
    from ..ros.segmentation_node import SegmentationNode

    if backend not in ("rgbd", "sfm"):
        raise ValueError(f"demo backend must be 'rgbd' or 'sfm' (RGB only), got {backend!r}")
    rgb_only = backend == "sfm"
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rclpy.init()
    nodes = []
    executors = []
    try:
        _log(f"rendering the embedded scene: {num_frames} frames {width}x{height}, seed {seed}, backend {backend}"
             + (" (RGB + camera info only: no depth, no odometry)" if rgb_only else ""))
        cam = CameraSimNode(parameter_overrides=[
            Parameter("width", value=width), Parameter("height", value=height),
            Parameter("num_frames", value=num_frames), Parameter("seed", value=seed),
            Parameter("rate_hz", value=float(rate_hz)), Parameter("start_delay_s", value=1.5),
            Parameter("publish_odom", value=not rgb_only)])
        rec = ReconstructionNode(parameter_overrides=[
            Parameter("keyframes.reconstruct_at", value=num_frames),
            Parameter("keyframes.min_interval_s", value=0.1),
            Parameter("keyframes.max_keyframes", value=max(num_frames, 2)),
            Parameter("dga.iterations", value=iterations),
            Parameter("segmenter", value=segmenter), Parameter("backend", value=backend)])
        # one process with the reconstruction node: the allocator settings of memory.keep_scene_heap
        # are process-wide and would keep the reconstruction's freed buffers too (~150 MB more RSS)
        seg = SegmentationNode(parameter_overrides=[Parameter("segmenter", value=segmenter),
                                                    Parameter("memory.keep_scene_heap", value=False)])
        client = Node("wildseg3d_demo_client")
        nodes = [cam, rec, seg, client]
        got = {}
        ev_scene, ev_obj = threading.Event(), threading.Event()

        def on_scene(msg):
            if msg.width * msg.height > 0:
                got["scene"] = (time.perf_counter(), msg)
                ev_scene.set()

        def on_obj(msg):
            if msg.width * msg.height > 0:
                got.setdefault("objects", []).append((time.perf_counter(), msg))
                ev_obj.set()

        client.create_subscription(PointCloud2, "wildseg3d/scene", on_scene, convert.LATCHED_QOS)
        client.create_subscription(PointCloud2, "wildseg3d/object_cloud", on_obj, convert.LATCHED_QOS)
        click_pub = client.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
        from std_srvs.srv import Trigger
        reconstruct_cli = client.create_client(Trigger, "reconstruction_node/reconstruct")
        for n in nodes:
            ex = SingleThreadedExecutor()
            ex.add_node(n)
            th = threading.Thread(target=ex.spin, daemon=True)
            th.start()
            executors.append((ex, th))

        _log("streaming the camera; waiting for the reconstruction")
        t_stream = time.perf_counter()
        # when the stream has ended and the automatic trigger did not fire (e.g. a frame was
        # refused), ask for the reconstruction of what was buffered, like an operator would
        while not ev_scene.wait(0.5) and time.perf_counter() - t_stream < timeout_s:
            if cam.done and not rec.reconstruction_running() and time.perf_counter() - t_stream > 3:
                if reconstruct_cli.wait_for_service(timeout_sec=2.0):
                    fut = reconstruct_cli.call_async(Trigger.Request())
                    while not fut.done():
                        time.sleep(0.05)
                    _log(f"stream ended: ~/reconstruct -> {fut.result().message}")
                    if not fut.result().success:
                        break
                    time.sleep(0.5)
                    while rec.reconstruction_running() and not ev_scene.wait(0.2):
                        pass
                    ev_scene.wait(2.0)
                break
        if not ev_scene.is_set():
            raise RuntimeError(f"no scene within {timeout_s:.0f} s (reconstruction_node last error: "
                               f"{rec.last_error or 'none'}; stats {dict(rec.stats)})")
        t_scene, scene_msg = got["scene"]
        scene = scene_from_cloud_array(convert.cloud_to_struct(scene_msg), scene_msg.header.frame_id)
        recon = dict(rec.last_reconstruction)
        _log(f"scene received: {scene.num_views} keyframes, {len(scene.mask_cache.object_ids())} cached "
             f"objects, reconstruction {recon.get('wall_s', float('nan')):.2f} s")

        seq = cam.seq
        frame_idx = match_frames(scene.rgb, seq.rgb)
        # the click: an object visible in the first keyframe, at its mask's most interior pixel
        gt_kf = seq.instance[frame_idx]
        # objects ranked by their reconstructed area in keyframe 0 (all of it with depth; stereo
        # leaves holes, an object may even be missing from it)
        rec0 = finite_points(scene.pts3d[0]) & (scene.conf[0] > 0)
        areas = {oid: int(((gt_kf[0] == oid) & rec0).sum()) for oid in seq.scene.object_ids}
        ranked = sorted(areas, key=lambda o: -areas[o])
        target = ranked[min(target_rank, len(ranked) - 1)]
        import cv2
        # (on a pixel with a reconstructed point: stereo leaves some pixels without depth)
        m = ((gt_kf[0] == target) & rec0).astype(np.uint8)
        if not m.any():
            raise RuntimeError(f"keyframe 0 has no reconstructed point on '{seq.scene.names[target]}'")
        dist = cv2.distanceTransform(m, cv2.DIST_L2, 5)
        v, u = np.unravel_index(np.argmax(dist), dist.shape)
        p = scene.pts3d[0, v, u]
        _log(f"clicking on '{seq.scene.names[target]}' (id {target}) at keyframe 0 pixel ({u}, {v}) -> "
             f"3D ({p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f}) in '{scene.frame_id}'")
        # wait until the segmentation node has prepared this scene (its latched empty answer)
        time.sleep(0.2)
        deadline = time.perf_counter() + 30
        while seg.scene is None and time.perf_counter() < deadline:
            time.sleep(0.05)
        ev_obj.clear()
        got.pop("objects", None)
        msg = PointStamped(header=convert.make_header(scene.frame_id, client.get_clock().now().to_msg()))
        msg.point.x, msg.point.y, msg.point.z = (float(x) for x in p)
        t_click = time.perf_counter()
        click_pub.publish(msg)
        if not ev_obj.wait(20):
            raise RuntimeError(f"no object cloud within 20 s (segmentation_node last error: {seg.last_error or 'none'})")
        t_obj, obj_msg = got["objects"][-1]
        latency_ms = (t_obj - t_click) * 1e3
        arr = convert.cloud_to_struct(obj_msg).reshape(-1)
        from ..core.output.cloud import unpack_rgb
        obj_pts = np.stack([arr["x"], arr["y"], arr["z"]], -1).astype(np.float32)
        obj_rgb = unpack_rgb(arr["rgb"])
        _log(f"object cloud received: {len(obj_pts)} points, click-to-PointCloud2 {latency_ms:.1f} ms")

        gt_masks = gt_kf == target
        ious, pred_masks = segment_iou_per_view(obj_pts, scene, gt_masks)
        # in world_frame (odometry known) the poses are compared as they are; in the reconstruction
        # frame (anchored at keyframe 0) after expressing both relative to keyframe 0
        perr_raw = pose_errors(scene.poses, seq.poses[frame_idx],
                               align="none" if scene.frame_id == "map" else "first")
        perr_sim3 = pose_errors(scene.poses, seq.poses[frame_idx], align="sim3")
        valid = scene.valid_mask()
        ply.write_ply(out / "object.ply", obj_pts, obj_rgb)
        ply.write_ply(out / "scene.ply", scene.pts3d[valid], scene.rgb[valid])
        montage.make_montage(scene.rgb, pred_masks, obj_pts, obj_rgb, None, None, out / "montage.png",
                             gt_masks=gt_masks, titles=[f"keyframe {i}" for i in range(scene.num_views)],
                             view_from=scene.poses[0])
        metrics = {
            "scene": {"seed": seed, "frames": num_frames, "width": width, "height": height, "backend": backend,
                      "keyframes_left_out": dict(rec._scene.info.get("dropped_views") or {}) if rec._scene is not None else {},
                      "keyframes": scene.num_views, "cached_objects": int(len(scene.mask_cache.object_ids())),
                      "frame_id": scene.frame_id},
            "target": {"id": int(target), "name": seq.scene.names[target], "click_pixel": [int(u), int(v)],
                       "click_point": [float(x) for x in p]},
            "segment_iou_per_keyframe": [round(float(x), 4) for x in ious],
            "segment_iou_mean": round(float(np.mean(ious)), 4),
            "object_points": int(len(obj_pts)),
            "pose_error_in_scene_frame": perr_raw,
            "pose_error_after_sim3": perr_sim3,
            "reconstruction_s": {k: round(float(val), 4) for k, val in recon.items() if isinstance(val, (int, float))},
            "keyframes_prepared_ahead": int(rec.stats.get("keyframes_prepared", 0)),
            "stream_to_scene_s": round(t_scene - t_stream, 3),
            "click_to_pointcloud2_ms": round(latency_ms, 2),
            "segmentation_node_prompt_ms": round(float(seg.latencies_ms[-1]), 2) if seg.latencies_ms else None,
            "demo_wall_s": round(time.perf_counter() - t_start, 2),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _log(f"3D-segment IoU per keyframe {metrics['segment_iou_per_keyframe']} (mean {metrics['segment_iou_mean']:.3f}); "
             f"pose error {perr_raw['rot_deg_mean']:.2f} deg / {perr_raw['center_mean'] * 100:.1f} cm (frame '{scene.frame_id}')")
        _log(f"wrote {out}/object.ply, scene.ply, montage.png, metrics.json in {metrics['demo_wall_s']:.1f} s")
        return metrics
    finally:
        for ex, th in executors:
            ex.shutdown(timeout_sec=2.0)
            th.join(timeout=2.0)
        for n in nodes:
            n.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
