"""Frame sources of the offline tool: image folders, videos and rosbag2 recordings (ROS-free).

A :class:`Source` counts its frames (after ``every`` sampling) and yields :class:`Frame` objects
(RGB, optional K, metric depth and camera-to-world pose) for chosen positions, in order:

* :class:`ImageFolderSource`: sorted image files, or ``color/`` (``rgb/``, ``images/``) + ``depth/``
  sub-folders; depth paired by file stem or by order (integer depth x ``depth_scale``); an
  optional pose file (``tx ty tz qx qy qz qw`` or TUM lines, camera-to-world).
* :class:`VideoSource`: any video OpenCV decodes.
* :class:`BagSource`: rosbag2 (sqlite3 / mcap) through :mod:`.bags`; topics found by type when not
  given; two passes (stamps, camera info and poses first; then only the selected colour / depth
  messages are decoded); depth matched to each colour frame and poses interpolated at its stamp
  by the same rules as the live node (:mod:`.pairing`). A pose topic must give the camera optical frame's pose in a world frame (there is
  no TF lookup offline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, ProgressFn, report
from ..geometry import pose_from_xyz_quat
from . import bags
from .pairing import POSE_NONE, interpolate_poses, match_stamps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
DEPTH_EXTS = (".png", ".pgm", ".tif", ".tiff", ".exr", ".npy")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".wmv")
COLOR_SUBDIRS = ("color", "rgb", "image", "images")
DEPTH_SUBDIRS = ("depth",)

T_IMAGE = ("sensor_msgs/msg/Image",)
T_COMPRESSED = ("sensor_msgs/msg/CompressedImage",)
T_INFO = ("sensor_msgs/msg/CameraInfo",)
T_POSE = ("geometry_msgs/msg/PoseStamped", "nav_msgs/msg/Odometry",
          "geometry_msgs/msg/PoseWithCovarianceStamped")




@dataclass
class Frame:
    """One decoded input frame (``index``: position in the source, before sampling)."""

    index: int
    stamp: float
    rgb: np.ndarray
    K: Optional[np.ndarray] = None
    depth: Optional[np.ndarray] = None
    pose: Optional[np.ndarray] = None
    frame_id: str = "camera"
    K_known: bool = True   # False when K was guessed (no intrinsics given)



def K_from(intr: Sequence[float]) -> np.ndarray:
    fx, fy, cx, cy = intr
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], np.float64)


def guess_K(width: int, height: int, hfov_deg: float = 60.0) -> np.ndarray:
    f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], np.float64)


def load_pose_file(path: Path) -> List[np.ndarray]:
    """Poses, one per line: ``tx ty tz qx qy qz qw`` or ``stamp tx ty tz qx qy qz qw`` (TUM),
    camera-to-world; ``#`` comments and blank lines skipped."""
    poses = []
    for ln in Path(path).read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if not ln:
            continue
        vals = [float(x) for x in ln.replace(",", " ").split()]
        if len(vals) == 8:
            vals = vals[1:]
        if len(vals) != 7:
            raise InputError(f"{path}: pose lines must hold 7 (tx ty tz qx qy qz qw) or 8 (TUM) numbers, "
                             f"got {len(vals)}: {ln!r}")
        poses.append(pose_from_xyz_quat(vals[:3], vals[3:]))
    return poses


def read_depth_file(path: Path, depth_scale: float) -> np.ndarray:
    """Depth image -> float32 metres, 0 = invalid. Integer images are multiplied by
    ``depth_scale`` (default 0.001: millimetres); float images / .npy are metres."""
    import cv2

    if path.suffix.lower() == ".npy":
        d = np.load(path).astype(np.float32)
    else:
        d = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if d is None:
            raise InputError(f"cannot read depth image {path}")
        if d.ndim == 3:
            d = d[..., 0]
        d = d.astype(np.float32) * (1.0 if np.issubdtype(d.dtype, np.floating) else float(depth_scale))
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def read_rgb_file(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"cannot read image {path}")
    return np.ascontiguousarray(img[..., ::-1])


