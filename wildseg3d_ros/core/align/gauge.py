"""The aligner's gauge: which world frame and scale the (gauge-invariant) objective is solved in.

* :func:`apply_known_pose_gauge` — before optimising: with >= 2 known poses a similarity takes
  the initial world onto them (their scale becomes the scene's, the pair scales are free); with
  fewer the pair scales are normalised to prod sigma_e = 1 and, with exactly one known pose, the
  world is moved rigidly onto it.
* :func:`align_poses` — that similarity, fitted on the camera centres and two points along each
  camera's x and z axes.
* :func:`to_first_camera` — after optimising, when no pose is known: world = camera 0 (the
  final depth solve then writes the points in that frame); :func:`output_gauge` re-orthonormalises
  the output rotations.

Fitting a finished reconstruction to known camera poses afterwards (the world frame of the
pipeline) is not done here.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .init import InitState, batched_umeyama

__all__ = ["align_poses", "apply_known_pose_gauge", "output_gauge", "to_first_camera"]


def align_poses(R_est, c_est, T_known, rigid: bool = False):
    """World similarity taking estimated cameras onto known ones: fit on the camera centres and
    two points along each camera's x and z axes (at the scale of the camera spread). ``rigid``
    (metric pointmaps: depth cameras): scale 1, the axis points at the same distance on both
    sides -- a scale from the centres of a short, noisy sweep would rescale metric depth."""
    c_k = T_known[:, :3, 3]
    R_k = T_known[:, :3, :3]
    L_e = float((c_est - c_est.mean(0)).norm(dim=-1).mean()) or 1.0
    L_k = float((c_k - c_k.mean(0)).norm(dim=-1).mean()) or 1.0
    if rigid:
        L_e = L_k = max(L_e, L_k)
    src = torch.cat([c_est, c_est + L_e * R_est[:, :, 0], c_est + L_e * R_est[:, :, 2]])
    dst = torch.cat([c_k, c_k + L_k * R_k[:, :, 0], c_k + L_k * R_k[:, :, 2]])
    s, R, t = batched_umeyama(src[None].double(), dst[None].double(),
                              torch.ones(1, len(src), dtype=torch.float64, device=src.device),
                              with_scale=not rigid)
    return s[0], R[0], t[0]


def apply_known_pose_gauge(st: InitState, known_poses, known_mask, metric: bool = False) -> tuple:
    """(state in the gauge of the known poses, norm_scale). known_poses: (V,4,4) numpy in
    normalised units (NaN rows unknown) or None; known_mask (V,) bool; metric: the pointmaps
    are metric (their scale is kept: a rigid gauge)."""
    cam_R, cam_c, e_s, e_R, e_t = st.cam_R, st.cam_c, st.e_s, st.e_R, st.e_t
    dev = cam_R.device
    n_known = int(np.sum(known_mask))
    if n_known >= 2:
        g_s, g_R, g_t = align_poses(cam_R[known_mask], cam_c[known_mask],
                                    torch.as_tensor(known_poses[known_mask], device=dev), rigid=metric)
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


def to_first_camera(res):
    """An optimiser result expressed with camera 0 as the world (its pose becomes identity)."""
    R0, c0 = res.R[0], res.c[0]
    return replace(res, R=R0.T @ res.R, c=(res.c - c0) @ R0, Re=R0.T @ res.Re, te=(res.te - c0) @ R0)


def output_gauge(poses: np.ndarray) -> np.ndarray:
    """Rotations re-orthonormalised (float32 round-off) of camera-to-world poses (V,4,4)."""
    poses = poses.copy()
    for v in range(len(poses)):
        U, _, Vt = np.linalg.svd(poses[v, :3, :3])
        poses[v, :3, :3] = U @ np.diag([1, 1, np.linalg.det(U @ Vt)]) @ Vt
    return poses
