"""Camera input of reconstruction_node: subscriptions, pairing, decoding, keyframe offers.

Callbacks only store: each message goes into the ROS-free ``core.frame_pairing.FramePairer``
(a sorted insert) and wakes the keyframe thread. That thread polls the pairer — at every
message and every 20 ms for the expiries; it never sleeps waiting for one frame's partner —
and processes each frame the pairer hands out, in stamp order: keyframe pre-check (timestamps,
pose motion), colour decode and checks against its CameraInfo, then its depth (lost, or decode
and checks), the camera pose (a frame that needed a pose and has none is refused, never buffered pose-less),
then ``KeyframeBuffer.offer``. Every refusal is counted in the node's ``stats``, kept as its
``last_error`` and logged (rate-limited) with what was wrong and what was done.

Seams (tests, benchmarks): ``on_processed`` — callables ``fn(frame, outcome, seconds)`` run
after each frame the keyframe thread handled (not for superseded ones); ``queue_sizes()``;
``K`` (the intrinsics in force); ``pairer`` (the core pairer, with its counters).
"""
from __future__ import annotations

import collections
import math
import threading
import time
import traceback
from typing import Callable, List, Optional

import numpy as np
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..core.camera.pairing import FramePairer, PairedFrame, PairingConfig
from ..core.camera.stream_health import StampGapMonitor
from . import convert

#: a pose message (valid or refused) or a TF pose this recent means poses are expected
POSE_EXPECTED_S = 5.0
POLL_S = 0.02


class Rate:
    """Receive rate of one input (Hz) over the last ``window_s`` seconds; O(1) per message."""

    def __init__(self, maxlen: int = 256):
        self._t = collections.deque(maxlen=maxlen)

    def tick(self, now: float):
        self._t.append(now)

    def hz(self, now: float, window_s: float = 3.0) -> float:
        ts = [t for t in list(self._t) if now - t <= window_s]
        if len(ts) < 2:
            return 0.0
        return (len(ts) - 1) / max(ts[-1] - ts[0], 1e-6)


def percentile(values, q: float) -> float:
    v = list(values)
    return float(np.percentile(np.asarray(v, dtype=np.float64), q)) if v else float("nan")


