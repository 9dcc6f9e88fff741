"""`wildseg3d segment`: the WildSeg3D pipeline offline, without a ROS runtime.

Input: a rosbag2 (folder with ``metadata.yaml``, or a single ``.mcap`` / ``.db3`` file), an image
folder (sorted file names; optional ``depth/`` sibling folder of 16-bit PNG/PGM or float images),
or a video file (OpenCV; ``--every K`` keeps one frame in K, e.g. for drone footage).

It runs the same core code as the ROS nodes: keyframe selection (:class:`KeyframeBuffer`, the
reconstruction node's policy, or uniform sampling), the pointmap backend (``rgbd`` or
``dust3r``), the per-view segmenter and Dynamic Global Aligning
(:class:`~wildseg3d_ros.core.pipeline.ReconstructionPipeline`), then an
:class:`~wildseg3d_ros.core.segment.interactive.InteractiveSession` (Multi-view Group Mapping)
with the ``--click`` / ``--negative`` pixel prompts, and writes into ``--out``:

* ``object.ply``  the segmented object(s) (xyz, rgb, label)
* ``scene.ply``   every valid point of the aligned scene (xyz, rgb)
* ``montage.png`` keyframes with the object mask + a rendered view of the 3D segment
* ``result.json`` settings, keyframes used (source frame index, stamp), timings, point counts

Bags are read with the ``rosbags`` library (no ROS installation needed). Message types:
``sensor_msgs/msg/Image``, ``sensor_msgs/msg/CompressedImage``, ``sensor_msgs/msg/CameraInfo``,
``geometry_msgs/msg/PoseStamped``, ``nav_msgs/msg/Odometry`` (and
``geometry_msgs/msg/PoseWithCovarianceStamped``). A pose topic must give the *camera optical
frame's* pose in a world frame (camera-to-world, OpenCV axes): there is no TF lookup offline.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

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


class InputError(RuntimeError):
    """The input cannot be used as asked (message meant for the user; exit code 2)."""


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


@dataclass
class Prompt:
    positive: bool
    view: int
    u: float
    v: float


def _log(msg: str, quiet: bool = False):
    if not quiet:
        print(f"[wildseg3d segment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tqdm(iterable=None, **kw):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience only
        class _Null:
            def __init__(self, it=None, **_):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def update(self, *_):
                pass

            def set_description_str(self, *_):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *_):
                return False
        return _Null(iterable)
    return tqdm(iterable, **kw)


# =============================================================================================
# argument parsing helpers
# =============================================================================================

def parse_click(text: str) -> Tuple[int, float, float]:
    """``'<view>:<u>,<v>'`` -> (view, u, v); ``u`` column, ``v`` row, in input-image pixels."""
    try:
        view_s, uv = str(text).split(":", 1)
        u_s, v_s = uv.split(",", 1)
        view, u, v = int(view_s), float(u_s), float(v_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected <view>:<u>,<v> (e.g. 0:120,80), got {text!r}") from None
    if view < 0 or not (math.isfinite(u) and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"invalid click {text!r}")
    return view, u, v


def parse_intrinsics(text: str) -> Tuple[float, float, float, float]:
    try:
        vals = [float(x) for x in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy, got {text!r}") from None
    if len(vals) != 4 or vals[0] <= 0 or vals[1] <= 0 or not all(map(math.isfinite, vals)):
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy with positive focals, got {text!r}")
    return tuple(vals)  # type: ignore[return-value]


class _PromptAction(argparse.Action):
    """--click / --negative append to one ordered list (the order of the command line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        lst = list(getattr(namespace, self.dest, None) or [])
        view, u, v = values
        lst.append(Prompt(self.const, view, u, v))
        setattr(namespace, self.dest, lst)


def K_from(intr: Sequence[float]) -> np.ndarray:
    fx, fy, cx, cy = intr
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], np.float64)


def guess_K(width: int, height: int, hfov_deg: float = 60.0) -> np.ndarray:
    f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], np.float64)


