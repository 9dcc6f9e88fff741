"""Soak test: reconstruction_node + segmentation_node under a 640x480 RGB-D stream at 30 Hz.

NOT part of the default test run. One process holds a streamer node (pre-rendered synthetic
frames of the embedded scene, re-stamped and looped: rgb8 Image + 32FC1 depth + CameraInfo +
Odometry at --hz), the reconstruction node and the segmentation node, each on its own executor
thread (every message still goes through DDS). Periodically: ~/reconstruct (every
--reconstruct-every s), ~/reset of the reconstruction node (every --reset-every s, which also
exercises cancelling a running reconstruction) and a 3D click on a cached object of the current
scene (every --prompt-every s).

Measures: process RSS over time (VmRSS, sampled every --sample-s s; growth after warm-up =
last-quarter median vs. the first sample after --warmup-s), image callback figures (stamp ->
callback latency p95, callback duration p95, keyframe-thread processing p95), dropped frames
(published but never received; received but superseded before the keyframe thread took them;
segmentation queue drops), reconstruction count / time / failures, cancel latency of resets that
hit a running job, prompt latency p50/p95, errors (frame_errors, worker errors, last_error), and
the largest queue / buffer sizes seen (to detect a growing queue).
Baseline measured in the same run: RSS of the idle process (nodes up, before streaming) and the
achieved publish rate vs. the requested one.

Last line: one JSON object with the figures.

    ROS_DOMAIN_ID=41 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST .venv/bin/python benchmarks/soak_rgbd_stream.py --minutes 3
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(values, q):
    v = list(values)
    return round(float(np.percentile(v, q)), 3) if v else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--hz", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--views", type=int, default=8, help="pre-rendered frames along the arc (looped)")
    ap.add_argument("--iterations", type=int, default=20, help="dga.iterations (the alignment is slow on CPU)")
    ap.add_argument("--max-keyframes", type=int, default=5)
    ap.add_argument("--reconstruct-every", type=float, default=40.0)
    ap.add_argument("--reset-every", type=float, default=95.0)
    ap.add_argument("--prompt-every", type=float, default=2.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    import rclpy
    from geometry_msgs.msg import PointStamped
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_srvs.srv import Trigger

    from wildseg3d_ros.sim import tabletop as synthetic
    from wildseg3d_ros.core.output.scene_codec import scene_from_cloud_array
    from wildseg3d_ros.ros import convert
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode
    from wildseg3d_ros.ros.segmentation_node import SegmentationNode

    W, H = args.width, args.height
    t_render = time.perf_counter()
    seq = synthetic.render_sequence(n_views=args.views, width=W, height=H, seed=0)
    print(f"[soak] rendered {args.views} frames {W}x{H} in {time.perf_counter() - t_render:.1f} s", flush=True)
    odom = synthetic.add_odometry_drift(seq.poses, seed=1, trans_sigma=0.003, rot_sigma_deg=0.2)
    scene_dir = tempfile.mkdtemp(prefix="wildseg3d_soak_")

    rclpy.init()
    rec = ReconstructionNode(parameter_overrides=[
        Parameter("keyframes.reconstruct_at", value=0), Parameter("keyframes.max_keyframes", value=args.max_keyframes),
        Parameter("dga.iterations", value=args.iterations), Parameter("use_tf", value=False),
        Parameter("scene_dir", value=scene_dir), Parameter("max_saved_scenes", value=2)])
    # as the demo: memory.keep_scene_heap's process-wide allocator settings are for a segmentation
    # node in a process of its own (here they would keep the reconstruction's freed buffers too)
    seg = SegmentationNode(parameter_overrides=[Parameter("scene_dir", value=scene_dir),
                                                Parameter("memory.keep_scene_heap", value=False)])
    drv = rclpy.create_node("soak_driver")
    pub_img = drv.create_publisher(Image, "image", convert.SENSOR_QOS)
    pub_dep = drv.create_publisher(Image, "depth", convert.SENSOR_QOS)
    pub_inf = drv.create_publisher(CameraInfo, "camera_info", convert.SENSOR_QOS)
    pub_odo = drv.create_publisher(Odometry, "odom", 50)
    pub_click = drv.create_publisher(PointStamped, "clicked_point", convert.PROMPT_QOS)
    latest_scene = {}
    drv.create_subscription(PointCloud2, "wildseg3d/scene",
                            lambda m: latest_scene.__setitem__("msg", m), convert.LATCHED_QOS)
    cli_rec = drv.create_client(Trigger, "/reconstruction_node/reconstruct")
    cli_reset = drv.create_client(Trigger, "/reconstruction_node/reset")

    execs = []
    for n in (rec, seg, drv):
        ex = SingleThreadedExecutor()
        ex.add_node(n)
        th = threading.Thread(target=ex.spin, daemon=True)
        th.start()
        execs.append((ex, th))

    # pre-build the messages' payloads once (the streamer only re-stamps)
    rgb_msgs = [convert.array_to_image(seq.rgb[i], "rgb8", 0.0, "camera") for i in range(args.views)]
    dep_msgs = [convert.array_to_image(seq.depth[i], "32FC1", 0.0, "camera") for i in range(args.views)]
    info = convert.make_camera_info(seq.K, W, H, 0.0, "camera")
    time.sleep(2.0)
    rss_idle = rss_mb()
    print(f"[soak] idle RSS {rss_idle:.1f} MB; streaming {args.minutes:.1f} min at {args.hz} Hz", flush=True)

    published = [0]
    pub_lat = []
    stop = threading.Event()

    def stream():
        period = 1.0 / args.hz
        t_next = time.perf_counter()
        k = 0
        # ping-pong along the arc so consecutive frames are neighbours
        order = list(range(args.views)) + list(range(args.views - 2, 0, -1))
        while not stop.is_set():
            i = order[k % len(order)]
            k += 1
            stamp = convert.sec_to_stamp(time.time())
            t0 = time.perf_counter()
            for m in (info, rgb_msgs[i], dep_msgs[i]):
                m.header.stamp = stamp
            od = Odometry(header=convert.make_header("map", stamp), child_frame_id="camera")
            od.pose.pose = convert.matrix_to_pose(odom[i])
            pub_inf.publish(info)
            pub_dep.publish(dep_msgs[i])
            pub_odo.publish(od)
            pub_img.publish(rgb_msgs[i])
            pub_lat.append(time.perf_counter() - t0)
            if len(pub_lat) > 5000:
                del pub_lat[:2500]
            published[0] += 1
            t_next += period
            dt = t_next - time.perf_counter()
            if dt > 0:
                time.sleep(dt)
            else:
                t_next = time.perf_counter()  # behind: do not burst

    th_stream = threading.Thread(target=stream, daemon=True)
    t_start = time.perf_counter()
    th_stream.start()

    samples = []
    events = []
    cancel_lat = []
    max_q = {"seg_queue": 0, "depth_ring": 0, "pose_ring": 0, "buffer": 0}
    duration = args.minutes * 60.0
    next_sample = next_rec = next_reset = next_prompt = 0.0
    next_rec = min(20.0, args.reconstruct_every)
    next_reset = args.reset_every
    prompt_scene_id = None
    prompt_target = None
    prompts_sent = 0
    n_recon_calls = 0

    def call(cli, what):
        if not cli.service_is_ready():
            return None
        fut = cli.call_async(Trigger.Request())
        t0 = time.perf_counter()
        while not fut.done() and time.perf_counter() - t0 < 5.0:
            time.sleep(0.01)
        r = fut.result() if fut.done() else None
        events.append((round(time.perf_counter() - t_start, 1), what, bool(r and r.success),
                       r.message if r else "no answer"))
        return r

    try:
        while True:
            now = time.perf_counter() - t_start
            if now >= duration:
                break
            if now >= next_sample:
                samples.append((round(now, 1), round(rss_mb(), 1)))
                next_sample += args.sample_s
                d = rec.diagnostics_values()
                print(f"[soak] t={now:6.0f}s RSS {samples[-1][1]:.1f} MB, image {d['rate_hz.image']} Hz, "
                      f"buffer {d['buffer_fill']}, running {d['reconstruction_running']}, "
                      f"recons {rec.stats['reconstructions_done']}, prompts {seg.stats['prompts_answered']}",
                      flush=True)
            max_q["seg_queue"] = max(max_q["seg_queue"], seg._q.qsize())
            qs = rec.frames.queue_sizes()
            max_q["depth_ring"] = max(max_q["depth_ring"], qs["depths"])
            max_q["pose_ring"] = max(max_q["pose_ring"], qs["poses"])
            max_q["buffer"] = max(max_q["buffer"], len(rec._buffer))
            if now >= next_rec:
                next_rec += args.reconstruct_every
                n_recon_calls += 1
                call(cli_rec, "reconstruct")
            if now >= next_reset:
                next_reset += args.reset_every
                running = rec.reconstruction_running()
                before = rec.stats["reconstructions_cancelled"]
                r = call(cli_reset, f"reset (job running: {running})")
                if running and r is not None:
                    job = rec._job
                    if job is not None:
                        job.join(30.0)
                    if rec.stats["reconstructions_cancelled"] > before and rec.last_cancel_latency_s is not None:
                        cancel_lat.append(round(rec.last_cancel_latency_s * 1e3, 1))
            if now >= next_prompt:
                next_prompt += args.prompt_every
                m = latest_scene.get("msg")
                if m is not None and m.width * m.height > 0:
                    key = (m.header.stamp.sec, m.header.stamp.nanosec)
                    if key != prompt_scene_id:
                        try:
                            sc = scene_from_cloud_array(convert.cloud_to_struct(m), m.header.frame_id)
                            lab = sc.mask_cache.labels[0]
                            big = int(np.bincount(lab[lab > 0]).argmax()) if (lab > 0).any() else 0
                            vv, uu = np.nonzero(lab == big)
                            j = len(vv) // 2
                            prompt_target = (sc.pts3d[0, vv[j], uu[j]].astype(float), m.header.frame_id)
                        except Exception as e:  # report, keep going
                            events.append((round(now, 1), "prompt target failed", False, str(e)))
                            prompt_target = None
                        prompt_scene_id = key
                    if prompt_target is not None and np.isfinite(prompt_target[0]).all():
                        pm = PointStamped(header=convert.make_header(prompt_target[1], time.time()))
                        pm.point.x, pm.point.y, pm.point.z = (float(x) for x in prompt_target[0])
                        pub_click.publish(pm)
                        prompts_sent += 1
            time.sleep(0.05)
    finally:
        stop.set()
        th_stream.join(2.0)
        elapsed = time.perf_counter() - t_start

    # let a running job finish or be cancelled cleanly
    call(cli_reset, "final reset")
    time.sleep(1.0)
    rss_final = rss_mb()
    warm = [s for s in samples if s[0] >= args.warmup_s]
    rss_warm = warm[0][1] if warm else None
    tail = [s[1] for s in samples[-max(1, len(samples) // 4):]]
    growth = (float(np.median(tail)) - rss_warm) / rss_warm * 100.0 if rss_warm else None
    # steady state: median RSS of the first quarter after warm-up vs the last quarter (single
    # samples swing by hundreds of MB depending on whether a reconstruction is running)
    q = max(1, len(warm) // 4)
    first_q = float(np.median([s[1] for s in warm[:q]])) if warm else None
    last_q = float(np.median([s[1] for s in warm[-q:]])) if warm else None
    steady = (last_q - first_q) / first_q * 100.0 if first_q else None
    rs, ss = dict(rec.stats), dict(seg.stats)
    recv = rs.get("images_received", 0)
    out = {
        "duration_s": round(elapsed, 1), "width": W, "height": H, "requested_hz": args.hz,
        "baseline_rss_idle_mb": round(rss_idle, 1),
        "rss_after_warmup_mb": rss_warm, "rss_max_mb": max(s[1] for s in samples),
        "rss_final_mb": round(rss_final, 1),
        "rss_growth_after_warmup_pct": round(growth, 2) if growth is not None else None,
        "rss_first_quarter_median_mb": first_q, "rss_last_quarter_median_mb": last_q,
        "rss_growth_steady_pct": round(steady, 2) if steady is not None else None,
        "rss_samples": samples,
        "published_frames": published[0], "achieved_publish_hz": round(published[0] / elapsed, 2),
        "publish_call_p95_ms": pct(np.array(pub_lat) * 1e3, 95),
        "received_images": recv, "dropped_in_transport": published[0] - recv,
        "superseded_before_keyframe_thread": rs.get("images_superseded", 0),
        "keyframes_accepted": rs.get("keyframe_accepted", 0),
        "image_latency_p95_ms": pct(rec.image_latency_ms, 95),
        "image_latency_p50_ms": pct(rec.image_latency_ms, 50),
        "callback_duration_p95_ms": pct(rec.callback_ms, 95),
        "keyframe_thread_p95_ms": pct(rec.frame_ms, 95),
        "reconstruct_calls": n_recon_calls, "reconstructions_done": rs.get("reconstructions_done", 0),
        "reconstructions_cancelled": rs.get("reconstructions_cancelled", 0),
        "reconstructions_failed": rs.get("reconstructions_failed", 0),
        "last_reconstruction": {k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in rec.last_reconstruction.items()},
        "cancel_latency_ms": cancel_lat,
        "prompts_sent": prompts_sent, "prompts_answered": ss.get("prompts_answered", 0),
        "prompts_refused": ss.get("prompts_refused", 0),
        "prompt_latency_p50_ms": pct(seg.latencies_ms, 50), "prompt_latency_p95_ms": pct(seg.latencies_ms, 95),
        "segmentation_queue_drops": ss.get("dropped_queue_full", 0),
        "max_queue_sizes": max_q,
        "errors": {"frame_errors": rs.get("frame_errors", 0), "bad_image": rs.get("bad_image", 0),
                   "bad_depth": rs.get("bad_depth", 0), "dropped_no_depth": rs.get("dropped_no_depth", 0),
                   "save_errors": rs.get("save_errors", 0), "seg_worker_errors": ss.get("worker_errors", 0),
                   "rec_last_error": rec.last_error[:200], "seg_last_error": seg.last_error[:200]},
        "scenes_saved": rs.get("scenes_saved", 0),
        "events": events,
    }
    for ex, th in execs:
        ex.shutdown(timeout_sec=2.0)
    for n in (rec, seg, drv):
        n.destroy_node()
    rclpy.shutdown()
    import shutil
    shutil.rmtree(scene_dir, ignore_errors=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