class Source:
    """A frame source: ``count()`` (frames after ``every`` sampling) and ``frames(positions)``
    yielding :class:`Frame` for those positions (all when None), in order."""

    kind = "?"
    has_depth = False

    def count(self) -> int:
        raise NotImplementedError

    def frames(self, positions: Optional[Sequence[int]] = None) -> Iterator[Frame]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


class ImageFolderSource(Source):
    kind = "image_folder"

    def __init__(self, path: Path, depth_dir: Optional[Path], poses: Optional[Path],
                 intrinsics: Optional[Sequence[float]], depth_scale: float, every: int, fps: float):
        path = Path(path)
        color = path
        for sub in COLOR_SUBDIRS:
            if (path / sub).is_dir():
                color = path / sub
                break
        self.images = sorted(p for p in color.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if depth_dir is None:
            for sub in DEPTH_SUBDIRS:
                if (path / sub).is_dir() and (path / sub) != color:
                    depth_dir = path / sub
                    break
        if not self.images:
            raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) in {color}")
        self.depths: Optional[List[Path]] = None
        if depth_dir is not None:
            dfiles = sorted(p for p in Path(depth_dir).iterdir() if p.suffix.lower() in DEPTH_EXTS and p.is_file())
            by_stem = {p.stem: p for p in dfiles}
            if all(p.stem in by_stem for p in self.images):
                self.depths = [by_stem[p.stem] for p in self.images]
            elif len(dfiles) == len(self.images):
                self.depths = dfiles
            else:
                raise InputError(f"depth folder {depth_dir} holds {len(dfiles)} files for {len(self.images)} "
                                 "images and their names do not match: pair them by name or by count")
        self.has_depth = self.depths is not None
        self.poses = load_pose_file(poses) if poses else None
        if self.poses is not None and len(self.poses) != len(self.images):
            raise InputError(f"{poses}: {len(self.poses)} poses for {len(self.images)} images")
        self.intrinsics = intrinsics
        self.depth_scale = float(depth_scale)
        self.every = max(1, int(every))
        self.fps = float(fps)
        self.color_dir, self.depth_dir = color, depth_dir

    def _indices(self):
        return list(range(0, len(self.images), self.every))

    def count(self) -> int:
        return len(self._indices())

    def frames(self, positions=None):
        idx = self._indices()
        sel = idx if positions is None else [idx[p] for p in positions]
        for i in sel:
            rgb = read_rgb_file(self.images[i])
            h, w = rgb.shape[:2]
            K = K_from(self.intrinsics) if self.intrinsics else None
            depth = read_depth_file(self.depths[i], self.depth_scale) if self.depths else None
            if depth is not None and depth.shape != (h, w):
                raise InputError(f"depth {self.depths[i].name} is {depth.shape[1]}x{depth.shape[0]}, "
                                 f"image {self.images[i].name} is {w}x{h}")
            yield Frame(i, i / self.fps, rgb, K, depth, None if self.poses is None else self.poses[i])

    def describe(self):
        return {"kind": self.kind, "images": len(self.images), "color_dir": str(self.color_dir),
                "depth_dir": None if self.depth_dir is None else str(self.depth_dir),
                "poses": self.poses is not None}


