"""What segmentation_node publishes for a selection, and how a client matches it to its prompt.

* ``wildseg3d/object_cloud`` (x y z rgb), ``wildseg3d/object_cloud_labelled`` (x y z rgb label),
  ``wildseg3d/object_markers``: reliable + transient local. Their ``header.stamp`` is the
  ``header.stamp`` of the prompt they answer (the latest prompt applied to the selection), so a
  client waits for the object cloud whose stamp equals its click's. A selection cleared by
  ``~/reset``, by a reconstruction reset or because another scene arrived carries the node's
  clock instead. A new scene replaces the shown selection with the answer to a prompt queued
  during its preparation, or clears it once no such prompt is waiting; when nothing was shown it
  publishes nothing (no empty cloud is published between a click and its answer).
* ``wildseg3d/prompt_status`` (std_msgs/String, one JSON object, reliable, depth 50): one per
  prompt, refused ones included, published after the clouds of an answer:
  ``{"prompt_stamp": {"sec", "nanosec"}, "topic_kind": "point"|"pixel", "positive",
  "new_object", "status": "answered"|"refused"|"cleared", "reason", "objects", "points",
  "scene_id", "latency_ms"}``.
"""
from __future__ import annotations

import json
import time

from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from ..core.output import cloud as corecloud
from ..core.prompts.session import combine_results
from . import convert

STATUS_QOS_DEPTH = 50


class ObjectOutput:
    def __init__(self, node):
        self.node = node
        self.cloud_pub = node.create_publisher(PointCloud2, "wildseg3d/object_cloud", convert.LATCHED_QOS)
        self.labelled_pub = node.create_publisher(PointCloud2, "wildseg3d/object_cloud_labelled", convert.LATCHED_QOS)
        self.marker_pub = node.create_publisher(MarkerArray, "wildseg3d/object_markers", convert.LATCHED_QOS)
        self.status_pub = node.create_publisher(String, "wildseg3d/prompt_status", STATUS_QOS_DEPTH)
        self.shown = False          # the last published object cloud was non-empty
        self.stale = False          # what is shown belongs to a previous scene (cleared when nothing replaces it)
        self.t_published = 0.0      # perf_counter when the last object cloud was published

    def publish(self, results, frame: str, stamp=None):
        """Publish the selection ``results`` ([(label, Segment3D)]) stamped ``stamp`` (the prompt's;
        None = the node's clock)."""
        if stamp is None:
            stamp = self.node.get_clock().now().to_msg()
        P, C, L = combine_results(results)
        self.cloud_pub.publish(convert.struct_to_cloud(corecloud.pack_object_cloud(P, C), frame, stamp))
        self.t_published = time.perf_counter()  # end of the prompt-latency span
        self.labelled_pub.publish(convert.struct_to_cloud(corecloud.pack_object_cloud(P, C, L), frame, stamp))
        self.marker_pub.publish(convert.bbox_markers([(lab, seg.points) for lab, seg in results], frame, stamp))
        self.shown, self.stale = len(P) > 0, False
        return len(P)

    def status(self, stamp, kind: str, positive: bool, new_object: bool, status: str, reason: str = "",
               objects: int = 0, points: int = 0, scene_id: str = "", latency_ms: float = None):
        body = {"prompt_stamp": {"sec": int(getattr(stamp, "sec", 0)), "nanosec": int(getattr(stamp, "nanosec", 0))},
                "topic_kind": kind, "positive": bool(positive), "new_object": bool(new_object), "status": status,
                "reason": reason, "objects": int(objects), "points": int(points), "scene_id": scene_id or "",
                "latency_ms": None if latency_ms is None else round(float(latency_ms), 3)}
        self.status_pub.publish(String(data=json.dumps(body)))
