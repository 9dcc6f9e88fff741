"""Rigid / similarity geometry helpers (numpy, vectorised).

Poses are camera-to-world 4x4 matrices with OpenCV camera axes (x right, y down,
z forward); points are (..., 3) arrays. Nothing here loops over points.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np


def finite_points(pts: np.ndarray) -> np.ndarray:
    """(..., 3) points -> (...) bool: all three coordinates finite.  The same as
    ``np.isfinite(pts).all(-1)``, 6x faster (numpy reduces a length-3 last axis slowly)."""
    pts = np.asarray(pts)
    return np.isfinite(pts[..., 0]) & np.isfinite(pts[..., 1]) & np.isfinite(pts[..., 2])


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of one or a stack (..., 4, 4) of rigid transforms."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def transform_points(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform (similarity allowed) to points (..., 3); keeps the points' dtype."""
    T = np.asarray(T)
    pts = np.asarray(pts)
    out = pts @ T[:3, :3].T.astype(pts.dtype, copy=False) + T[:3, 3].astype(pts.dtype, copy=False)
    return out


def backproject_depth(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame pointmap (H, W, 3) float32 from z-depth (metres). Invalid depth (<= 0,
    NaN, inf) gives the zero vector; use ``depth > 0`` as the validity mask."""
    depth = np.asarray(depth, dtype=np.float32)
    H, W = depth.shape
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    u = (np.arange(W, dtype=np.float32) - cx) / fx
    v = (np.arange(H, dtype=np.float32) - cy) / fy
    pts = np.empty((H, W, 3), dtype=np.float32)
    pts[..., 0] = u[None, :] * d
    pts[..., 1] = v[:, None] * d
    pts[..., 2] = d
    return pts


def depth_to_world(depth: np.ndarray, K: np.ndarray, T_c2w: np.ndarray) -> np.ndarray:
    """World-frame pointmap (H, W, 3) float32; invalid pixels are NaN."""
    pts = transform_points(T_c2w, backproject_depth(depth, K))
    pts[~(np.isfinite(depth) & (depth > 0))] = np.nan
    return pts


def project_points(pts_world: np.ndarray, K: np.ndarray, T_c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Project world points (..., 3) into a camera. Returns pixel coords (..., 2) as (u=column,
    v=row) and camera z (...). Points behind the camera get z <= 0 (uv is then meaningless)."""
    T_w2c = invert_pose(T_c2w)
    pc = transform_points(T_w2c, np.asarray(pts_world, dtype=np.float64))
    z = pc[..., 2]
    zs = np.where(np.abs(z) < 1e-12, 1e-12, z)
    u = K[0, 0] * pc[..., 0] / zs + K[0, 2]
    v = K[1, 1] * pc[..., 1] / zs + K[1, 2]
    return np.stack([u, v], axis=-1), z


def umeyama(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray] = None,
            with_scale: bool = True) -> Tuple[float, np.ndarray, np.ndarray]:
    """Closed-form (weighted) similarity ``dst ≈ s · R @ src + t`` (Umeyama 1991).

    src, dst: (N, 3). weights: (N,) non-negative or None. Returns (s, R (3,3), t (3,)).
    Raises ValueError with fewer than 3 usable correspondences."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    ok = np.isfinite(src).all(1) & np.isfinite(dst).all(1) & np.isfinite(w) & (w > 0)
    if ok.sum() < 3:
        raise ValueError("umeyama needs at least 3 finite correspondences with positive weight")
    src, dst, w = src[ok], dst[ok], w[ok]
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    var_s = float(w @ (xs ** 2).sum(1))
    s = float(np.trace(np.diag(D) @ S) / var_s) if (with_scale and var_s > 0) else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def sim3_matrix(s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 matrix of the similarity x -> s R x + t."""
    M = np.eye(4)
    M[:3, :3] = s * np.asarray(R)
    M[:3, 3] = t
    return M


def apply_sim3_to_poses(s: float, R: np.ndarray, t: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Map camera-to-world poses through the world similarity x -> s R x + t (the camera
    frames stay rigid: rotation R·R_i, centre s R c_i + t)."""
    poses = np.asarray(poses, dtype=np.float64)
    out = poses.copy()
    out[..., :3, :3] = R @ poses[..., :3, :3]
    out[..., :3, 3] = s * poses[..., :3, 3] @ R.T + t
    return out


def rotation_from_rotvec(rotvec) -> np.ndarray:
    """Rotation matrix (3, 3) of an axis-angle vector (3,), or (N, 3, 3) of (N, 3) (radians)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.asarray(rotvec, dtype=np.float64)).as_matrix()


