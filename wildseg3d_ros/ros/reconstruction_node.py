"""reconstruction_node: camera stream -> keyframes -> reconstructed, segmented scene.

Subscriptions (relative names; remap them):
  image (sensor_msgs/Image, sensor-data QoS) or image/compressed (sensor_msgs/CompressedImage)
  depth (sensor_msgs/Image 16UC1 mm or 32FC1 m), camera_info (sensor_msgs/CameraInfo)
  odom (nav_msgs/Odometry) and pose (geometry_msgs/PoseStamped): camera poses in world_frame
Publications (reliable + transient local):
  wildseg3d/scene (sensor_msgs/PointCloud2, organised: V*H rows x W, fields x y z rgb confidence
  keyframe label), wildseg3d/keyframe_poses (geometry_msgs/PoseArray), /diagnostics
Services: ~/reconstruct, ~/reset (std_srvs/Trigger)

Threads: callbacks only store messages (cheap); a keyframe thread pairs each colour frame with its
depth, camera pose and CameraInfo as they arrive (core.frame_pairing: exact stamp first, never
blocking), decodes and selects keyframes (ros/frame_input.py); a worker thread runs the
reconstruction, cancellable by ~/reset (ros/reconstruction_job.py); ros/scene_output.py publishes
and saves the scene. Every callback, service and thread is guarded: no exception ends it.

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
from typing import Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseArray
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger

from ..core.keyframes import KeyframeBuffer, KeyframePolicy
from ..core.config import PipelineConfig, check_flat, keyframe_policy_from_flat
from ..core.pipeline import ReconstructionPipeline
from . import convert
from .frame_input import FrameInput
from .node_common import NodeCommonMixin
from .reconstruction_job import ReconstructionJobMixin
from .reconstruction_params import PARAMS  # noqa: F401  (re-exported: scripts/param_tables.py, tests)
from .params import ParameterTable
from .scene_output import SceneOutputMixin
from .throttled_log import ThrottledLogger


def _validate_combination(v) -> Optional[str]:
    """Cross-parameter checks (the ParameterTable validator), shared with every front end."""
    return check_flat(v)


class ReconstructionNode(ReconstructionJobMixin, SceneOutputMixin, NodeCommonMixin, Node):
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
        self._stop = threading.Event()
        self._init_jobs()
        self.last_saved: str = ""
        self._save_lock = threading.Lock()
        self._static_tf = None  # tf2_ros StaticTransformBroadcaster, False when tf2_ros is missing
        self.restored = threading.Event()  # set once the start-up scene restore has finished (or was skipped)

        self.scene_pub = self.create_publisher(PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
        self.poses_pub = self.create_publisher(PoseArray, "wildseg3d/keyframe_poses", convert.LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Trigger, "~/reconstruct", self.guarded_service("reconstruct", self._srv_reconstruct),
                            qos_profile=convert.SERVICE_QOS)
        self.create_service(Trigger, "~/reset", self.guarded_service("reset", self._srv_reset),
                            qos_profile=convert.SERVICE_QOS)
        self._start_diagnostics_timer(p["diagnostics_period_s"])
        # camera input: subscriptions, pairing, keyframe thread (callbacks only store)
        self.frames = FrameInput(self, on_accepted=self._keyframe_accepted)
        self.image_latency_ms = self.frames.image_latency_ms
        self.callback_ms = self.frames.callback_ms
        self.frame_ms = self.frames.frame_ms
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
        return keyframe_policy_from_flat(self.params.values)

    def _on_params_changed(self, changed):
        if any(k.startswith("keyframes.") for k in changed):
            self._buffer.policy = self._policy().validate()  # already checked by _validate_combination
        if "diagnostics_period_s" in changed:
            self._start_diagnostics_timer(changed["diagnostics_period_s"])
        if any(k.startswith("input.") or k == "backend" for k in changed) and hasattr(self, "frames"):
            self.frames.reconfigure()
        # models are rebuilt lazily at the next reconstruction when their parameters changed

    def _pipeline_config(self) -> PipelineConfig:
        return PipelineConfig.from_flat(self.params.values)

    def _ensure_pipeline(self) -> Optional[ReconstructionPipeline]:
        """Build backend + segmenter for the current parameters (slow for models); on failure the
        node stays up and reports the error in the log and in diagnostics."""
        cfg = self._pipeline_config()
        key = cfg.model_key()
        with self._lock:
            if self._pipeline is not None and self._pipeline_key == key:
                self._pipeline.cfg = cfg
                return self._pipeline
        try:
            pipe = ReconstructionPipeline(cfg)
        except Exception as e:  # missing package / checkpoint / anything: clear error, keep running
            msg = f"cannot set up backend '{cfg.backend}' / segmenter '{cfg.segmenter}': {e}"
            self.get_logger().error(msg + " (the node keeps running; fix the parameters and call ~/reconstruct)")
            self.stats["pipeline_errors"] += 1
            with self._lock:
                self._pipeline_error = msg
                self.last_error = msg
            return None
        pipe.on_pairs_queued = self._pairs_wake.set  # the pair thread registers them
        with self._lock:
            self._pipeline, self._pipeline_key, self._pipeline_error = pipe, key, None
        return pipe

    # ------------------------------------------------------------------ services
    def _srv_reconstruct(self, req, resp):
        ok, msg = self._start_job("service")
        resp.success, resp.message = ok, msg
        if not ok:
            self.stats["reconstruct_refused"] += 1
            self.log.warning("reconstruct_refused", f"~/reconstruct refused: {msg}")
        return resp

    def _srv_reset(self, req, resp):
        running = self._cancel_jobs()
        self.frames.clear()
        self.stats["resets"] += 1
        self._publish_empty_scene()
        resp.success = True
        resp.message = "buffer and scene cleared" + (" (running reconstruction cancelled)" if running else "")
        self.get_logger().info(resp.message)
        return resp

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        """Key/values of the /diagnostics status (also used by tests and the soak benchmark)."""
        running = self.reconstruction_running()
        p = self.params
        if self._pipeline_error:
            backend_status = "error"
        elif self._pipeline is not None:
            backend_status = "ready"
        else:
            backend_status = "loading"
        scene = self._scene
        dropped = dict(scene.info.get("dropped_views") or {}) if scene is not None else {}  # left out by the backend
        kv = {"backend": p["backend"], "segmenter": p["segmenter"], "device": p["device"],
              "backend_status": backend_status,
              "model": (p["dust3r.checkpoint"] if p["backend"] == "dust3r" else
                        "none (sfm: pycolmap structure from motion + OpenCV SGBM stereo)" if p["backend"] == "sfm"
                        else "none (rgbd: depth + features)")
              + (f"; last reconstruction left out keyframes {sorted(dropped)}: "
                 + "; ".join(f"{k}: {m}" for k, m in sorted(dropped.items()))[:400] if dropped else "")
              + (f"; sam2 {p['sam2.checkpoint']}" if p["segmenter"] == "sam2" else ""),
              "buffer_fill": f"{len(self._buffer)}/{p['keyframes.max_keyframes']}",
              "reconstruction_running": str(running),
              "cancelled_job_winding_down": str(self.job_winding_down()),
              "scene": (f"{self._scene.num_views} keyframes, frame '{self._scene.frame_id}'"
                        if self._scene is not None else "none"),
              "last_error": self.last_error[:300] or "none",
              "scene_dir": self._scene_dir() or "(disabled)",
              "last_saved": os.path.basename(self.last_saved) or "none",
              "transport_warning": self.frames.transport_warning() or "none"}
        kv.update(self.frames.diagnostics())
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
        warn = self.frames.transport_warning()
        if warn:
            return DiagnosticStatus.WARN, warn
        return DiagnosticStatus.OK, "reconstructing" if self.reconstruction_running() else "ok"

    def destroy_node(self):
        self._stop.set()
        self._cancel.set()
        if hasattr(self, "frames"):
            self.frames.stop()
        return super().destroy_node()


def main(args=None):
    from .spin import spin_node
    spin_node(ReconstructionNode, args)


if __name__ == "__main__":
    main()
