"""segmentation_node: prompts -> segmented object clouds, answered from the mask cache.

Subscriptions:
  wildseg3d/scene (sensor_msgs/PointCloud2, reliable + transient local; from reconstruction_node)
  clicked_point (geometry_msgs/PointStamped): positive 3D click (rviz2 "Publish Point")
  wildseg3d/negative_point (PointStamped): negative 3D click
  wildseg3d/new_object_point (PointStamped): positive 3D click that starts a new object
  wildseg3d/pixel_prompt, wildseg3d/pixel_prompt_negative (PointStamped): pixel clicks on a
    keyframe: header.frame_id = 'keyframe_<i>', point.x = column u, point.y = row v (pixels)
Publications (reliable + transient local):
  wildseg3d/object_cloud (PointCloud2 x y z rgb, point_step 16): all selected objects
  wildseg3d/object_cloud_labelled (PointCloud2 x y z rgb label, point_step 20)
  wildseg3d/object_markers (visualization_msgs/MarkerArray): bounding box + text per object
  /diagnostics
Services: ~/reset (clear prompts and selection), ~/resegment (rebuild the mapper for the
current scene and parameters, replay the prompts, republish) — std_srvs/Trigger.

All work runs in one worker thread fed by a queue (scene preparation, prompts in arrival
order); callbacks only enqueue, so services and parameters always answer.

Bad prompts (no scene yet, no TF to the scene frame, far from every surface, outside the image,
unknown keyframe, negative before positive) and bad scene messages are refused with a
rate-limited log line; ``stats`` counts them and ``last_error`` holds the latest.

Persistence: with ``scene_dir`` set, the prompts of the current scene (3D points already in the
scene frame, pixel prompts as keyframe/u/v; positive / negative / new object) are saved
atomically after every change via core.store.save_session, keyed by the scene identity (a
BLAKE2 hash of the scene cloud's data bytes, its size and frame). With ``load_last_session``,
when a scene with that identity arrives (e.g. the reconstruction node restarted with
load_last_scene), the prompts are replayed and the same segmented cloud is republished.
A scene message identical to the current one (a republish) keeps the current selection.
"""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import threading
import time
import traceback
from typing import List, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PointStamped
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ..core import cloud as corecloud
from ..core import store
from ..core.scene_codec import SceneDecodeError, scene_from_cloud_array
from . import convert
from .params import ParamSpec, ParameterTable, check_device, check_dir_param, check_file_param
from .memory import release_free_heap
from .node_common import NodeCommonMixin
from .throttled_log import ThrottledLogger

