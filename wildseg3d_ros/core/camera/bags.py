"""rosbag2 files (sqlite3 and mcap) of camera streams (ROS-free: the ``rosbags`` library serialises/deserialises CDR itself, no rclpy needed).

Writing (:func:`write_bag`): a sequence of frames -> one rosbag2 folder with

* ``sensor_msgs/Image`` (rgb8, bgr8, rgba8, bgra8, mono8, optional row padding) or
  ``sensor_msgs/CompressedImage`` (jpeg / png) colour,
* optional depth ``sensor_msgs/Image`` (16UC1 millimetres or 32FC1 metres),
* ``sensor_msgs/CameraInfo`` with every frame,
* optional camera poses as ``geometry_msgs/PoseStamped`` and/or ``nav_msgs/Odometry``
  (camera-to-world, in ``world_frame``),

all stamped with the given stamps (header stamps and bag log times are identical; within one
frame the order is camera_info, depth, poses, colour, so a subscriber that receives the colour
image already has its partners).

Reading (:func:`read_bag`) yields :class:`BagMessage` tuples ``(topic, stamp, value, msgtype,
log_time_ns, msg, raw)`` where ``value`` is the message decoded to numpy with the same decoders
as the ROS node (:mod:`.image_codec`): colour -> H x W x 3 uint8 RGB, depth -> H x W float32
metres, CameraInfo -> :class:`CameraIntrinsics`, PoseStamped / Odometry -> 4x4 camera-to-world;
``msg`` is rosbags' deserialised message and ``raw`` the CDR bytes (what ``ros2 bag play``
publishes). Message types are taken from rosbags' typestore of ROS 2 Humble, Jazzy or Kilted
(``distro``); the types used here are identical in the three.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import cv2
import numpy as np

from . import image_codec
from ..errors import InputError
from ..geometry import pose_from_xyz_quat, rot_to_quat_xyzw

__all__ = ["CameraIntrinsics", "BagMessage", "BagTopics", "write_bag", "read_bag", "bag_info",
           "typestore_for", "STORAGES", "DISTROS"]

STORAGES = ("sqlite3", "mcap")
DISTROS = ("humble", "jazzy", "kilted")
IMAGE_T = "sensor_msgs/msg/Image"
COMPRESSED_T = "sensor_msgs/msg/CompressedImage"
INFO_T = "sensor_msgs/msg/CameraInfo"
POSE_T = "geometry_msgs/msg/PoseStamped"
ODOM_T = "nav_msgs/msg/Odometry"


# ---------------------------------------------------------------------------------------------
# rosbag2 writing
# ---------------------------------------------------------------------------------------------
def typestore_for(distro: str = "kilted"):
    """rosbags typestore of a ROS 2 distribution (humble | jazzy | kilted)."""
    from rosbags.typesys import Stores, get_typestore

    d = str(distro).lower()
    if d not in DISTROS:
        raise ValueError(f"unknown ROS 2 distro {distro!r} (one of {DISTROS})")
    return get_typestore(getattr(Stores, f"ROS2_{d.upper()}"))


@dataclass
class BagTopics:
    """Topic names written by :func:`write_bag` (relative names resolve to ``/name``)."""

    image: str = "/camera/image"
    compressed: str = "/camera/image/compressed"
    depth: str = "/camera/depth"
    camera_info: str = "/camera/camera_info"
    pose: str = "/camera/pose"
    odom: str = "/odom"


class _Msgs:
    """rosbags message constructors of one typestore."""

    def __init__(self, ts):
        T = ts.types
        self.ts = ts
        self.Time = T["builtin_interfaces/msg/Time"]
        self.Header = T["std_msgs/msg/Header"]
        self.Image = T[IMAGE_T]
        self.Compressed = T[COMPRESSED_T]
        self.Info = T[INFO_T]
        self.ROI = T["sensor_msgs/msg/RegionOfInterest"]
        self.Pose = T["geometry_msgs/msg/Pose"]
        self.Point = T["geometry_msgs/msg/Point"]
        self.Quat = T["geometry_msgs/msg/Quaternion"]
        self.PoseStamped = T[POSE_T]
        self.PoseCov = T["geometry_msgs/msg/PoseWithCovariance"]
        self.TwistCov = T["geometry_msgs/msg/TwistWithCovariance"]
        self.Twist = T["geometry_msgs/msg/Twist"]
        self.Vec3 = T["geometry_msgs/msg/Vector3"]
        self.Odom = T[ODOM_T]

    def header(self, stamp_ns: int, frame_id: str):
        return self.Header(stamp=self.Time(sec=int(stamp_ns // 1_000_000_000),
                                           nanosec=int(stamp_ns % 1_000_000_000)), frame_id=frame_id)

    def image(self, arr, encoding, stamp_ns, frame_id, step=None):
        enc, h, w, s, data = image_codec.encode_image(arr, encoding, step=step)
        return self.Image(header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=enc,
                          is_bigendian=0, step=s, data=np.frombuffer(data, np.uint8))

    def compressed(self, rgb, fmt, stamp_ns, frame_id, quality):
        data = image_codec.encode_compressed(rgb, fmt, quality=quality)
        f = "jpeg" if fmt.lower() in ("jpg", "jpeg") else "png"
        return self.Compressed(header=self.header(stamp_ns, frame_id),
                               format=f"rgb8; {f} compressed bgr8", data=np.frombuffer(data, np.uint8))

    def info(self, K, w, h, stamp_ns, frame_id):
        P = np.zeros((3, 4))
        P[:3, :3] = K
        return self.Info(header=self.header(stamp_ns, frame_id), height=int(h), width=int(w),
                         distortion_model="plumb_bob", d=np.zeros(5), k=np.asarray(K, np.float64).reshape(9),
                         r=np.eye(3).reshape(9), p=P.reshape(12), binning_x=0, binning_y=0,
                         roi=self.ROI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))

    def pose(self, T):
        q = rot_to_quat_xyzw(np.asarray(T)[:3, :3])
        t = np.asarray(T, np.float64)[:3, 3]
        return self.Pose(position=self.Point(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                         orientation=self.Quat(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))

    def pose_stamped(self, T, stamp_ns, world_frame):
        return self.PoseStamped(header=self.header(stamp_ns, world_frame), pose=self.pose(T))

    def odom(self, T, stamp_ns, world_frame, child_frame):
        zero = self.Vec3(x=0.0, y=0.0, z=0.0)
        return self.Odom(header=self.header(stamp_ns, world_frame), child_frame_id=child_frame,
                         pose=self.PoseCov(pose=self.pose(T), covariance=np.zeros(36)),
                         twist=self.TwistCov(twist=self.Twist(linear=zero, angular=zero),
                                             covariance=np.zeros(36)))


def write_bag(path: Union[str, Path], rgb: Sequence[np.ndarray], stamps: Sequence[float], K: np.ndarray,
              depth: Optional[Sequence[np.ndarray]] = None, poses: Optional[np.ndarray] = None, *,
              storage: str = "sqlite3", image_format: str = "rgb8", depth_encoding: str = "16UC1",
              pose_msgs: Iterable[str] = ("pose",), topics: Optional[BagTopics] = None,
              frame_id: str = "camera", world_frame: str = "map", distro: str = "kilted",
              row_padding: int = 0, jpeg_quality: int = 90, info_lead_s: float = 0.0) -> Dict[str, int]:
    """Write frames to a new rosbag2 folder ``path`` (must not exist); returns message counts
    per topic.

    rgb: V arrays H x W x 3 uint8 RGB; stamps: V increasing seconds; K: 3x3 (one camera);
    depth: V arrays H x W float32 metres (0 = invalid) or None; poses: V x 4 x 4 camera-to-world
    or None. storage: 'sqlite3' | 'mcap'. image_format: a colour encoding (rgb8, bgr8, rgba8,
    bgra8, mono8 -- mono8 stores the grey of the RGB) or 'jpeg' / 'png' (CompressedImage on
    ``topics.compressed``). depth_encoding: '16UC1' (mm) | '32FC1' (m). pose_msgs: any of
    'pose' (PoseStamped) and 'odom' (Odometry, child_frame_id = frame_id). row_padding: extra
    bytes per row of raw images (``step > width * bpp``). info_lead_s > 0 also writes a
    CameraInfo and the first pose(s) that long before the first frame (as a driver that
    publishes camera_info continuously would), so a player's subscriber knows the intrinsics
    before the first image arrives.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    storage = str(storage).lower()
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    V = len(rgb)
    st = np.asarray(stamps, dtype=np.float64)
    if st.shape != (V,) or V == 0:
        raise ValueError(f"need one stamp per frame ({V} frames, stamps shape {st.shape})")
    if np.any(np.diff(st) <= 0) or st[0] < 0:
        raise ValueError("stamps must be non-negative and strictly increasing")
    if depth is not None and len(depth) != V:
        raise ValueError(f"{len(depth)} depth images for {V} frames")
    if poses is not None and len(poses) != V:
        raise ValueError(f"{len(poses)} poses for {V} frames")
    pose_msgs = tuple(pose_msgs) if poses is not None else ()
    for m in pose_msgs:
        if m not in ("pose", "odom"):
            raise ValueError(f"pose_msgs entries are 'pose' or 'odom', got {m!r}")
    fmt = str(image_format).lower()
    compressed = fmt in ("jpeg", "jpg", "png")
    if not compressed:
        image_codec.bytes_per_pixel(fmt)  # raises on an unknown encoding
    topics = topics or BagTopics()
    M = _Msgs(typestore_for(distro))
    ts = M.ts
    ns = np.rint(st * 1e9).astype(np.int64)

    counts: Dict[str, int] = {}
    with Writer(Path(path), version=9, storage_plugin=getattr(StoragePlugin, storage.upper())) as w:
        conns = {"camera_info": w.add_connection(topics.camera_info, INFO_T, typestore=ts)}
        if depth is not None:
            conns["depth"] = w.add_connection(topics.depth, IMAGE_T, typestore=ts)
        if "pose" in pose_msgs:
            conns["pose"] = w.add_connection(topics.pose, POSE_T, typestore=ts)
        if "odom" in pose_msgs:
            conns["odom"] = w.add_connection(topics.odom, ODOM_T, typestore=ts)
        conns["image"] = w.add_connection(topics.compressed if compressed else topics.image,
                                          COMPRESSED_T if compressed else IMAGE_T, typestore=ts)

        def put(key, msg, typ, t):
            w.write(conns[key], int(t), bytes(ts.serialize_cdr(msg, typ)))
            counts[conns[key].topic] = counts.get(conns[key].topic, 0) + 1

        if info_lead_s > 0:
            t = int(ns[0] - round(info_lead_s * 1e9))
            if t < 0:
                raise ValueError("info_lead_s is larger than the first stamp")
            h, wd = np.asarray(rgb[0]).shape[:2]
            put("camera_info", M.info(K, wd, h, t, frame_id), INFO_T, t)
            if "pose" in pose_msgs:
                put("pose", M.pose_stamped(poses[0], t, world_frame), POSE_T, t)
            if "odom" in pose_msgs:
                put("odom", M.odom(poses[0], t, world_frame, frame_id), ODOM_T, t)
        for v in range(V):
            im = np.asarray(rgb[v])
            h, wd = im.shape[:2]
            t = ns[v]
            put("camera_info", M.info(K, wd, h, t, frame_id), INFO_T, t)
            if depth is not None:
                d = np.asarray(depth[v], np.float32)
                step = None
                if row_padding:
                    step = d.shape[1] * image_codec.bytes_per_pixel(depth_encoding) + int(row_padding)
                put("depth", M.image(d, depth_encoding, t, frame_id, step), IMAGE_T, t)
            if "pose" in pose_msgs:
                put("pose", M.pose_stamped(poses[v], t, world_frame), POSE_T, t)
            if "odom" in pose_msgs:
                put("odom", M.odom(poses[v], t, world_frame, frame_id), ODOM_T, t)
            if compressed:
                put("image", M.compressed(im, fmt, t, frame_id, jpeg_quality), COMPRESSED_T, t)
            else:
                src = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) if fmt == "mono8" else im
                step = None
                if row_padding:
                    step = wd * image_codec.bytes_per_pixel(fmt) + int(row_padding)
                put("image", M.image(src, fmt, t, frame_id, step), IMAGE_T, t)
    return counts


