"""Express an aligned reconstruction in the frame of known camera poses (odometry, TF, mocap).

The aligner returns camera-to-world poses in a gauge of its own (camera 0 at the origin when no
pose is known). When some keyframes carry a known camera-to-world pose (OpenCV axes), the scene
is moved into that frame by the similarity ``x_world = s R x + t`` (rigid, ``s = 1``, for metric
reconstructions: depth cameras give the scale, a drifting odometry must not rescale it) that
best maps the estimated **poses** onto the known ones — rotations and centres together:

    min_{s,R,t}  sum_i w_i ( L^2 ||R R_i^est - R_i^known||_F^2 + ||s R c_i^est + t - c_i^known||^2 )

with ``L`` the spread of the known centres, so both terms count in the same units. Fitting
centres alone leaves the rotation about the line of centres undetermined for a straight or short
trajectory and is undefined for a single pose or a camera that does not move; the rotation term
fixes it. For a fixed scale the optimum is a Procrustes problem (SVD of the combined
cross-covariance); the scale of a non-metric reconstruction follows from the centres when they
spread (>= ``min_spread_m``) and stays 1 otherwise (the poses then carry no scale information).

Outlier poses (a bad odometry message, a TF glitch) are handled by consensus then IRLS: the
rotation hypothesis of every single view is scored by the views that agree with it within
``inlier_deg``; the largest set seeds the fit, and Cauchy-weighted re-fits on the combined
residual (rotation angle + centre distance / L) refine it. Exact known poses are reproduced
exactly (up to float round-off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ..geometry import apply_sim3_to_poses, invert_pose, rotation_angle_deg, transform_points
from ..types import AlignedScene


@dataclass
class WorldFit:
    """The similarity ``x_world = s R x + t`` and how it was obtained."""

    s: float = 1.0
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))
    mode: str = "anchor"            # 'poses' | 'anchor' (no known pose: first keyframe at the origin)
    used: List[int] = field(default_factory=list)      # views whose known pose was used
    outliers: List[int] = field(default_factory=list)  # known poses rejected as inconsistent
    scaled: bool = False            # True when s was estimated (non-metric, spread centres)
    rot_err_deg: float = 0.0        # mean rotation disagreement of the used views after the fit
    centre_err_m: float = 0.0       # mean centre disagreement of the used views after the fit
    views: List[int] = field(default_factory=list)     # views with a known pose, in the order below
    rot_res_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per view, after the fit
    centre_res: np.ndarray = field(default_factory=lambda: np.zeros(0))   # per view, after the fit
    spread: float = 0.0             # spread of the known centres (their units)

    def matrix(self) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.s * self.R
        T[:3, 3] = self.t
        return T


def _proj_so3(M: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0])
    return U @ D @ Vt


def _solve(R_e, c_e, R_k, c_k, w, L, estimate_scale: bool, iters: int = 5):
    """Weighted fit of (s, R, t) for fixed weights (alternating R | s, closed forms)."""
    w = w / max(w.sum(), 1e-300)
    mu_e = (w[:, None] * c_e).sum(0)
    mu_k = (w[:, None] * c_k).sum(0)
    de, dk = c_e - mu_e, c_k - mu_k
    rot_cov = L * L * np.einsum("n,nij,nkj->ik", w, R_k, R_e)  # sum w R_k R_e^T
    var_e = float((w * (de * de).sum(1)).sum())
    s = 1.0
    R = np.eye(3)
    for _ in range(iters if estimate_scale else 1):
        M = rot_cov + s * np.einsum("n,ni,nj->ij", w, dk, de)
        R = _proj_so3(M)
        if not estimate_scale or var_e <= 0:
            break
        s_new = float((w * ((de @ R.T) * dk).sum(1)).sum()) / var_e
        if not np.isfinite(s_new) or s_new <= 0:
            break
        if abs(s_new - s) <= 1e-12 * max(s, 1e-12):
            s = s_new
            break
        s = s_new
    if estimate_scale:  # final R for the final s
        R = _proj_so3(rot_cov + s * np.einsum("n,ni,nj->ij", w, dk, de))
    t = mu_k - s * R @ mu_e
    return s, R, t


def _residuals(s, R, t, R_e, c_e, R_k, c_k, L):
    ang = np.deg2rad(rotation_angle_deg(np.einsum("ij,njk,nlk->nil", R, R_e, R_k)))
    dc = np.linalg.norm(c_e @ (s * R).T + t - c_k, axis=1)
    return ang, dc, ang + dc / L


def fit_world_transform(est_poses: np.ndarray, known: Sequence[Optional[np.ndarray]], metric: bool,
                        inlier_deg: float = 3.0, min_spread_m: float = 1e-3,
                        scene_depth: Optional[float] = None) -> WorldFit:
    """The similarity taking the estimated camera-to-world poses onto the known ones.

    est_poses: (V, 4, 4) camera-to-world from the aligner; known: V entries, a 4x4
    camera-to-world pose or None; metric: True keeps s = 1. Views with a non-finite known pose
    are ignored. Without any known pose the first camera becomes the origin (mode 'anchor').
    ``scene_depth``: typical camera-to-scene distance in the estimate's units; the rotation term
    is weighted by ``L = max(spread of the centres, scene depth)`` (a rotation error of theta
    moves the scene by ~theta x depth, a centre error by itself), so a short sweep's centres
    (noise comparable to their spread) cannot tilt the frame the cameras' orientations fix."""
    est = np.asarray(est_poses, np.float64)
    idx = [i for i, k in enumerate(known) if k is not None and np.isfinite(np.asarray(k, np.float64)).all()]
    if not idx:
        M = invert_pose(est[0])
        return WorldFit(1.0, M[:3, :3], M[:3, 3], mode="anchor")
    K = np.stack([np.asarray(known[i], np.float64) for i in idx])
    E = est[idx]
    R_e, c_e, R_k, c_k = E[:, :3, :3], E[:, :3, 3], K[:, :3, :3], K[:, :3, 3]
    n = len(idx)
    spread = float(np.sqrt(((c_k - c_k.mean(0)) ** 2).sum(1).mean())) if n > 1 else 0.0
    estimate_scale = (not metric) and n >= 2 and spread >= min_spread_m
    depth_k = 0.0
    if scene_depth is not None and np.isfinite(scene_depth) and scene_depth > 0:
        spread_e = float(np.sqrt(((c_e - c_e.mean(0)) ** 2).sum(1).mean())) if n > 1 else 0.0
        s0 = spread / spread_e if estimate_scale and spread_e > 0 else 1.0  # estimate -> known units
        depth_k = float(scene_depth) * s0
    L = max(spread, depth_k, min_spread_m)

    # consensus on rotations: each view's hypothesis R = R_k R_e^T, scored by agreeing views
    hyp = np.einsum("nij,nkj->nik", R_k, R_e)
    agree = rotation_angle_deg(np.einsum("aij,bkj->abik", hyp, hyp).reshape(-1, 3, 3)).reshape(n, n) <= inlier_deg
    inl = agree[int(np.argmax(agree.sum(1)))]
    w = inl.astype(np.float64)
    s, R, t = _solve(R_e, c_e, R_k, c_k, w, L, estimate_scale and inl.sum() >= 2)
    # robust refinement on the combined residual (Cauchy weights, scale from the inliers' MAD)
    for _ in range(10):
        _, _, r = _residuals(s, R, t, R_e, c_e, R_k, c_k, L)
        sig = max(1.4826 * float(np.median(r[w > 0])) if (w > 0).any() else 0.0, 1e-6)
        w_new = 1.0 / (1.0 + (r / (3.0 * sig)) ** 2)
        w_new[r > 10 * sig + np.deg2rad(inlier_deg)] = 0.0
        if w_new.sum() <= 0:
            break
        w = w_new
        s, R, t = _solve(R_e, c_e, R_k, c_k, w, L, estimate_scale and (w > 0).sum() >= 2)
    ang, dc, _ = _residuals(s, R, t, R_e, c_e, R_k, c_k, L)
    used = [idx[k] for k in range(n) if w[k] > 0]
    keep = w > 0
    return WorldFit(float(s), R, t, mode="poses", used=used,
                    outliers=[idx[k] for k in range(n) if w[k] == 0],
                    scaled=bool(estimate_scale), rot_err_deg=float(np.rad2deg(ang[keep]).mean()) if keep.any() else 0.0,
                    centre_err_m=float(dc[keep].mean()) if keep.any() else 0.0,
                    views=list(idx), rot_res_deg=np.rad2deg(ang), centre_res=dc, spread=spread)


