"""Keyframe selection policy and a bounded, thread-safe keyframe buffer (ROS-free).

Selection (:meth:`KeyframeBuffer.offer`), checks in order of cost, cheapest first:

1. **timestamp** (no image work): a stamp older than the newest stamp ever offered is rejected
   as ``'timestamp_backwards'``, an equal one as ``'duplicate_timestamp'``; a stamp less than
   ``min_interval_s`` after the newest keyframe is ``'too_soon'``.
2. **inputs** (shape checks only): ``'invalid_image'``, ``'depth_size_mismatch'``,
   ``'invalid_intrinsics'``, ``'invalid_pose'``.
3. **pose motion** (no image work) when both the frame and the newest keyframe carry a
   camera-to-world pose: accepted as motion if the translation is >= ``min_translation_m`` *or*
   the rotation angle is >= ``min_rotation_deg``; otherwise ``'too_little_motion'``.
4. **sharpness**: variance of the Laplacian of a grey copy downsampled to ``analysis_width``
   pixels wide. ``'blurred'`` when it is below ``min_sharpness`` or below
   ``min_relative_sharpness`` x the median sharpness of the last ``sharpness_history`` frames
   that reached this step (adapts to the scene's texture; catches motion blur).
5. **image motion** when no pose comparison is possible: global shift by phase correlation,
   refined by sparse Lucas-Kanade flow of up to 100 corners of the newest keyframe (downsampled
   grey, forward-backward checked); the median displacement is scaled to full-resolution pixels.
   When fewer than ``min_track_fraction`` of the corners survive (little overlap left) the motion
   counts as large. Textureless images (fewer than 8 corners) use the phase-correlation shift
   alone. ``'too_little_motion'`` below ``min_flow_px``.

The first frame that passes 1, 2 and 4 is accepted (it becomes the *anchor*).

Eviction (buffer holds at most ``max_keyframes``): after a frame is accepted into a full buffer,
one keyframe is dropped, never the first (anchor) nor the newest. For each candidate ``i`` the
gap its removal would leave, ``d(i-1, i+1)``, is computed and the candidate with the smallest gap
(the one most redundant with its neighbours: removing it loses the least coverage) is dropped;
ties go to the less sharp one. ``d`` is the motion in units of the thresholds:
``max(translation / min_translation_m, rotation / min_rotation_deg)`` when both frames have
poses, else LK flow between their downsampled images / ``min_flow_px`` (cached per pair). The
reason is then ``'accepted_evicted_<k>'`` with ``k`` the position (0-based, in stamp order,
counting the new frame) of the dropped keyframe.

Cost: the ROS callback should only store the latest frame (optionally after
:meth:`KeyframeBuffer.cheap_reject`, which is lock-free and never touches pixels); ``offer`` runs
on a worker and works on a downsampled copy. Accepted frames are copied (the caller may reuse
its arrays). :meth:`KeyframeBuffer.keyframes` returns :class:`~wildseg3d_ros.core.types.Keyframe`
objects that share the stored arrays: treat them as read-only.
"""
from __future__ import annotations

import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from .geometry import pose_delta
from .camera.image_codec import ImageDecodeError, validate_camera_info
from .types import Keyframe

__all__ = ["KeyframePolicy", "KeyframeBuffer", "sharpness", "pose_delta", "image_flow", "select_keyframes",
           "uniform_positions"]