class FrameInput:
    """``node``: the ReconstructionNode (params, stats, log, ``_refuse``, ``_buffer``);
    ``on_accepted()`` is called after each accepted keyframe (automatic reconstruction)."""

    def __init__(self, node, on_accepted: Callable[[], None]):
        self.node = node
        self._on_accepted = on_accepted
        self.on_processed: List[Callable] = []
        p = node.params
        self.pairer = FramePairer(self._config(), pose_fn=self._tf_pose)
        self._K: Optional[np.ndarray] = None
        self._last_pose_rx = -math.inf
        self._last_pose_refusal = ""
        self._graph_t = -math.inf
        self.rates = {k: Rate() for k in ("image", "depth", "camera_info", "pose")}
        self.gaps = {"image": StampGapMonitor(), "depth": StampGapMonitor()}
        self.image_latency_ms = collections.deque(maxlen=2000)   # receive wall time - header stamp
        self.callback_ms = collections.deque(maxlen=2000)        # duration of the subscription callbacks
        self.frame_ms = collections.deque(maxlen=500)            # keyframe thread: decode + selection
        self._wake = threading.Event()
        self._stop = threading.Event()
        qos = convert.RELIABLE_CAMERA_QOS if p["input.reliable"] else convert.SENSOR_QOS
        g = node.guarded_callback
        if p["input.use_compressed"]:
            node.create_subscription(CompressedImage, "image/compressed", g("image", self._on_image), qos)
        else:
            node.create_subscription(Image, "image", g("image", self._on_image), qos)
        node.create_subscription(Image, "depth", g("depth", self._on_depth), qos)
        node.create_subscription(CameraInfo, "camera_info", g("camera_info", self._on_camera_info), qos)
        node.create_subscription(Odometry, "odom", g("odom", lambda m: self._on_pose(m.header, m.pose.pose)), 50)
        node.create_subscription(PoseStamped, "pose", g("pose", lambda m: self._on_pose(m.header, m.pose)), 50)
        self._tf_buffer = None
        if p["use_tf"]:
            try:  # tf2_ros is not on PyPI; it is on every real ROS install
                import tf2_ros
                self._tf_buffer = tf2_ros.Buffer()
                self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, node)
            except ImportError:
                node.get_logger().info("tf2_ros not importable: camera poses come from the odom/pose topics only")
        self._thread = threading.Thread(target=self._loop, name="keyframes", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ configuration
    def _config(self) -> PairingConfig:
        p = self.node.params
        return PairingConfig(need_depth=p["backend"] == "rgbd", need_info=True,
                             depth_tolerance_s=p["input.depth_sync_tolerance_s"],
                             pose_tolerance_s=p["input.pose_sync_tolerance_s"],
                             expiry_s=p["input.pairing_timeout_s"]).validate()

    def reconfigure(self) -> None:
        """Apply changed input.* / backend parameters to the pairing (waiting frames keep waiting)."""
        self.pairer.config = self._config()

    @property
    def K(self) -> Optional[np.ndarray]:
        return self._K

    def queue_sizes(self) -> dict:
        return self.pairer.sizes()

    def clear(self) -> None:
        self.pairer.clear()
        for m in self.gaps.values():
            m.clear()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ callbacks (store only)
    def _on_image(self, msg):
        t0 = time.perf_counter()
        now = time.monotonic()
        self.node.stats["images_received"] += 1
        self.rates["image"].tick(now)
        st = convert.stamp_to_sec(msg.header.stamp)
        if st > 0:
            self.image_latency_ms.append((time.time() - st) * 1e3)
        if self._ahead_of_clock(st, "image", "colour frame"):
            return
        self.gaps["image"].observe(st)
        self.pairer.add_image(st, msg, now, frame_id=msg.header.frame_id)
        self._wake.set()
        self.callback_ms.append((time.perf_counter() - t0) * 1e3)

    def _ahead_of_clock(self, stamp: float, key: str, what: str) -> bool:
        """Refuse (count, log) a message stamped more than input.max_future_s ahead of the node's
        clock; True when refused."""
        limit = self.node.params["input.max_future_s"]
        if limit <= 0 or not math.isfinite(stamp):
            return False
        now = self.node.get_clock().now().nanoseconds * 1e-9
        if now <= 0 or stamp <= now + limit:  # no clock yet (sim time before /clock): no check
            return False
        self.node._refuse(f"future_{key}", "rejected_future_stamp",
                          f"{what} at t={stamp:.3f} refused: stamped {stamp - now:.1f} s ahead of the node's "
                          f"clock (input.max_future_s={limit:g}); dropped so it cannot become the newest stamp",
                          "warning")
        return True

    def _on_depth(self, msg: Image):
        t0 = time.perf_counter()
        now = time.monotonic()
        self.node.stats["depth_received"] += 1
        self.rates["depth"].tick(now)
        st = convert.stamp_to_sec(msg.header.stamp)
        if self._ahead_of_clock(st, "depth", "depth image"):
            return
        self.gaps["depth"].observe(st)
        self.pairer.add_depth(st, msg, now)
        self._wake.set()
        self.callback_ms.append((time.perf_counter() - t0) * 1e3)

    def _on_camera_info(self, msg: CameraInfo):
        self.rates["camera_info"].tick(time.monotonic())
        try:
            K = convert.camera_info_to_K(msg)
        except ValueError as e:
            self.node._refuse("camera_info", "bad_camera_info", f"CameraInfo refused ({e}); keeping the previous "
                              "intrinsics" if self._K is not None else f"CameraInfo refused ({e}); frames are not "
                              "buffered until a valid CameraInfo arrives")
            return
        self._K = K
        self.pairer.add_info((K, (int(msg.height), int(msg.width))))
        self._wake.set()

    def _on_pose(self, header, pose):
        now = time.monotonic()
        self.rates["pose"].tick(now)
        self._last_pose_rx = now
        world = self.node.params["world_frame"]
        try:
            T = convert.pose_to_matrix(pose)
            stamp = convert.stamp_to_sec(header.stamp)
            if not math.isfinite(stamp) or stamp <= 0:
                raise ValueError(f"stamp {stamp!r} is not a positive time")
        except ValueError as e:
            self._last_pose_refusal = f"camera pose message refused ({e}): pose ignored"
            self.node._refuse("pose", "bad_pose", self._last_pose_refusal)
            return
        if header.frame_id and header.frame_id != world:
            self._last_pose_refusal = (f"camera pose in frame '{header.frame_id}' refused: poses must be in world_frame "
                                       f"'{world}' (publish them there or set world_frame:={header.frame_id}); "
                                       "pose ignored")
            self.node._refuse("pose_frame", "bad_pose_frame", self._last_pose_refusal, "warning")
            return
        if self._ahead_of_clock(stamp, "pose", "camera pose"):
            return
        self.pairer.add_pose(stamp, T, now)
        self._wake.set()

    def _tf_pose(self, stamp: float, frame_id: str) -> Optional[np.ndarray]:
        """Non-blocking TF lookup world_frame <- frame_id at the frame's stamp (None if not yet)."""
        if self._tf_buffer is None or not frame_id:
            return None
        from rclpy.time import Time

        from ..core.geometry import pose_from_xyz_quat
        world = self.node.params["world_frame"]
        t = Time(nanoseconds=int(stamp * 1e9))
        try:
            if not self._tf_buffer.can_transform(world, frame_id, t):
                return None
            tf = self._tf_buffer.lookup_transform(world, frame_id, t)
        except Exception:  # extrapolation, unknown frame: the topics may still give the pose
            return None
        self._last_pose_rx = time.monotonic()
        tr, q = tf.transform.translation, tf.transform.rotation
        return pose_from_xyz_quat([tr.x, tr.y, tr.z], [q.x, q.y, q.z, q.w])

    # ------------------------------------------------------------------ keyframe thread
    def _loop(self):
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            try:
                now = time.monotonic()
                self.pairer.expect_pose = now - self._last_pose_rx < POSE_EXPECTED_S
                if now - self._graph_t > 0.2:  # a cheap graph query (no message), at most 5 times a second
                    self._graph_t = now
                    self.pairer.await_pose = self._pose_publishers() > 0
                frames = self.pairer.poll(now)
            except Exception as e:  # never let the thread die
                self.node.internal_error("frame pairing", e)
                continue
            for f in frames:
                if self._stop.is_set():
                    return
                self._handle(f)

    def _pose_publishers(self) -> int:
        try:
            n = self.node
            return n.count_publishers(n.resolve_topic_name("odom")) + n.count_publishers(n.resolve_topic_name("pose"))
        except Exception:  # during shutdown
            return 0

    def _handle(self, f: PairedFrame):
        t0 = time.perf_counter()
        try:
            outcome = self._process(f)
        except Exception as e:
            outcome = "frame_errors"
            try:
                self.node.stats["frame_errors"] += 1
                self.node.last_error = f"frame processing failed: {e}"
                self.node.log.error("frame", f"{self.node.last_error}: frame dropped\n{traceback.format_exc(limit=3)}")
            except Exception:
                pass
        dt = time.perf_counter() - t0
        self.frame_ms.append(dt * 1e3)
        if outcome == "superseded":
            return
        for fn in list(self.on_processed):
            try:
                fn(f, outcome, dt)
            except Exception as e:
                self.node.internal_error("on_processed hook", e)

    def _process(self, f: PairedFrame) -> str:
        """Handle one frame from the pairer; returns its outcome (a stats key)."""
        node, p = self.node, self.node.params
        refuse = node._refuse
        stamp = f.stamp
        if f.dropped == "superseded":
            node.stats["images_superseded"] += 1
            return "superseded"
        if f.dropped == "duplicate_timestamp":
            refuse("duplicate_timestamp", "rejected_duplicate_timestamp", f"image at t={stamp:.6f} refused: "
                   f"duplicate timestamp ({f.detail}; frame dropped)", "warning")
            return "rejected_duplicate_timestamp"
        if f.dropped == "out_of_order":  # usually a backwards / duplicate stamp: say which
            reason = node._buffer.cheap_reject(stamp, None)
            if reason in ("timestamp_backwards", "duplicate_timestamp", "invalid_timestamp"):
                refuse(reason, f"rejected_{reason}", f"image at t={stamp:.6f} refused: "
                       f"{reason.replace('_', ' ')} (newest stamp seen is kept; frame dropped)", "warning")
                return f"rejected_{reason}"
            refuse("out_of_order", "dropped_out_of_order", f"image at t={stamp:.6f} refused: it {f.detail} "
                   "(frames are paired in stamp order): frame dropped", "warning")
            return "dropped_out_of_order"
        if f.dropped == "no_camera_info":
            refuse("no_info", "dropped_no_camera_info", "no valid CameraInfo received yet: colour frame dropped",
                   "warning")
            return "dropped_no_camera_info"
        pose = f.pose
        reason = node._buffer.cheap_reject(stamp, pose)
        if reason is not None:
            if reason in ("timestamp_backwards", "duplicate_timestamp", "invalid_timestamp"):
                refuse(reason, f"rejected_{reason}", f"image at t={stamp:.6f} refused: "
                       f"{reason.replace('_', ' ')} (newest stamp seen is kept; frame dropped)", "warning")
            else:
                node.stats[f"rejected_{reason}"] += 1  # normal keyframe selection, not an error
            return f"rejected_{reason}"
        msg = f.image
        try:
            if isinstance(msg, CompressedImage):
                rgb = convert.compressed_to_array(msg, p["input.max_pixels"])
            else:
                rgb = convert.image_to_array(msg, p["input.max_pixels"])
        except ValueError as e:
            refuse("image", "bad_image", f"colour image refused ({e}): frame dropped")
            return "bad_image"
        if rgb.ndim != 3:
            refuse("image", "bad_image", f"image topic carries a depth encoding ({getattr(msg, 'encoding', '?')}); "
                   "expected a colour image: frame dropped")
            return "bad_image"
        K, shape = f.info
        if shape[0] > 0 and tuple(shape) != rgb.shape[:2]:
            refuse("info_size", "bad_image", f"CameraInfo is {shape[1]}x{shape[0]} but the image is "
                   f"{rgb.shape[1]}x{rgb.shape[0]}: frame dropped")
            return "bad_image"
        if f.dropped is not None:  # depth_lost (checked after the image: a broken image is said first)
            refuse("no_depth", "dropped_no_depth", f"no depth image within {self.pairer.depth_tolerance():.3f} s of the "
                   f"colour frame at t={stamp:.3f}: frame dropped ({f.detail})", "warning")
            return "dropped_no_depth"
        depth = None
        if f.depth is not None:
            depth = self._decode_depth(f.depth, rgb.shape[:2])
            if depth is None:
                return "bad_depth"
        if f.pose_source in ("late", "unmatched"):
            hint = (" (pose messages were refused: see bad_pose / bad_pose_frame in /diagnostics)"
                    if self._last_pose_refusal else "")
            refuse("no_pose", "dropped_no_pose", f"colour frame at t={stamp:.3f} dropped: {f.detail}{hint}", "warning")
            return "dropped_no_pose"
        if pose is None and any(kf.pose_prior is not None for kf in node._buffer.keyframes()[-1:]):
            refuse("pose_mix", "dropped_no_pose", f"colour frame at t={stamp:.3f} dropped: it has no camera pose but the "
                   "buffered keyframes have poses (a pose-less keyframe would move the scene out of world_frame); "
                   "are the odom/pose topics still published?", "warning")
            return "dropped_no_pose"
        accepted, reason = node._buffer.offer(rgb, stamp, K.copy(), depth=depth, pose=pose,
                                              frame_id=getattr(msg.header, "frame_id", "") or "camera")
        outcome = f"keyframe_{'accepted' if accepted else reason}"
        node.stats[outcome] += 1
        if accepted:
            self._on_accepted()
        return outcome

    def _decode_depth(self, dmsg, shape) -> Optional[np.ndarray]:
        refuse = self.node._refuse
        try:
            depth, dstats = convert.depth_to_array(dmsg, self.node.params["input.max_pixels"])
        except ValueError as e:
            refuse("depth", "bad_depth", f"depth image refused ({e}): frame dropped")
            return None
        if depth.shape != tuple(shape):
            refuse("depth_size", "bad_depth", f"depth {depth.shape[1]}x{depth.shape[0]} does not match "
                   f"colour {shape[1]}x{shape[0]}: frame dropped")
            return None
        if dstats["valid"] == 0:
            refuse("depth_invalid", "bad_depth", "depth image has no valid pixel (all 0/NaN/inf/negative): frame dropped")
            return None
        if dstats["nan"] + dstats["inf"] + dstats["negative"] > 0:
            # common on real sensors: not an error, the pixels are masked out
            self.node.stats["depth_invalid_values"] += 1
            self.node.log.warning("depth_values", f"depth had {dstats['nan']} NaN, {dstats['inf']} inf, "
                                  f"{dstats['negative']} negative values: treated as invalid (0), frame kept")
        return depth

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict:
        now = time.monotonic()
        kv = {f"rate_hz.{k}": f"{r.hz(now):.2f}" for k, r in self.rates.items()}
        kv["image_latency_p95_ms"] = f"{percentile(self.image_latency_ms, 95):.2f}"
        kv["callback_p95_ms"] = f"{percentile(self.callback_ms, 95):.3f}"
        kv["frame_processing_p95_ms"] = f"{percentile(self.frame_ms, 95):.2f}"
        kv["pairing.depth_tolerance_s"] = f"{self.pairer.depth_tolerance():.4f}"
        kv["pairing.waiting_frames"] = str(self.pairer.pending())
        kv["pairing.poses_expected"] = str(self.pairer.expect_pose)
        kv.update({f"pairing.{k}": str(v) for k, v in sorted(self.pairer.stats().items())})
        for name, mon in self.gaps.items():
            s = mon.summary()
            kv[f"transport.{name}_missing"] = f"{s['missing']}/{s['received'] + s['missing']}"
        return kv

    def transport_warning(self) -> Optional[str]:
        for name, mon in self.gaps.items():
            w = mon.warning("colour images" if name == "image" else "depth images")
            if w:
                return w
        return None
