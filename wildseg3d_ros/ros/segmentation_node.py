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
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from typing import List, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PointStamped
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ..core import cloud as corecloud
from ..core.scene_codec import SceneDecodeError, scene_from_cloud_array
from . import convert
from .params import ParamSpec, ParameterTable
from .throttled_log import ThrottledLogger

PARAMS = [
    ParamSpec("segmenter", "classical", "Segmenter used to refine with extra clicks.",
              choices=("classical", "sam2")),
    ParamSpec("sam2.config", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM2 config name in the sam2 package."),
    ParamSpec("sam2.checkpoint", "", "SAM2 checkpoint path (read only)."),
    ParamSpec("device", "cpu", "torch device for SAM2 refinement."),
    ParamSpec("prompt.max_distance_m", 0.05, "A 3D click farther than this from every scene point "
              "selects nothing.", 1e-4, 10.0),
    ParamSpec("mgm.voxel_size_m", 0.0, "Voxel size of the floater filter (m); 0 = automatic "
              "(3x the median point spacing).", 0.0, 1.0),
    ParamSpec("mgm.min_consistency", 0.5, "Minimum share of the other views that see a point and "
              "agree with its object for the point to be kept.", 0.0, 1.0),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics messages (s).", 0.1, 60.0),
]


class SegmentationNode(Node):
    def __init__(self, **kwargs):
        super().__init__("segmentation_node", **kwargs)
        self.log = ThrottledLogger(self.get_logger())
        self.params = ParameterTable(self, PARAMS)
        self._q: "queue.Queue" = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self.scene = None
        self.scene_stamp = None
        self.session = None
        self._segmenter = None
        self._segmenter_error = ""
        self.prompt_log: List[tuple] = []  # prompts of the current scene, replayed by ~/resegment
        self.latencies_ms = collections.deque(maxlen=1000)
        self.stats = collections.Counter()
        self.last_error = ""

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
        self.create_timer(self.params["diagnostics_period_s"], self._publish_diagnostics)
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

    # ------------------------------------------------------------------ callbacks (enqueue only)
    def _on_scene(self, msg: PointCloud2):
        self._put(("scene", time.perf_counter(), msg))

    def _enqueue(self, kind: str, msg: PointStamped, positive: bool, new_object: bool):
        self._put((kind, time.perf_counter(), msg, positive, new_object))

    def _put(self, item):
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.stats["dropped_queue_full"] += 1
            self.log.error("queue", "segmentation queue full (256 pending items): input dropped")

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
                elif item[0] == "reset":
                    self._do_reset()
                elif item[0] == "resegment":
                    self._do_resegment(item[1])
                else:
                    self._handle_prompt(*item)
            except Exception as e:  # keep the worker alive whatever happens
                self.last_error = f"{item[0]} failed: {e}"
                self.get_logger().error(f"{self.last_error}\n{traceback.format_exc(limit=4)}")

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
            self.scene, self.session, self.prompt_log = None, None, []
            self._publish_results([])
            self.get_logger().info("empty scene received (reconstruction reset): selection cleared")
            return
        try:
            arr = convert.cloud_to_struct(msg)
            scene = scene_from_cloud_array(arr, msg.header.frame_id)
        except (corecloud.CloudError, SceneDecodeError, ValueError) as e:
            self.stats["bad_scene"] += 1
            self.last_error = f"scene message refused: {e}"
            self.get_logger().error(self.last_error)
            return
        session = self._build_session(scene)
        self.scene, self.session, self.scene_stamp = scene, session, msg.header.stamp
        self.prompt_log = []
        self._publish_results([])
        n_obj = len(scene.mask_cache.object_ids()) if scene.mask_cache is not None else 0
        self.get_logger().info(f"scene ready: {scene.num_views} keyframes {scene.image_shape[1]}x"
                               f"{scene.image_shape[0]}, {n_obj} cached objects, frame '{scene.frame_id}' "
                               f"({time.perf_counter() - t0:.2f} s to prepare)")

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

    def _handle_prompt(self, kind, t_recv, msg, positive, new_object, replay=False):
        from ..core.segment.interactive import PromptError
        what = ("positive" if positive else "negative") + (" new-object" if new_object else "")
        if self.session is None:
            self.stats["prompts_without_scene"] += 1
            self.log.warning("no_scene", f"{what} {kind} prompt ignored: no scene has been reconstructed yet "
                             "(waiting for wildseg3d/scene)")
            return
        try:
            if kind == "point":
                p = self._to_scene_frame(msg)
                self.session.add_point_prompt(p, positive=positive, new_object=new_object)
                desc = f"3D ({p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f})"
            else:
                view = convert.parse_keyframe_frame(msg.header.frame_id)
                u, v = float(msg.point.x), float(msg.point.y)
                self.session.add_pixel_prompt(view, u, v, positive=positive, new_object=new_object)
                desc = f"pixel ({u:.1f}, {v:.1f}) on keyframe {view}"
        except (PromptError, ValueError) as e:
            self.stats["prompts_refused"] += 1
            self.log.warning("prompt", f"{what} {kind} prompt refused: {e}")
            return
        if not replay:
            self.prompt_log.append((kind, msg, positive, new_object))
        results = self.session.results()
        self._publish_results(results)
        dt = (time.perf_counter() - t_recv) * 1e3
        if not replay:
            self.latencies_ms.append(dt)
            self.stats["prompts_answered"] += 1
        n = sum(len(seg.points) for _, seg in results)
        self.get_logger().info(f"{what} {desc}: {len(results)} object(s), {n} points, {dt:.1f} ms")

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
        self.labelled_pub.publish(convert.struct_to_cloud(corecloud.pack_object_cloud(P, C, L), frame, stamp))
        self.marker_pub.publish(convert.bbox_markers([(lab, seg.points) for lab, seg in results], frame, stamp))

    def _do_reset(self):
        if self.session is not None:
            self.session.reset()
        self.prompt_log = []
        self._publish_results([])

    def _do_resegment(self, done: threading.Event):
        try:
            if self.scene is None:
                return
            self._segmenter, self._segmenter_error = None, ""
            self.session = self._build_session(self.scene)
            for kind, msg, positive, new_object in list(self.prompt_log):
                self._handle_prompt(kind, time.perf_counter(), msg, positive, new_object, replay=True)
            if not self.prompt_log:
                self._publish_results([])
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
    def _publish_diagnostics(self):
        st = DiagnosticStatus(name="wildseg3d: segmentation_node", hardware_id=self.params["device"])
        if self._segmenter_error:
            st.level, st.message = DiagnosticStatus.WARN, self._segmenter_error[:200]
        elif self.last_error:
            st.level, st.message = DiagnosticStatus.WARN, self.last_error[:200]
        else:
            st.level, st.message = DiagnosticStatus.OK, "scene loaded" if self.scene is not None else "waiting for a scene"
        kv = {"segmenter": self.params["segmenter"], "queue": str(self._q.qsize())}
        if self.latencies_ms:
            lat = np.array(self.latencies_ms)
            kv["prompt_latency_p50_ms"] = f"{np.percentile(lat, 50):.2f}"
            kv["prompt_latency_p95_ms"] = f"{np.percentile(lat, 95):.2f}"
        kv.update({k: str(v) for k, v in self.stats.items()})
        st.values = [KeyValue(key=k, value=v) for k, v in kv.items()]
        self.diag_pub.publish(DiagnosticArray(header=convert.make_header("", self.get_clock().now().to_msg()),
                                              status=[st]))

    def destroy_node(self):
        self._stop.set()
        return super().destroy_node()


def main(args=None):
    rclpy.init(args=args)
    node = SegmentationNode()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()
