"""The aligner's gauge: which world frame and scale the (gauge-invariant) objective is solved in.

* :func:`apply_known_pose_gauge` — before optimising: with >= 2 known poses a similarity takes
  the initial world onto them (their scale becomes the scene's, the pair scales are free); with
  fewer the pair scales are normalised to prod sigma_e = 1 and, with exactly one known pose, the
  world is moved rigidly onto it.
* :func:`align_poses` — that similarity, fitted on the camera centres and two points along each
  camera's x and z axes.
* :func:`output_gauge` — after optimising: world = camera 0 when no pose is known;
  rotations re-orthonormalised.

Fitting a finished reconstruction to known camera poses afterwards (the world frame of the
pipeline) is not done here.
"""
from __future__ import annotations

import numpy as np
import torch

from .init import InitState, batched_umeyama

__all__ = ["align_poses", "apply_known_pose_gauge", "output_gauge"]


def align_poses(R_est, c_est, T_known):
    """World similarity taking estimated cameras onto known ones: fit on the camera centres and
    two points along each camera's x and z axes (at the scale of the camera spread)."""
    c_k = T_known[:, :3, 3]
    R_k = T_known[:, :3, :3]
    L_e = float((c_est - c_est.mean(0)).norm(dim=-1).mean()) or 1.0
    L_k = float((c_k - c_k.mean(0)).norm(dim=-1).mean()) or 1.0
    src = torch.cat([c_est, c_est + L_e * R_est[:, :, 0], c_est + L_e * R_est[:, :, 2]])
    dst = torch.cat([c_k, c_k + L_k * R_k[:, :, 0], c_k + L_k * R_k[:, :, 2]])
    s, R, t = batched_umeyama(src[None].double(), dst[None].double(),
                              torch.ones(1, len(src), dtype=torch.float64, device=src.device))
    return s[0], R[0], t[0]


def apply_known_pose_gauge(st: InitState, known_poses, known_mask) -> tuple:
    """(state in the gauge of the known poses, norm_scale). known_poses: (V,4,4) numpy in
    normalised units (NaN rows unknown) or None; known_mask (V,) bool."""
    cam_R, cam_c, e_s, e_R, e_t = st.cam_R, st.cam_c, st.e_s, st.e_R, st.e_t
    dev = cam_R.device
    n_known = int(np.sum(known_mask))
    if n_known >= 2:
        g_s, g_R, g_t = align_poses(cam_R[known_mask], cam_c[known_mask],
                                    torch.as_tensor(known_poses[known_mask], device=dev))
        cam_R = g_R @ cam_R
        cam_c = g_s * cam_c @ g_R.T + g_t
        e_R = g_R @ e_R
        e_t = g_s * e_t @ g_R.T + g_t
        e_s = g_s * e_s
    norm_scale = n_known < 2
    if norm_scale:
        g = torch.exp(torch.log(e_s).mean())
        e_s, e_t, cam_c = e_s / g, e_t / g, cam_c / g
    if n_known == 1:  # one known pose: move the gauge onto it (rigid)
        v = int(np.flatnonzero(known_mask)[0])
        Kv = torch.as_tensor(known_poses[v], device=dev)
        G_R = Kv[:3, :3] @ cam_R[v].T
        G_t = Kv[:3, 3] - G_R @ cam_c[v]
        cam_R, cam_c = G_R @ cam_R, cam_c @ G_R.T + G_t
        e_R, e_t = G_R @ e_R, e_t @ G_R.T + G_t
    return st.replace(cam_R=cam_R, cam_c=cam_c, e_s=e_s, e_R=e_R, e_t=e_t), norm_scale


def output_gauge(poses: np.ndarray, pts: list, n_known: int):
    """World = camera 0 when nothing is known (the loss is invariant to it); rotations
    re-orthonormalised (float32 round-off). poses (V,4,4) float64, pts list of (H,W,3)."""
    poses = poses.copy()
    if n_known == 0:
        G = np.linalg.inv(poses[0])
        poses = G @ poses
        poses[0] = np.eye(4)
        pts = [(p.reshape(-1, 3) @ G[:3, :3].T + G[:3, 3]).reshape(p.shape) for p in pts]
    for v in range(len(poses)):
        U, _, Vt = np.linalg.svd(poses[v, :3, :3])
        poses[v, :3, :3] = U @ np.diag([1, 1, np.linalg.det(U @ Vt)]) @ Vt
    return poses, pts
