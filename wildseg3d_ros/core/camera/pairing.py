"""Colour / depth / pose pairing of a camera stream, without blocking (ROS-free, numpy only).

One timestamp matcher for the package: the live node (``FramePairer``, fed message by message)
and offline readers of sorted stamp arrays (``match_stamps``, ``interpolate_poses``) use the
same rules:

* **Depth: exact stamp first.** A depth stamped like the colour frame (within ``EXACT_S``) is
  its partner. Otherwise the nearest depth within the *effective tolerance* — the configured
  tolerance, but never more than ``HALF_PERIOD_FRACTION`` (0.45) of the colour frame period, so
  a lost depth is never replaced by the neighbouring frame's — and only if that depth is nearer
  to this colour frame than to any other (one depth never serves two frames). An approximate
  match becomes final once the next colour frame is known (it might claim that depth), or at
  the expiry.
* **Pose:** the pose of the same stamp; else SLERP (rotation) + linear (translation)
  interpolation between the odometry messages before and after the frame when both are within
  the pose tolerance; else the nearer of the two when within it. A frame whose later odometry
  has not arrived yet *waits* for it (odometry often arrives after the image); at the expiry the
  nearest earlier pose within the tolerance is used, else the frame is dropped ("pose late")
  when poses are expected, or paired without a pose when none are.
* **Nothing waits by sleeping.** Messages are added as they arrive; ``poll(now)`` returns the
  frames that completed (in stamp order: keyframe selection needs increasing stamps) and the ones
  that expired, each with its reason. A frame waits at most ``expiry_s`` after its arrival for
  its partners — long enough for a reliable transport to resend a lost depth.

Outcome counters (``FramePairer.stats()``). Every colour frame is counted once among
``paired_exact`` / ``paired_approx`` (depth partner found by exact stamp / within the effective
tolerance), ``paired_no_depth`` (depth not needed) and the drops ``depth_lost`` (no depth arrived
before the expiry), ``depth_late`` (its depth arrived after the expiry: a lost frame is moved
here when that happens), ``no_camera_info``, ``superseded`` (more than ``max_pending`` frames
waiting: the oldest is dropped), ``duplicate_timestamp`` (a second colour frame of a stamp
already waiting) and ``out_of_order`` (not newer than a frame already handed out). Every frame that got past those is counted once among ``pose_exact`` /
``pose_interpolated`` / ``pose_nearest`` / ``pose_external`` (from ``pose_fn``, e.g. TF) /
``pose_none`` (no pose expected) / ``pose_late`` (poses expected, none usable before the expiry)
/ ``pose_unmatched`` (poses around the frame, none within the tolerance); the last two go out
with ``pose=None`` and the reason in ``detail`` for the consumer to refuse. Besides:
``wrong_pair_avoided`` (the plain nearest-within-tolerance rule would have given this frame
another frame's depth) and ``depth_unclaimed`` (depths dropped without ever matching a frame).
"""
from __future__ import annotations

import bisect
import collections
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

#: two stamps closer than this are the same instant (stamps are integer nanoseconds in ROS)
EXACT_S = 1e-6
#: the approximate-match tolerance never exceeds this fraction of the colour frame period
HALF_PERIOD_FRACTION = 0.45

# ----------------------------------------------------------------------------- array functions


def estimate_period(stamps) -> float:
    """Median spacing of the distinct stamps (s), 0.0 when fewer than two."""
    s = np.unique(np.asarray(stamps, dtype=np.float64))
    if len(s) < 2:
        return 0.0
    d = np.diff(s)
    d = d[d > EXACT_S]
    return float(np.median(d)) if len(d) else 0.0


def effective_tolerance(tolerance: float, period: float) -> float:
    """The approximate-match tolerance actually used: ``tolerance`` capped below half a period."""
    tolerance = max(float(tolerance), 0.0)
    return min(tolerance, HALF_PERIOD_FRACTION * period) if period > 0 else tolerance