class VideoSource(Source):
    kind = "video"

    def __init__(self, path: Path, intrinsics, every: int):
        import cv2

        self.path = Path(path)
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise InputError(f"OpenCV cannot open the video {self.path} (codec missing?)")
        self.n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0
        cap.release()
        if self.n <= 0:  # some containers do not report a count: count by decoding
            self.n = sum(1 for _ in self._raw())
        self.intrinsics = intrinsics
        self.every = max(1, int(every))

    def _raw(self):
        import cv2

        cap = cv2.VideoCapture(str(self.path))
        try:
            while True:
                ok = cap.grab()
                if not ok:
                    return
                yield cap
        finally:
            cap.release()

    def count(self):
        return (self.n + self.every - 1) // self.every

    def frames(self, positions=None):
        wanted = None if positions is None else {p * self.every for p in positions}
        for i, cap in enumerate(self._raw()):
            if i % self.every or (wanted is not None and i not in wanted):
                continue
            ok, bgr = cap.retrieve()
            if not ok:
                continue
            rgb = np.ascontiguousarray(bgr[..., ::-1])
            yield Frame(i, i / self.fps, rgb, K_from(self.intrinsics) if self.intrinsics else None)

    def describe(self):
        return {"kind": self.kind, "frames": self.n, "fps": self.fps, "every": self.every}


