"""RGB-D reconstruction backend: metric pointmaps from depth, pairwise poses from registration.

For every keyframe the pointmap is the back-projection of its metric depth with its ``K``
(camera frame, metres).  Confidence::

    conf = 1 + conf_scale * exp(-conf_k * rel_jump)     where the depth is valid,
    conf = 0                                             where it is not (depth 0 / NaN / > max_depth)

with ``rel_jump`` the largest relative depth difference ``|d - d_nb| / d`` to the four
neighbours (infinite next to invalid pixels), so points on depth discontinuities (mixed pixels,
flying points) get confidence close to 1 and smooth surfaces ``1 + conf_scale``.  Invalid pixels
keep a *finite* point (the pixel ray at the frame's median depth) so that downstream optimisers
never see NaN; their confidence is 0.

The relative pose of every pair ``(i, j)`` is registered **independently of odometry**:

1. keypoints + descriptors (SIFT or ORB, OpenCV) on each keyframe, restricted to valid depth;
2. mutual nearest-neighbour matching with Lowe's ratio test (vectorised distance matrices);
3. ``cv2.solvePnPRansac`` with the 3D points of ``j`` (its depth) and the 2D keypoints of ``i``,
   Levenberg-Marquardt refinement on the inliers, then a 3D consistency check of the inliers;
4. point-to-plane ICP (Huber-weighted Gauss-Newton, projective data association on the
   organised target pointmap, normal compatibility, coarse-to-fine correspondence gates) of the sub-sampled pointmap of ``j`` onto that of ``i``; the ICP
   correction is accepted only if it stays within ``max_icp_correction`` of the RANSAC pose.

Odometry / TF poses (``Keyframe.pose_prior``, camera-to-world), when both keyframes have one, give
a second ICP initialisation: the candidate with the better ICP overlap wins (ties go to the
feature-based one).  When feature registration fails (fewer than ``min_inliers`` inliers, e.g.
on a textureless pair) the prior is used (``fallback_to_prior=True``), ICP-refined only when the
refinement improves the overlap and moves less than ``max_icp_correction``; without a prior a
:class:`~wildseg3d_ros.core.pointmaps.base.BackendError` explains the failure.

The prediction for edge ``(i, j)`` (:class:`~wildseg3d_ros.core.types.PairwisePredictions`, metric):
``pts1`` = pointmap of ``i`` in its own frame, ``pts2`` = pointmap of ``j`` mapped into ``i``'s frame by
``T_ij`` (pose of camera ``j`` in camera ``i``: ``x_i = T_ij x_j``).  ``relative_poses`` and
``registrations`` keep the last run's results for diagnostics.
"""
from __future__ import annotations

import dataclasses

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..geometry import (backproject_depth, finite_points, invert_pose, pose_delta, rotation_from_rotvec,
                        transform_points)
from ..types import Keyframe, PairwisePredictions
from ..errors import BackendError, CancelFn, ProgressFn, check_cancel, report
from .base import Pair, PointmapBackend
from .scene_graph import graph_components


