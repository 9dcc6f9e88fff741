"""camera_sim_node: publishes the embedded synthetic tabletop scene as an RGB-D camera stream.

Publications: image (sensor_msgs/Image rgb8), depth (sensor_msgs/Image 32FC1 m or 16UC1 mm),
camera_info (sensor_msgs/CameraInfo), odom (nav_msgs/Odometry: the camera pose in world_frame
with odometry-like random-walk drift), ~/ground_truth_poses (geometry_msgs/PoseArray, latched:
the exact poses of the frames, for evaluation). All frames share a stamp per tick.
"""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import PoseArray
from nav_msgs.msg import Odometry
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from ..sim import tabletop as synthetic
from . import convert
from .params import ParamSpec, ParameterTable

PARAMS = [
    ParamSpec("width", 640, "Image width (px).", 32, 4096, read_only=True),
    ParamSpec("height", 480, "Image height (px).", 24, 4096, read_only=True),
    ParamSpec("num_frames", 5, "Frames along the camera arc.", 2, 200, read_only=True),
    ParamSpec("seed", 0, "Scene / trajectory / drift seed.", 0, 2**31 - 1, read_only=True),
    ParamSpec("num_objects", 5, "Objects on the table.", 0, 12, read_only=True),
    ParamSpec("rate_hz", 4.0, "Publishing rate (frames per second).", 0.1, 120.0),
    ParamSpec("loop", False, "Start over after the last frame (otherwise stop publishing)."),
    ParamSpec("start_delay_s", 0.5, "Wait before the first frame so subscribers can connect (s).", 0.0, 60.0),
    ParamSpec("depth_encoding", "32FC1", "Depth image encoding.", choices=("32FC1", "16UC1")),
    ParamSpec("frame_id", "camera_color_optical_frame", "Camera optical frame."),
    ParamSpec("world_frame", "map", "Frame of the odometry poses."),
    ParamSpec("publish_odom", True, "Publish camera poses on odom."),
    ParamSpec("drift.trans_sigma", 0.005, "Odometry drift: translation noise per step (m).", 0.0, 1.0),
    ParamSpec("drift.rot_sigma_deg", 0.3, "Odometry drift: rotation noise per step (deg).", 0.0, 45.0),
]


class CameraSimNode(Node):
    def __init__(self, **kwargs):
        super().__init__("camera_sim_node", **kwargs)
        self.params = p = ParameterTable(self, PARAMS)
        self.seq = synthetic.render_sequence(n_views=p["num_frames"], width=p["width"], height=p["height"],
                                             seed=p["seed"], num_objects=p["num_objects"])
        self.odom = synthetic.add_odometry_drift(self.seq.poses, seed=p["seed"] + 1,
                                                 trans_sigma=p["drift.trans_sigma"],
                                                 rot_sigma_deg=p["drift.rot_sigma_deg"])
        self.image_pub = self.create_publisher(Image, "image", convert.SENSOR_QOS)
        self.depth_pub = self.create_publisher(Image, "depth", convert.SENSOR_QOS)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", convert.SENSOR_QOS)
        self.odom_pub = self.create_publisher(Odometry, "odom", 50)
        self.gt_pub = self.create_publisher(PoseArray, "~/ground_truth_poses", convert.LATCHED_QOS)
        self.gt_pub.publish(convert.poses_to_pose_array(self.seq.poses, p["world_frame"],
                                                        self.get_clock().now().to_msg()))
        self.index = 0
        self.published_stamps = []
        self.done = False
        self._start = self.create_timer(p["start_delay_s"] or 1e-3, self._begin)
        self.get_logger().info(f"camera_sim_node: {p['num_frames']} frames {p['width']}x{p['height']} "
                               f"at {p['rate_hz']} Hz, objects {self.seq.scene.object_ids}")

    def _begin(self):
        self._start.cancel()
        self.create_timer(1.0 / self.params["rate_hz"], self._tick)

    def _tick(self):
        p = self.params
        if self.index >= self.seq.num_views:
            if not p["loop"]:
                self.done = True
                return
            self.index = 0
        i = self.index
        self.index += 1
        stamp = self.get_clock().now().to_msg()
        frame = p["frame_id"]
        depth = self.seq.depth[i]
        if p["depth_encoding"] == "16UC1":
            depth = np.round(depth * 1000.0).clip(0, 65535).astype(np.uint16)
        self.info_pub.publish(convert.make_camera_info(self.seq.K, p["width"], p["height"], stamp, frame))
        self.depth_pub.publish(convert.array_to_image(depth, p["depth_encoding"], stamp, frame))
        if p["publish_odom"]:
            od = Odometry(header=convert.make_header(p["world_frame"], stamp), child_frame_id=frame)
            od.pose.pose = convert.matrix_to_pose(self.odom[i])
            self.odom_pub.publish(od)
        self.image_pub.publish(convert.array_to_image(self.seq.rgb[i], "rgb8", stamp, frame))
        self.published_stamps.append(convert.stamp_to_sec(stamp))


def main(args=None):
    from .spin import spin_node
    spin_node(CameraSimNode, args)


if __name__ == "__main__":
    main()