class BagSource(Source):
    """rosbag2 (sqlite3 or mcap) through ``rosbags``. Two passes: the first reads stamps, camera
    info and poses (small), the second decodes only the selected colour/depth messages."""

    kind = "rosbag2"

    def __init__(self, path: Path, image_topic: Optional[str], depth_topic: Optional[str],
                 info_topic: Optional[str], pose_topic: Optional[str], intrinsics,
                 every: int, sync_tol: float, pose_tol: float, max_pixels: int = 4096 * 3072,
                 progress: Optional[ProgressFn] = None):
        self.path = Path(path)
        self.ts = bags.typestore_for("kilted")
        self.every = max(1, int(every))
        self.sync_tol, self.pose_tol = float(sync_tol), float(pose_tol)
        self.max_pixels = int(max_pixels)
        self.intrinsics = intrinsics
        reader, close = bags.open_bag(self.path)
        try:
            conns = list(reader.connections)
            by_topic: Dict[str, str] = {}
            for c in conns:
                by_topic.setdefault(c.topic, c.msgtype)
            self.topics = dict(by_topic)
            self.image_topic = self._pick(image_topic, T_IMAGE + T_COMPRESSED, "image",
                                          lambda t: "depth" not in t.lower())
            self.depth_topic = self._pick(depth_topic, T_IMAGE + T_COMPRESSED, "depth",
                                          lambda t: "depth" in t.lower(), required=False)
            if self.depth_topic == self.image_topic:
                self.depth_topic = None
            self.info_topic = self._pick(info_topic, T_INFO, "camera_info", self._near_image, required=False)
            self.pose_topic = self._pick(pose_topic, T_POSE, "pose", lambda t: True, required=False)
            self.has_depth = self.depth_topic is not None
            # pass 1: stamps of image / depth messages, camera info, poses
            self.img_stamps: List[float] = []
            self.depth_stamps: List[float] = []
            self.info = None
            pose_st, pose_T = [], []
            want = [c for c in conns if c.topic in {self.image_topic, self.depth_topic, self.info_topic,
                                                    self.pose_topic}]
            total = sum(int(getattr(c, "msgcount", 0) or 0) for c in want) or 1
            for k, (c, t_ns, raw) in enumerate(reader.messages(connections=want)):
                if k % 256 == 0:
                    report(progress, k / total, "scan bag")
                if c.topic == self.image_topic:
                    self.img_stamps.append(bags.message_stamp(self._header_only(raw, c.msgtype), t_ns))
                elif c.topic == self.depth_topic:
                    self.depth_stamps.append(bags.message_stamp(self._header_only(raw, c.msgtype), t_ns))
                elif c.topic == self.info_topic:
                    if self.info is None:
                        self.info = self.ts.deserialize_cdr(raw, c.msgtype)
                elif c.topic == self.pose_topic:
                    m = self.ts.deserialize_cdr(raw, c.msgtype)
                    T = bags.pose_of_message(m)
                    if T is not None:
                        pose_st.append(bags.message_stamp(m, t_ns))
                        pose_T.append(T)
        finally:
            close()
        if not self.img_stamps:
            raise InputError(f"no messages on the image topic {self.image_topic!r} in {self.path}")
        o = np.argsort(pose_st, kind="stable")
        self.pose_stamps = np.asarray(pose_st, np.float64)[o]
        self.poses = [pose_T[i] for i in o]
        self.frame_id = "camera"

    # -- topic selection -------------------------------------------------------------------------
    def _near_image(self, topic: str) -> bool:
        base = self.image_topic.rsplit("/", 2)[0] if self.image_topic else ""
        return topic.startswith(base) if base else True

    def _pick(self, given, types, what, prefer, required=True):
        listing = ", ".join(f"{t} [{ty}]" for t, ty in sorted(self.topics.items())) or "none"
        if given:
            if given not in self.topics:
                raise InputError(f"{what} topic {given!r} is not in the bag; its topics: {listing}")
            if self.topics[given] not in types:
                raise InputError(f"{what} topic {given!r} has type {self.topics[given]}, expected one of "
                                 f"{', '.join(types)}")
            return given
        cands = sorted(t for t, ty in self.topics.items() if ty in types)
        good = [t for t in cands if prefer(t)]
        if good:
            return good[0]
        if required:
            raise InputError(f"no {what} topic ({', '.join(types)}) found; pass --{what.replace('_', '-')}"
                             f"-topic. The bag's topics: {listing}")
        return None

    def _header_only(self, raw, msgtype):
        # the header is the first field of every message type read here; a full deserialisation
        # of an Image keeps its data as a zero-copy array, so it is cheap
        return self.ts.deserialize_cdr(raw, msgtype)

    def _colour(self, m, msgtype) -> np.ndarray:
        try:
            return bags.decode_colour(msgtype, m, self.max_pixels)
        except ValueError as e:
            raise InputError(f"image topic {self.image_topic!r}: {e}") from e

    def _depth(self, m, msgtype) -> np.ndarray:
        try:
            return bags.decode_depth_message(msgtype, m, self.max_pixels)
        except ValueError as e:
            raise InputError(f"depth topic {self.depth_topic!r}: {e}") from e

    def _K(self, w: int, h: int) -> Optional[np.ndarray]:
        if self.intrinsics:
            return K_from(self.intrinsics)
        if self.info is None:
            return None
        K = np.asarray(self.info.k, np.float64).reshape(3, 3).copy()
        iw, ih = int(self.info.width), int(self.info.height)
        if iw > 0 and ih > 0 and (iw, ih) != (w, h):  # camera_info of another resolution: rescale
            K[0] *= w / iw
            K[1] *= h / ih
        return K

    def _indices(self):
        return list(range(0, len(self.img_stamps), self.every))

    def count(self):
        return len(self._indices())

    def frames(self, positions=None):
        idx = self._indices()
        sel = idx if positions is None else [idx[p] for p in positions]
        sel_set = set(sel)
        # one timestamp matcher for the package (core.camera.pairing): exact stamp first, mutual
        # nearest within a tolerance capped below half the colour frame period
        idx = match_stamps(np.asarray(self.img_stamps, np.float64), np.asarray(self.depth_stamps, np.float64),
                           self.sync_tol)
        depth_for: Dict[int, int] = {i: int(idx[i]) for i in sel if idx[i] >= 0}
        depth_wanted = set(depth_for.values())
        reader, close = bags.open_bag(self.path)
        try:
            want = [c for c in reader.connections if c.topic in {self.image_topic, self.depth_topic}]
            colours: Dict[int, Tuple[float, np.ndarray, str]] = {}
            depths: Dict[int, np.ndarray] = {}
            ci = di = 0
            for c, t_ns, raw in reader.messages(connections=want):
                if c.topic == self.image_topic:
                    if ci in sel_set:
                        m = self.ts.deserialize_cdr(raw, c.msgtype)
                        colours[ci] = (bags.message_stamp(m, t_ns), self._colour(m, c.msgtype),
                                       getattr(m.header, "frame_id", "") or "camera")
                    ci += 1
                else:
                    if di in depth_wanted:
                        m = self.ts.deserialize_cdr(raw, c.msgtype)
                        depths[di] = self._depth(m, c.msgtype)
                    di += 1
                # emit colour frames whose depth partner has been read (or has none)
                for i in sorted(colours):
                    if i in depth_for and depth_for[i] not in depths:
                        break
                    yield self._frame(i, colours.pop(i), depths.get(depth_for.get(i, -1)))
            for i in sorted(colours):
                yield self._frame(i, colours.pop(i), depths.get(depth_for.get(i, -1)))
        finally:
            close()

    def _frame(self, i, col, depth):
        stamp, rgb, frame_id = col
        h, w = rgb.shape[:2]
        if depth is not None and depth.shape != (h, w):
            raise InputError(f"depth on {self.depth_topic!r} is {depth.shape[1]}x{depth.shape[0]} but colour "
                             f"on {self.image_topic!r} is {w}x{h}: record the registered depth "
                             "(e.g. aligned_depth_to_color) so pixels correspond")
        T, how = interpolate_poses([stamp], self.pose_stamps, self.poses, self.pose_tol)
        pose = None if how[0] == POSE_NONE else T[0]
        return Frame(i, stamp, rgb, self._K(w, h), depth, pose, frame_id)

    def describe(self):
        return {"kind": self.kind, "path": str(self.path), "image_topic": self.image_topic,
                "depth_topic": self.depth_topic, "camera_info_topic": self.info_topic,
                "pose_topic": self.pose_topic, "image_messages": len(self.img_stamps),
                "depth_messages": len(self.depth_stamps), "pose_messages": int(len(self.pose_stamps))}