# ----------------------------------------------------------------------------------------------
# Pointmaps and confidence
# ----------------------------------------------------------------------------------------------
def depth_confidence(depth: np.ndarray, conf_scale: float = 3.0, conf_k: float = 20.0,
                     max_depth: float = np.inf) -> np.ndarray:
    """Per-pixel confidence (H, W) float32 from depth validity and local discontinuities."""
    d = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(d) & (d > 0) & (d <= max_depth)
    dv = np.where(valid, d, np.nan).astype(np.float32)
    pad = np.pad(dv, 1, mode="edge")
    H, W = d.shape
    nbs = (pad[0:H, 1:W + 1], pad[2:H + 2, 1:W + 1], pad[1:H + 1, 0:W], pad[1:H + 1, 2:W + 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        jumps = np.stack([np.abs(dv - n) for n in nbs], 0) / dv[None]
    jumps = np.where(np.isnan(jumps), np.inf, jumps)  # invalid neighbour -> discontinuity
    rel = jumps.max(0)
    conf = 1.0 + conf_scale * np.exp(-conf_k * rel)
    return np.where(valid, conf, 0.0).astype(np.float32)


def depth_pointmap(depth: np.ndarray, K: np.ndarray, max_depth: float = np.inf) -> np.ndarray:
    """Camera-frame pointmap (H, W, 3) float32; invalid pixels lie on their ray at the median
    valid depth (finite, conf 0)."""
    d = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(d) & (d > 0) & (d <= max_depth)
    fill = float(np.median(d[valid])) if valid.any() else 1.0
    return backproject_depth(np.where(valid, d, fill).astype(np.float32), K)


def organised_normals(pts: np.ndarray, valid: np.ndarray, step: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Normals (H, W, 3) of an organised pointmap by central differences at ``step`` pixels,
    oriented towards the camera; returns (normals, ok)."""
    H, W, _ = pts.shape
    s = max(1, int(step))
    n = np.zeros_like(pts, dtype=np.float32)
    ok = np.zeros((H, W), bool)
    if H <= 2 * s or W <= 2 * s:
        return n, ok
    c = (slice(s, H - s), slice(s, W - s))
    dx = pts[s:H - s, 2 * s:] - pts[s:H - s, :W - 2 * s]
    dy = pts[2 * s:, s:W - s] - pts[:H - 2 * s, s:W - s]
    cr = np.cross(dx, dy)
    norm = np.linalg.norm(cr, axis=-1)
    good = (valid[s:H - s, 2 * s:] & valid[s:H - s, :W - 2 * s] & valid[2 * s:, s:W - s]
            & valid[:H - 2 * s, s:W - s] & valid[c] & (norm > 1e-12))
    cr = cr / np.maximum(norm, 1e-12)[..., None]
    flip = (cr * pts[c]).sum(-1) > 0
    cr[flip] *= -1
    n[c] = cr
    ok[c] = good
    return n, ok


# ----------------------------------------------------------------------------------------------
# Small SE(3) helpers
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Point-to-plane ICP
# ----------------------------------------------------------------------------------------------
@dataclass
class IcpResult:
    T: np.ndarray
    fitness: float  # fraction of source points with a correspondence within the last gate
    rmse: float  # point-to-plane RMS residual of those correspondences (m)
    iterations: int


def icp_point_to_plane(src: np.ndarray, tgt_pts: np.ndarray, tgt_nrm: np.ndarray, tgt_ok: np.ndarray,
                       K: np.ndarray, T0: np.ndarray, src_nrm: Optional[np.ndarray] = None,
                       gates: Sequence[float] = (0.10, 0.04, 0.015), rel_gate: float = 0.01,
                       iters: int = 10, normal_cos: float = 0.8, huber: float = 2.0,
                       depth_sigma: Optional[Tuple[float, float, float]] = (0.0012, 0.0019, 0.4),
                       feat_src: Optional[np.ndarray] = None, feat_tgt: Optional[np.ndarray] = None,
                       feat_sigma_factor: float = 3.0, eps: float = 1e-6) -> IcpResult:
    """Point-to-plane ICP of ``src`` (N, 3) onto an *organised* target pointmap.

    Correspondences by projective association (KinectFusion style): each transformed source
    point is projected with ``K`` into the target image and paired with the target pixel's point
    / normal (``tgt_pts``, ``tgt_nrm`` (H, W, 3), ``tgt_ok`` (H, W) bool); a pair is kept when
    the points are closer than ``gate + rel_gate * z`` and, with ``src_nrm``, the normals agree
    (cosine > ``normal_cos``).  Each gate (m) runs up to ``iters`` Gauss-Newton steps.

    Residuals are weighted by the inverse variance of the depth noise ``sigma(z) = a + b (z - c)^2``
    (``depth_sigma`` = (a, b, c); the default is the Kinect model of Nguyen et al. 2012; None =
    uniform) with a Huber kernel of ``huber`` sigmas, so far, noisy (and often biased) depth does
    not dominate.  Optional matched 3D feature points ``feat_src`` -> ``feat_tgt`` (K, 3) add
    point-to-point residuals with sigma ``feat_sigma_factor * sigma(z)``: they pin the degrees of
    freedom that planar geometry leaves free (ICP sliding).  Returns ``T`` with ``tgt ≈ T src``; ``fitness`` =
    fraction of source points paired at the last gate, ``rmse`` their point-to-plane residual.
    """
    T = np.array(T0, dtype=np.float64)
    src = np.asarray(src, dtype=np.float64)
    H, W = tgt_ok.shape
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    it_total = 0

    def residuals(T, gate):
        p = src @ T[:3, :3].T + T[:3, 3]
        z = p[:, 2]
        zs = np.where(z > 1e-6, z, 1.0)
        u = np.round(fx * p[:, 0] / zs + cx).astype(np.int64)
        v = np.round(fy * p[:, 1] / zs + cy).astype(np.int64)
        ok = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        u, v = np.where(ok, u, 0), np.where(ok, v, 0)
        ok &= tgt_ok[v, u]
        q = tgt_pts[v, u].astype(np.float64)
        nn = tgt_nrm[v, u].astype(np.float64)
        ok &= np.linalg.norm(p - q, axis=1) < gate + rel_gate * z
        if src_nrm is not None:
            ok &= ((src_nrm @ T[:3, :3].T) * nn).sum(1) > normal_cos
        r = ((p[ok] - q[ok]) * nn[ok]).sum(1)
        return p[ok], nn[ok], r, int(ok.sum())

    def sigma(z):
        if depth_sigma is None:
            return np.full_like(z, 0.01)
        a, b, c = depth_sigma
        return a + b * (z - c) ** 2

    if feat_src is not None and feat_tgt is not None and len(feat_src) > 0:
        fs = np.asarray(feat_src, np.float64)
        ft = np.asarray(feat_tgt, np.float64)
        fsig = feat_sigma_factor * sigma(ft[:, 2])
    else:
        fs = None

    for gate in gates:
        for _ in range(iters):
            pp, nn, r, nk = residuals(T, gate)
            if nk < 6:
                break
            sg = sigma(pp[:, 2])
            rn = np.abs(r) / sg
            w = np.where(rn <= huber, 1.0, huber / np.maximum(rn, 1e-12)) / sg ** 2
            J = np.hstack([np.cross(pp, nn), nn])
            Hm = J.T @ (J * w[:, None])
            g = J.T @ (w * r)
            if fs is not None:
                pf = fs @ T[:3, :3].T + T[:3, 3]
                e = pf - ft
                en = np.linalg.norm(e, axis=1) / fsig
                wf = np.where(en <= huber, 1.0, huber / np.maximum(en, 1e-12)) / fsig ** 2
                # d(R p + t)/d(omega, t) = [-[p]x, I]; stack the 3 rows of every feature
                Jf = np.zeros((len(pf), 3, 6))
                Jf[:, 0, 1], Jf[:, 0, 2] = pf[:, 2], -pf[:, 1]
                Jf[:, 1, 0], Jf[:, 1, 2] = -pf[:, 2], pf[:, 0]
                Jf[:, 2, 0], Jf[:, 2, 1] = pf[:, 1], -pf[:, 0]
                Jf[:, :, 3:] = np.eye(3)
                Hm = Hm + np.einsum("kai,k,kaj->ij", Jf, wf, Jf)
                g = g + np.einsum("kai,k,ka->i", Jf, wf, e)
            Hm = Hm + 1e-9 * np.trace(Hm) * np.eye(6)
            x = -np.linalg.solve(Hm, g)
            dT = np.eye(4)
            dT[:3, :3] = rotation_from_rotvec(x[:3])
            dT[:3, 3] = x[3:]
            T = dT @ T
            it_total += 1
            if np.linalg.norm(x) < eps:
                break
    _, _, r, nk = residuals(T, gates[-1])
    fitness = nk / max(len(src), 1)
    rmse = float(np.sqrt(np.mean(r ** 2))) if nk >= 6 else float("inf")
    return IcpResult(T=T, fitness=float(fitness), rmse=float(rmse), iterations=it_total)


# ----------------------------------------------------------------------------------------------
# Features and matching
# ----------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    K: np.ndarray
    depth: np.ndarray
    valid: np.ndarray
    pts: np.ndarray  # (H, W, 3) camera frame
    conf: np.ndarray
    uv: np.ndarray = None  # (N, 2) keypoints with valid depth
    xyz: np.ndarray = None  # (N, 3) their camera-frame points
    desc: np.ndarray = None
    nrm: np.ndarray = None  # (H, W, 3) normals (camera frame)
    nrm_ok: np.ndarray = None  # (H, W) usable for ICP (valid, smooth, normal defined)
    icp_src: np.ndarray = None  # (M, 3) sub-sampled points used as ICP source
    icp_nrm: np.ndarray = None  # (M, 3) their normals


def _match(desc_a: np.ndarray, desc_b: np.ndarray, binary: bool, ratio: float
           ) -> Tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours passing the ratio test; returns index arrays (ia, ib), one a
    per b (binary descriptors' tied distances: the first a)."""
    if desc_a is None or desc_b is None or len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    import torch

    if binary:
        a = torch.from_numpy(np.unpackbits(desc_a, axis=1).astype(np.float32))
        b = torch.from_numpy(np.unpackbits(desc_b, axis=1).astype(np.float32))
    else:
        a = torch.from_numpy(np.ascontiguousarray(desc_a, dtype=np.float32))
        b = torch.from_numpy(np.ascontiguousarray(desc_b, dtype=np.float32))
    # squared distances by one matrix product per row block (torch: BLAS, threads) of augmented
    # descriptors, [a, |a|^2, 1] . [-2 b, 1, |b|^2] = |a - b|^2 (Hamming = squared L2 of bits),
    # so no broadcast sum is materialised.  Per block: the two nearest b of every a (ratio test)
    # and a running minimum over a of every b's distance (mutual check: a's nearest b must have
    # a as its nearest, i.e. their distance is that b's minimum)
    n, blk = len(a), 256
    one_a, one_b = torch.ones(n, 1), torch.ones(len(b), 1)
    a_aug = torch.cat([a, (a * a).sum(1, keepdim=True), one_a], 1)
    bT = torch.cat([-2.0 * b, one_b, (b * b).sum(1, keepdim=True)], 1).T.contiguous()
    two = torch.empty(n, 2)
    best = torch.empty(n, dtype=torch.long)
    col_min = torch.full((len(b),), float("inf"))
    for s in range(0, n, blk):
        D = a_aug[s:s + blk] @ bT
        t2, i2 = D.topk(2, dim=1, largest=False)
        two[s:s + blk] = t2
        best[s:s + blk] = i2[:, 0]
        torch.minimum(col_min, D.amin(0), out=col_min)
    ia = torch.arange(n)
    d1, d2 = two[:, 0].clamp_min(0.0), two[:, 1].clamp_min(0.0)
    mutual = d1 <= col_min[best].clamp_min(0.0)
    if not binary:  # the ratio test on distances, not their squares
        d1, d2 = d1.sqrt(), d2.sqrt()
    keep = (d1 < ratio * d2) & mutual
    if binary and keep.any():
        # integer Hamming distances tie: one a per b (the first), so matches stay one-to-one
        kb = best[keep]
        ki = ia[keep]
        first = torch.ones_like(kb, dtype=torch.bool)
        o = torch.argsort(kb * n + ki)
        first[o[1:]] = kb[o[1:]] != kb[o[:-1]]
        keep[ki[~first]] = False
    return ia[keep].numpy(), best[keep].numpy()


@dataclass
class PairRegistration:
    """Result of registering keyframe ``j`` to keyframe ``i`` (``x_i = T x_j``)."""

    i: int
    j: int
    T: np.ndarray
    status: str  # 'registered' | 'prior' | 'prior+icp'
    init: str  # which initialisation won: 'features' | 'prior'
    matches: int = 0
    inliers: int = 0
    icp_fitness: float = float("nan")
    icp_rmse: float = float("nan")
    seconds: float = 0.0
    message: str = ""


def _pair_prior(a: Keyframe, b: Keyframe) -> Optional[np.ndarray]:
    """Pose of keyframe b's camera in keyframe a's from their pose priors (None without both)."""
    if a.pose_prior is None or b.pose_prior is None:
        return None
    return invert_pose(np.asarray(a.pose_prior, np.float64)) @ np.asarray(b.pose_prior, np.float64)


def _connected(edges, nodes) -> bool:
    """True when the undirected graph (nodes, edges) is connected."""
    return len(graph_components(sorted(set(nodes)), list(edges))) <= 1


class RgbdBackend(PointmapBackend):
    """Pairwise predictions from metric depth + feature/ICP registration (see module docstring).

    Parameters: ``feature`` ('sift' | 'orb'), ``n_features``, ``ratio`` (Lowe), ``min_inliers``,
    ``reproj_px`` (RANSAC threshold in pixels), ``max_depth`` (m), ``conf_scale`` / ``conf_k``
    (confidence law), ``icp`` (refine with ICP), ``icp_points`` (points per keyframe for ICP),
    ``icp_gates`` (m), ``icp_iters``, ``max_icp_correction`` ((degrees, metres)),
    ``use_prior_init`` (try the odometry prior as an ICP start), ``fallback_to_prior``,
    ``scene_graph`` (used when ``predict_pairs`` gets no pairs), ``workers`` (threads for the
    per-keyframe features and the per-pair registrations; 0: min(4, CPUs)).
    """

    name = "rgbd"
    pointmaps_per_keyframe = True  # each view's pointmap is its depth image back-projected

    def __init__(self, feature: str = "sift", n_features: int = 4000, ratio: float = 0.8,
                 sift_contrast: float = 0.01, kp_min_conf: float = 0.05,
                 depth_tol: Tuple[float, float] = (0.05, 0.10),
                 min_inliers: int = 20, reproj_px: float = 3.0, max_depth: float = 10.0,
                 conf_scale: float = 3.0, conf_k: float = 20.0, icp: bool = True,
                 icp_points: int = 8000, icp_gates: Sequence[float] = (0.10, 0.04, 0.015),
                 icp_rel_gate: float = 0.01, icp_feature_weight: float = 1.0,
                 depth_sigma: Optional[Tuple[float, float, float]] = (0.0012, 0.0019, 0.4),
                 icp_iters: int = 10, max_icp_correction: Tuple[float, float] = (5.0, 0.10),
                 use_prior_init: bool = True, fallback_to_prior: bool = True,
                 scene_graph: str = "complete", seed: int = 0, drop_failed_pairs: bool = True,
                 check_consistency: bool = True, consistency_tol: Tuple[float, float, float] = (2.0, 0.03, 0.03),
                 workers: int = 0):
        #: threads for the keyframe features and the pair registrations (0: min(4, CPUs))
        self.workers = int(workers) if int(workers) > 0 else max(1, min(4, os.cpu_count() or 1))
        self.drop_failed_pairs = bool(drop_failed_pairs)
        self.check_consistency = bool(check_consistency)
        self.consistency_tol = tuple(float(x) for x in consistency_tol)
        self.failed_pairs: Dict[Pair, str] = {}
        feature = str(feature).lower()
        if feature not in ("sift", "orb"):
            raise BackendError(f"rgbd backend: unknown feature {feature!r} (sift | orb)")
        self.feature = feature
        self.n_features = int(n_features)
        self.sift_contrast = float(sift_contrast)
        self.kp_min_conf = float(kp_min_conf)
        self.depth_tol = (float(depth_tol[0]), float(depth_tol[1]))
        self.ratio = float(ratio)
        self.min_inliers = int(min_inliers)
        self.reproj_px = float(reproj_px)
        self.max_depth = float(max_depth)
        self.conf_scale = float(conf_scale)
        self.conf_k = float(conf_k)
        self.icp = bool(icp)
        self.icp_points = int(icp_points)
        self.icp_gates = tuple(float(g) for g in icp_gates)
        self.icp_iters = int(icp_iters)
        self.icp_rel_gate = float(icp_rel_gate)
        self.icp_feature_weight = float(icp_feature_weight)
        self.depth_sigma = None if depth_sigma is None else tuple(float(x) for x in depth_sigma)
        self.max_icp_correction = (float(max_icp_correction[0]), float(max_icp_correction[1]))
        self.use_prior_init = bool(use_prior_init)
        self.fallback_to_prior = bool(fallback_to_prior)
        self.scene_graph = scene_graph
        self.seed = int(seed)
        #: (i, j) -> 4x4 pose of camera j in camera i, for every predicted edge of the last run
        self.relative_poses: Dict[Pair, np.ndarray] = {}
        #: (i, j) with i < j -> PairRegistration of the last run
        self.registrations: Dict[Pair, PairRegistration] = {}
        #: prepared keyframes by content (``prepare``, earlier reconstructions), oldest first
        self.frame_cache_size = 12
        self._frames: "OrderedDict[str, _Frame]" = OrderedDict()
        self._frames_lock = threading.Lock()
        #: registrations done ahead (prepare_pairs) by (key_i, key_j, prior): (PairRegistration | None, error)
        self.pair_cache_size = 64
        self._pairs: "OrderedDict[tuple, tuple]" = OrderedDict()
        #: registrations being computed now, by the same key: another thread waits for it
        self._pairs_inflight: Dict[tuple, threading.Event] = {}

    # -- per keyframe ------------------------------------------------------------------------
    def prepare(self, keyframe: Keyframe):
        fr = self._frame(keyframe)
        return fr.pts, (fr.conf > 0) & finite_points(fr.pts)

    def prepare_pairs(self, keyframe: Keyframe, partners: Sequence[Keyframe]) -> int:
        """Register ``keyframe`` to each earlier partner now (pair (partner, keyframe), as
        predict_pairs orders them), cached by content and prior, so a reconstruction that has
        these pairs only looks them up."""
        fr = self._frame(keyframe)
        return sum(self._cached_registration(p, keyframe, self._frame(p), fr, p.index, keyframe.index)[2]
                   for p in partners)

    def _cached_registration(self, a: Keyframe, b: Keyframe, fr_a: "_Frame", fr_b: "_Frame", i: int, j: int):
        """(PairRegistration or None, error or None, computed now) of keyframe b to keyframe a
        (their prepared frames fr_a, fr_b): from the pair cache (by content and prior) or
        registered now and remembered; when another thread is registering the same pair (the
        node's pair preparation while a reconstruction starts), its result is waited for."""
        prior = _pair_prior(a, b)
        key = (a.content_key(), b.content_key(), None if prior is None else prior.tobytes())
        with self._frames_lock:
            hit = self._pairs.get(key)
            busy = self._pairs_inflight.get(key) if hit is None else None
            if hit is None and busy is None:
                done = self._pairs_inflight[key] = threading.Event()
        if busy is not None:
            busy.wait()
            with self._frames_lock:
                hit = self._pairs.get(key)
            if hit is None:  # it failed unexpectedly (or was evicted): register here
                return self._cached_registration(a, b, fr_a, fr_b, i, j)
        if hit is not None:
            return hit[0], hit[1], False
        try:
            try:
                res = (self.register_pair(fr_a, fr_b, prior, i, j), None)
            except BackendError as e:
                res = (None, str(e))
            with self._frames_lock:
                self._pairs[key] = res
                self._pairs.move_to_end(key)
                while len(self._pairs) > self.pair_cache_size:
                    self._pairs.popitem(last=False)
        finally:
            with self._frames_lock:
                self._pairs_inflight.pop(key, None)
            done.set()
        return res[0], res[1], True

    def _frame(self, kf: Keyframe) -> "_Frame":
        """The prepared frame of ``kf`` (features, normals, ICP points), from the cache when the
        same keyframe was prepared before (at acceptance, or by a previous reconstruction)."""
        key = kf.content_key()
        with self._frames_lock:
            hit = self._frames.get(key)
            if hit is not None:
                self._frames.move_to_end(key)
                return hit
        fr = self.prepare_frame(kf)
        with self._frames_lock:
            self._frames[key] = fr
            while len(self._frames) > self.frame_cache_size:
                self._frames.popitem(last=False)
        return fr

    def _detector(self):
        import cv2

        if self.feature == "sift":
            return cv2.SIFT_create(nfeatures=self.n_features, contrastThreshold=self.sift_contrast)
        return cv2.ORB_create(nfeatures=self.n_features, scaleFactor=1.2, nlevels=8, fastThreshold=10)

    def prepare_frame(self, kf: Keyframe, with_features: bool = True) -> _Frame:
        if kf.depth is None:
            raise BackendError(f"rgbd backend: keyframe {kf.index} has no depth image "
                               "(use an RGB-D camera or the dust3r backend)")
        depth = np.asarray(kf.depth, dtype=np.float32)
        if depth.shape != tuple(kf.rgb.shape[:2]):
            raise BackendError(f"rgbd backend: keyframe {kf.index} depth {depth.shape} does not match "
                               f"its colour image {tuple(kf.rgb.shape[:2])} (register depth to colour)")
        K = np.asarray(kf.K, dtype=np.float64)
        valid = np.isfinite(depth) & (depth > 0) & (depth <= self.max_depth)
        fr = _Frame(K=K, depth=depth, valid=valid, pts=depth_pointmap(depth, K, self.max_depth),
                    conf=depth_confidence(depth, self.conf_scale, self.conf_k, self.max_depth))
        if with_features:
            self._features(fr, kf.rgb)
        if self.icp:
            self._icp_points(fr)
        return fr

    def _features(self, fr: _Frame, rgb: np.ndarray) -> None:
        import cv2

        gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
        kps, desc = self._detector().detectAndCompute(gray, None)
        if desc is None or len(kps) == 0:
            fr.uv, fr.xyz, fr.desc = np.zeros((0, 2)), np.zeros((0, 3)), None
            return
        uv = cv2.KeyPoint_convert(kps).astype(np.float64).reshape(-1, 2)
        H, W = fr.depth.shape
        c = np.clip(np.round(uv[:, 0]).astype(int), 0, W - 1)
        r = np.clip(np.round(uv[:, 1]).astype(int), 0, H - 1)
        # keypoints on valid depth only, not on strong discontinuities (mixed depth pixels)
        ok = fr.valid[r, c] & (fr.conf[r, c] > 1.0 + self.kp_min_conf * self.conf_scale)
        d = fr.depth[r, c][ok].astype(np.float64)
        u, v = uv[ok, 0], uv[ok, 1]
        K = fr.K
        fr.xyz = np.stack([(u - K[0, 2]) / K[0, 0] * d, (v - K[1, 2]) / K[1, 1] * d, d], 1)
        fr.uv = uv[ok]
        fr.desc = desc[ok]

    def _icp_points(self, fr: _Frame) -> None:
        H, W = fr.depth.shape
        step = max(1, int(np.floor(np.sqrt(H * W / max(self.icp_points, 1)))))
        nrm, nok = organised_normals(fr.pts, fr.valid, step=2)
        fr.nrm = nrm
        fr.nrm_ok = nok & (fr.conf > 1.0 + 0.5 * self.conf_scale)
        sub = np.zeros_like(nok)
        sub[step // 2::step, step // 2::step] = True
        sel = fr.nrm_ok & sub
        fr.icp_src = fr.pts[sel].astype(np.float64)
        fr.icp_nrm = nrm[sel].astype(np.float64)

    # -- per pair ---------------------------------------------------------------------------
    def _ransac(self, fi: _Frame, fj: _Frame):
        """Feature registration; returns (T_ij or None, matches, inliers, message, (xyz_j, xyz_i)
        of the inliers or None)."""
        import cv2

        ia, ib = _match(fi.desc, fj.desc, self.feature == "orb", self.ratio)
        nm = int(len(ia))
        if nm < max(self.min_inliers, 6):
            return None, nm, 0, f"only {nm} feature matches (need >= {self.min_inliers})", None
        obj = fj.xyz[ib].astype(np.float64)
        img = fi.uv[ia].astype(np.float64)
        cv2.setRNGSeed(self.seed)
        ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, fi.K, None, iterationsCount=2000,
                                                 reprojectionError=self.reproj_px, confidence=0.9999,
                                                 flags=cv2.SOLVEPNP_EPNP)
        if not ok or inl is None or len(inl) < self.min_inliers:
            n_in = 0 if inl is None else len(inl)
            return (None, nm, n_in, f"RANSAC PnP found {n_in} inliers of {nm} matches "
                    f"(need >= {self.min_inliers})", None)
        inl = inl.reshape(-1)
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl], img[inl], fi.K, None, rvec, tvec)
        T = np.eye(4)
        T[:3, :3] = cv2.Rodrigues(rvec)[0]
        T[:3, 3] = tvec.reshape(3)
        # 3D check: the inliers' depth must agree too (rejects depth-inconsistent solutions)
        pj = transform_points(T, obj[inl])
        pi = fi.xyz[ia[inl]]
        tol = self.depth_tol[0] + self.depth_tol[1] * pi[:, 2]  # depth noise grows with range
        good = np.linalg.norm(pj - pi, axis=1) < tol
        n_in = int(good.sum())
        if n_in < self.min_inliers:
            return None, nm, n_in, (f"only {n_in} of {len(inl)} PnP inliers are depth-consistent "
                                    f"(need >= {self.min_inliers})"), None
        sel = inl[good]
        rvec, tvec = cv2.solvePnPRefineLM(obj[sel], img[sel], fi.K, None, rvec, tvec)
        T[:3, :3] = cv2.Rodrigues(rvec)[0]
        T[:3, 3] = tvec.reshape(3)
        return T, nm, n_in, f"{n_in} inliers of {nm} matches", (obj[sel], fi.xyz[ia[sel]])

    def _icp(self, fi: _Frame, fj: _Frame, T0: np.ndarray, iters: Optional[int] = None,
             feats=None) -> Optional[IcpResult]:
        if not self.icp or fi.nrm_ok is None or fj.icp_src is None or len(fj.icp_src) < 6:
            return None
        fs, ft = feats if (feats is not None and self.icp_feature_weight > 0) else (None, None)
        return icp_point_to_plane(fj.icp_src, fi.pts, fi.nrm, fi.nrm_ok, fi.K, T0, src_nrm=fj.icp_nrm,
                                  gates=self.icp_gates if iters is None else self.icp_gates[-1:],
                                  rel_gate=self.icp_rel_gate,
                                  iters=self.icp_iters if iters is None else iters,
                                  depth_sigma=self.depth_sigma, feat_src=fs, feat_tgt=ft,
                                  feat_sigma_factor=1.0 / max(self.icp_feature_weight, 1e-9))

    def _within(self, A: np.ndarray, B: np.ndarray) -> bool:
        dt, dr = pose_delta(A, B)
        return dr <= self.max_icp_correction[0] and dt <= self.max_icp_correction[1]

    def register_pair(self, fi: _Frame, fj: _Frame, prior_ij: Optional[np.ndarray], i: int = 0,
                      j: int = 1) -> PairRegistration:
        t0 = time.perf_counter()
        T_feat, nm, n_in, msg, feats = (self._ransac(fi, fj) if fi.desc is not None
                                         else (None, 0, 0, "no features", None))
        cands = []  # (fitness, rmse, T, init)
        if T_feat is not None:
            r = self._icp(fi, fj, T_feat, feats=feats)
            if r is not None and np.isfinite(r.rmse) and self._within(T_feat, r.T):
                cands.append((r.fitness, r.rmse, r.T, "features"))
            else:
                fit = r.fitness if r is not None else float("nan")
                cands.append((fit if np.isfinite(fit) else 0.0, float("nan"), T_feat, "features"))
            if prior_ij is not None and self.use_prior_init and self.icp and not self._within(T_feat, prior_ij):
                rp = self._icp(fi, fj, prior_ij, feats=feats)
                if rp is not None and np.isfinite(rp.rmse) and self._within(prior_ij, rp.T):
                    cands.append((rp.fitness, rp.rmse, rp.T, "prior"))
            # best overlap wins; the feature solution wins ties (within 2 %)
            best = cands[0]
            for c in cands[1:]:
                if c[0] > best[0] + 0.02:
                    best = c
            return PairRegistration(i, j, best[2], "registered", best[3], nm, n_in, best[0], best[1],
                                    time.perf_counter() - t0, msg)
        if prior_ij is None or not self.fallback_to_prior:
            why = "no odometry/TF prior for this pair" if prior_ij is None else "fallback_to_prior is off"
            raise BackendError(f"rgbd backend: registration of keyframes {i} and {j} failed ({msg}) and "
                               f"{why}; the views may not overlap or be textureless — provide pose "
                               "priors (odometry/TF), add keyframes in between, or use the dust3r backend")
        status, T = "prior", np.array(prior_ij, dtype=np.float64)
        fit, rmse = float("nan"), float("nan")
        r0 = self._icp(fi, fj, T)
        if r0 is not None:
            fit = r0.fitness
            # measure the prior's own overlap at the finest gate, then accept ICP only if it helps
            base = self._icp(fi, fj, T, iters=0)
            fit, rmse = base.fitness, base.rmse
            if np.isfinite(r0.rmse) and r0.fitness >= base.fitness and self._within(T, r0.T):
                status, T, fit, rmse = "prior+icp", r0.T, r0.fitness, r0.rmse
        return PairRegistration(i, j, T, status, "prior", nm, n_in, fit, rmse, time.perf_counter() - t0,
                                f"feature registration failed ({msg}); used the odometry prior")

    # -- public ------------------------------------------------------------------------------
    def predict_pairs(self, keyframes: Sequence[Keyframe], pairs: Optional[Sequence[Pair]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelFn] = None) -> PairwisePredictions:
        import torch

        kfs, pairs = self._check_inputs(keyframes, pairs)
        n = len(kfs)
        used = sorted({v for p in pairs for v in p})
        frames: Dict[int, _Frame] = {}
        und = sorted({(min(i, j), max(i, j)) for i, j in pairs})
        self.registrations = {}
        self.failed_pairs = {}

        def register(ij):
            i, j = ij
            check_cancel(cancel)
            # registered when the keyframe was accepted (prepare_pairs), else now
            reg, err, _ = self._cached_registration(kfs[i], kfs[j], frames[i], frames[j], i, j)
            if reg is None:
                # a pair that does not overlap (e.g. the two ends of an arc in a complete graph)
                # is left out of the pair graph; the aligner checks the rest stays connected
                if not self.drop_failed_pairs:
                    raise BackendError(err)
                return None, err
            return dataclasses.replace(reg, i=i, j=j), None

        # keyframes, then pairs, on a few threads (OpenCV and numpy release the GIL); results are
        # collected in order, so the outcome does not depend on the scheduling
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futs = [pool.submit(lambda v=v: (check_cancel(cancel), self._frame(kfs[v]))[1]) for v in used]
            for c, (v, f) in enumerate(zip(used, futs)):
                frames[v] = f.result()
                report(progress, 0.3 * (c + 1) / len(used), f"rgbd: prepared keyframe {c + 1}/{len(used)}")
            futs = [pool.submit(register, ij) for ij in und]
            for c, (ij, f) in enumerate(zip(und, futs)):
                reg, err = f.result()
                if reg is not None:
                    self.registrations[ij] = reg
                else:
                    self.failed_pairs[ij] = err
                report(progress, 0.3 + 0.65 * (c + 1) / len(und), f"rgbd: registered pair {c + 1}/{len(und)}")
        if not self.registrations:
            raise BackendError("rgbd backend: no keyframe pair could be registered: "
                               + "; ".join(self.failed_pairs.values())[:600])
        if self.check_consistency:
            self._drop_inconsistent_pairs(n)
        pairs = [(i, j) for i, j in pairs if (min(i, j), max(i, j)) in self.registrations]
        self.relative_poses = {}
        E = len(pairs)
        H, W = kfs[0].rgb.shape[:2]
        pts1 = np.empty((E, H, W, 3), np.float32)
        pts2 = np.empty((E, H, W, 3), np.float32)
        conf1 = np.empty((E, H, W), np.float32)
        conf2 = np.empty((E, H, W), np.float32)
        for e, (i, j) in enumerate(pairs):
            reg = self.registrations[(min(i, j), max(i, j))]
            T = reg.T if i < j else invert_pose(reg.T)
            self.relative_poses[(i, j)] = T
            pts1[e] = frames[i].pts
            conf1[e] = frames[i].conf
            pts2[e] = transform_points(T, frames[j].pts)
            conf2[e] = frames[j].conf
        out = PairwisePredictions(
            idx1=[p[0] for p in pairs], idx2=[p[1] for p in pairs],
            pts1=torch.from_numpy(pts1), conf1=torch.from_numpy(conf1),
            pts2=torch.from_numpy(pts2), conf2=torch.from_numpy(conf2),
            images=np.stack([np.asarray(kf.rgb, np.uint8) for kf in kfs]),
            intrinsics=np.stack([np.asarray(kf.K, np.float64) for kf in kfs]), metric=True,
            info={"registrations": self.registration_summary(), "failed_pairs": dict(self.failed_pairs)})
        report(progress, 1.0, f"rgbd: {E} pairwise predictions")
        return out

    def _drop_inconsistent_pairs(self, n: int) -> None:
        """Loop-consistency check of the pair graph by triangle voting: for every triangle
        (i, j, k) whose three pairs are registered, the composed relative poses must close
        (T_ij T_jk T_ki = I within ``consistency_tol``: deg, m + fraction of the loop's
        baselines). A pair that takes part in triangles but closes none of them is dropped:
        a wide-baseline pair with a wrong RANSAC solution would otherwise reach the aligner as
        a confident, contradictory constraint. Pairs in no triangle cannot be checked and stay."""
        from itertools import combinations

        regs = self.registrations

        def rel(a: int, b: int) -> np.ndarray:
            return regs[(a, b)].T if a < b else invert_pose(regs[(b, a)].T)

        # 1) feature registrations that ICP refused to confirm (it wanted to move them by more than
        #    max_icp_correction: the RANSAC pose is likely a wrong local solution) are dropped
        #    first, as long as the pair graph stays connected without them
        if self.icp:
            unverified = [e for e in regs if regs[e].status == "registered" and not np.isfinite(regs[e].icp_rmse)]
            for e in sorted(unverified, key=lambda e: regs[e].inliers):
                rest = [k for k in regs if k != e]
                if _connected(rest, {v for k in regs for v in k}):
                    self.failed_pairs[e] = (f"pair {e}: ICP did not confirm the feature registration "
                                            "(it moved beyond max_icp_correction): dropped")
                    del regs[e]
        # 2) triangle voting on what is left
        rot_tol, t_tol, t_rel = self.consistency_tol
        nodes = sorted({v for k in regs for v in k})
        closes = {}
        for i, j, k in combinations(nodes, 3):
            if not ((i, j) in regs and (j, k) in regs and (i, k) in regs):
                continue
            Tij, Tjk = rel(i, j), rel(j, k)
            loop = Tij @ Tjk @ rel(k, i)
            ang = float(np.degrees(np.arccos(np.clip((np.trace(loop[:3, :3]) - 1) / 2, -1, 1))))
            dt = float(np.linalg.norm(loop[:3, 3]))
            base = float(np.linalg.norm(Tij[:3, 3]) + np.linalg.norm(Tjk[:3, 3]))
            closes[(i, j, k)] = ang <= rot_tol and dt <= t_tol + t_rel * base
        # greedy: drop the pair closing the smallest share of its loops until every pair that is
        # part of a loop closes at least half of them (one wrong pair spoils its neighbours' loops
        # too, so they are re-counted after each removal)
        while True:
            seen = {e: 0 for e in regs}
            ok = {e: 0 for e in regs}
            for (i, j, k), c in closes.items():
                tri = ((i, j), (j, k), (i, k))
                if all(e in regs for e in tri):
                    for e in tri:
                        seen[e] += 1
                        ok[e] += int(c)
            bad = [e for e in regs if seen[e] and ok[e] / seen[e] < 0.5]
            if not bad:
                break
            worst = min(bad, key=lambda e: (ok[e] / seen[e], regs[e].inliers))
            self.failed_pairs[worst] = (f"pair {worst} closes {ok[worst]} of the {seen[worst]} loops it is "
                                        "part of (loop-consistency check): dropped")
            del regs[worst]

    def registration_summary(self) -> List[dict]:
        """One dict per registered pair of the last run (for logs / benchmarks)."""
        return [dict(i=r.i, j=r.j, status=r.status, init=r.init, matches=r.matches, inliers=r.inliers,
                     icp_fitness=r.icp_fitness, icp_rmse=r.icp_rmse, seconds=r.seconds, message=r.message)
                for r in self.registrations.values()]