def _nearest_sorted(sorted_vals: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Index into ``sorted_vals`` of the nearest value for every query (-1 when empty)."""
    n = len(sorted_vals)
    if n == 0:
        return np.full(len(q), -1, dtype=np.int64)
    i = np.searchsorted(sorted_vals, q)
    lo = np.clip(i - 1, 0, n - 1)
    hi = np.clip(i, 0, n - 1)
    return np.where(np.abs(sorted_vals[lo] - q) <= np.abs(sorted_vals[hi] - q), lo, hi)


def match_stamps(query, candidates, tolerance: float, period: Optional[float] = None,
                 return_naive: bool = False):
    """Partner of every query stamp among ``candidates`` (any order): its index, or -1.

    Exact stamp first; otherwise the nearest candidate within ``effective_tolerance(tolerance,
    period)`` (``period`` estimated from the query stamps when None) that is not nearer to
    another query stamp. Offline use (rosbag2 reader): ``depth_index = match_stamps(colour_stamps,
    depth_stamps, tol)``. With ``return_naive`` also returns the plain nearest-within-``tolerance``
    index (what a naive matcher would pick) so callers can count the wrong pairs avoided.
    """
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    c = np.asarray(candidates, dtype=np.float64).reshape(-1)
    out = np.full(len(q), -1, dtype=np.int64)
    naive = np.full(len(q), -1, dtype=np.int64)
    if len(q) == 0 or len(c) == 0:
        return (out, naive) if return_naive else out
    if period is None:
        period = estimate_period(q)
    etol = effective_tolerance(tolerance, period)
    corder = np.argsort(c, kind="stable")
    cs = c[corder]
    near = _nearest_sorted(cs, q)
    dist = np.abs(cs[near] - q)
    naive = np.where(dist <= tolerance, corder[near], -1)
    # mutual nearest: the query stamp nearest to the chosen candidate must be this one
    qorder = np.argsort(q, kind="stable")
    qs = q[qorder]
    back = qorder[_nearest_sorted(qs, cs[near])]
    back_d = np.abs(q[back] - cs[near])
    mutual = (back == np.arange(len(q))) | (np.abs(back_d - dist) <= EXACT_S)
    ok = (dist <= EXACT_S) | ((dist <= etol) & mutual)
    out = np.where(ok, corder[near], -1)
    return (out, naive) if return_naive else out


def _rot_to_quat(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations -> (N, 4) unit quaternions x y z w (batched, as core.geometry)."""
    R = np.asarray(R, dtype=np.float64).reshape(-1, 3, 3)
    m = np.zeros((len(R), 4, 4))
    m[:, 0, 0] = R[:, 0, 0] - R[:, 1, 1] - R[:, 2, 2]
    m[:, 1, 0] = R[:, 0, 1] + R[:, 1, 0]
    m[:, 1, 1] = R[:, 1, 1] - R[:, 0, 0] - R[:, 2, 2]
    m[:, 2, 0] = R[:, 0, 2] + R[:, 2, 0]
    m[:, 2, 1] = R[:, 1, 2] + R[:, 2, 1]
    m[:, 2, 2] = R[:, 2, 2] - R[:, 0, 0] - R[:, 1, 1]
    m[:, 3, 0] = R[:, 2, 1] - R[:, 1, 2]
    m[:, 3, 1] = R[:, 0, 2] - R[:, 2, 0]
    m[:, 3, 2] = R[:, 1, 0] - R[:, 0, 1]
    m[:, 3, 3] = R[:, 0, 0] + R[:, 1, 1] + R[:, 2, 2]
    _, vecs = np.linalg.eigh(m / 3.0)  # lower triangle is read
    return vecs[:, :, -1]


def _quat_to_rot(q: np.ndarray) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    R = np.empty((len(q), 3, 3))
    R[:, 0, 0] = 1 - 2 * (y * y + z * z)
    R[:, 0, 1] = 2 * (x * y - z * w)
    R[:, 0, 2] = 2 * (x * z + y * w)
    R[:, 1, 0] = 2 * (x * y + z * w)
    R[:, 1, 1] = 1 - 2 * (x * x + z * z)
    R[:, 1, 2] = 2 * (y * z - x * w)
    R[:, 2, 0] = 2 * (x * z - y * w)
    R[:, 2, 1] = 2 * (y * z + x * w)
    R[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, s) -> np.ndarray:
    """Pose(s) a fraction ``s`` (scalar or (N,)) of the way from T0 to T1: SLERP of the
    rotation, linear translation. Returns (4, 4) for a scalar ``s``, else (N, 4, 4)."""
    scalar = np.ndim(s) == 0
    s = np.atleast_1d(np.asarray(s, dtype=np.float64))
    T0 = np.broadcast_to(np.asarray(T0, dtype=np.float64).reshape(-1, 4, 4), (len(s), 4, 4))
    T1 = np.broadcast_to(np.asarray(T1, dtype=np.float64).reshape(-1, 4, 4), (len(s), 4, 4))
    q0, q1 = _rot_to_quat(T0[:, :3, :3]), _rot_to_quat(T1[:, :3, :3])
    dot = np.sum(q0 * q1, axis=-1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)  # shortest arc
    dot = np.clip(np.abs(dot), -1.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    small = sin < 1e-9
    w0 = np.where(small, 1.0 - s, np.sin((1.0 - s) * theta) / np.where(small, 1.0, sin))
    w1 = np.where(small, s, np.sin(s * theta) / np.where(small, 1.0, sin))
    q = w0[:, None] * q0 + w1[:, None] * q1
    out = np.tile(np.eye(4), (len(s), 1, 1))
    out[:, :3, :3] = _quat_to_rot(q)
    out[:, :3, 3] = (1.0 - s)[:, None] * T0[:, :3, 3] + s[:, None] * T1[:, :3, 3]
    return out[0] if scalar else out


#: how a pose was found (``interpolate_poses`` codes)
POSE_NONE, POSE_EXACT, POSE_INTERPOLATED, POSE_NEAREST = 0, 1, 2, 3


def interpolate_poses(query, pose_stamps, poses, tolerance: float) -> Tuple[np.ndarray, np.ndarray]:
    """Camera pose at every query stamp from a pose stream (stamps in any order).

    Returns ``(T, how)``: (N, 4, 4) poses (NaN where none) and codes POSE_EXACT (same stamp),
    POSE_INTERPOLATED (between the poses before and after, both within ``tolerance``),
    POSE_NEAREST (the nearer neighbour, within ``tolerance``) or POSE_NONE. Offline use: the
    poses of a whole bag at once."""
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    ts = np.asarray(pose_stamps, dtype=np.float64).reshape(-1)
    P = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
    out = np.full((len(q), 4, 4), np.nan)
    how = np.zeros(len(q), dtype=np.int8)
    if len(q) == 0 or len(ts) == 0:
        return out, how
    order = np.argsort(ts, kind="stable")
    ts, P = ts[order], P[order]
    i = np.searchsorted(ts, q, side="right")  # ts[i-1] <= q < ts[i]
    lo, hi = np.clip(i - 1, 0, len(ts) - 1), np.clip(i, 0, len(ts) - 1)
    d_lo, d_hi = q - ts[lo], ts[hi] - q
    has_lo, has_hi = (i > 0), (i < len(ts))
    exact = has_lo & (np.abs(d_lo) <= EXACT_S)
    exact_hi = ~exact & has_hi & (np.abs(d_hi) <= EXACT_S)
    interp = ~exact & ~exact_hi & has_lo & has_hi & (d_lo <= tolerance) & (d_hi <= tolerance)
    use_lo = np.where(has_lo, d_lo, np.inf) <= np.where(has_hi, d_hi, np.inf)
    nd = np.where(use_lo, np.where(has_lo, d_lo, np.inf), np.where(has_hi, d_hi, np.inf))
    nearest = ~exact & ~exact_hi & ~interp & (nd <= tolerance)
    out[exact] = P[lo[exact]]
    out[exact_hi] = P[hi[exact_hi]]
    if interp.any():
        s = d_lo[interp] / (ts[hi[interp]] - ts[lo[interp]])
        out[interp] = interpolate_pose(P[lo[interp]], P[hi[interp]], s)
    out[nearest] = P[np.where(use_lo, lo, hi)[nearest]]
    how[exact | exact_hi] = POSE_EXACT
    how[interp] = POSE_INTERPOLATED
    how[nearest] = POSE_NEAREST
    return out, how

# ----------------------------------------------------------------------------- live pairing


@dataclass
class PairingConfig:
    need_depth: bool = True          #: the backend needs depth (rgbd): frames wait for it
    need_info: bool = True           #: frames wait for a CameraInfo
    depth_tolerance_s: float = 0.05  #: max |t_colour - t_depth| of an approximate match (capped below period/2)
    pose_tolerance_s: float = 0.1    #: max |t_colour - t_pose| of a pose neighbour used
    expiry_s: float = 0.5            #: how long a colour frame waits for its partners after it arrived (s)
    max_pending: int = 32            #: colour frames waiting at most (older ones are superseded)
    max_depths: int = 30             #: depth messages kept for matching
    max_poses: int = 400             #: pose messages kept for interpolation

    def validate(self) -> "PairingConfig":
        for name in ("depth_tolerance_s", "pose_tolerance_s", "expiry_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("max_pending", "max_depths", "max_poses"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        return self


@dataclass
class PairedFrame:
    """One colour frame handed out by ``FramePairer.poll``: paired, or ``dropped`` with a reason."""
    stamp: float
    image: Any
    frame_id: str = ""
    depth: Any = None
    depth_stamp: Optional[float] = None
    pose: Optional[np.ndarray] = None
    pose_source: str = "none"        #: exact | interpolated | nearest | external | none | late | unmatched
    info: Any = None
    dropped: Optional[str] = None    #: None, or one of the drop counters of the module docstring
    detail: str = ""                 #: what was missing, in words (for the log line)
    waited_s: float = 0.0            #: arrival -> hand-out (s)


@dataclass
class _Pending:
    stamp: float
    image: Any
    frame_id: str
    arrived: float
    done: bool = False


class FramePairer:
    """Thread-safe pairing of colour frames with depth, pose and CameraInfo messages.

    ``add_*`` are cheap (a sorted insert); call ``poll(now)`` from the consumer thread (after an
    add, or every few tens of ms for the expiries). ``now`` is any monotonic clock in seconds.
    ``expect_pose`` (attribute) says whether poses are expected (poses are arriving): then a
    frame never goes out without one (or without ``pose_source`` 'late' / 'unmatched' saying
    why). ``await_pose``: a pose source is connected but has sent nothing yet: frames wait for a
    pose up to the expiry, then go out without one. ``pose_fn(stamp, frame_id) -> 4x4 or None`` is an
    optional non-blocking external lookup tried first (e.g. TF)."""

    def __init__(self, config: Optional[PairingConfig] = None,
                 pose_fn: Optional[Callable[[float, str], Optional[np.ndarray]]] = None):
        self.config = (config or PairingConfig()).validate()
        self.pose_fn = pose_fn
        self.expect_pose = False   # poses are required: no frame goes out without one (or its reason)
        self.await_pose = False    # a pose source exists but sent nothing yet: wait up to the expiry, then go without
        self._lock = threading.Lock()
        self._counts = collections.Counter()
        self._pending: List[_Pending] = []
        self._dstamps: List[float] = []
        self._ditems: List[Any] = []
        self._dused: List[bool] = []
        self._pstamps: List[float] = []
        self._poses: List[np.ndarray] = []
        self._info = None
        self._recent = collections.deque(maxlen=32)   # colour stamps seen (period estimate, mutual check)
        self._lost = collections.deque(maxlen=64)     # stamps dropped as depth_lost (late-depth detection)
        self._last_out: Optional[float] = None        # newest stamp handed out
        self._early: List[PairedFrame] = []           # dropped at add time, handed out by the next poll

    # -------------------------------------------------------------------------- inputs
    def add_image(self, stamp: float, image: Any, now: float, frame_id: str = "") -> None:
        """A colour frame arrived (``image`` is kept as it is, e.g. the undecoded message). A frame
        not newer than one already handed out cannot keep the stamp order: it goes out at the next
        poll as ``out_of_order`` (the keyframe buffer would refuse it as a backwards / duplicate
        timestamp anyway; its partners may already be forgotten)."""
        stamp = float(stamp)
        with self._lock:
            if self._last_out is not None and stamp <= self._last_out + EXACT_S:
                self._counts["out_of_order"] += 1
                self._early.append(PairedFrame(stamp, image, frame_id, dropped="out_of_order",
                                               detail=f"arrived after the frame at t={self._last_out:.6f} was "
                                               "handed out"))
                return
            keys = [p.stamp for p in self._pending]
            i = bisect.bisect_right(keys, stamp)
            if i > 0 and abs(keys[i - 1] - stamp) <= EXACT_S:  # the same instant twice: keep the first
                self._counts["duplicate_timestamp"] += 1
                self._early.append(PairedFrame(stamp, image, frame_id, dropped="duplicate_timestamp",
                                               detail=f"a colour frame stamped t={stamp:.6f} is already waiting"))
                return
            self._pending.insert(i, _Pending(stamp, image, frame_id, float(now)))
            self._recent.append(stamp)
            while len(self._pending) > self.config.max_pending:
                old = self._pending.pop(0)
                self._counts["superseded"] += 1
                self._early.append(PairedFrame(old.stamp, old.image, old.frame_id, dropped="superseded",
                                               detail=f"more than {self.config.max_pending} colour frames waiting "
                                               "for their depth/pose: the oldest was dropped",
                                               waited_s=float(now) - old.arrived))

    def add_depth(self, stamp: float, depth: Any, now: float = 0.0) -> None:
        stamp = float(stamp)
        with self._lock:
            i = bisect.bisect_right(self._dstamps, stamp)
            if i > 0 and abs(self._dstamps[i - 1] - stamp) <= EXACT_S:
                # the same instant again (a resend or a repeated frame): the newest copy is
                # available again to a colour frame of that stamp
                self._ditems[i - 1], self._dused[i - 1] = depth, False
                return
            if self._late_for_lost(stamp):
                return
            self._dstamps.insert(i, stamp)
            self._ditems.insert(i, depth)
            self._dused.insert(i, False)
            while len(self._dstamps) > self.config.max_depths:
                self._drop_depth(0)

    def add_pose(self, stamp: float, T: np.ndarray, now: float = 0.0) -> None:
        stamp = float(stamp)
        T = np.asarray(T, dtype=np.float64)
        with self._lock:
            i = bisect.bisect_right(self._pstamps, stamp)
            if i > 0 and abs(self._pstamps[i - 1] - stamp) <= EXACT_S:
                self._poses[i - 1] = T
                return
            self._pstamps.insert(i, stamp)
            self._poses.insert(i, T)
            while len(self._pstamps) > self.config.max_poses:
                self._pstamps.pop(0)
                self._poses.pop(0)

    def add_info(self, info: Any, now: float = 0.0) -> None:
        with self._lock:
            self._info = info

    @property
    def info(self):
        return self._info

    def clear(self) -> None:
        """Forget every waiting frame and message (e.g. on ~/reset); counters are kept."""
        with self._lock:
            self._pending.clear()
            self._dstamps.clear()
            self._ditems.clear()
            self._dused.clear()
            self._pstamps.clear()
            self._poses.clear()
            self._recent.clear()
            self._lost.clear()
            self._last_out = None
            self._early.clear()

    # -------------------------------------------------------------------------- state
    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def sizes(self) -> dict:
        """Messages held: waiting colour frames, depth and pose messages."""
        with self._lock:
            return {"pending_frames": len(self._pending), "depths": len(self._dstamps), "poses": len(self._pstamps)}

    def period(self) -> float:
        """Colour frame period estimated from the recent stamps (s), 0 when unknown."""
        with self._lock:
            return estimate_period(list(self._recent))

    def depth_tolerance(self) -> float:
        """The approximate depth tolerance in force (the configured one capped below period/2)."""
        return effective_tolerance(self.config.depth_tolerance_s, self.period())

    # -------------------------------------------------------------------------- matching
    def poll(self, now: float) -> List[PairedFrame]:
        """Frames completed or expired since the last call, oldest stamp first."""
        out: List[PairedFrame] = []
        with self._lock:
            cfg = self.config
            out.extend(self._early)
            self._early.clear()
            period = estimate_period(list(self._recent))
            etol = effective_tolerance(cfg.depth_tolerance_s, period)
            while self._pending:
                p = self._pending[0]
                expired = now - p.arrived >= cfg.expiry_s
                res = self._try_complete(p, etol, expired, now)
                if res is None:
                    break  # the oldest frame still waits: later ones wait behind it (stamp order)
                self._pending.pop(0)
                self._last_out = p.stamp if self._last_out is None else max(self._last_out, p.stamp)
                out.append(res)
            self._prune()
        return out

    def _try_complete(self, p: _Pending, etol: float, expired: bool, now: float) -> Optional[PairedFrame]:
        cfg = self.config
        res = PairedFrame(p.stamp, p.image, p.frame_id, waited_s=now - p.arrived)
        # camera info
        if cfg.need_info and self._info is None:
            if not expired:
                return None
            return self._drop(res, "no_camera_info", "no valid CameraInfo received yet")
        res.info = self._info
        # depth
        di, naive = -1, -1
        if cfg.need_depth:
            di, final, naive = self._depth_for(p.stamp, etol)
            if di < 0 or not final:
                if not expired:
                    return None
            if di < 0:
                if naive >= 0:
                    self._counts["wrong_pair_avoided"] += 1
                self._lost.append(p.stamp)
                return self._drop(res, "depth_lost", f"no depth stamped within {etol * 1e3:.1f} ms of the colour "
                                  f"frame arrived within {cfg.expiry_s:g} s" + (
                                      " (the nearest depth belongs to another frame: not used)" if naive >= 0 else ""))
        # pose: a frame whose pose is missing still goes out (its depth is committed), marked with
        # pose_source 'late' / 'unmatched' and the reason in ``detail``: the consumer refuses it
        # after checking the image itself (a broken image is reported as such first)
        pose, how = self._pose_for(p.stamp, p.frame_id, expired)
        if how == "wait":
            return None
        res.pose, res.pose_source = pose, how
        self._counts[f"pose_{how}"] += 1
        if how in ("late", "unmatched"):
            near = self._pose_neighbours(p.stamp)
            res.detail = ("no camera pose for its stamp: " + (
                f"{near}, beyond input.pose_sync_tolerance_s={cfg.pose_tolerance_s:g} s" if how == "unmatched" else
                f"no pose message covering it arrived within {cfg.expiry_s:g} s ({near})"))
        # commit the depth
        if cfg.need_depth:
            res.depth, res.depth_stamp = self._ditems[di], self._dstamps[di]
            self._dused[di] = True
            exact = abs(res.depth_stamp - p.stamp) <= EXACT_S
            self._counts["paired_exact" if exact else "paired_approx"] += 1
            if naive >= 0 and naive != di:
                self._counts["wrong_pair_avoided"] += 1
        else:
            self._counts["paired_no_depth"] += 1
        return res

    def _drop(self, res: PairedFrame, reason: str, detail: str) -> PairedFrame:
        self._counts[reason] += 1
        res.dropped, res.detail = reason, detail
        return res

    def _depth_for(self, stamp: float, etol: float) -> Tuple[int, bool, int]:
        """(index of the depth partner or -1, whether that choice is final, naive nearest index)."""
        ds = self._dstamps
        if not ds:
            return -1, False, -1
        i = bisect.bisect_left(ds, stamp)
        cands = [j for j in (i - 1, i, i + 1) if 0 <= j < len(ds)]
        j = min(cands, key=lambda k: abs(ds[k] - stamp))
        d = abs(ds[j] - stamp)
        naive = j if d <= self.config.depth_tolerance_s else -1  # what plain nearest-in-tolerance picks
        if d <= EXACT_S:
            return (j, True, naive) if not self._dused[j] else (-1, False, naive)
        if d > etol or self._dused[j]:
            return -1, False, naive
        # mutual nearest: no other known colour frame is nearer to this depth
        others = [s for s in self._recent if abs(s - stamp) > EXACT_S]
        if any(abs(s - ds[j]) < d for s in others):
            return -1, False, naive
        later_colour = any(s > stamp + EXACT_S for s in self._recent)
        later_depth = ds[-1] >= stamp
        return j, (later_colour and later_depth), naive

    def _pose_neighbours(self, stamp: float) -> str:
        ps = self._pstamps
        if not ps:
            return "no pose received"
        i = bisect.bisect_left(ps, stamp)
        parts = []
        if i > 0:
            parts.append(f"{(stamp - ps[i - 1]) * 1e3:.0f} ms before")
        if i < len(ps):
            parts.append(f"{(ps[i] - stamp) * 1e3:.0f} ms after")
        return "nearest poses " + " / ".join(parts)

    def _pose_for(self, stamp: float, frame_id: str, expired: bool) -> Tuple[Optional[np.ndarray], str]:
        """(pose, how) with how in exact | interpolated | nearest | external | none | wait | late | unmatched."""
        if self.pose_fn is not None:
            try:
                T = self.pose_fn(stamp, frame_id)
            except Exception:  # an external lookup must never break the pairing
                T = None
            if T is not None:
                return np.asarray(T, dtype=np.float64), "external"
        tol = self.config.pose_tolerance_s
        ps = self._pstamps
        if not ps:
            if not self.expect_pose:
                return (None, "wait") if self.await_pose and not expired else (None, "none")
            return (None, "late") if expired else (None, "wait")
        lo, hi = max(0, bisect.bisect_left(ps, stamp) - 1), bisect.bisect_right(ps, stamp) + 1
        T, how = interpolate_poses([stamp], ps[lo:hi], self._poses[lo:hi], tol)  # the two neighbours
        code = int(how[0])
        has_after = ps[-1] >= stamp - EXACT_S
        if code == POSE_EXACT:
            return T[0], "exact"
        if code == POSE_INTERPOLATED:
            return T[0], "interpolated"
        if not has_after and not expired:
            return None, "wait"  # the odometry of this instant may still come
        if code == POSE_NEAREST:
            return T[0], "nearest"
        if not self.expect_pose:
            return None, "none"
        return None, ("unmatched" if has_after else "late")

    def _late_for_lost(self, stamp: float) -> bool:
        """A depth for a frame already dropped as depth_lost: count it as late (not kept) instead.
        A depth that a waiting frame can use exactly, or that is nearer to another colour frame,
        is not late."""
        if not self._lost or any(abs(p.stamp - stamp) <= EXACT_S for p in self._pending):
            return False
        etol = effective_tolerance(self.config.depth_tolerance_s, estimate_period(list(self._recent)))
        for k, s in enumerate(self._lost):
            d = abs(s - stamp)
            if d <= EXACT_S or (d <= etol and not any(abs(c - stamp) < d for c in self._recent)):
                self._counts["depth_lost"] -= 1
                self._counts["depth_late"] += 1
                del self._lost[k]
                return True
        return False

    def _drop_depth(self, i: int) -> None:
        if not self._dused[i]:
            self._counts["depth_unclaimed"] += 1
        del self._dstamps[i], self._ditems[i], self._dused[i]

    def _prune(self) -> None:
        """Forget depths no waiting or future frame can use (older than what was handed out)."""
        if self._last_out is None:
            return
        horizon = self._last_out - max(self.config.depth_tolerance_s, EXACT_S) - 1e-3
        if self._pending:
            horizon = min(horizon, self._pending[0].stamp - self.config.depth_tolerance_s - 1e-3)
        while self._dstamps and self._dstamps[0] < horizon:
            self._drop_depth(0)
        phorizon = self._last_out - 2.0 * max(self.config.pose_tolerance_s, 1.0)
        while len(self._pstamps) > 2 and self._pstamps[1] < phorizon:
            self._pstamps.pop(0)
            self._poses.pop(0)
