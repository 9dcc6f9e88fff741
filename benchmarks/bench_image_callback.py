"""Image subscription callback cost of the reconstruction node, through real ROS 2.

A publisher *process* sends 1280x720 rgb8 sensor_msgs/Image at 30 Hz (plus CameraInfo) for
``--seconds``; in this process a ReconstructionNode (``backend=dust3r`` input path: colour only,
keyframe thread decoding and selecting; the model itself is not needed, so its set-up error is
expected and ignored; ``keyframes.reconstruct_at=0``) and a *baseline* node subscribe to the
same topic with the same sensor-data QoS, spun by one executor each in threads.

Measured with ``time.perf_counter`` around the callbacks (rclpy's deserialisation of the
message happens before either callback and is not included in either):

* node: the colour-image subscription callback (``FrameInput._on_image``: a sorted insert into
  the frame pairing), timed by the node itself (``frames.callback_ms``);
* baseline: a callback that copies every frame and decodes it
  (``np.frombuffer(msg.data).copy()`` + ``image_codec.decode_image``), i.e. doing the work in
  the callback.

Also reported: frames published / received by each, ``images_superseded`` (frames dropped
because more than 32 waited for the keyframe thread) and the keyframe thread's per-frame time. Goal (issue 5): node callback p95 <= 2 ms. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHER = r"""
import sys, time
import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
sys.path.insert(0, sys.argv[3])
from wildseg3d_ros.ros import convert
seconds, hz = float(sys.argv[1]), float(sys.argv[2])
rclpy.init()
node = rclpy.create_node("bench_image_publisher")
pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
ipub = node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
rng = np.random.default_rng(0)
W, H = int(sys.argv[4]), int(sys.argv[5])
base = (rng.random((H // 8, W // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
K = np.array([[900.0, 0, W / 2], [0, 900.0, H / 2], [0, 0, 1]])
msgs = []
for s in range(4):  # a few distinct frames (shifted texture) so keyframe selection sees motion
    msgs.append(convert.array_to_image(np.roll(base, 40 * s, axis=1), "rgb8", 0.0, "camera"))
deadline = time.monotonic() + 20
while pub.get_subscription_count() < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
n = 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    due = t0 + n / hz
    d = due - time.perf_counter()
    if d > 0:
        time.sleep(d)
    st = node.get_clock().now().to_msg()
    ipub.publish(convert.make_camera_info(K, W, H, st, "camera"))
    m = msgs[n % len(msgs)]
    m.header.stamp = st
    pub.publish(m)
    n += 1
print("PUBLISHED", n, flush=True)
time.sleep(0.5)
node.destroy_node()
rclpy.shutdown()
"""


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hz", type=float, default=30.0)
    ap.add_argument("--publisher", choices=("thread", "process"), default="thread",
                    help="thread: publisher node in this process (DDS intra-process delivery; shares the GIL, "
                    "which only makes the callbacks look slower); process: a separate process (large "
                    "best-effort images are mostly lost by Fast DDS's default transports there, see the report)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    args = ap.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from wildseg3d_ros.core.camera import image_codec
    from wildseg3d_ros.ros import convert
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

    base_ms, kf_ms = [], []

    rclpy.init()
    params = {"backend": "dust3r", "use_tf": False, "keyframes.reconstruct_at": 0, "scene_dir": "",
              "keyframes.max_keyframes": 8}
    node = ReconstructionNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    # the node times its own subscription callbacks (perf_counter inside FrameInput._on_image; only
    # colour images and CameraInfo are published here, and CameraInfo is not timed); the keyframe
    # thread's per-frame time comes from its on_processed seam
    node.frames.callback_ms = node_ms = collections.deque(maxlen=10 ** 7)
    node.frames.on_processed.append(lambda frame, outcome, seconds: kf_ms.append(seconds * 1e3))
    base = rclpy.create_node("bench_baseline_subscriber")

    def baseline(msg):
        t = time.perf_counter()
        buf = np.frombuffer(msg.data, np.uint8).copy()
        image_codec.decode_image(msg.encoding, msg.height, msg.width, msg.step, buf, msg.is_bigendian)
        base_ms.append((time.perf_counter() - t) * 1e3)

    base.create_subscription(Image, "image", baseline, convert.SENSOR_QOS)
    runs = []
    for nd in (node, base):
        ex = SingleThreadedExecutor()
        ex.add_node(nd)
        th = threading.Thread(target=ex.spin, daemon=True)
        th.start()
        runs.append((ex, th))
    if args.publisher == "process":
        pub = subprocess.run([sys.executable, "-c", PUBLISHER, str(args.seconds), str(args.hz), str(ROOT),
                              str(args.width), str(args.height)],
                             capture_output=True, text=True, timeout=args.seconds + 60)
        out = pub.stdout
    else:
        import contextlib
        import io
        buf = io.StringIO()
        code = PUBLISHER.replace("rclpy.init()", "").replace("rclpy.shutdown()", "")
        argv = sys.argv
        sys.argv = ["publisher", str(args.seconds), str(args.hz), str(ROOT), str(args.width), str(args.height)]
        try:
            with contextlib.redirect_stdout(buf):
                th = threading.Thread(target=exec, args=(code, {"__name__": "publisher"}), daemon=True)
                th.start()
                th.join(args.seconds + 60)
        finally:
            sys.argv = argv
        out = buf.getvalue()
        pub = None
    published = int(out.split("PUBLISHED")[-1].split()[0]) if "PUBLISHED" in out else -1
    time.sleep(0.5)
    for ex, th in runs:
        ex.shutdown(timeout_sec=2.0)
        th.join(2.0)
    stats = dict(node.stats)
    node.destroy_node()
    base.destroy_node()
    rclpy.shutdown()
    if published < 0 and pub is not None:
        print(pub.stdout[-2000:], pub.stderr[-2000:], file=sys.stderr)
    res = {
        "frames_published": published, "publisher": args.publisher, "seconds": args.seconds, "hz": args.hz, "size": f"{args.width}x{args.height} rgb8",
        "node_callback_ms_p50": round(pct(node_ms, 50), 4), "node_callback_ms_p95": round(pct(node_ms, 95), 4),
        "node_callback_ms_max": round(max(node_ms) if node_ms else float("nan"), 4),
        "node_received": len(node_ms), "node_images_superseded": stats.get("images_superseded", 0),
        "node_keyframes_accepted": stats.get("keyframe_accepted", 0),
        "node_dropped_in_transport": published - len(node_ms) if published >= 0 else None,
        "keyframe_thread_ms_p50": round(pct(kf_ms, 50), 2), "keyframe_thread_ms_p95": round(pct(kf_ms, 95), 2),
        "keyframe_thread_frames": len(kf_ms),
        "baseline_copy_decode_ms_p50": round(pct(base_ms, 50), 4),
        "baseline_copy_decode_ms_p95": round(pct(base_ms, 95), 4),
        "baseline_received": len(base_ms),
        "goal_p95_ms": 2.0, "goal_met": bool(len(node_ms) and pct(node_ms, 95) <= 2.0),
    }
    print(f"node _on_image: p50 {res['node_callback_ms_p50']:.3f} ms, p95 {res['node_callback_ms_p95']:.3f} ms "
          f"({len(node_ms)} frames); baseline copy+decode: p50 {res['baseline_copy_decode_ms_p50']:.3f} ms, "
          f"p95 {res['baseline_copy_decode_ms_p95']:.3f} ms ({len(base_ms)} frames)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
