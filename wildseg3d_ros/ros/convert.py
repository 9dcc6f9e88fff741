"""Message <-> numpy conversions (the small numpy equivalents of cv_bridge, sensor_msgs_py's
point_cloud2 and tf2 pose helpers). The decoding itself lives in the ROS-free core
(core.image_codec, core.cloud); this module only moves fields in and out of messages."""
from __future__ import annotations

import array
import re
from typing import Optional, Sequence, Tuple

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseArray, Quaternion
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from ..core.output import cloud as corecloud
from ..core.camera import image_codec
from ..core.geometry import pose_from_xyz_quat, rot_to_quat_xyzw

# ----------------------------------------------------------------------------------------- QoS

#: camera streams: best effort, keep last 5 (rclpy's sensor-data profile)
SENSOR_QOS = qos_profile_sensor_data
#: camera streams when `input.reliable` is set: reliable, keep last 10 (large frames across processes;
#: keep last 2 lost 13 of 60 colour frames of a 30 Hz 640x480 stream to history overwrites while the
#: executor was busy deserialising, benchmarks/bench_camera_input.py)
RELIABLE_CAMERA_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE)
#: latched results (scene, object clouds, poses): reliable + transient local, last message kept
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: prompts: reliable, volatile, small queue
PROMPT_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
#: services: reliable, a request queue deep enough for a storm of concurrent calls (rclpy's
#: default keeps 10: with 20 concurrent ~/reconstruct calls half never got a reply)
SERVICE_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)

# ----------------------------------------------------------------------------------------- time


def stamp_to_sec(stamp) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> Time:
    t = max(0.0, float(t))
    sec = int(np.floor(t))
    return Time(sec=sec, nanosec=min(int(round((t - sec) * 1e9)), 999_999_999))


def make_header(frame_id: str, stamp) -> Header:
    if not isinstance(stamp, Time):
        stamp = sec_to_stamp(stamp)
    return Header(frame_id=frame_id, stamp=stamp)

# --------------------------------------------------------------------------------------- images


def image_to_array(msg: Image, max_pixels: Optional[int] = None) -> np.ndarray:
    """Colour Image -> H x W x 3 uint8 RGB (rgb8, bgr8, rgba8, bgra8, mono8)."""
    return image_codec.decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                    msg.is_bigendian, max_pixels)


def depth_to_array(msg: Image, max_pixels: Optional[int] = None):
    """Depth Image (16UC1 mm / 32FC1 m) -> (H x W float32 metres with 0 = invalid, stats)."""
    return image_codec.decode_depth(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                    msg.is_bigendian, max_pixels)


def compressed_to_array(msg: CompressedImage, max_pixels: Optional[int] = None) -> np.ndarray:
    return image_codec.decode_compressed(msg.format, msg.data, max_pixels=max_pixels)


def array_to_image(arr: np.ndarray, encoding: str, stamp, frame_id: str) -> Image:
    enc, h, w, step, data = image_codec.encode_image(arr, encoding)
    msg = Image(header=make_header(frame_id, stamp), height=h, width=w, encoding=enc,
                is_bigendian=0, step=step)
    msg.data = data
    return msg


def camera_info_to_K(msg: CameraInfo) -> np.ndarray:
    """3x3 intrinsics from CameraInfo.k, validated (zero / non-finite focal -> ImageDecodeError)."""
    return image_codec.validate_camera_info(np.asarray(msg.k, dtype=np.float64), msg.width, msg.height)


def make_camera_info(K: np.ndarray, width: int, height: int, stamp, frame_id: str) -> CameraInfo:
    K = np.asarray(K, dtype=np.float64)
    P = np.zeros((3, 4))
    P[:3, :3] = K
    return CameraInfo(header=make_header(frame_id, stamp), width=int(width), height=int(height),
                      distortion_model="plumb_bob", d=[0.0] * 5, k=K.reshape(-1).tolist(),
                      r=np.eye(3).reshape(-1).tolist(), p=P.reshape(-1).tolist())

# ---------------------------------------------------------------------------------------- poses


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """geometry_msgs/Pose -> 4x4 (raises ValueError on a zero / non-finite quaternion)."""
    p, q = pose.position, pose.orientation
    xyz = np.array([p.x, p.y, p.z], dtype=np.float64)
    if not np.isfinite(xyz).all():
        raise ValueError("pose position is not finite")
    return pose_from_xyz_quat(xyz, [q.x, q.y, q.z, q.w])


