"""Camera input across processes: frames paired per cell of the 12-cell matrix, large-data
transport profile vs Fast DDS's default transport (baseline), in the same run.

A *publisher process* (a camera driver's stand-in: rclpy, its own participant) sends per frame
CameraInfo, depth, colour and then odometry (odometry after the image, as many drivers do), all
stamped with the frame's stamp, 60 frames per cell, into the ``reconstruction_node`` *console
script* in another process (rgbd backend, every complete frame becomes a keyframe: motion /
sharpness thresholds 0, max 64 keyframes, no reconstruction). This process only orchestrates and
reads the node's /diagnostics between cells.

Cells (12; encoding x rate x resolution x reliable, every pair of levels covered):
reliable off: 5/15/30 Hz x 480x360/640x480 with 16UC1 / 32FC1 alternating; reliable on: the
same with the other encoding. ``input.reliable`` is the node's subscription QoS; the publisher
uses the matching QoS (best effort, keep last 5 / reliable, keep last 10).

Each cell runs twice: with ``FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_large_data.xml`` on
both processes (the shipped set-up), and with the default transport (baseline). Printed per cell:
colour frames received by the node, frames paired (= keyframes accepted), wrong pairings (a depth
or a single pose of another stamp: every message of a frame carries the same stamp, so an
approximate depth partner or a nearest-neighbour pose is another frame's), poses interpolated
(its own odometry was lost: SLERP between the neighbours, exact for this constant motion), depth
lost / late, superseded. Goal (issue 14): 60/60 paired in every cell with the profile, 0 wrong pairings.
Last line: one JSON object.

    python benchmarks/bench_camera_input.py [--frames 60] [--only profile|default]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROFILE = ROOT / "config" / "fastdds_large_data.xml"

RATES = (5.0, 15.0, 30.0)
SIZES = ((480, 360), (640, 480))


def cells():
    out = []
    for reliable in (False, True):
        for i, hz in enumerate(RATES):
            for j, (w, h) in enumerate(SIZES):
                enc = ("16UC1", "32FC1")[(i + j + int(reliable)) % 2]
                out.append({"reliable": reliable, "hz": hz, "width": w, "height": h, "encoding": enc})
    return out


PUBLISHER = r"""
import json, sys, time
import numpy as np
import rclpy
from nav_msgs.msg import Odometry
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
sys.path.insert(0, sys.argv[1])
from wildseg3d_ros.ros import convert

reliable = sys.argv[2] == "1"
rclpy.init()
node = rclpy.create_node("bench_camera_publisher")
qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE) \
    if reliable else qos_profile_sensor_data
pubs = {t: node.create_publisher(m, t, qos) for t, m in (("image", Image), ("depth", Image), ("camera_info", CameraInfo))}
odom = node.create_publisher(Odometry, "odom", 50)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not all(p.get_subscription_count() > 0 for p in list(pubs.values()) + [odom]):
    rclpy.spin_once(node, timeout_sec=0.05)
print("READY", flush=True)
rng = np.random.default_rng(0)
t_stamp = 1000.0
for line in sys.stdin:
    cell = json.loads(line)
    if not cell:
        break
    w, h, hz, n = cell["width"], cell["height"], cell["hz"], cell["frames"]
    K = np.array([[0.8 * w, 0, w / 2], [0, 0.8 * w, h / 2], [0, 0, 1.0]])
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    depth = np.full((h, w), 1.5, np.float32) + rng.random((h, w), dtype=np.float32) * 0.1
    t0 = time.monotonic()
    for k in range(n):
        t_stamp += 1.0 / hz
        st = convert.sec_to_stamp(t_stamp)
        pubs["camera_info"].publish(convert.make_camera_info(K, w, h, st, "camera"))
        pubs["depth"].publish(convert.array_to_image(depth, cell["encoding"], st, "camera"))
        pubs["image"].publish(convert.array_to_image(rgb, "rgb8", st, "camera"))
        T = np.eye(4)
        T[0, 3] = 0.01 * k
        m = Odometry(header=convert.make_header("map", st), child_frame_id="camera")
        m.pose.pose = convert.matrix_to_pose(T)
        odom.publish(m)
        rclpy.spin_once(node, timeout_sec=0.0)
        time.sleep(max(0.0, t0 + (k + 1) / hz - time.monotonic()))
    print("DONE", flush=True)