# ---------------------------------------------------------------------------------------------
# rosbag2 reading
# ---------------------------------------------------------------------------------------------
class CameraIntrinsics(NamedTuple):
    K: np.ndarray
    width: int
    height: int
    distortion_model: str
    D: np.ndarray


class BagMessage(NamedTuple):
    topic: str
    stamp: float            # header stamp (s); the log time when the message has no header
    value: object           # numpy decoding (see the module docstring); None for other types
    msgtype: str
    log_time_ns: int
    msg: object             # rosbags' deserialised message
    raw: bytes              # CDR bytes as stored


def message_stamp(msg, log_ns: int) -> float:
    """Header stamp (s) of a deserialised message; its log time when it has no (or a zero) stamp."""
    try:
        t = float(msg.header.stamp.sec) + 1e-9 * float(msg.header.stamp.nanosec)
        if t > 0:
            return t
    except AttributeError:
        pass
    return log_ns * 1e-9


def _pose_matrix(p) -> np.ndarray:
    return pose_from_xyz_quat([p.position.x, p.position.y, p.position.z],
                              [p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w])


def pose_of_message(msg) -> Optional[np.ndarray]:
    """Camera-to-world 4x4 of a PoseStamped / Odometry / PoseWithCovarianceStamped, or None when
    it is not a valid pose (zero or non-finite quaternion)."""
    p = msg.pose
    if hasattr(p, "pose"):  # Odometry / PoseWithCovarianceStamped
        p = p.pose
    try:
        T = _pose_matrix(p)
    except ValueError:
        return None
    return T if np.isfinite(T).all() else None


