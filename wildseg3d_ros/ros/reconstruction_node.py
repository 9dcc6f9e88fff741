"""reconstruction_node: camera stream -> keyframes -> reconstructed, segmented scene.

Subscriptions (relative names; remap them):
  image (sensor_msgs/Image, sensor-data QoS) or image/compressed (sensor_msgs/CompressedImage)
  depth (sensor_msgs/Image 16UC1 mm or 32FC1 m), camera_info (sensor_msgs/CameraInfo)
  odom (nav_msgs/Odometry) and pose (geometry_msgs/PoseStamped): camera poses in world_frame
Publications (reliable + transient local):
  wildseg3d/scene (sensor_msgs/PointCloud2, organised: V*H rows x W, fields x y z rgb confidence
  keyframe label), wildseg3d/keyframe_poses (geometry_msgs/PoseArray), /diagnostics
Services: ~/reconstruct, ~/reset (std_srvs/Trigger)

Threads: callbacks only store messages (cheap); a keyframe thread decodes and selects
keyframes; a worker thread runs the reconstruction, cancellable by ~/reset.

Bad input never stops the node: every refused message increments a counter in ``stats`` (also
on /diagnostics), sets ``last_error`` and logs one rate-limited line saying what was wrong and
what was done (``ThrottledLogger``: one line per kind every 2 s with a count of the others).

Persistence: with ``scene_dir`` set (default ~/.ros/wildseg3d/scenes; empty disables), every
completed scene is written atomically by core.store.save_scene (scene, mask cache, keyframe
depth / pose priors / stamps / intrinsics, timings), keeping ``max_saved_scenes`` files. With
``load_last_scene`` the newest saved scene is loaded at start-up and republished (the published
cloud is bit-identical to the one published when it was reconstructed). ~/reset clears the live
scene only, never the saved files. File names are made by the store, never taken from a message.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseArray, PoseStamped
from nav_msgs.msg import Odometry
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger

from ..core import cloud as corecloud
from ..core import store
from ..core.keyframes import KeyframeBuffer, KeyframePolicy
from ..core.errors import Cancelled
from ..core.pipeline import PipelineConfig, ReconstructionPipeline
from . import convert
from .params import (ParamSpec, ParameterTable, check_device, check_dir_param, check_file_param,
                     check_scene_graph)
from .memory import release_free_heap
from .node_common import NodeCommonMixin
from .throttled_log import ThrottledLogger

PARAMS = [
    ParamSpec("world_frame", "map", "Frame of the published scene when camera poses are known "
              "(odometry/pose topics or TF); otherwise reconstruction_frame is used."),
    ParamSpec("reconstruction_frame", "wildseg3d_reconstruction", "Frame of the scene when no camera "
              "pose is known: anchored at the first keyframe, scale unknown for monocular backends."),
    ParamSpec("use_tf", True, "Look up the camera pose in world_frame from TF (tf2_ros) when it is "
              "importable; pose/odom topics are used otherwise or in addition."),
    ParamSpec("tf_timeout_s", 0.05, "TF lookup timeout per frame (s).", 0.0, 5.0),
    ParamSpec("input.use_compressed", False, "Subscribe to image/compressed (jpeg/png) instead of image "
              "(fixed at start-up).", read_only=True),
    ParamSpec("input.depth_sync_tolerance_s", 0.05, "Max |t_colour - t_depth| to pair a depth image.", 0.0, 1.0),
    ParamSpec("input.pose_sync_tolerance_s", 0.1, "Max |t_image - t_pose| to use a pose message.", 0.0, 5.0),
    ParamSpec("input.max_pixels", 4096 * 3072, "Images above this pixel count are refused.", 1, 1 << 28),
    ParamSpec("input.reliable", False, "Subscribe to the camera topics with reliable QoS (keep last 2) "
              "instead of best effort: use it when large images published from another process are "
              "dropped by the DDS transport (fixed at start-up).", read_only=True),
    ParamSpec("keyframes.min_interval_s", 0.3, "Minimum time between keyframes (s).", 0.0, 60.0),
    ParamSpec("keyframes.min_translation_m", 0.05, "Minimum camera translation between keyframes "
              "when poses are known (m).", 0.0, 10.0),
    ParamSpec("keyframes.min_rotation_deg", 5.0, "Minimum camera rotation between keyframes when "
              "poses are known (deg); either motion threshold suffices.", 0.0, 180.0),
    ParamSpec("keyframes.min_flow_px", 20.0, "Minimum image motion between keyframes when no pose "
              "is known (px at full resolution).", 0.0, 1000.0),
    ParamSpec("keyframes.min_sharpness", 15.0, "Frames whose variance of Laplacian is below this "
              "are rejected as blurred (0 disables).", 0.0, 1e6),
    ParamSpec("keyframes.max_keyframes", 8, "Bounded keyframe buffer size.", 2, 64),
    ParamSpec("keyframes.reconstruct_at", 5, "Reconstruct automatically when the buffer holds this "
              "many new keyframes (0: only on ~/reconstruct).", 0, 64),
    ParamSpec("backend", "rgbd", "Pointmap backend.", choices=("rgbd", "dust3r")),
    ParamSpec("dust3r.checkpoint", "", "DUSt3R/MASt3R checkpoint (.pth file or save_pretrained folder).",
              check=check_file_param),
    ParamSpec("dust3r.image_size", 512, "DUSt3R input size (512 or 224).", 224, 512),
    ParamSpec("dust3r.batch_size", 4, "Pairs per inference batch.", 1, 64),
    ParamSpec("scene_graph", "complete", "Pair graph: complete | swin-<k> | logwin-<k> | oneref-<k>.",
              check=check_scene_graph),
    ParamSpec("segmenter", "classical", "Mask-cache segmenter.", choices=("classical", "sam2")),
    ParamSpec("sam2.config", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM2 config name in the sam2 package."),
    ParamSpec("sam2.checkpoint", "", "SAM2 checkpoint path (read only).", check=check_file_param),
    ParamSpec("sam2.points_per_side", 16, "Automatic mask generator grid.", 2, 64),
    ParamSpec("device", "cpu", "torch device for alignment / models (cpu, cuda, cuda:N, mps).",
              check=check_device),
    ParamSpec("dga.alpha_p", 0.5, "DGA alpha for matching points (paper: 0.5).", -0.99, 0.99),
    ParamSpec("dga.alpha_n", 0.9, "DGA alpha magnitude for non-matching points (paper: 0.9).", -0.99, 0.99),
    ParamSpec("dga.iterations", 500, "Alignment iterations (paper: 500; Adam steps, the cap of the "
              "gauss_newton optimiser's at most 30).", 1, 10000),
    ParamSpec("dga.optimizer", "gauss_newton", "Alignment optimiser: gauss_newton (Levenberg-Marquardt, "
              "converges in tens of iterations) or adam (the reference: dga.iterations Adam steps).",
              choices=("gauss_newton", "adam")),
    ParamSpec("dga.weighting", "dga", "Per-point weights: dga (paper) or confidence (DUSt3R baseline).",
              choices=("dga", "confidence")),
    ParamSpec("dga.match_threshold", 0.03, "Reciprocal-NN match distance, relative to depth.", 1e-4, 1.0),
    ParamSpec("use_pose_priors", True, "Use known camera poses as alignment priors."),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics messages (s).", 0.1, 60.0),
    ParamSpec("scene_dir", "~/.ros/wildseg3d/scenes", "Folder where every completed scene is saved "
              "atomically (~ expanded; empty disables saving and loading).", check=check_dir_param),
    ParamSpec("load_last_scene", False, "At start-up, load the newest scene of scene_dir and republish it."),
    ParamSpec("max_saved_scenes", 5, "Scene files kept in scene_dir (oldest deleted first).", 1, 1000),
]


def _validate_combination(v) -> Optional[str]:
    """Cross-parameter checks (the ParameterTable validator): the keyframe policy as a whole."""
    try:
        KeyframePolicy(min_interval_s=v["keyframes.min_interval_s"], min_translation_m=v["keyframes.min_translation_m"],
                       min_rotation_deg=v["keyframes.min_rotation_deg"], min_flow_px=v["keyframes.min_flow_px"],
                       min_sharpness=v["keyframes.min_sharpness"],
                       max_keyframes=v["keyframes.max_keyframes"]).validate()
    except ValueError as e:
        return f"keyframe policy refused: {e}"
    if v["keyframes.reconstruct_at"] > v["keyframes.max_keyframes"]:
        return (f"keyframes.reconstruct_at={v['keyframes.reconstruct_at']} exceeds keyframes.max_keyframes="
                f"{v['keyframes.max_keyframes']}: the automatic reconstruction would never trigger")
    if v["keyframes.reconstruct_at"] == 1:
        return "keyframes.reconstruct_at=1: a reconstruction needs at least 2 keyframes (0 disables)"
    return None


class _Rate:
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


def _percentile(values, q: float) -> float:
    v = list(values)
    return float(np.percentile(np.asarray(v, dtype=np.float64), q)) if v else float("nan")


class ReconstructionNode(NodeCommonMixin, Node):
    DIAG_NAME = "reconstruction_node"

    def __init__(self, **kwargs):
        super().__init__("reconstruction_node", **kwargs)
        self.log = ThrottledLogger(self.get_logger())
        self.stats = collections.Counter()
        self.last_error = ""
        self.params = ParameterTable(self, PARAMS, on_change=self._on_params_changed,
                                     validator=_validate_combination)
        p = self.params
        if self.params.startup_errors:
            self.last_error = "start-up parameters: " + "; ".join(self.params.startup_errors)
        self._lock = threading.Lock()
        try:
            self._buffer = KeyframeBuffer(self._policy())
        except ValueError as e:  # start-up combination refused: keep running with the defaults
            self.last_error = f"keyframe policy refused ({e}); default keyframe policy used"
            self.get_logger().error(self.last_error)
            self._buffer = KeyframeBuffer(KeyframePolicy())
        self._pipeline: Optional[ReconstructionPipeline] = None
        self._pipeline_key = None
        self._pipeline_error: Optional[str] = None
        self._latest_image = collections.deque(maxlen=1)
        self._depth_ring = collections.deque(maxlen=30)
        self._pose_ring = collections.deque(maxlen=200)
        self._K: Optional[np.ndarray] = None
        self._K_shape = None
        self._new_frame = threading.Event()
        self._stop = threading.Event()
        self._job: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._generation = 0
        self._new_since_reconstruction = 0
        self._scene = None
        self.last_reconstruction = {}
        self._last_image_stamp = None
        # diagnostics / soak figures
        self._rates = {k: _Rate() for k in ("image", "depth", "camera_info", "pose")}
        self.image_latency_ms = collections.deque(maxlen=2000)   # receive wall time - header stamp
        self.callback_ms = collections.deque(maxlen=2000)        # duration of the subscription callbacks
        self.frame_ms = collections.deque(maxlen=500)            # keyframe thread: decode + selection
        self._cancel_t: Optional[float] = None
        self.last_cancel_latency_s: Optional[float] = None
        self.last_saved: str = ""
        self._save_lock = threading.Lock()
        self._static_tf = None  # tf2_ros StaticTransformBroadcaster, False when tf2_ros is missing
        self.restored = threading.Event()  # set once the start-up scene restore has finished (or was skipped)

        # subscriptions (callbacks only store)
        cam_qos = convert.RELIABLE_CAMERA_QOS if p["input.reliable"] else convert.SENSOR_QOS
        if p["input.use_compressed"]:
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, cam_qos)
        else:
            self.create_subscription(Image, "image", self._on_image, cam_qos)
        self.create_subscription(Image, "depth", self._on_depth, cam_qos)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, cam_qos)
        self.create_subscription(Odometry, "odom", self._on_odom, 50)
        self.create_subscription(PoseStamped, "pose", self._on_pose, 50)
        self.scene_pub = self.create_publisher(PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
        self.poses_pub = self.create_publisher(PoseArray, "wildseg3d/keyframe_poses", convert.LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Trigger, "~/reconstruct", self._srv_reconstruct)
        self.create_service(Trigger, "~/reset", self._srv_reset)
        self._start_diagnostics_timer(p["diagnostics_period_s"])

        self._tf_buffer = None
        if p["use_tf"]:
            try:  # tf2_ros is not on PyPI; it is on every real ROS install
                import tf2_ros  # noqa: F401
                self._tf_buffer = tf2_ros.Buffer()
                self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
            except ImportError:
                self.get_logger().info("tf2_ros not importable: camera poses come from the odom/pose topics only")

        self._kf_thread = threading.Thread(target=self._keyframe_loop, name="keyframes", daemon=True)
        self._kf_thread.start()
        threading.Thread(target=self._ensure_pipeline, name="pipeline-init", daemon=True).start()
        if p["load_last_scene"] and self._scene_dir():
            threading.Thread(target=self._restore_last_scene, name="scene-restore", daemon=True).start()
        else:
            self.restored.set()
        self.get_logger().info(
            f"reconstruction_node ready: backend={p['backend']} segmenter={p['segmenter']} "
            f"device={p['device']} reconstruct_at={p['keyframes.reconstruct_at']}")

    # ------------------------------------------------------------------ parameters
    def _policy(self) -> KeyframePolicy:
        g = self.params.grouped("keyframes")
        return KeyframePolicy(min_interval_s=g["min_interval_s"], min_translation_m=g["min_translation_m"],
                              min_rotation_deg=g["min_rotation_deg"], min_flow_px=g["min_flow_px"],
                              min_sharpness=g["min_sharpness"], max_keyframes=g["max_keyframes"])

    def _on_params_changed(self, changed):
        if any(k.startswith("keyframes.") for k in changed):
            self._buffer.policy = self._policy().validate()  # already checked by _validate_combination
        if "diagnostics_period_s" in changed:
            self._start_diagnostics_timer(changed["diagnostics_period_s"])
        # models are rebuilt lazily at the next reconstruction when their parameters changed


    def _pipeline_config(self) -> PipelineConfig:
        p = self.params
        backend_kwargs = {}
        if p["backend"] == "dust3r":
            backend_kwargs = dict(model=p["dust3r.checkpoint"] or None, image_size=p["dust3r.image_size"],
                                  batch_size=p["dust3r.batch_size"])
        seg_kwargs = {}
        if p["segmenter"] == "sam2":
            seg_kwargs = dict(config=p["sam2.config"], checkpoint=p["sam2.checkpoint"],
                              points_per_side=p["sam2.points_per_side"])
        return PipelineConfig(backend=p["backend"], backend_kwargs=backend_kwargs, segmenter=p["segmenter"],
                              segmenter_kwargs=seg_kwargs, scene_graph=p["scene_graph"], device=p["device"],
                              alpha_p=p["dga.alpha_p"], alpha_n=p["dga.alpha_n"], iterations=p["dga.iterations"],
                              weighting=p["dga.weighting"], match_threshold=p["dga.match_threshold"],
                              optimizer=p["dga.optimizer"],
                              use_pose_priors=p["use_pose_priors"])

    def _ensure_pipeline(self) -> Optional[ReconstructionPipeline]:
        """Build backend + segmenter for the current parameters (slow for models); on failure the
        node stays up and reports the error in the log and in diagnostics."""
        cfg = self._pipeline_config()
        key = (cfg.backend, tuple(sorted(cfg.backend_kwargs.items())), cfg.segmenter,
               tuple(sorted(cfg.segmenter_kwargs.items())), cfg.device)
        with self._lock:
            if self._pipeline is not None and self._pipeline_key == key:
                self._pipeline.cfg = cfg
                return self._pipeline
        try:
            pipe = ReconstructionPipeline(cfg)
        except Exception as e:  # missing package / checkpoint: clear error, keep running
            msg = f"cannot set up backend '{cfg.backend}' / segmenter '{cfg.segmenter}': {e}"
            self.get_logger().error(msg + " (the node keeps running; fix the parameters and call ~/reconstruct)")
            self.stats["pipeline_errors"] += 1
            with self._lock:
                self._pipeline_error = msg
                self.last_error = msg
            return None
        with self._lock:
            self._pipeline, self._pipeline_key, self._pipeline_error = pipe, key, None
        return pipe

    # ------------------------------------------------------------------ callbacks (cheap)
    def _on_image(self, msg):
        t0 = time.perf_counter()
        now = time.monotonic()
        self.stats["images_received"] += 1
        self._rates["image"].tick(now)
        st = convert.stamp_to_sec(msg.header.stamp)
        if st > 0:
            self.image_latency_ms.append((time.time() - st) * 1e3)
        if self._latest_image:
            self.stats["images_superseded"] += 1  # the keyframe thread had not taken the previous one
        self._latest_image.append((now, msg))
        self._new_frame.set()
        self.callback_ms.append((time.perf_counter() - t0) * 1e3)

    def _on_depth(self, msg: Image):
        t0 = time.perf_counter()
        self.stats["depth_received"] += 1
        self._rates["depth"].tick(time.monotonic())
        self._depth_ring.append((convert.stamp_to_sec(msg.header.stamp), msg))
        self.callback_ms.append((time.perf_counter() - t0) * 1e3)

    def _on_camera_info(self, msg: CameraInfo):
        self._rates["camera_info"].tick(time.monotonic())
        try:
            K = convert.camera_info_to_K(msg)
        except ValueError as e:
            self._refuse("camera_info", "bad_camera_info", f"CameraInfo refused ({e}); keeping the previous "
                         "intrinsics" if self._K is not None else f"CameraInfo refused ({e}); frames are not "
                         "buffered until a valid CameraInfo arrives")
            return
        self._K, self._K_shape = K, (msg.height, msg.width)

    def _on_odom(self, msg: Odometry):
        self._store_pose(msg.header, msg.pose.pose)

    def _on_pose(self, msg: PoseStamped):
        self._store_pose(msg.header, msg.pose)

    def _store_pose(self, header, pose):
        self._rates["pose"].tick(time.monotonic())
        try:
            T = convert.pose_to_matrix(pose)
        except ValueError as e:
            self._refuse("pose", "bad_pose", f"camera pose message refused ({e}): pose ignored")
            return
        if header.frame_id and header.frame_id != self.params["world_frame"]:
            self.log.warning("pose_frame", f"camera pose is in frame '{header.frame_id}', expected world_frame "
                             f"'{self.params['world_frame']}': used as if it were world_frame")
        self._pose_ring.append((convert.stamp_to_sec(header.stamp), T))

    # ------------------------------------------------------------------ keyframe thread
    def _keyframe_loop(self):
        while not self._stop.is_set():
            if not self._new_frame.wait(0.2):
                continue
            self._new_frame.clear()
            try:
                t_recv, msg = self._latest_image.popleft()
            except IndexError:
                continue
            t0 = time.perf_counter()
            try:
                self._process_frame(msg)
            except Exception as e:  # never let the thread die
                self.stats["frame_errors"] += 1
                self.last_error = f"frame processing failed: {e}"
                self.log.error("frame", f"{self.last_error}: frame dropped\n{traceback.format_exc(limit=3)}")
            self.frame_ms.append((time.perf_counter() - t0) * 1e3)

    def _lookup_pose(self, stamp: float, frame_id: str) -> Optional[np.ndarray]:
        tol = self.params["input.pose_sync_tolerance_s"]
        if self._tf_buffer is not None:
            try:
                from rclpy.duration import Duration
                from rclpy.time import Time
                tf = self._tf_buffer.lookup_transform(
                    self.params["world_frame"], frame_id, Time(nanoseconds=int(stamp * 1e9)),
                    timeout=Duration(seconds=self.params["tf_timeout_s"]))
                tr, q = tf.transform.translation, tf.transform.rotation
                from ..core.geometry import pose_from_xyz_quat
                return pose_from_xyz_quat([tr.x, tr.y, tr.z], [q.x, q.y, q.z, q.w])
            except Exception as e:  # extrapolation, unknown frame, timeout
                self.log.warning("tf", f"no TF {self.params['world_frame']} <- {frame_id} at t={stamp:.3f}: {e}")
        ring = list(self._pose_ring)
        if not ring:
            return None
        ts = np.array([r[0] for r in ring])
        i = int(np.argmin(np.abs(ts - stamp)))
        if abs(ts[i] - stamp) > tol:
            return None
        return ring[i][1]

    def _pose_source_exists(self) -> bool:
        """A pose publisher is connected (odom / pose topics) even if none has arrived yet: the
        first frames then wait for their pose like later ones (cheap graph query)."""
        try:
            return self.count_publishers(self.resolve_topic_name("odom")) + \
                self.count_publishers(self.resolve_topic_name("pose")) > 0
        except Exception:
            return False

    def _wait_for(self, find, wait_s: float):
        deadline = time.monotonic() + wait_s
        found = None
        while found is None and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.005)
            found = find()
        return found

    def _find_depth(self, stamp: float):
        ring = list(self._depth_ring)
        if not ring:
            return None
        ts = np.array([r[0] for r in ring])
        i = int(np.argmin(np.abs(ts - stamp)))
        if abs(ts[i] - stamp) > self.params["input.depth_sync_tolerance_s"]:
            return None
        return ring[i][1]

    def _process_frame(self, msg):
        p = self.params
        stamp = convert.stamp_to_sec(msg.header.stamp)
        if self._K is None:  # CameraInfo of the same instant may arrive just after the image
            self._wait_for(lambda: self._K, 0.2)
        if self._K is None:
            self._refuse("no_info", "dropped_no_camera_info",
                         "no valid CameraInfo received yet: colour frame dropped", "warning")
            return
        # depth / pose messages of the same instant may arrive just after the colour image
        pose = self._lookup_pose(stamp, msg.header.frame_id)
        if pose is None and (self._pose_ring or self._pose_source_exists()):
            pose = self._wait_for(lambda: self._lookup_pose(stamp, msg.header.frame_id),
                                  p["input.pose_sync_tolerance_s"])
        reason = self._buffer.cheap_reject(stamp, pose)
        if reason is not None:
            if reason in ("timestamp_backwards", "duplicate_timestamp", "invalid_timestamp"):
                self._refuse(reason, f"rejected_{reason}", f"image at t={stamp:.6f} refused: "
                             f"{reason.replace('_', ' ')} (newest stamp seen is kept; frame dropped)", "warning")
            else:
                self.stats[f"rejected_{reason}"] += 1  # normal keyframe selection, not an error
            return
        try:
            if isinstance(msg, CompressedImage):
                rgb = convert.compressed_to_array(msg, p["input.max_pixels"])
            else:
                rgb = convert.image_to_array(msg, p["input.max_pixels"])
        except ValueError as e:
            self._refuse("image", "bad_image", f"colour image refused ({e}): frame dropped")
            return
        if rgb.ndim != 3:
            self._refuse("image", "bad_image", f"image topic carries a depth encoding "
                         f"({getattr(msg, 'encoding', '?')}); expected a colour image: frame dropped")
            return
        if self._K_shape and tuple(self._K_shape) != rgb.shape[:2] and self._K_shape[0] > 0:
            self._refuse("info_size", "bad_image", f"CameraInfo is {self._K_shape[1]}x{self._K_shape[0]} but the "
                         f"image is {rgb.shape[1]}x{rgb.shape[0]}: frame dropped")
            return
        depth = None
        if p["backend"] == "rgbd":
            # approximate-time pairing: until a depth stamped at or after the image has arrived, a
            # nearer partner may still be in flight, so wait for it (bounded) before choosing
            if not any(t >= stamp for t, _ in list(self._depth_ring)):
                self._wait_for(lambda: True if any(t >= stamp for t, _ in list(self._depth_ring)) else None,
                               p["input.depth_sync_tolerance_s"] + 0.05)
            dmsg = self._find_depth(stamp)
            if dmsg is None:
                self._refuse("no_depth", "dropped_no_depth", f"no depth image within "
                             f"{p['input.depth_sync_tolerance_s']} s of the colour frame at t={stamp:.3f}: "
                             "frame dropped", "warning")
                return
            try:
                depth, dstats = convert.depth_to_array(dmsg, p["input.max_pixels"])
            except ValueError as e:
                self._refuse("depth", "bad_depth", f"depth image refused ({e}): frame dropped")
                return
            if depth.shape != rgb.shape[:2]:
                self._refuse("depth_size", "bad_depth", f"depth {depth.shape[1]}x{depth.shape[0]} does not match "
                             f"colour {rgb.shape[1]}x{rgb.shape[0]}: frame dropped")
                return
            if dstats["valid"] == 0:
                self._refuse("depth_invalid", "bad_depth", "depth image has no valid pixel (all "
                             "0/NaN/inf/negative): frame dropped")
                return
            if dstats["nan"] + dstats["inf"] + dstats["negative"] > 0:
                # common on real sensors: not an error, the pixels are masked out
                self.stats["depth_invalid_values"] += 1
                self.log.warning("depth_values", f"depth had {dstats['nan']} NaN, {dstats['inf']} inf, "
                                 f"{dstats['negative']} negative values: treated as invalid (0), frame kept")
        accepted, reason = self._buffer.offer(rgb, stamp, self._K.copy(), depth=depth, pose=pose,
                                              frame_id=msg.header.frame_id or "camera")
        self.stats[f"keyframe_{'accepted' if accepted else reason}"] += 1
        if accepted:
            self._new_since_reconstruction += 1
            n_at = p["keyframes.reconstruct_at"]
            if n_at > 0 and len(self._buffer) >= n_at and self._new_since_reconstruction >= n_at:
                self._start_job("auto")

    # ------------------------------------------------------------------ reconstruction job
    def reconstruction_running(self) -> bool:
        """True while a reconstruction that has not been cancelled is running."""
        job = self._job
        return job is not None and job.is_alive() and not self._cancel.is_set()

    def job_winding_down(self) -> bool:
        """True while a cancelled reconstruction thread has not reached its next cancel check yet
        (its result will be discarded; a new reconstruction may already have been requested)."""
        job = self._job
        return job is not None and job.is_alive() and self._cancel.is_set()

    def _start_job(self, why: str):
        with self._lock:
            if self.reconstruction_running():
                return False, "a reconstruction is already running"
            kfs = self._buffer.keyframes()
            if len(kfs) < 2:
                return False, f"too few keyframes: {len(kfs)} buffered, at least 2 needed"
            previous = self._job if self._job is not None and self._job.is_alive() else None
            self._cancel = threading.Event()
            self._generation += 1
            gen = self._generation
            self._new_since_reconstruction = 0
            self._job = threading.Thread(target=self._run_job, args=(kfs, gen, self._cancel, why, previous),
                                         name="reconstruction", daemon=True)
            self._job.start()
        extra = " (after the cancelled one stops)" if previous is not None else ""
        return True, f"reconstruction of {len(kfs)} keyframes started{extra}"

    def _job_cancelled(self, cancel: threading.Event, gen: int, where: str):
        t_set = self._cancel_t
        if t_set is not None and cancel.is_set():
            self.last_cancel_latency_s = time.monotonic() - t_set
        self.stats["reconstructions_cancelled"] += 1
        lat = f" {self.last_cancel_latency_s * 1e3:.0f} ms after the request" \
            if self.last_cancel_latency_s is not None and cancel.is_set() else ""
        self.get_logger().info(f"reconstruction cancelled ({where}){lat}; its result is discarded")

    def _run_job(self, kfs, gen, cancel: threading.Event, why: str, previous: Optional[threading.Thread] = None):
        try:
            self._run_job_inner(kfs, gen, cancel, why, previous)
        finally:
            release_free_heap()  # a reconstruction allocates GBs in worker threads: give them back

    def _run_job_inner(self, kfs, gen, cancel: threading.Event, why: str,
                       previous: Optional[threading.Thread] = None):
        if previous is not None:  # a cancelled job still running: the pipeline objects are not shared
            while previous.is_alive() and not cancel.is_set() and not self._stop.is_set():
                previous.join(0.1)
        t0 = time.perf_counter()
        self.get_logger().info(f"reconstructing {len(kfs)} keyframes ({why})")
        pipe = self._ensure_pipeline()
        if pipe is None:
            self.stats["reconstructions_failed"] += 1
            return
        if cancel.is_set():
            self._job_cancelled(cancel, gen, "before it started")
            return
        known = all(kf.pose_prior is not None for kf in kfs)
        frame = self.params["world_frame"] if known else self.params["reconstruction_frame"]
        try:
            scene, timings = pipe.run(kfs, cancel=cancel.is_set, frame_id=frame)
        except Exception as e:
            if isinstance(e, Cancelled) or cancel.is_set():
                self._job_cancelled(cancel, gen, type(e).__name__)
                return
            self.stats["reconstructions_failed"] += 1
            self.last_error = f"reconstruction failed: {e}"
            self.get_logger().error(f"{self.last_error} (buffer and previous scene kept)\n"
                                    f"{traceback.format_exc(limit=4)}")
            return
        with self._lock:
            if cancel.is_set() or gen != self._generation:
                self._job_cancelled(cancel, gen, "finished after a reset")
                return
            self._scene = scene
        self.stats["reconstructions_done"] += 1
        self.last_reconstruction = dict(timings, loss=float(scene.loss), views=scene.num_views,
                                        objects=int(len(scene.mask_cache.object_ids())) if scene.mask_cache else 0,
                                        wall_s=time.perf_counter() - t0)
        self._publish_scene(scene)
        self.get_logger().info(
            f"scene published: {scene.num_views} keyframes, "
            f"{self.last_reconstruction['objects']} objects, frame '{scene.frame_id}', "
            f"{self.last_reconstruction['wall_s']:.2f} s")
        self._save_scene(scene, kfs, dict(why=why, timings={k: float(v) for k, v in timings.items()}))

    # ------------------------------------------------------------------ persistence
    def _scene_dir(self) -> str:
        d = str(self.params["scene_dir"]).strip()
        return os.path.expanduser(d) if d else ""

    def _save_scene(self, scene, kfs, extra: dict):
        d = self._scene_dir()
        if not d:
            return
        t0 = time.perf_counter()
        try:
            with self._save_lock:
                path = store.save_scene(d, scene, extra=extra, keyframes_meta=kfs,
                                        keep=int(self.params["max_saved_scenes"]))
        except Exception as e:  # disk full, permissions, ...: the live scene is unaffected
            self.stats["save_errors"] += 1
            self.last_error = f"saving the scene into {d} failed: {e}"
            self.log.error("save", self.last_error + " (the published scene is unaffected)")
            return
        self.last_saved = str(path)
        self.stats["scenes_saved"] += 1
        self.last_reconstruction["save_s"] = time.perf_counter() - t0
        self.get_logger().info(f"scene saved to {path} ({time.perf_counter() - t0:.2f} s)")

    def _restore_last_scene(self):
        d = self._scene_dir()
        try:
            with self._lock:
                gen = self._generation
            try:
                loaded = store.load_latest(d)
            except Exception as e:  # StoreError: corrupt / foreign / wrong version
                self.stats["load_errors"] += 1
                self.last_error = f"load_last_scene: {e}"
                self.get_logger().error(self.last_error + " (starting without a scene)")
                return
            if loaded is None:
                self.get_logger().info(f"load_last_scene: no saved scene in {d}")
                return
            scene, extra = loaded
            with self._lock:
                if gen != self._generation or self._scene is not None:
                    self.get_logger().info("load_last_scene: a reset or a new reconstruction came first; "
                                           "saved scene not restored")
                    return
                self._scene = scene
            name = extra.get("_store", {}).get("file", "?")
            self.last_reconstruction = dict(restored_from=name, loss=float(scene.loss), views=scene.num_views)
            self.stats["scenes_restored"] += 1
            self._publish_scene(scene)
            self.get_logger().info(f"load_last_scene: restored {name} ({scene.num_views} keyframes, frame "
                                   f"'{scene.frame_id}') and republished it")
        finally:
            self.restored.set()

    def _publish_scene(self, scene):
        stamp = self.get_clock().now().to_msg()
        arr, h, w = corecloud.pack_scene_cloud(scene)
        self.scene_pub.publish(convert.struct_to_cloud(arr, scene.frame_id, stamp, h, w))
        self.poses_pub.publish(convert.poses_to_pose_array(scene.poses, scene.frame_id, stamp))
        self._broadcast_keyframe_tf(scene, stamp)

    def _broadcast_keyframe_tf(self, scene, stamp):
        """Static TF scene frame -> keyframe_<i> (each keyframe's camera, OpenCV axes) when tf2_ros
        is installed, so rviz2 shows the cameras and pixel prompts name a real frame."""
        if self._static_tf is None:
            try:
                import tf2_ros
                self._static_tf = tf2_ros.StaticTransformBroadcaster(self)
            except ImportError:
                self._static_tf = False
        if not self._static_tf:
            return
        from geometry_msgs.msg import TransformStamped
        tfs = []
        for i, T in enumerate(scene.poses):
            pose = convert.matrix_to_pose(T)
            t = TransformStamped(header=convert.make_header(scene.frame_id, stamp), child_frame_id=f"keyframe_{i}")
            t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = (
                pose.position.x, pose.position.y, pose.position.z)
            t.transform.rotation = pose.orientation
            tfs.append(t)
        self._static_tf.sendTransform(tfs)

    def _publish_empty_scene(self):
        stamp = self.get_clock().now().to_msg()
        arr = np.zeros((0,), dtype=corecloud.scene_cloud_dtype())
        self.scene_pub.publish(convert.struct_to_cloud(arr, self.params["reconstruction_frame"], stamp, 0, 0))
        self.poses_pub.publish(PoseArray(header=convert.make_header(self.params["reconstruction_frame"], stamp)))

    # ------------------------------------------------------------------ services
    def _srv_reconstruct(self, req, resp):
        ok, msg = self._start_job("service")
        resp.success, resp.message = ok, msg
        if not ok:
            self.stats["reconstruct_refused"] += 1
            self.log.warning("reconstruct_refused", f"~/reconstruct refused: {msg}")
        return resp

    def _srv_reset(self, req, resp):
        with self._lock:
            if not self._cancel.is_set():
                self._cancel_t = time.monotonic()
            self._cancel.set()
            self._generation += 1
            self._buffer.clear()
            self._scene = None
            self._new_since_reconstruction = 0
            running = self._job is not None and self._job.is_alive()
        self._latest_image.clear()
        self._depth_ring.clear()
        self.stats["resets"] += 1
        self._publish_empty_scene()
        resp.success = True
        resp.message = "buffer and scene cleared" + (" (running reconstruction cancelled)" if running else "")
        self.get_logger().info(resp.message)
        return resp

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        """Key/values of the /diagnostics status (also used by tests and the soak benchmark)."""
        now = time.monotonic()
        running = self.reconstruction_running()
        p = self.params
        if self._pipeline_error:
            backend_status = "error"
        elif self._pipeline is not None:
            backend_status = "ready"
        else:
            backend_status = "loading"
        kv = {"backend": p["backend"], "segmenter": p["segmenter"], "device": p["device"],
              "backend_status": backend_status,
              "model": (p["dust3r.checkpoint"] if p["backend"] == "dust3r" else "none (rgbd: depth + features)")
              + (f"; sam2 {p['sam2.checkpoint']}" if p["segmenter"] == "sam2" else ""),
              "buffer_fill": f"{len(self._buffer)}/{p['keyframes.max_keyframes']}",
              "reconstruction_running": str(running),
              "cancelled_job_winding_down": str(self.job_winding_down()),
              "scene": (f"{self._scene.num_views} keyframes, frame '{self._scene.frame_id}'"
                        if self._scene is not None else "none"),
              "last_error": self.last_error[:300] or "none",
              "scene_dir": self._scene_dir() or "(disabled)",
              "last_saved": os.path.basename(self.last_saved) or "none"}
        for k, r in self._rates.items():
            kv[f"rate_hz.{k}"] = f"{r.hz(now):.2f}"
        kv["image_latency_p95_ms"] = f"{_percentile(self.image_latency_ms, 95):.2f}"
        kv["callback_p95_ms"] = f"{_percentile(self.callback_ms, 95):.3f}"
        kv["frame_processing_p95_ms"] = f"{_percentile(self.frame_ms, 95):.2f}"
        lr = self.last_reconstruction
        kv["last_reconstruction_time_s"] = f"{lr['wall_s']:.3f}" if "wall_s" in lr else "none"
        kv["last_reconstruction_loss"] = f"{lr['loss']:.6g}" if "loss" in lr else "none"
        if self.last_cancel_latency_s is not None:
            kv["last_cancel_latency_ms"] = f"{self.last_cancel_latency_s * 1e3:.1f}"
        kv.update({k: str(v) for k, v in sorted(self.stats.items())})
        kv.update({f"last_reconstruction.{k}": f"{v:.4g}" if isinstance(v, float) else str(v)
                   for k, v in lr.items()})
        return kv

    def _diagnostic_state(self):
        """(level, message) of this node's /diagnostics status."""
        if self._pipeline_error:
            return DiagnosticStatus.ERROR, self._pipeline_error
        if self.last_error:
            return DiagnosticStatus.WARN, self.last_error
        return DiagnosticStatus.OK, "reconstructing" if self.reconstruction_running() else "ok"

    def destroy_node(self):
        self._stop.set()
        self._cancel.set()
        if self._kf_thread.is_alive() and threading.current_thread() is not self._kf_thread:
            self._kf_thread.join(timeout=2.0)
        return super().destroy_node()


def main(args=None):
    from .spin import spin_node
    spin_node(ReconstructionNode, args)


if __name__ == "__main__":
    main()