def load_pose_file(path: Path) -> List[np.ndarray]:
    """Poses, one per line: ``tx ty tz qx qy qz qw`` or ``stamp tx ty tz qx qy qz qw`` (TUM),
    camera-to-world; ``#`` comments and blank lines skipped."""
    from .core.geometry import pose_from_xyz_quat

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


# =============================================================================================
# sources
# =============================================================================================

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


def _pose_from_msg(msg) -> Optional[np.ndarray]:
    from .core.geometry import pose_from_xyz_quat

    p = msg.pose
    if hasattr(p, "pose"):  # Odometry / PoseWithCovarianceStamped
        p = p.pose
    try:
        T = pose_from_xyz_quat([p.position.x, p.position.y, p.position.z],
                               [p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w])
    except ValueError:
        return None
    return T if np.isfinite(T).all() else None


def _stamp(msg, fallback_ns: int) -> float:
    try:
        s = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        if s > 0:
            return float(s)
    except AttributeError:
        pass
    return fallback_ns * 1e-9


def _open_bag(path: Path):
    """(reader-like object with .connections and .messages(connections), close callable)."""
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


class BagSource(Source):
    """rosbag2 (sqlite3 or mcap) through ``rosbags``. Two passes: the first reads stamps, camera
    info and poses (small), the second decodes only the selected colour/depth messages."""

    kind = "rosbag2"

    def __init__(self, path: Path, image_topic: Optional[str], depth_topic: Optional[str],
                 info_topic: Optional[str], pose_topic: Optional[str], intrinsics,
                 every: int, sync_tol: float, pose_tol: float, max_pixels: int = 4096 * 3072,
                 quiet: bool = False):
        from rosbags.typesys import Stores, get_typestore

        self.path = Path(path)
        self.ts = get_typestore(Stores.LATEST if hasattr(Stores, "LATEST") else Stores.ROS2_HUMBLE)
        self.every = max(1, int(every))
        self.sync_tol, self.pose_tol = float(sync_tol), float(pose_tol)
        self.max_pixels = int(max_pixels)
        self.intrinsics = intrinsics
        reader, close = _open_bag(self.path)
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
            total = sum(int(getattr(c, "msgcount", 0) or 0) for c in want) or None
            bar = _tqdm(total=total, desc="scan bag", unit="msg", disable=quiet or None, leave=False)
            for c, t_ns, raw in reader.messages(connections=want):
                bar.update(1)
                if c.topic == self.image_topic:
                    self.img_stamps.append(_stamp(self._header_only(raw, c.msgtype), t_ns))
                elif c.topic == self.depth_topic:
                    self.depth_stamps.append(_stamp(self._header_only(raw, c.msgtype), t_ns))
                elif c.topic == self.info_topic:
                    if self.info is None:
                        self.info = self.ts.deserialize_cdr(raw, c.msgtype)
                elif c.topic == self.pose_topic:
                    m = self.ts.deserialize_cdr(raw, c.msgtype)
                    T = _pose_from_msg(m)
                    if T is not None:
                        pose_st.append(_stamp(m, t_ns))
                        pose_T.append(T)
            bar.close()
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

    # -- decoding ------------------------------------------------------------------------------
    def _decode_color(self, m, msgtype) -> np.ndarray:
        from .core.image_codec import decode_compressed, decode_image

        if msgtype in T_COMPRESSED:
            return decode_compressed(m.format, m.data, max_pixels=self.max_pixels)
        out = decode_image(m.encoding, m.height, m.width, m.step, m.data, m.is_bigendian,
                           max_pixels=self.max_pixels)
        if out.ndim != 3:
            raise InputError(f"image topic {self.image_topic!r} carries {m.encoding!r} (not colour)")
        return out

    def _decode_depth(self, m, msgtype) -> np.ndarray:
        from .core.image_codec import decode_compressed, decode_depth

        if msgtype in T_COMPRESSED:
            d = decode_compressed(m.format, m.data, max_pixels=self.max_pixels)
            if d.ndim != 2:
                raise InputError(f"depth topic {self.depth_topic!r} carries a colour image ({m.format!r})")
            return d
        return decode_depth(m.encoding, m.height, m.width, m.step, m.data, m.is_bigendian,
                            max_pixels=self.max_pixels)[0]

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

    def _nearest(self, stamps: np.ndarray, s: float, tol: float) -> Optional[int]:
        if len(stamps) == 0:
            return None
        i = int(np.searchsorted(stamps, s))
        best = min((j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(stamps[j] - s))
        return best if abs(stamps[best] - s) <= tol else None

    def frames(self, positions=None):
        idx = self._indices()
        sel = idx if positions is None else [idx[p] for p in positions]
        sel_set = set(sel)
        dst = np.asarray(self.depth_stamps, np.float64)
        dorder = np.argsort(dst, kind="stable")
        dsorted = dst[dorder]
        depth_for: Dict[int, int] = {}
        for i in sel:
            j = self._nearest(dsorted, self.img_stamps[i], self.sync_tol)
            if j is not None:
                depth_for[i] = int(dorder[j])
        depth_wanted = set(depth_for.values())
        reader, close = _open_bag(self.path)
        try:
            want = [c for c in reader.connections if c.topic in {self.image_topic, self.depth_topic}]
            colours: Dict[int, Tuple[float, np.ndarray, str]] = {}
            depths: Dict[int, np.ndarray] = {}
            ci = di = 0
            for c, t_ns, raw in reader.messages(connections=want):
                if c.topic == self.image_topic:
                    if ci in sel_set:
                        m = self.ts.deserialize_cdr(raw, c.msgtype)
                        colours[ci] = (_stamp(m, t_ns), self._decode_color(m, c.msgtype),
                                       getattr(m.header, "frame_id", "") or "camera")
                    ci += 1
                else:
                    if di in depth_wanted:
                        m = self.ts.deserialize_cdr(raw, c.msgtype)
                        depths[di] = self._decode_depth(m, c.msgtype)
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
        j = self._nearest(self.pose_stamps, stamp, self.pose_tol)
        return Frame(i, stamp, rgb, self._K(w, h), depth, None if j is None else self.poses[j], frame_id)

    def describe(self):
        return {"kind": self.kind, "path": str(self.path), "image_topic": self.image_topic,
                "depth_topic": self.depth_topic, "camera_info_topic": self.info_topic,
                "pose_topic": self.pose_topic, "image_messages": len(self.img_stamps),
                "depth_messages": len(self.depth_stamps), "pose_messages": int(len(self.pose_stamps))}


def open_source(args) -> Source:
    p = Path(args.input)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    intr = args.intrinsics
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
        for opt in ("image_topic", "depth_topic", "camera_info_topic", "pose_topic"):
            if getattr(args, opt):
                raise InputError(f"--{opt.replace('_', '-')} only applies to rosbag2 inputs; {p} is a {kind}")
    if kind == "bag":
        return BagSource(p, args.image_topic, args.depth_topic, args.camera_info_topic, args.pose_topic,
                         intr, args.every, args.sync_tolerance, args.pose_tolerance, quiet=args.quiet)
    if kind == "video":
        if args.depth_dir or args.poses:
            raise InputError("--depth-dir / --poses apply to image folders, not to videos")
        return VideoSource(p, intr, args.every)
    return ImageFolderSource(p, Path(args.depth_dir) if args.depth_dir else None,
                             Path(args.poses) if args.poses else None, intr, args.depth_scale,
                             args.every, args.fps)


# =============================================================================================
# keyframe selection
# =============================================================================================

def uniform_positions(n: int, k: int) -> List[int]:
    """``k`` evenly spaced positions in ``range(n)`` (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted(set(int(round(x)) for x in np.linspace(0, n - 1, k)))


def select_keyframes(src: Source, args) -> Tuple[List[Frame], dict]:
    """Keyframes (as :class:`Frame`, with K filled in) and selection statistics."""
    from .core.keyframes import KeyframeBuffer, KeyframePolicy

    n = src.count()
    stats = {"candidate_frames": n, "mode": args.select}
    kept: List[Frame] = []
    if args.select == "uniform":
        pos = uniform_positions(n, args.max_frames)
        for fr in _tqdm(src.frames(pos), total=len(pos), desc="read frames", unit="frame",
                        disable=args.quiet or None, leave=False):
            kept.append(_with_K(fr, args))
        return kept, stats
    policy = KeyframePolicy(min_interval_s=args.min_interval, min_translation_m=args.min_translation,
                            min_rotation_deg=args.min_rotation, min_flow_px=args.min_flow,
                            min_sharpness=args.min_sharpness, max_keyframes=max(2, args.max_frames))
    buf = KeyframeBuffer(policy)
    frames: Dict[int, Frame] = {}
    for fr in _tqdm(src.frames(None), total=n, desc="select keyframes", unit="frame",
                    disable=args.quiet or None, leave=False):
        fr = _with_K(fr, args)
        ok, _reason = buf.offer(fr.rgb, fr.stamp, fr.K, fr.depth, fr.pose, fr.frame_id)
        if ok:
            frames[fr.index] = fr
            live = set(buf.stamps())
            frames = {i: f for i, f in frames.items() if f.stamp in live}
    kept = sorted(frames.values(), key=lambda f: f.stamp)
    stats.update({k: int(v) for k, v in buf.stats().items()})
    return kept, stats


def _with_K(fr: Frame, args) -> Frame:
    if fr.K is None:
        h, w = fr.rgb.shape[:2]
        fr.K = guess_K(w, h, args.hfov)
        if not getattr(args, "_warned_K", False):
            _log(f"no intrinsics given: assuming a {args.hfov:.0f} deg horizontal field of view "
                 f"(pass --intrinsics fx,fy,cx,cy{'' if args.backend == 'dust3r' else ' - metric depth needs them'})",
                 args.quiet)
            args._warned_K = True
    return fr


# =============================================================================================
# the run
# =============================================================================================

def _to_network_resolution(kfs: List[Frame], size: int):
    """DUSt3R works at 512 (long side, multiple-of-16 crop) or 224 (square crop). The aligned
    scene comes out at that resolution, so keyframes are brought there first (same resize/crop as
    ``dust3r.utils.image.load_images``; K adjusted) and clicks are mapped with the returned
    per-keyframe (sx, sy, left, top)."""
    from .core.backends.dust3r_backend import preprocess_image

    maps = []
    for fr in kfs:
        p = preprocess_image(fr.rgb, fr.K, size=size)
        maps.append((p.scale[0], p.scale[1], p.crop[0], p.crop[1]))
        fr.rgb, fr.K, fr.depth = p.rgb, p.K, None
    return maps


def run_segment(args) -> dict:
    """Run the whole offline pipeline for parsed ``args``; returns the result dict (also written
    as result.json) with the in-memory ``scene`` and ``session`` under ``_scene``/``_session``."""
    import torch

    from .core import montage, ply
    from .core.evaluation import project_segment
    from .core.pipeline import PipelineConfig, ReconstructionPipeline
    from .core.scene import Keyframe
    from .core.segment.group_mapping import GroupMapper
    from .core.segment.interactive import InteractiveSession

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(int(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}

    src = open_source(args)
    _log(f"input: {json.dumps(src.describe())}", args.quiet)
    if args.backend == "rgbd" and not src.has_depth:
        hint = ("pass --depth-topic <topic> (the bag has no topic with 'depth' in its name)" if src.kind == "rosbag2"
                else "pass --depth-dir <folder of 16-bit depth images>" if src.kind == "image_folder"
                else "a video has no depth")
        raise InputError(f"the input has no depth images, and the 'rgbd' backend needs metric depth: {hint}, "
                         "or reconstruct from RGB only with --backend dust3r --checkpoint <DUSt3R/MASt3R .pth> "
                         "(see docs/gpu_setup.md)")
    if args.backend == "dust3r" and not args.checkpoint:
        raise InputError("--backend dust3r needs --checkpoint <local DUSt3R/MASt3R .pth or save_pretrained folder> "
                         "(weights are never downloaded; see docs/gpu_setup.md, check with `wildseg3d check-gpu`)")
    if args.segmenter == "sam2" and not args.sam2_checkpoint:
        raise InputError("--segmenter sam2 needs --sam2-checkpoint <sam2.1_hiera_*.pt> (see docs/gpu_setup.md)")

    t = time.perf_counter()
    frames, sel_stats = select_keyframes(src, args)
    timings["read_select_s"] = time.perf_counter() - t
    if len(frames) < 2:
        raise InputError(f"only {len(frames)} keyframe(s) selected from {sel_stats['candidate_frames']} frames "
                         f"({sel_stats}); lower --min-flow / --min-translation, raise --max-frames, or use "
                         "--select uniform")
    if args.backend == "rgbd":
        missing = [f.index for f in frames if f.depth is None]
        if missing:
            raise InputError(f"frames {missing} have no depth partner within {args.sync_tolerance} s; raise "
                             "--sync-tolerance or check --depth-topic")
    src_shape = frames[0].rgb.shape[:2]
    click_maps = None
    if args.backend == "dust3r":
        click_maps = _to_network_resolution(frames, args.image_size)
    _log(f"{len(frames)} keyframes: source frames {[f.index for f in frames]} "
         f"({sel_stats['candidate_frames']} candidates, selection '{args.select}')", args.quiet)

    have_poses = all(f.pose is not None for f in frames)
    kfs = [Keyframe(index=i, stamp=f.stamp, rgb=f.rgb, K=f.K, depth=f.depth, pose_prior=f.pose,
                    frame_id=f.frame_id) for i, f in enumerate(frames)]
    backend_kwargs = {}
    if args.backend == "dust3r":
        backend_kwargs = dict(model=args.checkpoint, image_size=args.image_size, batch_size=args.batch_size)
    seg_kwargs = {}
    if args.segmenter == "sam2":
        seg_kwargs = dict(config=args.sam2_config, checkpoint=args.sam2_checkpoint,
                          points_per_side=args.points_per_side)
    cfg = PipelineConfig(backend=args.backend, backend_kwargs=backend_kwargs, segmenter=args.segmenter,
                         segmenter_kwargs=seg_kwargs, scene_graph=args.scene_graph, device=args.device,
                         iterations=args.iterations, weighting=args.weighting, optimizer=args.optimizer,
                         use_pose_priors=have_poses and not args.ignore_poses)
    t = time.perf_counter()
    _log(f"building backend '{args.backend}' and segmenter '{args.segmenter}' on {args.device}", args.quiet)
    pipe = ReconstructionPipeline(cfg)
    timings["model_load_s"] = time.perf_counter() - t

    stages = ["pointmaps", "segmentation", "alignment", "mask cache", "done"]
    bar = _tqdm(total=len(stages) - 1, desc="reconstruct", unit="step", disable=args.quiet or None, leave=False)
    state = {"i": 0}

    def progress(stage, frac):
        k = stages.index(stage) if stage in stages else state["i"]
        if k > state["i"]:
            bar.update(k - state["i"])
            state["i"] = k
        bar.set_description_str(f"reconstruct: {stage}")

    frame_id = args.frame_id or ("map" if cfg.use_pose_priors else "wildseg3d_reconstruction")
    for kf in kfs:
        if not cfg.use_pose_priors:
            kf.pose_prior = None
    scene, rec_t = pipe.run(kfs, progress=progress, frame_id=frame_id)
    bar.close()
    timings.update({k: float(v) for k, v in rec_t.items()})
    _log(f"scene: {scene.num_views} views {scene.image_shape[1]}x{scene.image_shape[0]}, "
         f"{len(scene.mask_cache.object_ids())} cached objects, reconstruction {rec_t['total_s']:.2f} s", args.quiet)

    # prompts
    t = time.perf_counter()
    mapper = GroupMapper(scene, voxel=args.mgm_voxel or None, min_agree_frac=args.mgm_min_consistency)
    session = InteractiveSession(scene, mapper, pipe.segmenter)
    timings["group_mapper_s"] = time.perf_counter() - t
    prompts = list(args.prompts or [])
    prompt_log = []
    t = time.perf_counter()
    for pr in prompts:
        if pr.view >= scene.num_views:
            raise InputError(f"click on view {pr.view}, but only {scene.num_views} keyframes were selected "
                             f"(views 0..{scene.num_views - 1}; result.json lists their source frames)")
        u, v = pr.u, pr.v
        if click_maps is not None:  # input pixels -> network-resolution pixels
            sx, sy, left, top = click_maps[pr.view]
            u, v = (u + 0.5) * sx - 0.5 - left, (v + 0.5) * sy - 0.5 - top
        tp = time.perf_counter()
        res = session.add_pixel_prompt(pr.view, u, v, pr.positive)
        prompt_log.append({"positive": pr.positive, "view": pr.view, "u": pr.u, "v": pr.v,
                           "u_scene": round(float(u), 2), "v_scene": round(float(v), 2),
                           "points_after": int(res.num_points), "ms": round((time.perf_counter() - tp) * 1e3, 2)})
    timings["prompts_s"] = time.perf_counter() - t
    obj_pts, obj_rgb, obj_lab = session.combined_cloud()

    # outputs
    t = time.perf_counter()
    valid = scene.valid_mask()
    ply.write_ply(out / "scene.ply", scene.pts3d[valid], scene.rgb[valid])
    ply.write_ply(out / "object.ply", obj_pts, obj_rgb, labels=obj_lab)
    V, H, W = valid.shape
    # the 3D segment seen from each keyframe (projected, occlusion-tested), as the demo shows it
    masks = project_segment(obj_pts, scene) if len(obj_pts) else np.zeros((V, H, W), bool)
    montage.make_montage(scene.rgb, masks, obj_pts, obj_rgb, None, None, out / "montage.png",
                         titles=[f"view {i} (frame {f.index})" for i, f in enumerate(frames)],
                         view_from=scene.poses[0])
    timings["write_s"] = time.perf_counter() - t
    timings["wall_s"] = time.perf_counter() - t0

    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("func", "prompts")}
    result = {
        "input": src.describe(),
        "settings": settings,
        "prompts": prompt_log,
        "keyframes": [{"view": i, "source_frame": int(f.index), "stamp": float(f.stamp),
                       "has_depth": f.depth is not None, "has_pose": f.pose is not None}
                      for i, f in enumerate(frames)],
        "selection": sel_stats,
        "source_image_size": [int(src_shape[1]), int(src_shape[0])],
        "scene_image_size": [int(W), int(H)],
        "frame_id": scene.frame_id,
        "metric": bool(scene.metric),
        "scene_points": int(valid.sum()),
        "cached_objects": int(len(scene.mask_cache.object_ids())),
        "object_points": int(len(obj_pts)),
        "objects": [{"label": int(lab), "points": int(seg.num_points),
                     "cache_ids": [int(x) for x in seg.object_ids]} for lab, seg in session.results()],
        "camera_poses": [np.round(p, 6).tolist() for p in scene.poses],
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
        "files": ["object.ply", "scene.ply", "montage.png", "result.json"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    _log(f"object: {len(obj_pts)} points; wrote {out}/object.ply, scene.ply, montage.png, result.json "
         f"in {timings['wall_s']:.1f} s", args.quiet)
    if not prompts:
        _log("no --click given: object.ply is empty; pick a pixel on a keyframe of montage.png and run again "
             "with --click <view>:<u>,<v>", args.quiet)
    result["_scene"] = scene
    result["_session"] = session
    return result


def _segment_main(args) -> int:
    try:
        res = run_segment(args)
    except InputError as e:
        print(f"wildseg3d segment: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # model / pipeline failures: one readable line, details with --verbose
        name = type(e).__name__
        if getattr(args, "verbose", False):
            import traceback
            traceback.print_exc()
        print(f"wildseg3d segment: {name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "keyframes": len(res["keyframes"]),
                      "object_points": res["object_points"], "wall_s": res["timings_s"]["wall_s"]}))
    return 0


EPILOG = """\
input kinds:
  rosbag2 folder (metadata.yaml), or one .mcap / .db3 file: topics are found by type when not
      given (colour: first Image/CompressedImage topic without 'depth' in its name; depth: the
      one with 'depth'; CameraInfo; PoseStamped/Odometry for camera poses). Depth must be
      registered to the colour image (same size). 16UC1 depth is millimetres, 32FC1 metres.
  image folder: sorted image files, or color/ (rgb/, images/) + depth/ sub-folders; depth paired
      by file stem or by order; integer depth x --depth-scale (default 0.001 = millimetres).
  video file: OpenCV; --every K keeps one frame in K (aerial/drone footage: e.g. --every 15
      on 30 fps, --backend dust3r; the camera must move between kept frames).

views and clicks:
  Keyframes are numbered 0..N-1 in time order ("views"); result.json lists the source frame of
  each. --click 0:320,240 is a positive click on view 0 at column 320, row 240 of the INPUT image
  (mapped to the network resolution for dust3r). The first click selects the cached object under
  it (Multi-view Group Mapping); later clicks (and --negative) refine it. Without clicks only
  the scene is reconstructed (montage.png shows the views to click on).

examples:
  wildseg3d segment --input room.mcap --depth-topic /camera/depth/image_raw --click 0:320,240 --out out
  wildseg3d segment --input frames/ --depth-dir depth/ --intrinsics 518,519,325.5,253.5 --click 2:300,200 --out out
  wildseg3d segment --input flight.mp4 --every 15 --max-frames 8 --backend dust3r \\
      --checkpoint ckpt/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth --device cuda --click 0:640,360 --out out

exit codes: 0 done, 1 pipeline/model failure, 2 unusable input or options.
"""


def add_segment_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "segment", help="offline: segment an object from a rosbag2 / image folder / video (no ROS runtime)",
        description="Reconstruct a scene from a few keyframes of a recording and segment the clicked object "
                    "in 3D (the WildSeg3D pipeline the ROS nodes run). Writes object.ply, scene.ply, "
                    "montage.png and result.json into --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = s.add_argument_group("input")
    g.add_argument("--input", "-i", required=True,
                   help="rosbag2 folder, .mcap or .db3 file, image folder or video file")
    g.add_argument("--image-topic", help="bag: colour topic (sensor_msgs/Image or CompressedImage)")
    g.add_argument("--depth-topic", help="bag: depth topic registered to the colour image (Image 16UC1/32FC1 or "
                                         "compressedDepth)")
    g.add_argument("--camera-info-topic", help="bag: sensor_msgs/CameraInfo topic (intrinsics)")
    g.add_argument("--pose-topic", help="bag: camera pose topic (PoseStamped / Odometry; camera optical frame "
                                        "in a world frame)")
    g.add_argument("--depth-dir", help="image folder: folder of depth images (default: <input>/depth if present)")
    g.add_argument("--poses", help="image folder: pose file, one line per image: tx ty tz qx qy qz qw "
                                   "(camera-to-world; TUM lines with a leading stamp also accepted)")
    g.add_argument("--intrinsics", type=parse_intrinsics, metavar="FX,FY,CX,CY",
                   help="pinhole intrinsics in input pixels (overrides CameraInfo)")
    g.add_argument("--hfov", type=float, default=60.0,
                   help="horizontal field of view (deg) assumed when no intrinsics are known (default 60)")
    g.add_argument("--depth-scale", type=float, default=0.001,
                   help="metres per unit of integer depth images in folders (default 0.001: millimetres)")
    g.add_argument("--fps", type=float, default=10.0,
                   help="image folder: frame rate used to give frames time stamps (default 10)")
    g.add_argument("--sync-tolerance", type=float, default=0.05,
                   help="bag: max |t_colour - t_depth| (s) to pair a depth image (default 0.05)")
    g.add_argument("--pose-tolerance", type=float, default=0.1,
                   help="bag: max |t_colour - t_pose| (s) to use a pose (default 0.1)")
    g.add_argument("--ignore-poses", action="store_true", help="do not use poses even when available")
    k = s.add_argument_group("keyframes")
    k.add_argument("--every", type=int, default=1, metavar="K",
                   help="keep one input frame in K before selection (videos, long bags; default 1)")
    k.add_argument("--max-frames", type=int, default=5, metavar="N",
                   help="number of keyframes (the paper uses a few views; default 5)")
    k.add_argument("--select", choices=("keyframes", "uniform"), default="keyframes",
                   help="keyframes: the reconstruction node's KeyframeBuffer policy (motion, sharpness, "
                        "redundancy eviction); uniform: N evenly spaced frames (default keyframes)")
    k.add_argument("--min-interval", type=float, default=0.0, help="keyframes: min seconds between keyframes")
    k.add_argument("--min-translation", type=float, default=0.05, help="keyframes: min camera motion (m) with poses")
    k.add_argument("--min-rotation", type=float, default=5.0, help="keyframes: min camera rotation (deg) with poses")
    k.add_argument("--min-flow", type=float, default=20.0, help="keyframes: min image motion (px) without poses")
    k.add_argument("--min-sharpness", type=float, default=15.0, help="keyframes: min variance of Laplacian")
    m = s.add_argument_group("models")
    m.add_argument("--backend", choices=("rgbd", "dust3r"), default="rgbd",
                   help="pointmaps from metric depth (rgbd, CPU) or from RGB with DUSt3R/MASt3R (default rgbd)")
    m.add_argument("--checkpoint", help="dust3r: local DUSt3R/MASt3R checkpoint (.pth or save_pretrained folder)")
    m.add_argument("--image-size", type=int, choices=(224, 512), default=512, help="dust3r: network input size")
    m.add_argument("--batch-size", type=int, default=4, help="dust3r: pairs per forward pass")
    m.add_argument("--scene-graph", default="complete", help="pair graph: complete | swin-<k> | oneref-<k>")
    m.add_argument("--segmenter", choices=("classical", "sam2"), default="classical",
                   help="mask-cache segmenter: classical (CPU, no weights) or sam2 (default classical)")
    m.add_argument("--sam2-checkpoint", help="sam2: checkpoint .pt (e.g. sam2.1_hiera_tiny.pt)")
    m.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml",
                   help="sam2: config name inside the sam2 package matching the checkpoint")
    m.add_argument("--points-per-side", type=int, default=16, help="sam2: automatic mask generator grid")
    m.add_argument("--iterations", type=int, default=500, help="DGA iterations (paper: 500)")
    m.add_argument("--weighting", choices=("dga", "confidence"), default="dga",
                   help="alignment weights: dga (paper) or confidence (DUSt3R baseline)")
    m.add_argument("--optimizer", choices=("gauss_newton", "adam"), default="gauss_newton",
                   help="alignment optimiser: gauss_newton (default, tens of iterations) or adam "
                        "(the reference, --iterations steps)")
    m.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default cpu)")
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    m.add_argument("--mgm-voxel", type=float, default=0.0, help="MGM floater-filter voxel (m); 0 = automatic")
    m.add_argument("--mgm-min-consistency", type=float, default=0.5,
                   help="MGM: min share of agreeing views for a point to stay")
    p = s.add_argument_group("prompts and output")
    p.add_argument("--click", dest="prompts", action=_PromptAction, const=True, type=parse_click,
                   metavar="VIEW:U,V", help="positive click on keyframe VIEW at column U, row V (repeatable)")
    p.add_argument("--negative", dest="prompts", action=_PromptAction, const=False, type=parse_click,
                   metavar="VIEW:U,V", help="negative click (repeatable; after a positive one)")
    p.add_argument("--frame-id", default="", help="frame name recorded in result.json (default map with poses, "
                                                  "else wildseg3d_reconstruction)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress log / bars")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    s.set_defaults(func=_segment_main, prompts=[])
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="wildseg3d")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_segment_parser(sub)
    args = ap.parse_args(["segment"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