node.destroy_node()
rclpy.shutdown()
"""

KEYS = ("images_received", "keyframe_accepted", "pairing.paired_exact", "pairing.paired_approx",
        "pairing.pose_exact", "pairing.pose_interpolated", "pairing.pose_nearest", "pairing.depth_lost",
        "pairing.depth_late", "pairing.superseded", "dropped_no_depth", "dropped_no_pose", "images_superseded")


def _script(name):
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def run_config(transport: str, reliable: bool, cell_list, frames: int, domain_id: int):
    diag = Diagnostics(domain_id)
    env = os.environ.copy()
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    if transport == "profile":
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [_script("reconstruction_node"), "--ros-args"] + sum((["-p", f"{k}:={v}"] for k, v in {
        "backend": "rgbd", "use_tf": "false", "keyframes.reconstruct_at": 0, "keyframes.min_interval_s": 0.0,
        "keyframes.min_translation_m": 0.0, "keyframes.min_rotation_deg": 0.0, "keyframes.min_flow_px": 0.0,
        "keyframes.min_sharpness": 0.0, "keyframes.max_keyframes": 64, "scene_dir": "''",
        "diagnostics_period_s": 0.2, "input.reliable": str(reliable).lower()}.items()), [])
    node = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(ROOT), "1" if reliable else "0"], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    results = []
    try:
        assert pub.stdout.readline().strip() == "READY", "publisher did not see the node's subscriptions"
        assert diag.wait_values(30) is not None, "no /diagnostics from reconstruction_node"
        for cell in cell_list:
            before = diag.settled()
            pub.stdin.write(json.dumps(dict(cell, frames=frames)) + "\n")
            pub.stdin.flush()
            assert pub.stdout.readline().strip() == "DONE"
            after = diag.settled(min_wait=1.2)  # > input.pairing_timeout_s: every frame handed out
            d = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in KEYS}
            wrong = d["pairing.paired_approx"] + d["pairing.pose_nearest"]
            results.append(dict(cell, transport=transport, sent=frames, received=d["images_received"],
                                paired=d["keyframe_accepted"], wrong_pairings=wrong,
                                pose_interpolated=d["pairing.pose_interpolated"],
                                depth_lost=d["pairing.depth_lost"], depth_late=d["pairing.depth_late"],
                                superseded=d["pairing.superseded"], dropped_no_pose=d["dropped_no_pose"]))
        pub.stdin.write("{}\n")
        pub.stdin.flush()
    finally:
        diag.close()
        for p in (pub, node):
            try:
                p.wait(timeout=5) if p is pub else None
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                os.killpg(p.pid, 2)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
    return results


class Diagnostics:
    """/diagnostics of one run's node, on a ROS domain of that run only (so that a previous run's
    node, still shutting down, can never be read as this one)."""

    def __init__(self, domain_id: int):
        import threading

        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("bench_camera_input_diag", context=self.ctx)
        self.last = None
        self.t_last = 0.0
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._cb, 10)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self.th = threading.Thread(target=self.ex.spin, daemon=True)
        self.th.start()

    def _cb(self, msg):
        for st in msg.status:
            if st.name == "wildseg3d: reconstruction_node":
                self.last = {v.key: v.value for v in st.values}
                self.t_last = time.monotonic()

    def wait_values(self, timeout):
        deadline = time.monotonic() + timeout
        while self.last is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.last

    def settled(self, min_wait=0.0, timeout=20.0):
        """Counters once they stopped changing for 0.6 s (after at least ``min_wait`` s)."""
        time.sleep(min_wait)
        deadline = time.monotonic() + timeout
        prev, t_same = None, time.monotonic()
        while time.monotonic() < deadline:
            cur = {k: (self.last or {}).get(k, "0") for k in KEYS + ("pairing.waiting_frames",)}
            if cur != prev:
                prev, t_same = cur, time.monotonic()
            elif time.monotonic() - t_same > 0.6 and cur.get("pairing.waiting_frames", "0") == "0":
                break
            time.sleep(0.1)
        return dict(self.last or {})

    def close(self):
        self.ex.shutdown(timeout_sec=2)
        self.th.join(5)
        self.node.destroy_node()
        self.ctx.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--only", choices=("profile", "default"), default=None)
    args = ap.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if _script("reconstruction_node") is None:
        sys.exit("reconstruction_node console script not found (pip install -e . first)")
    rows = []
    t0 = time.perf_counter()
    base_domain = 150 + os.getpid() % 50
    for transport in ("profile", "default"):
        if args.only and transport != args.only:
            continue
        for reliable in (False, True):
            todo = [c for c in cells() if c["reliable"] == reliable]
            rows += run_config(transport, reliable, todo, args.frames, base_domain + len(rows) // 6)
            for r in rows[-len(todo):]:
                print(f"{r['transport']:>7} reliable={str(r['reliable']):5} {r['encoding']} {r['hz']:4.0f} Hz "
                      f"{r['width']}x{r['height']}: received {r['received']:3d}/{r['sent']}, paired "
                      f"{r['paired']:3d}/{r['sent']}, wrong {r['wrong_pairings']}, depth lost {r['depth_lost']}, "
                      f"late {r['depth_late']}, superseded {r['superseded']}, pose interpolated "
                      f"{r['pose_interpolated']}", flush=True)
    prof = [r for r in rows if r["transport"] == "profile"]
    base = [r for r in rows if r["transport"] == "default"]
    summary = {
        "cells": len(prof) or len(base), "frames_per_cell": args.frames, "wall_s": round(time.perf_counter() - t0, 1),
        "profile_min_paired": min((r["paired"] for r in prof), default=None),
        "profile_total_paired": sum(r["paired"] for r in prof), "profile_wrong_pairings": sum(r["wrong_pairings"] for r in prof),
        "baseline_default_transport_min_paired": min((r["paired"] for r in base), default=None),
        "baseline_default_transport_total_paired": sum(r["paired"] for r in base),
        "baseline_wrong_pairings": sum(r["wrong_pairings"] for r in base),
        "goal_met": bool(prof) and all(r["paired"] == args.frames and r["wrong_pairings"] == 0 for r in prof),
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