def matrix_to_pose(T: np.ndarray) -> Pose:
    q = rot_to_quat_xyzw(np.asarray(T)[:3, :3])
    t = np.asarray(T)[:3, 3]
    return Pose(position=Point(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def poses_to_pose_array(poses: np.ndarray, frame_id: str, stamp) -> PoseArray:
    return PoseArray(header=make_header(frame_id, stamp), poses=[matrix_to_pose(T) for T in poses])

# ---------------------------------------------------------------------------------- point clouds


def struct_to_cloud(arr: np.ndarray, frame_id: str, stamp, height: Optional[int] = None,
                    width: Optional[int] = None) -> PointCloud2:
    """Structured numpy array (core.cloud layouts) -> PointCloud2 (little-endian)."""
    lay = corecloud.cloud_layout(arr, height, width)
    msg = PointCloud2(header=make_header(frame_id, stamp), height=lay.height, width=lay.width,
                      is_bigendian=False, point_step=lay.point_step, row_step=lay.row_step,
                      is_dense=lay.is_dense)
    msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                  for f in lay.fields]
    buf = array.array("B")
    buf.frombytes(corecloud.cloud_to_bytes(arr))
    msg.data = buf
    return msg


def cloud_to_struct(msg: PointCloud2) -> np.ndarray:
    """PointCloud2 -> structured array of shape (height, width); raises core.cloud.CloudError."""
    return corecloud.cloud_from_bytes(msg.data, msg.fields, msg.point_step, msg.height, msg.width,
                                      msg.is_bigendian, row_step=msg.row_step)

# -------------------------------------------------------------------------------------- markers


_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]],
                    dtype=np.float64) / 255.0


def label_color(label: int) -> Tuple[float, float, float]:
    c = _PALETTE[(int(label) - 1) % len(_PALETTE)]
    return float(c[0]), float(c[1]), float(c[2])


def bbox_markers(objects: Sequence[Tuple[int, np.ndarray]], frame_id: str, stamp,
                 ns: str = "wildseg3d") -> MarkerArray:
    """One axis-aligned bounding box (LINE_LIST) and a text label per (label, points) object.
    Starts with a DELETEALL so boxes of objects that disappeared are removed in rviz2."""
    header = make_header(frame_id, stamp)
    out = MarkerArray(markers=[Marker(header=header, ns=ns, action=Marker.DELETEALL)])
    # the 12 edges of a box as corner index pairs (corners in binary xyz order)
    edges = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [0, 2], [1, 3], [4, 6], [5, 7],
                      [0, 4], [1, 5], [2, 6], [3, 7]])
    bits = ((np.arange(8)[:, None] >> np.array([0, 1, 2])) & 1).astype(bool)
    for label, pts in objects:
        pts = np.asarray(pts)
        if len(pts) == 0:
            continue
        lo, hi = np.nanmin(pts, axis=0), np.nanmax(pts, axis=0)
        corners = np.where(bits, hi, lo)
        r, g, b = label_color(label)
        m = Marker(header=header, ns=ns, id=int(label) * 2, type=Marker.LINE_LIST, action=Marker.ADD)
        m.pose.orientation.w = 1.0
        m.scale.x = 0.005
        m.color = ColorRGBA(r=r, g=g, b=b, a=1.0)
        m.points = [Point(x=float(c[0]), y=float(c[1]), z=float(c[2])) for c in corners[edges.reshape(-1)]]
        t = Marker(header=header, ns=ns, id=int(label) * 2 + 1, type=Marker.TEXT_VIEW_FACING,
                   action=Marker.ADD, text=f"object {int(label)} ({len(pts)} pts)")
        t.pose.position = Point(x=float((lo[0] + hi[0]) / 2), y=float((lo[1] + hi[1]) / 2), z=float(hi[2] + 0.03))
        t.pose.orientation.w = 1.0
        t.scale.z = 0.04
        t.color = ColorRGBA(r=r, g=g, b=b, a=1.0)
        out.markers += [m, t]
    return out

# --------------------------------------------------------------------------------- pixel prompts


_KEYFRAME_RE = re.compile(r"^(?:.*/)?keyframe_(\d+)$")


def parse_keyframe_frame(frame_id: str) -> int:
    """Pixel prompts name their keyframe in header.frame_id as ``keyframe_<i>`` (any namespace
    prefix ending in '/' is allowed); point.x = u (column), point.y = v (row) in pixels.
    Raises ValueError with the expected form otherwise."""
    m = _KEYFRAME_RE.match(frame_id.strip())
    if not m:
        raise ValueError(f"pixel prompt frame_id {frame_id!r} does not name a keyframe: "
                         "use header.frame_id = 'keyframe_<index>' and point.x/.y = pixel column/row")
    return int(m.group(1))