def pose_delta(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """(translation, rotation degrees) between two camera-to-world poses: the distance of their
    centres (= the translation of ``inv(a) @ b``) and the angle of ``R_a^T R_b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    t = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    return t, float(rotation_angle_deg(a[:3, :3].T @ b[:3, :3]))


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) of one or a stack of rotation matrices."""
    R = np.asarray(R, dtype=np.float64)
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def pose_errors(est: np.ndarray, gt: np.ndarray, align: str = "sim3") -> Dict[str, float]:
    """Pose error of estimated camera-to-world poses against ground truth.

    align: 'sim3' (fit a similarity on the camera centres first; needs >= 3 views, falls back
    to aligning the first camera), 'first' (express both relative to the first camera; scale
    fitted on centres), or 'none'. Returns mean/max rotation error (deg), mean/max camera-centre
    error (gt units) and the fitted scale."""
    est = np.asarray(est, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    s = 1.0
    if align == "sim3" and len(est) >= 3:
        s, R, t = umeyama(est[:, :3, 3], gt[:, :3, 3])
        est = apply_sim3_to_poses(s, R, t, est)
    elif align in ("sim3", "first"):
        rel_e = invert_pose(est[0]) @ est
        rel_g = invert_pose(gt[0]) @ gt
        ce, cg = rel_e[:, :3, 3], rel_g[:, :3, 3]
        den = float((ce * ce).sum())
        s = float((ce * cg).sum() / den) if den > 0 else 1.0
        rel_e[:, :3, 3] *= s
        est = gt[0] @ rel_e
    dR = np.swapaxes(est[:, :3, :3], -1, -2) @ gt[:, :3, :3]
    rot = rotation_angle_deg(dR)
    cen = np.linalg.norm(est[:, :3, 3] - gt[:, :3, 3], axis=-1)
    return {"rot_deg_mean": float(rot.mean()), "rot_deg_max": float(rot.max()),
            "center_mean": float(cen.mean()), "center_max": float(cen.max()), "scale": float(s)}


def quat_xyzw_to_rot(q) -> np.ndarray:
    """Rotation matrix from a unit quaternion (x, y, z, w) (normalised here)."""
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError("quaternion has zero or non-finite norm")
    x, y, z, w = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rot_to_quat_xyzw(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with w >= 0 from a rotation matrix."""
    R = np.asarray(R, dtype=np.float64)
    m = np.array([
        [R[0, 0] - R[1, 1] - R[2, 2], 0, 0, 0],
        [R[0, 1] + R[1, 0], R[1, 1] - R[0, 0] - R[2, 2], 0, 0],
        [R[0, 2] + R[2, 0], R[1, 2] + R[2, 1], R[2, 2] - R[0, 0] - R[1, 1], 0],
        [R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1], R[0, 0] + R[1, 1] + R[2, 2]],
    ]) / 3.0
    vals, vecs = np.linalg.eigh(m)
    q = vecs[:, np.argmax(vals)]
    return q if q[3] >= 0 else -q


def pose_from_xyz_quat(xyz, q_xyzw) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = quat_xyzw_to_rot(q_xyzw)
    T[:3, 3] = xyz
    return T


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes) of a camera at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(x) < 1e-9:
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, eye
    return T


class ResectionError(ValueError):
    """A pointmap whose camera cannot be recovered; ``view`` is its index in the batch."""

    def __init__(self, view: int, reason: str):
        super().__init__(reason)
        self.view = int(view)


def _resection_sample(pts: np.ndarray, valid: Optional[np.ndarray], max_samples: int, rng):
    """Rows, columns of up to ``max_samples`` valid pixels of one (H,W,3) pointmap, drawn from a
    pixel grid ~4x denser than the sample (the whole image when that grid has too few valid
    pixels): the DLT needs a spread sample, not every pixel."""
    H, W = pts.shape[:2]
    s = max(1, int(np.sqrt(H * W / (4.0 * max_samples))))
    while True:
        ok = finite_points(pts[::s, ::s])
        if valid is not None:
            ok &= np.asarray(valid, dtype=bool)[::s, ::s]
        vv, uu = np.nonzero(ok)
        if s == 1 or len(uu) >= min(max_samples, 1000):
            break
        s = 1
    if len(uu) > max_samples:
        sel = rng.choice(len(uu), max_samples, replace=False)
        vv, uu = vv[sel], uu[sel]
    return vv * s, uu * s


def resect_pinhole_views(pts_world: np.ndarray, valid: Optional[np.ndarray] = None,
                         max_samples: int = 4000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Intrinsics K (V,3,3) and camera-to-world poses (V,4,4) of V organised pinhole pointmaps
    (V,H,W,3), in one batched solve.

    Every pixel (u, v) of an organised world pointmap lies on its camera ray, so the 3x4
    projection matrix follows from a linear DLT over a sample of the valid pixels (the same
    number for every view: the smallest view's, at most ``max_samples``), and K, R, t from an
    RQ decomposition. Used by consumers of the published scene cloud, which carries per-pixel
    world points but no separate camera messages. Raises :class:`ResectionError` (naming the
    view) when a view has fewer than 12 valid pixels or degenerate points."""
    pts = np.asarray(pts_world)  # only the sampled points are converted to float64
    V, H, W = pts.shape[:3]
    rng = np.random.default_rng(seed)
    samples = [_resection_sample(pts[i], None if valid is None else valid[i], max_samples, rng)
               for i in range(V)]
    for i, (vv, _) in enumerate(samples):
        if len(vv) < 12:
            raise ResectionError(i, "resect_pinhole needs at least 12 valid pixels")
    n = min(len(vv) for vv, _ in samples)
    vv = np.stack([a[:n] for a, _ in samples])  # (V,n); each sample is already random
    uu = np.stack([b[:n] for _, b in samples])
    X = pts[np.arange(V)[:, None], vv, uu].astype(np.float64)  # (V,n,3)
    # normalise for conditioning
    mu = X.mean(1, keepdims=True)
    sc = np.sqrt(2.0) / np.maximum(np.linalg.norm(X - mu, axis=2).mean(1), 1e-12)  # (V,)
    Tn = np.zeros((V, 4, 4))
    Tn[:, [0, 1, 2], [0, 1, 2]] = sc[:, None]
    Tn[:, :3, 3] = -sc[:, None] * mu[:, 0]
    Tn[:, 3, 3] = 1.0
    Xh = np.concatenate([(X - mu) * sc[:, None, None], np.ones((V, n, 1))], 2)
    cu, cv = W / 2.0, H / 2.0
    u = uu.astype(np.float64) - cu
    v = vv.astype(np.float64) - cv
    su = np.sqrt(2.0) / np.maximum(np.sqrt(u ** 2 + v ** 2).mean(1), 1e-12)  # (V,)
    Un_inv = np.zeros((V, 3, 3))
    Un_inv[:, 0, 0] = Un_inv[:, 1, 1] = 1.0 / su
    Un_inv[:, 0, 2], Un_inv[:, 1, 2], Un_inv[:, 2, 2] = cu, cv, 1.0
    un = u * su[:, None]
    vn = v * su[:, None]
    A = np.zeros((V, 2 * n, 12))
    A[:, 0::2, 0:4] = Xh
    A[:, 0::2, 8:12] = -un[..., None] * Xh
    A[:, 1::2, 4:8] = Xh
    A[:, 1::2, 8:12] = -vn[..., None] * Xh
    # smallest right singular vector of A from its 12x12 normal matrix (same vector, a fraction
    # of the cost of the (2n x 12) SVD; the normalisation above keeps it well conditioned)
    _, evecs = np.linalg.eigh(np.swapaxes(A, 1, 2) @ A)  # batched BLAS (einsum is 10x slower)
    P = Un_inv @ evecs[:, :, 0].reshape(V, 3, 4) @ Tn
    M = P[:, :, :3]
    bad = np.flatnonzero(np.abs(np.linalg.det(M)) < 1e-15)
    if bad.size:
        raise ResectionError(int(bad[0]), "degenerate pointmap: cannot resect a camera")
    # RQ decomposition of M = K R
    Q, Rq = np.linalg.qr(np.swapaxes(M[:, ::-1, :], 1, 2))
    Kq = np.swapaxes(Rq, 1, 2)[:, ::-1, ::-1]
    Rm = np.swapaxes(Q, 1, 2)[:, ::-1, :]
    D = np.sign(np.diagonal(Kq, axis1=1, axis2=2))  # (V,3)
    Kq = Kq * D[:, None, :]
    Rm = D[:, :, None] * Rm
    tvec = np.linalg.solve(Kq, P[:, :, 3:])[..., 0]
    flip = np.linalg.det(Rm) < 0
    Rm = np.where(flip[:, None, None], -Rm, Rm)
    tvec = np.where(flip[:, None], -tvec, tvec)
    K = Kq / Kq[:, 2:3, 2:3]
    T_c2w = np.tile(np.eye(4), (V, 1, 1))
    Rt = np.swapaxes(Rm, 1, 2)
    T_c2w[:, :3, :3] = Rt
    T_c2w[:, :3, 3] = -np.einsum("vij,vj->vi", Rt, tvec)
    # make sure points are in front of the camera (sign ambiguity of the DLT)
    z = np.einsum("vj,vnj->vn", Rm[:, 2], X) + tvec[:, 2:3]
    behind = np.flatnonzero(np.median(z, axis=1) < 0)
    if behind.size:
        raise ResectionError(int(behind[0]), "resected camera has the points behind it")
    return K, T_c2w


def resect_pinhole(pts_world: np.ndarray, valid: Optional[np.ndarray] = None,
                   max_samples: int = 4000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """K (3,3) and camera-to-world pose (4,4) of one organised pinhole pointmap (H,W,3): see
    :func:`resect_pinhole_views`. Raises ValueError when it cannot be resected."""
    pts = np.asarray(pts_world)
    K, T = resect_pinhole_views(pts[None], None if valid is None else np.asarray(valid, bool)[None],
                                max_samples, seed)
    return K[0], T[0]