PARAMS = [
    ParamSpec("segmenter", "classical", "Segmenter used to refine with extra clicks (use the "
              "reconstruction node's: classical, geometric or sam2).",
              choices=("classical", "geometric", "sam2")),
    ParamSpec("sam2.config", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM2 config name in the sam2 package."),
    ParamSpec("sam2.checkpoint", "", "SAM2 checkpoint path (read only).", check=check_file_param),
    ParamSpec("device", "cpu", "torch device for SAM2 refinement (cpu, cuda, cuda:N, mps).", check=check_device),
    ParamSpec("prompt.max_distance_m", 0.05, "A 3D click farther than this from every scene point "
              "selects nothing.", 1e-4, 10.0),
    ParamSpec("mgm.voxel_size_m", 0.0, "Voxel size of the floater filter (m); 0 = automatic "
              "(3x the median point spacing).", 0.0, 1.0),
    ParamSpec("mgm.min_consistency", 0.5, "Minimum share of the other views that see a point and "
              "agree with its object for the point to be kept.", 0.0, 1.0),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics messages (s).", 0.1, 60.0),
    ParamSpec("scene_dir", "~/.ros/wildseg3d/scenes", "Folder of the saved session (session.json: the "
              "prompts of the current scene, saved after every change; ~ expanded; empty disables).",
              check=check_dir_param),
    ParamSpec("load_last_session", False, "Replay the saved prompts when the scene they were made on "
              "is received again (same scene identity), e.g. after a restart."),
]

SESSION_FORMAT = "wildseg3d-prompts-1"


def scene_identity(msg: PointCloud2) -> str:
    """Identity of a published scene: hash of the cloud's data bytes, size and frame (the stamp
    is left out: a restored scene is republished with a new stamp but identical bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{msg.height}x{msg.width}:{msg.point_step}:{msg.header.frame_id}:".encode())
    h.update(memoryview(msg.data))
    return h.hexdigest()


def _percentile(values, q: float) -> float:
    v = list(values)
    return float(np.percentile(np.asarray(v, dtype=np.float64), q)) if v else float("nan")


class SegmentationNode(NodeCommonMixin, Node):
    REFUSE_LEVEL = "warning"  # a bad prompt is the operator's, not the node's, fault
    DIAG_NAME = "segmentation_node"

    def __init__(self, **kwargs):
        super().__init__("segmentation_node", **kwargs)
        self.log = ThrottledLogger(self.get_logger())
        self.params = ParameterTable(self, PARAMS, on_change=self._on_params_changed)
        self._q: "queue.Queue" = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self.scene = None
        self.scene_stamp = None
        self.session = None
        self._segmenter = None
        self._segmenter_error = ""
        # prompts of the current scene, replayed by ~/resegment and saved in the session:
        # (kind, data, positive, new_object) with data = xyz (np.float64[3], scene frame) for
        # kind 'point' and (keyframe, u, v) for kind 'pixel'
        self.prompt_log: List[tuple] = []
        self.scene_id: Optional[str] = None
        self.latencies_ms = collections.deque(maxlen=1000)
        self.stats = collections.Counter()
        self.last_error = ""
        self.last_saved_session = ""
        self.restored_prompts = 0

        self.create_subscription(PointCloud2, "wildseg3d/scene", self._on_scene, convert.LATCHED_QOS)
        self.create_subscription(PointStamped, "clicked_point",
                                 lambda m: self._enqueue("point", m, True, False), convert.PROMPT_QOS)
        self.create_subscription(PointStamped, "wildseg3d/negative_point",
                                 lambda m: self._enqueue("point", m, False, False), convert.PROMPT_QOS)
        self.create_subscription(PointStamped, "wildseg3d/new_object_point",
                                 lambda m: self._enqueue("point", m, True, True), convert.PROMPT_QOS)
        self.create_subscription(PointStamped, "wildseg3d/pixel_prompt",
                                 lambda m: self._enqueue("pixel", m, True, False), convert.PROMPT_QOS)
        self.create_subscription(PointStamped, "wildseg3d/pixel_prompt_negative",
                                 lambda m: self._enqueue("pixel", m, False, False), convert.PROMPT_QOS)
        self.cloud_pub = self.create_publisher(PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
        self.labelled_pub = self.create_publisher(PointCloud2, "wildseg3d/object_cloud_labelled",
                                                  convert.LATCHED_QOS)
        self.marker_pub = self.create_publisher(MarkerArray, "wildseg3d/object_markers", convert.LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Trigger, "~/reset", self._srv_reset)
        self.create_service(Trigger, "~/resegment", self._srv_resegment)
        self._start_diagnostics_timer(self.params["diagnostics_period_s"])
        self._tf_buffer = None
        try:
            import tf2_ros
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        except ImportError:
            pass
        self._worker = threading.Thread(target=self._work_loop, name="segmentation", daemon=True)
        self._worker.start()
        self.get_logger().info("segmentation_node ready: waiting for a scene on wildseg3d/scene")

    def _on_params_changed(self, changed):
        if "diagnostics_period_s" in changed:
            self._start_diagnostics_timer(changed["diagnostics_period_s"])


    # ------------------------------------------------------------------ callbacks (enqueue only)
    def _on_scene(self, msg: PointCloud2):
        self._put(("scene", time.perf_counter(), msg))

    def _enqueue(self, kind: str, msg: PointStamped, positive: bool, new_object: bool):
        self._put((kind, time.perf_counter(), msg, positive, new_object))

    def _put(self, item):
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._refuse("queue", "dropped_queue_full", "segmentation queue full (256 pending items): "
                         f"{item[0]} input dropped", "error")

    # ------------------------------------------------------------------ worker
    def _work_loop(self):
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if item[0] == "scene":
                    self._load_scene(item[2])
                    release_free_heap()  # the previous scene's arrays were just dropped
                elif item[0] == "reset":
                    self._do_reset()
                elif item[0] == "resegment":
                    self._do_resegment(item[1])
                else:
                    self._handle_prompt(*item)
            except Exception as e:  # keep the worker alive whatever happens
                self.stats["worker_errors"] += 1
                self.last_error = f"{item[0]} failed: {e}"
                self.log.error(f"worker_{item[0]}", f"{self.last_error} (input dropped, node keeps running)\n"
                               f"{traceback.format_exc(limit=4)}")

    def _get_segmenter(self):
        if self._segmenter is None and not self._segmenter_error:
            from ..core.segment.base import make_segmenter
            try:
                name = self.params["segmenter"]
                kw = {}
                if name == "sam2":
                    kw = dict(config=self.params["sam2.config"], checkpoint=self.params["sam2.checkpoint"],
                              device=self.params["device"])
                self._segmenter = make_segmenter(name, **kw)
            except Exception as e:
                self._segmenter_error = f"refinement segmenter unavailable ({e}); clicks are answered from the mask cache only"
                self.get_logger().error(self._segmenter_error)
        return self._segmenter

    def _build_session(self, scene):
        from ..core.segment.group_mapping import GroupMapper
        from ..core.segment.interactive import InteractiveSession
        mapper = GroupMapper(scene, voxel=self.params["mgm.voxel_size_m"] or None,
                             min_agree_frac=self.params["mgm.min_consistency"])
        return InteractiveSession(scene, mapper, self._get_segmenter(),
                                  max_click_dist=self.params["prompt.max_distance_m"])

    def _load_scene(self, msg: PointCloud2):
        t0 = time.perf_counter()
        if msg.width * msg.height == 0:
            self.scene, self.session, self.prompt_log, self.scene_id = None, None, [], None
            self._publish_results([])
            self.get_logger().info("empty scene received (reconstruction reset): selection cleared")
            return
        sid = scene_identity(msg)
        if sid == self.scene_id and self.session is not None:
            self.stats["scene_republished"] += 1
            self.scene_stamp = msg.header.stamp
            self.get_logger().info("the same scene was received again (republished): selection kept")
            self._publish_results(self.session.results())
            return
        try:
            arr = convert.cloud_to_struct(msg)
            scene = scene_from_cloud_array(arr, msg.header.frame_id)
        except (corecloud.CloudError, SceneDecodeError, ValueError) as e:
            self._refuse("bad_scene", "bad_scene", f"scene message refused ({e}); the previous scene "
                         "and selection are kept", "error")
            return
        session = self._build_session(scene)
        self.scene, self.session, self.scene_stamp, self.scene_id = scene, session, msg.header.stamp, sid
        self.prompt_log = []
        self.stats["scenes_loaded"] += 1
        n_obj = len(scene.mask_cache.object_ids()) if scene.mask_cache is not None else 0
        self.get_logger().info(f"scene ready: {scene.num_views} keyframes {scene.image_shape[1]}x"
                               f"{scene.image_shape[0]}, {n_obj} cached objects, frame '{scene.frame_id}' "
                               f"({time.perf_counter() - t0:.2f} s to prepare)")
        if not self._restore_session():
            self._publish_results([])

    # ------------------------------------------------------------------ session persistence
    def _scene_dir(self) -> str:
        d = str(self.params["scene_dir"]).strip()
        return os.path.expanduser(d) if d else ""

    @staticmethod
    def _prompt_to_json(kind, data, positive, new_object) -> dict:
        d = {"kind": kind, "positive": bool(positive), "new_object": bool(new_object)}
        if kind == "point":
            d["xyz"] = [float(x) for x in data]
        else:
            d["keyframe"], d["u"], d["v"] = int(data[0]), float(data[1]), float(data[2])
        return d

    @staticmethod
    def _prompt_from_json(d) -> tuple:
        """Validated prompt tuple from a saved dict (ValueError / KeyError / TypeError if malformed)."""
        kind = d["kind"]
        if kind == "point":
            xyz = np.array(d["xyz"], dtype=np.float64).reshape(-1)
            if xyz.shape != (3,) or not np.isfinite(xyz).all():
                raise ValueError(f"bad 3D prompt {d['xyz']!r}")
            data = xyz
        elif kind == "pixel":
            data = (int(d["keyframe"]), float(d["u"]), float(d["v"]))
        else:
            raise ValueError(f"unknown prompt kind {kind!r}")
        return kind, data, bool(d["positive"]), bool(d["new_object"])

    def _save_session(self):
        d = self._scene_dir()
        if not d or self.scene_id is None:
            return
        body = {"format": SESSION_FORMAT, "scene_id": self.scene_id,
                "frame_id": self.scene.frame_id if self.scene is not None else "",
                "prompts": [self._prompt_to_json(*p) for p in self.prompt_log]}
        try:
            self.last_saved_session = str(store.save_session(d, body))
            self.stats["sessions_saved"] += 1
        except Exception as e:
            self._refuse("session_save", "session_save_errors", f"saving the prompt session into {d} failed "
                         f"({e}); the live selection is unaffected", "error")

    def _restore_session(self) -> bool:
        """Replay the saved prompts when they belong to the current scene. True if replayed."""
        d = self._scene_dir()
        if not d or not self.params["load_last_session"]:
            return False
        try:
            sess = store.load_session(d)
        except Exception as e:  # StoreError: corrupt / foreign / wrong version
            self._refuse("session_load", "session_load_errors", f"saved session refused ({e}); starting "
                         "with no prompts", "error")
            return False
        if not sess or sess.get("format") != SESSION_FORMAT or sess.get("scene_id") != self.scene_id:
            return False
        try:
            prompts = [self._prompt_from_json(x) for x in sess.get("prompts") or []]
        except (KeyError, TypeError, ValueError) as e:
            self._refuse("session_load", "session_load_errors", f"saved session is malformed ({e}); "
                         "starting with no prompts", "error")
            return False
        for kind, data, positive, new_object in prompts:
            self._apply_prompt(kind, data, positive, new_object, t_recv=None)
        self.restored_prompts = len(self.prompt_log)
        self.stats["sessions_restored"] += 1
        self._publish_results(self.session.results())
        self.get_logger().info(f"session restored: {len(self.prompt_log)} of {len(prompts)} saved prompt(s) "
                               "replayed on the same scene")
        return True

    def _to_scene_frame(self, msg: PointStamped) -> np.ndarray:
        p = np.array([msg.point.x, msg.point.y, msg.point.z], dtype=np.float64)
        if not np.isfinite(p).all():
            raise ValueError("prompt point is not finite")
        frame = msg.header.frame_id
        if not frame or frame == self.scene.frame_id:
            return p
        if self._tf_buffer is None:
            raise ValueError(f"prompt is in frame '{frame}' but the scene is in '{self.scene.frame_id}' and "
                             "tf2_ros is not available to transform it: click in the scene frame "
                             "(rviz2 Fixed Frame) or install tf2_ros")
        from rclpy.duration import Duration
        from rclpy.time import Time
        from ..core.geometry import pose_from_xyz_quat, transform_points
        try:
            tf = self._tf_buffer.lookup_transform(self.scene.frame_id, frame, Time(), timeout=Duration(seconds=0.1))
        except Exception as e:
            raise ValueError(f"no TF from '{frame}' to the scene frame '{self.scene.frame_id}': {e}") from None
        tr, q = tf.transform.translation, tf.transform.rotation
        return transform_points(pose_from_xyz_quat([tr.x, tr.y, tr.z], [q.x, q.y, q.z, q.w]), p)

    def _handle_prompt(self, kind, t_recv, msg, positive, new_object):
        what = ("positive" if positive else "negative") + (" new-object" if new_object else "")
        if self.session is None:
            self._refuse("no_scene", "prompts_without_scene", f"{what} {kind} prompt ignored: no scene has "
                         "been reconstructed yet (waiting for wildseg3d/scene)")
            return
        try:
            if kind == "point":
                data = self._to_scene_frame(msg)
            else:
                view = convert.parse_keyframe_frame(msg.header.frame_id)
                data = (view, float(msg.point.x), float(msg.point.y))
        except ValueError as e:
            self._refuse("prompt", "prompts_refused", f"{what} {kind} prompt refused: {e}")
            return
        if self._apply_prompt(kind, data, positive, new_object, t_recv):
            self._save_session()

    def _apply_prompt(self, kind, data, positive, new_object, t_recv: Optional[float]) -> bool:
        """Apply one prompt (scene-frame point or keyframe pixel) to the session, log it and
        publish. t_recv None = replay (no latency statistics, publish left to the caller)."""
        from ..core.segment.interactive import PromptError
        what = ("positive" if positive else "negative") + (" new-object" if new_object else "")
        try:
            if kind == "point":
                p = np.asarray(data, dtype=np.float64)
                self.session.add_point_prompt(p, positive=positive, new_object=new_object)
                desc = f"3D ({p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f})"
            else:
                view, u, v = data
                self.session.add_pixel_prompt(view, u, v, positive=positive, new_object=new_object)
                desc = f"pixel ({u:.1f}, {v:.1f}) on keyframe {view}"
        except (PromptError, ValueError) as e:
            self._refuse("prompt", "prompts_refused", f"{what} {kind} prompt refused: {e}")
            return False
        self.prompt_log.append((kind, data, positive, new_object))
        if t_recv is None:
            return True
        results = self.session.results()
        self._publish_results(results)
        dt = (self._t_cloud_published - t_recv) * 1e3  # prompt receipt -> object PointCloud2 published
        self.latencies_ms.append(dt)
        self.stats["prompts_answered"] += 1
        n = sum(len(seg.points) for _, seg in results)
        self.get_logger().info(f"{what} {desc}: {len(results)} object(s), {n} points, {dt:.1f} ms")
        return True

    def _publish_results(self, results):
        stamp = self.get_clock().now().to_msg()
        frame = self.scene.frame_id if self.scene is not None else "map"
        pts = [seg.points for _, seg in results]
        cols = [seg.colors for _, seg in results]
        labels = [np.full(len(seg.points), lab, np.uint32) for lab, seg in results]
        P = np.concatenate(pts) if pts else np.zeros((0, 3), np.float32)
        C = np.concatenate(cols) if cols else np.zeros((0, 3), np.uint8)
        L = np.concatenate(labels) if labels else np.zeros((0,), np.uint32)
        self.cloud_pub.publish(convert.struct_to_cloud(corecloud.pack_object_cloud(P, C), frame, stamp))
        self._t_cloud_published = time.perf_counter()  # end of the prompt-latency span
        self.labelled_pub.publish(convert.struct_to_cloud(corecloud.pack_object_cloud(P, C, L), frame, stamp))
        self.marker_pub.publish(convert.bbox_markers([(lab, seg.points) for lab, seg in results], frame, stamp))

    def _do_reset(self):
        if self.session is not None:
            self.session.reset()
        self.prompt_log = []
        self._publish_results([])
        self._save_session()

    def _do_resegment(self, done: threading.Event):
        try:
            if self.scene is None:
                return
            self._segmenter, self._segmenter_error = None, ""
            self.session = self._build_session(self.scene)
            prompts, self.prompt_log = list(self.prompt_log), []
            for kind, data, positive, new_object in prompts:
                self._apply_prompt(kind, data, positive, new_object, t_recv=None)
            self._publish_results(self.session.results())
            self._save_session()
        finally:
            done.set()

    # ------------------------------------------------------------------ services
    def _srv_reset(self, req, resp):
        self._put(("reset",))
        resp.success, resp.message = True, "prompts and selection cleared"
        return resp

    def _srv_resegment(self, req, resp):
        if self.scene is None:
            resp.success, resp.message = False, "no scene yet: nothing to re-segment"
            return resp
        done = threading.Event()
        self._put(("resegment", done))
        resp.success = True
        resp.message = f"re-segmenting the current scene and replaying {len(self.prompt_log)} prompt(s)"
        return resp

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        """Key/values of the /diagnostics status (also used by tests and the soak benchmark)."""
        p = self.params
        if self._segmenter_error:
            seg_status = "error"
        elif self._segmenter is not None:
            seg_status = "ready"
        else:
            seg_status = "not loaded yet (loaded with the first scene)"
        scene = self.scene
        kv = {"segmenter": p["segmenter"], "segmenter_status": seg_status, "device": p["device"],
              "model": p["sam2.checkpoint"] if p["segmenter"] == "sam2" else "none (classical)",
              "queue": f"{self._q.qsize()}/{self._q.maxsize}",
              "scene": (f"{scene.num_views} keyframes, frame '{scene.frame_id}'" if scene is not None else "none"),
              "scene_id": self.scene_id or "none",
              "prompts": str(len(self.prompt_log)),
              "objects": str(len(self.session.results())) if self.session is not None else "0",
              "prompt_latency_p50_ms": f"{_percentile(self.latencies_ms, 50):.2f}",
              "prompt_latency_p95_ms": f"{_percentile(self.latencies_ms, 95):.2f}",
              "last_error": (self.last_error or self._segmenter_error)[:300] or "none",
              "scene_dir": self._scene_dir() or "(disabled)"}
        kv.update({k: str(v) for k, v in sorted(self.stats.items())})
        return kv

    def _diagnostic_state(self):
        """(level, message) of this node's /diagnostics status."""
        if self._segmenter_error:
            return DiagnosticStatus.WARN, self._segmenter_error
        if self.last_error:
            return DiagnosticStatus.WARN, self.last_error
        return DiagnosticStatus.OK, "scene loaded" if self.scene is not None else "waiting for a scene"

    def destroy_node(self):
        self._stop.set()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout=2.0)  # no publish on a destroyed publisher
        return super().destroy_node()


def main(args=None):
    from .spin import spin_node
    spin_node(SegmentationNode, args)


if __name__ == "__main__":
    main()
