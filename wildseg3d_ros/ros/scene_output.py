"""What reconstruction_node does with a completed scene: publish it (organised scene cloud,
keyframe poses, static TF to each keyframe's camera), save it atomically (core.store) and
restore the newest saved one at start-up.

A mixin of ReconstructionNode: expects ``scene_pub``, ``poses_pub``, ``params``, ``stats``,
``log``, ``_lock``, ``_generation``, ``_scene``, ``last_reconstruction`` and ``restored``."""
from __future__ import annotations

import os
import time

import numpy as np
from geometry_msgs.msg import PoseArray

from ..core.group_mapping import precompute_kept
from ..core.output import cloud as corecloud
from ..core.output import store
from . import convert


class SceneOutputMixin:
    # ------------------------------------------------------------------ publishing
    def _publish_scene(self, scene):
        stamp = self.get_clock().now().to_msg()
        if scene.mask_cache is not None and scene.mask_cache.kept is None:
            # Multi-view Group Mapping's filter, computed once here and sent with the scene:
            # a segmentation node cuts every object from it instead of computing it
            try:
                precompute_kept(scene)
            except Exception as e:  # the scene goes out without it (segmentation computes it)
                scene.mask_cache.kept = None
                self.internal_error("precomputing the scene's MGM filter", e)
        arr, h, w = corecloud.pack_scene_cloud(scene)
        self.scene_pub.publish(convert.struct_to_cloud(arr, scene.frame_id, stamp, h, w))
        self.poses_pub.publish(convert.poses_to_pose_array(scene.poses, scene.frame_id, stamp))
        self._broadcast_keyframe_tf(scene, stamp)

    def _broadcast_keyframe_tf(self, scene, stamp):
        """Static TF scene frame -> keyframe_<i> (each keyframe's camera, OpenCV axes) when tf2_ros
        is installed, so rviz2 shows the cameras and pixel prompts name a real frame."""
        if getattr(self, "_static_tf", None) is None:
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
        except Exception as e:  # a thread of its own: report, never die silently
            self.internal_error("load_last_scene", e)
        finally:
            self.restored.set()
