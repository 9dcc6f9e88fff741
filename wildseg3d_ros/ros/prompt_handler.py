"""Prompt handling of segmentation_node (worker thread): a 3D click (transformed into the scene
frame, refused when farther than prompt.max_distance_m from every scene point) or a pixel
click on a keyframe, applied to the interactive session; the answer published stamped with
the prompt's stamp, and a prompt_status for every prompt (ros/object_output.py). Prompts that
arrive while no scene is loaded wait up to prompt.scene_wait_s for one.

A mixin of SegmentationNode: expects ``session``, ``scene``, ``scene_id``, ``params``, ``stats``,
``out``, ``prompt_log`` / ``_prompt_meta``, ``_held``, ``_tf_buffer``, ``latencies_ms``,
``_refuse``, ``_save_session`` and ``_frame``."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
from geometry_msgs.msg import PointStamped

from . import convert


class PromptHandlerMixin:
    def _frame(self) -> str:
        return self.scene.frame_id if self.scene is not None else "map"

    def _last_stamp(self):
        return self._prompt_meta[-1][1] if self._prompt_meta else None

    def _expire_held(self):
        if not self._held:
            return
        now, wait = time.perf_counter(), self.params["prompt.scene_wait_s"]
        keep = [h for h in self._held if now - h[1] < wait]
        for h in self._held:
            if now - h[1] >= wait:
                self._handle_prompt(*h, may_wait=False)
        self._held = keep

    def _to_scene_frame(self, msg: PointStamped) -> np.ndarray:
        p = np.array([msg.point.x, msg.point.y, msg.point.z], dtype=np.float64)
        if not np.isfinite(p).all():
            raise ValueError(f"prompt point ({p[0]}, {p[1]}, {p[2]}) is not finite")
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

    def _near_scene(self, p: np.ndarray):
        """Refuse a 3D click farther than prompt.max_distance_m from every scene point."""
        mapper = getattr(self.session, "mapper", None)
        if mapper is None:
            return
        md = self.params["prompt.max_distance_m"]
        d = mapper.nearest_distance(p, md)
        if not np.isfinite(d):
            raise ValueError(f"3D prompt ({p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f}) is farther than "
                             f"prompt.max_distance_m={md:g} from every scene point: nothing selected")

    def _recent_clicks(self, t_scene: float, scene_msg):
        """3D clicks meant for a new scene that reached this node before it: stamped at or after the
        scene's stamp (the client clicked on it) and received at most prompt.scene_wait_s before
        it, in arrival order — those applied to the previous scene and those refused as far from
        it."""
        wait = self.params["prompt.scene_wait_s"]
        if scene_msg.header.frame_id != self._frame():
            return []
        t_stamp = convert.stamp_to_sec(scene_msg.header.stamp)
        applied = [(p, m) for p, m in zip(self.prompt_log, self._prompt_meta) if p[0] == "point"]
        far = [(p, m) for p, m in self._recent_far if p[2]]
        self._recent_far.clear()
        keep = [(p, m) for p, m in applied + far if m[0] >= t_scene - wait and m[1] is not None
                and convert.stamp_to_sec(m[1]) >= t_stamp > 0]
        return sorted(keep, key=lambda pm: pm[1][0])

    def _replay_on_new_scene(self, carry):
        for (kind, data, positive, new_object), (t, stamp) in carry:
            try:
                self._near_scene(np.asarray(data, dtype=np.float64))
            except ValueError:
                continue  # far from this scene too: its refusal stands
            self._apply_prompt(kind, data, positive, new_object, None, stamp, replay_of=t)

    def _refuse_prompt(self, key, counter, msg, stamp, kind, positive, new_object):
        self._refuse(key, counter, msg)
        self.out.status(stamp, kind, positive, new_object, "refused", reason=msg, scene_id=self.scene_id or "")

    def _handle_prompt(self, kind, t_recv, msg, positive, new_object, may_wait=True):
        what = ("positive" if positive else "negative") + (" new-object" if new_object else "")
        stamp = msg.header.stamp
        if self.session is None:
            if may_wait and time.perf_counter() - t_recv < self.params["prompt.scene_wait_s"]:
                self._held.append((kind, t_recv, msg, positive, new_object))
                return
            self._refuse_prompt("no_scene", "prompts_without_scene", f"{what} {kind} prompt ignored: no scene has "
                                "been reconstructed yet (waiting for wildseg3d/scene)", stamp, kind, positive,
                                new_object)
            return
        try:
            if kind == "point":
                data = self._to_scene_frame(msg)
                try:
                    self._near_scene(data)
                except ValueError:  # maybe a click on a scene that has not reached this node yet
                    self._recent_far.append(((kind, data, positive, new_object), (t_recv, stamp)))
                    raise
            else:
                view = convert.parse_keyframe_frame(msg.header.frame_id)
                data = (view, float(msg.point.x), float(msg.point.y))
        except ValueError as e:
            self._refuse_prompt("prompt", "prompts_refused", f"{what} {kind} prompt refused: {e}", stamp, kind,
                                positive, new_object)
            return
        if self._apply_prompt(kind, data, positive, new_object, t_recv, stamp):
            self._save_session()

    def _apply_prompt(self, kind, data, positive, new_object, t_recv: Optional[float], stamp,
                      replay_of: Optional[float] = None) -> bool:
        """Apply one prompt (scene-frame point or keyframe pixel) to the session, log it and
        publish. t_recv None = replay (no latency statistics, publish left to the caller)."""
        from ..core.prompts.session import PromptError
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
            msg = f"{what} {kind} prompt refused: {e}"
            if t_recv is None and stamp is None:
                self._refuse("prompt", "prompts_refused", msg)
            else:
                self._refuse_prompt("prompt", "prompts_refused", msg, stamp, kind, positive, new_object)
            return False
        self.prompt_log.append((kind, data, positive, new_object))
        self._prompt_meta.append((t_recv if t_recv is not None else (replay_of or 0.0), stamp))
        if t_recv is None:
            if replay_of is not None:
                self.out.status(stamp, kind, positive, new_object, "answered", reason="replayed on the new scene",
                                scene_id=self.scene_id)
            return True
        results = self.session.results()
        n = self.out.publish(results, self._frame(), stamp)
        dt = (self.out.t_published - t_recv) * 1e3  # prompt receipt -> object PointCloud2 published
        self.latencies_ms.append(dt)
        self.stats["prompts_answered"] += 1
        self.out.status(stamp, kind, positive, new_object, "answered", objects=len(results), points=n,
                        scene_id=self.scene_id, latency_ms=dt)
        self.get_logger().info(f"{what} {desc}: {len(results)} object(s), {n} points, {dt:.1f} ms")
        return True