def decode_colour(msgtype: str, msg, max_pixels: Optional[int] = None) -> np.ndarray:
    """H x W x 3 uint8 RGB of an Image / CompressedImage (ValueError for a non-colour image)."""
    if msgtype == COMPRESSED_T:
        out = image_codec.decode_compressed(msg.format, msg.data, max_pixels=max_pixels)
    else:
        out = image_codec.decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                       msg.is_bigendian, max_pixels=max_pixels)
    if out.ndim != 3:
        raise ValueError(f"carries {getattr(msg, 'encoding', getattr(msg, 'format', '?'))!r} (not colour)")
    return out


def decode_depth_message(msgtype: str, msg, max_pixels: Optional[int] = None) -> np.ndarray:
    """H x W float32 metres of a depth Image (16UC1 mm, 32FC1 m) or compressedDepth message."""
    if msgtype == COMPRESSED_T:
        d = image_codec.decode_compressed(msg.format, msg.data, max_pixels=max_pixels)
        if d.ndim != 2:
            raise ValueError(f"carries a colour image ({msg.format!r}), not depth")
        return d
    return image_codec.decode_depth(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                    msg.is_bigendian, max_pixels)[0]


def decode_message(msgtype: str, msg, max_pixels: Optional[int] = None):
    """numpy value of a deserialised rosbags message (see the module docstring)."""
    if msgtype == IMAGE_T:
        enc = msg.encoding.strip().lower()
        if enc in ("16uc1", "mono16", "32fc1"):
            d, _stats = image_codec.decode_depth(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                                 msg.is_bigendian, max_pixels)
            return d
        return image_codec.decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                        msg.is_bigendian, max_pixels)
    if msgtype == COMPRESSED_T:
        return image_codec.decode_compressed(msg.format, msg.data, max_pixels=max_pixels)
    if msgtype == INFO_T:
        return CameraIntrinsics(np.asarray(msg.k, np.float64).reshape(3, 3), int(msg.width), int(msg.height),
                                str(msg.distortion_model), np.asarray(msg.d, np.float64))
    if msgtype in (POSE_T, ODOM_T):
        return pose_of_message(msg)
    return None