@dataclass
class KeyframePolicy:
    """Parameters of the keyframe selection rule (see the module docstring)."""

    min_interval_s: float = 0.3
    min_translation_m: float = 0.05
    min_rotation_deg: float = 5.0
    min_flow_px: float = 20.0            # full-resolution pixels, used when poses are unknown
    min_sharpness: float = 15.0          # variance of Laplacian on the downsampled grey image
    min_relative_sharpness: float = 0.4  # x median sharpness of recent frames (0 disables)
    sharpness_history: int = 15
    max_keyframes: int = 8
    analysis_width: int = 320            # width of the grey copy used for sharpness and flow
    min_track_fraction: float = 0.3      # below: overlap lost -> motion counts as large

    def validate(self) -> "KeyframePolicy":
        """Raise ValueError naming the first invalid field (for ROS parameter callbacks)."""
        for name in ("min_interval_s", "min_translation_m", "min_rotation_deg", "min_flow_px",
                     "min_sharpness", "min_relative_sharpness"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (0.0 <= self.min_track_fraction <= 1.0):
            raise ValueError(f"min_track_fraction must be in [0, 1], got {self.min_track_fraction!r}")
        if int(self.max_keyframes) != self.max_keyframes or self.max_keyframes < 2:
            raise ValueError(f"max_keyframes must be an integer >= 2, got {self.max_keyframes!r}")
        if int(self.analysis_width) != self.analysis_width or self.analysis_width < 32:
            raise ValueError(f"analysis_width must be an integer >= 32, got {self.analysis_width!r}")
        if int(self.sharpness_history) != self.sharpness_history or self.sharpness_history < 1:
            raise ValueError(f"sharpness_history must be an integer >= 1, got {self.sharpness_history!r}")
        return self


# ---------------------------------------------------------------------------------------------
# cheap image measures (all on small grey images)
# ---------------------------------------------------------------------------------------------

def _small_gray(rgb: np.ndarray, width: int) -> Tuple[np.ndarray, float]:
    """Grey copy at most ``width`` pixels wide (INTER_AREA) and the full-res/small scale."""
    h, w = rgb.shape[:2]
    if w > width:
        sh = max(1, int(round(h * width / w)))
        small = cv2.resize(rgb, (width, sh), interpolation=cv2.INTER_AREA)
        scale = w / float(width)
    else:
        small, scale = rgb, 1.0
    return cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY), scale


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a grey uint8 image (higher = sharper)."""
    lap = cv2.Laplacian(gray, cv2.CV_32F, ksize=1)
    return float(lap.var())


def _features(gray: np.ndarray) -> Optional[np.ndarray]:
    return cv2.goodFeaturesToTrack(gray, maxCorners=100, qualityLevel=0.01, minDistance=7, blockSize=7)


def image_flow(ref: np.ndarray, cur: np.ndarray, ref_pts: Optional[np.ndarray] = None,
               min_track_fraction: float = 0.3) -> float:
    """Median image motion in pixels *of the given (small) images* from ``ref`` to ``cur``.

    Phase correlation (Hanning window) gives the global shift, which initialises sparse
    pyramidal LK on ``ref``'s corners (so large pans are tracked too; rotation, zoom and
    parallax are measured by LK around that guess), with a 1 px forward-backward check.
    Returns ``inf`` when fewer than ``min_track_fraction`` of the corners are tracked (overlap
    lost) or the sizes differ. Textureless images (< 8 corners) return the phase-correlation
    shift.
    """
    if ref.shape != cur.shape:
        return math.inf
    if ref_pts is None:
        ref_pts = _features(ref)
    win = cv2.createHanningWindow((ref.shape[1], ref.shape[0]), cv2.CV_32F)
    (sx, sy), _resp = cv2.phaseCorrelate(ref.astype(np.float32), cur.astype(np.float32), win)
    if ref_pts is None or len(ref_pts) < 8:
        return float(math.hypot(sx, sy))
    lk = dict(winSize=(21, 21), maxLevel=3,
              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
    init = (ref_pts + np.float32([sx, sy])).astype(np.float32)
    p1, st1, _ = cv2.calcOpticalFlowPyrLK(ref, cur, ref_pts, init, flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
    if p1 is None:
        return math.inf
    p0b, st2, _ = cv2.calcOpticalFlowPyrLK(cur, ref, p1, ref_pts.copy(), flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
    ok = (st1.ravel() == 1) & (st2.ravel() == 1)
    fb = np.linalg.norm((p0b - ref_pts).reshape(-1, 2), axis=1)
    ok &= fb < 1.0
    if ok.sum() < max(1, min_track_fraction * len(ref_pts)):
        return math.inf
    d = np.linalg.norm((p1 - ref_pts).reshape(-1, 2)[ok], axis=1)
    return float(np.median(d))


# ---------------------------------------------------------------------------------------------
# buffer
# ---------------------------------------------------------------------------------------------

class _KF:
    __slots__ = ("uid", "stamp", "rgb", "K", "depth", "pose", "frame_id", "gray", "scale", "pts", "sharp")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class KeyframeBuffer:
    """Bounded, thread-safe keyframe buffer applying a :class:`KeyframePolicy`.

    ``offer()`` returns ``(accepted, reason)``; ``stats()`` counts every reason seen.
    """

    def __init__(self, policy: Optional[KeyframePolicy] = None):
        self.policy = (policy or KeyframePolicy()).validate()
        self._lock = threading.RLock()
        self._kfs: List[_KF] = []
        self._uid = 0
        self._pair_d: Dict[Tuple[int, int], float] = {}
        self._sharp_hist: deque = deque(maxlen=int(self.policy.sharpness_history))
        self._counts: Counter = Counter()
        # (newest stamp seen, newest keyframe stamp, newest keyframe pose): read lock-free by
        # cheap_reject(); replaced atomically (one attribute assignment) under the lock
        self._snap: Tuple[Optional[float], Optional[float], Optional[np.ndarray]] = (None, None, None)

    # -- cheap checks -------------------------------------------------------------------------
    def _time_reason(self, stamp: float, snap) -> Optional[str]:
        last_seen, kf_stamp, _ = snap
        if last_seen is not None:
            if stamp < last_seen:
                return "timestamp_backwards"
            if stamp == last_seen:
                return "duplicate_timestamp"
        if kf_stamp is not None and stamp - kf_stamp < self.policy.min_interval_s:
            return "too_soon"
        return None

    def _pose_motion(self, pose: np.ndarray, ref_pose: np.ndarray) -> bool:
        t, r = pose_delta(ref_pose, pose)
        return t >= self.policy.min_translation_m or r >= self.policy.min_rotation_deg

    def cheap_reject(self, stamp: float, pose: Optional[np.ndarray] = None) -> Optional[str]:
        """Reason a frame with this stamp (and pose) would be rejected, or None if it may pass.

        Lock-free, no image work, does not change the buffer: call it from a subscription
        callback before decoding/storing the frame. Checks the timestamp rules and, when
        ``pose`` and the newest keyframe's pose are known, the pose-motion rule.
        """
        try:
            s = float(stamp)
        except (TypeError, ValueError):
            return "invalid_timestamp"
        if not math.isfinite(s):
            return "invalid_timestamp"
        snap = self._snap
        reason = self._time_reason(s, snap)
        if reason is None and pose is not None and snap[2] is not None:
            p = np.asarray(pose, dtype=np.float64)
            if p.shape == (4, 4) and np.isfinite(p).all() and not self._pose_motion(p, snap[2]):
                return "too_little_motion"
        return reason

    # -- main entry ---------------------------------------------------------------------------
    def offer(self, rgb: np.ndarray, stamp: float, K: np.ndarray, depth: Optional[np.ndarray] = None,
              pose: Optional[np.ndarray] = None, frame_id: str = "camera") -> Tuple[bool, str]:
        """Offer one frame; returns ``(accepted, reason)`` (reasons in the module docstring)."""
        with self._lock:
            ok, reason = self._offer(rgb, stamp, K, depth, pose, frame_id)
            self._counts["accepted" if ok else reason] += 1
            return ok, reason

    def _offer(self, rgb, stamp, K, depth, pose, frame_id):
        pol = self.policy
        try:
            s = float(stamp)
        except (TypeError, ValueError):
            return False, "invalid_timestamp"
        if not math.isfinite(s):
            return False, "invalid_timestamp"
        snap = self._snap
        reason = self._time_reason(s, snap)
        if reason in ("timestamp_backwards", "duplicate_timestamp"):
            return False, reason
        self._snap = (s, snap[1], snap[2])  # newest stamp seen
        if reason is not None:
            return False, reason

        # inputs (shape checks only)
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] < 8 or rgb.shape[1] < 8:
            return False, "invalid_image"
        if depth is not None:
            depth = np.asarray(depth)
            if depth.shape != rgb.shape[:2]:
                return False, "depth_size_mismatch"
        try:
            Kv = validate_camera_info(K, rgb.shape[1], rgb.shape[0])
        except ImageDecodeError:
            return False, "invalid_intrinsics"
        if pose is not None:
            pose = np.asarray(pose, dtype=np.float64)
            if pose.shape != (4, 4) or not np.isfinite(pose).all():
                return False, "invalid_pose"

        newest = self._kfs[-1] if self._kfs else None
        pose_decided = newest is not None and pose is not None and newest.pose is not None
        if pose_decided and not self._pose_motion(pose, newest.pose):
            return False, "too_little_motion"

        gray, scale = _small_gray(rgb, int(pol.analysis_width))
        sh = sharpness(gray)
        hist_med = float(np.median(self._sharp_hist)) if self._sharp_hist else None
        self._sharp_hist.append(sh)
        if sh < pol.min_sharpness or (hist_med is not None and sh < pol.min_relative_sharpness * hist_med):
            return False, "blurred"

        if newest is not None and not pose_decided:
            flow = image_flow(newest.gray, gray, newest.pts, pol.min_track_fraction) * newest.scale
            if flow < pol.min_flow_px:
                return False, "too_little_motion"

        # accept: copy the arrays (the caller may reuse its buffers)
        kf = _KF(uid=self._uid, stamp=s, rgb=np.array(rgb, copy=True), K=Kv,
                 depth=None if depth is None else np.array(depth, dtype=np.float32, copy=True),
                 pose=None if pose is None else pose.copy(), frame_id=str(frame_id),
                 gray=gray, scale=scale, pts=_features(gray), sharp=sh)
        self._uid += 1
        self._kfs.append(kf)
        reason = "accepted"
        if len(self._kfs) > pol.max_keyframes:
            k = self._evict_index()
            gone = self._kfs.pop(k)
            self._pair_d = {key: v for key, v in self._pair_d.items() if gone.uid not in key}
            reason = f"accepted_evicted_{k}"
        self._snap = (s, kf.stamp, kf.pose)
        return True, reason

    # -- eviction -----------------------------------------------------------------------------
    def _distance(self, a: _KF, b: _KF) -> float:
        key = (a.uid, b.uid)
        d = self._pair_d.get(key)
        if d is not None:
            return d
        pol = self.policy
        if a.pose is not None and b.pose is not None:
            t, r = pose_delta(a.pose, b.pose)
            d = max(t / max(pol.min_translation_m, 1e-9), r / max(pol.min_rotation_deg, 1e-9))
        else:
            f = image_flow(a.gray, b.gray, a.pts, pol.min_track_fraction) * a.scale
            d = min(f, 1e6) / max(pol.min_flow_px, 1e-9)
        self._pair_d[key] = d
        return d

    def _evict_index(self) -> int:
        kfs = self._kfs
        best, best_key = 1, None
        for i in range(1, len(kfs) - 1):
            key = (self._distance(kfs[i - 1], kfs[i + 1]), kfs[i].sharp)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    # -- access -------------------------------------------------------------------------------
    def keyframes(self) -> List[Keyframe]:
        """Current keyframes sorted by stamp, ``index`` reassigned 0..n-1 (arrays shared)."""
        with self._lock:
            kfs = sorted(self._kfs, key=lambda k: k.stamp)
            return [Keyframe(index=i, stamp=k.stamp, rgb=k.rgb, K=k.K, depth=k.depth,
                             pose_prior=k.pose, frame_id=k.frame_id) for i, k in enumerate(kfs)]

    def stamps(self) -> List[float]:
        with self._lock:
            return [k.stamp for k in self._kfs]

    def clear(self) -> None:
        """Drop every keyframe and forget the stamp history (a replayed bag may start over)."""
        with self._lock:
            self._kfs.clear()
            self._pair_d.clear()
            self._sharp_hist.clear()
            self._snap = (None, None, None)

    def stats(self) -> Dict[str, int]:
        """Count of each offer() outcome since construction (``accepted`` includes evictions)."""
        with self._lock:
            d = dict(self._counts)
            d["size"] = len(self._kfs)
            return d

    def __len__(self) -> int:
        with self._lock:
            return len(self._kfs)


# ---------------------------------------------------------------------------------------------
# selection from a finite recording (the offline tool)
# ---------------------------------------------------------------------------------------------
def uniform_positions(n: int, k: int) -> List[int]:
    """``k`` evenly spaced positions in ``range(n)`` (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted(set(int(round(x)) for x in np.linspace(0, n - 1, k)))


def select_keyframes(source, mode: str, max_frames: int, policy: Optional[KeyframePolicy] = None,
                     prepare=None, progress=None):
    """Keyframes of a finite frame source (anything with ``count()`` and ``frames(positions)``
    yielding objects with ``index, stamp, rgb, K, depth, pose, frame_id``, e.g.
    :mod:`wildseg3d_ros.core.camera.sources`) and selection statistics.

    mode 'uniform': ``max_frames`` evenly spaced frames; 'keyframes': the node's
    :class:`KeyframeBuffer` policy (motion, sharpness, redundancy eviction) with ``max_keyframes =
    max(2, max_frames)``. ``prepare(frame) -> frame`` runs on every frame first (e.g. to fill in a
    missing K); ``progress(fraction, message)`` is called per frame."""
    n = source.count()
    stats = {"candidate_frames": n, "mode": mode}
    prepare = prepare or (lambda f: f)
    if mode == "uniform":
        pos = uniform_positions(n, max_frames)
        kept = []
        for k, fr in enumerate(source.frames(pos)):
            kept.append(prepare(fr))
            if progress is not None:
                progress((k + 1) / max(len(pos), 1), "read frames")
        return kept, stats
    if mode != "keyframes":
        raise ValueError(f"selection mode must be 'keyframes' or 'uniform', got {mode!r}")
    policy = replace(policy or KeyframePolicy(), max_keyframes=max(2, int(max_frames)))
    buf = KeyframeBuffer(policy)
    frames: Dict[int, object] = {}
    for k, fr in enumerate(source.frames(None)):
        fr = prepare(fr)
        ok, _reason = buf.offer(fr.rgb, fr.stamp, fr.K, fr.depth, fr.pose, fr.frame_id)
        if ok:
            frames[fr.index] = fr
            live = set(buf.stamps())
            frames = {i: f for i, f in frames.items() if f.stamp in live}
        if progress is not None:
            progress((k + 1) / max(n, 1), "select keyframes")
    kept = sorted(frames.values(), key=lambda f: f.stamp)
    stats.update({key: int(v) for key, v in buf.stats().items()})
    return kept, stats