def inconsistent_poses(est_poses: np.ndarray, known: Sequence[Optional[np.ndarray]], metric: bool,
                       max_rot_deg: float = 5.0, max_centre_frac: float = 0.1,
                       scene_depth: Optional[float] = None) -> List[int]:
    """Views whose known pose disagrees with the estimated cameras beyond what an estimate's
    noise explains: after the robust fit (:func:`fit_world_transform`), a rotation residual above
    ``max_rot_deg`` or a centre residual above ``max_centre_frac`` of ``L = max(spread of the
    known centres, scene_depth)`` (a short sweep's centres are closer together than the
    estimate's centre noise; the scene depth, in the known poses' units, sets the scale then).
    Meant for rough estimates (e.g. the aligner's initial cameras, ~1 deg), where the fit's own
    outlier test (10 x the inliers' spread) lets a wrong pose in with a small weight."""
    fit = fit_world_transform(est_poses, known, metric, scene_depth=scene_depth)
    if len(fit.views) < 3:  # with two poses neither can be told to be the wrong one
        return []
    L = max(fit.spread, float(scene_depth) if scene_depth is not None and np.isfinite(scene_depth) else 0.0, 1e-9)
    bad = (fit.rot_res_deg > max_rot_deg) | (fit.centre_res > max_centre_frac * L)
    return sorted(set(fit.outliers) | {fit.views[k] for k in np.flatnonzero(bad)})


def _scene_depth(scene: AlignedScene) -> Optional[float]:
    """Median distance of the scene's valid points (a strided sample) from their cameras."""
    pts = np.asarray(scene.pts3d)[:, ::8, ::8]
    ok = scene.valid_mask()[:, ::8, ::8]
    c = np.asarray(scene.poses, np.float64)[:, :3, 3]
    d = np.linalg.norm(pts - c[:, None, None, :], axis=-1)[ok]
    return float(np.median(d)) if d.size else None


def express_in_world(scene: AlignedScene, known: Sequence[Optional[np.ndarray]]) -> WorldFit:
    """Move ``scene`` (points and poses, in place) into the frame of the known camera poses
    (see :func:`fit_world_transform`; ``scene.metric`` decides whether the scale may change)."""
    fit = fit_world_transform(scene.poses, known, scene.metric, scene_depth=_scene_depth(scene))
    T = fit.matrix()
    scene.pts3d = transform_points(T, scene.pts3d.astype(np.float32)).astype(np.float32)
    scene.poses = apply_sim3_to_poses(fit.s, fit.R, fit.t, scene.poses)
    return fit