def open_bag(path):
    """(reader, close) for a rosbag2 folder (``metadata.yaml``), a folder holding one .mcap/.db3
    file, or a single .mcap/.db3 file; the reader has ``.connections`` and
    ``.messages(connections=...)`` (rosbags). InputError when it is none of these."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if path.is_dir():
        if (path / "metadata.yaml").exists():
            r = Reader(path)
            r.open()
            return r, r.close
        files = sorted(list(path.glob("*.mcap")) + list(path.glob("*.db3")))
        if len(files) != 1:
            raise InputError(f"{path} has no metadata.yaml and {len(files)} .mcap/.db3 files: "
                             "pass the bag folder of a rosbag2 recording or a single .mcap/.db3 file")
        path = files[0]
    suffix = path.suffix.lower()
    if suffix == ".mcap":
        from rosbags.rosbag2.storage_mcap import McapReader as Storage
    elif suffix == ".db3":
        from rosbags.rosbag2.storage_sqlite3 import Sqlite3Reader as Storage
    else:
        raise InputError(f"{path}: not a rosbag2 storage file (.mcap or .db3)")
    s = Storage(path)
    s.open()
    if hasattr(s, "read_index") and not getattr(s, "connections", None):
        s.read_index()
    return s, s.close


def bag_info(path) -> Dict[str, object]:
    """Storage, duration (s), message count and {topic: (msgtype, count)} of a rosbag2 folder."""
    from rosbags.rosbag2 import Reader

    with Reader(Path(path)) as r:
        files = [p.suffix for p in Path(path).iterdir()]
        storage = "mcap" if ".mcap" in files else "sqlite3" if ".db3" in files else "?"
        return {"storage": storage, "duration_s": r.duration * 1e-9, "message_count": r.message_count,
                "start_ns": r.start_time,
                "topics": {t: (i.msgtype, i.msgcount) for t, i in r.topics.items()}}


def read_bag(path, topics: Optional[Iterable[str]] = None, distro: str = "kilted", decode: bool = True,
             max_pixels: Optional[int] = None) -> Iterator[BagMessage]:
    """Messages of a rosbag2 folder (sqlite3 or mcap) in log-time order as :class:`BagMessage`.

    topics: restrict to these topic names (None: all). decode=False leaves ``value`` None (no
    image decoding; the player uses ``raw``). Message types not in the typestore are
    registered from the definitions stored in the bag."""
    ts = typestore_for(distro)
    r, close = open_bag(path)
    try:
        conns = [c for c in r.connections if topics is None or c.topic in set(topics)]
        for c in conns:
            if c.msgtype not in ts.types and c.msgdef and c.msgdef.data:
                from rosbags.typesys import get_types_from_msg

                try:
                    ts.register(get_types_from_msg(c.msgdef.data, c.msgtype))
                except Exception:  # noqa: BLE001 - IDL or odd definitions: leave undecoded
                    pass
        if not conns:
            return
        for c, t_ns, raw in r.messages(connections=conns):
            if c.msgtype not in ts.types:
                yield BagMessage(c.topic, t_ns * 1e-9, None, c.msgtype, int(t_ns), None, bytes(raw))
                continue
            msg = ts.deserialize_cdr(raw, c.msgtype)
            value = decode_message(c.msgtype, msg, max_pixels) if decode else None
            yield BagMessage(c.topic, message_stamp(msg, t_ns), value, c.msgtype, int(t_ns), msg, bytes(raw))
    finally:
        close()