def open_source(path, intrinsics=None, every: int = 1, image_topic=None, depth_topic=None,
                camera_info_topic=None, pose_topic=None, sync_tolerance: float = 0.05,
                pose_tolerance: float = 0.1, depth_dir=None, poses=None, depth_scale: float = 0.001,
                fps: float = 10.0, progress: Optional[ProgressFn] = None) -> Source:
    """The source for ``path``: a rosbag2 (folder or one .mcap/.db3 file), a video file, or an
    image folder; topic options only for bags, ``depth_dir`` / ``poses`` only for folders.
    Raises InputError with what to change."""
    p = Path(path)
    opts = {"image_topic": image_topic, "depth_topic": depth_topic, "camera_info_topic": camera_info_topic,
            "pose_topic": pose_topic}
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    intr = intrinsics
    if p.is_file() and p.suffix.lower() in (".mcap", ".db3"):
        kind = "bag"
    elif p.is_file() and p.suffix.lower() in VIDEO_EXTS:
        kind = "video"
    elif p.is_dir() and ((p / "metadata.yaml").exists() or any(p.glob("*.mcap")) or any(p.glob("*.db3"))):
        kind = "bag"
    elif p.is_dir():
        kind = "folder"
    elif p.is_file():
        kind = "video"  # let OpenCV try
    else:
        raise InputError(f"cannot tell what {p} is")
    if kind != "bag":
        for opt, given in opts.items():
            if given:
                raise InputError(f"--{opt.replace('_', '-')} only applies to rosbag2 inputs; {p} is a {kind}")
    if kind == "bag":
        return BagSource(p, image_topic, depth_topic, camera_info_topic, pose_topic, intr, every,
                         sync_tolerance, pose_tolerance, progress=progress)
    if kind == "video":
        if depth_dir or poses:
            raise InputError("--depth-dir / --poses apply to image folders, not to videos")
        return VideoSource(p, intr, every)
    return ImageFolderSource(p, Path(depth_dir) if depth_dir else None, Path(poses) if poses else None,
                             intr, depth_scale, every, fps)
