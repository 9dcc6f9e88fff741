"""Evaluation helpers shared by the demo, tests and benchmarks: project a 3D segment into the
keyframes (with a visibility test against each keyframe's own pointmap) and score it against
ground-truth masks."""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

from ..core.geometry import invert_pose, project_points, transform_points
from ..core.types import AlignedScene


def match_frames(keyframe_rgb: np.ndarray, frames_rgb: np.ndarray) -> np.ndarray:
    """Index of the source frame of each keyframe (by nearest image, exact for lossless input)."""
    kf = keyframe_rgb.reshape(len(keyframe_rgb), -1)[:, ::97].astype(np.float32)
    fr = frames_rgb.reshape(len(frames_rgb), -1)[:, ::97].astype(np.float32)
    d = np.abs(kf[:, None, :] - fr[None, :, :]).mean(-1)
    return np.argmin(d, axis=1)


def project_to_views(points: np.ndarray, K: np.ndarray, poses: np.ndarray, depth: np.ndarray,
                     rel_tol: float = 0.03, abs_tol: float = 0.01, close_px: int = 3) -> np.ndarray:
    """(N, H, W) bool: a 3D segment seen by N cameras (K (N,3,3), camera-to-world poses (N,4,4),
    depth (N,H,W) metres, 0 / NaN = unknown). A pixel is on when a segment point projects into
    it and lies at that view's depth (within ``abs_tol + rel_tol * z``; a pixel without depth
    cannot occlude), then a ``close_px`` morphological closing fills the gaps between points."""
    N, H, W = depth.shape
    out = np.zeros((N, H, W), bool)
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    if pts.shape[0] == 0:
        return out
    kernel = np.ones((close_px, close_px), np.uint8) if close_px > 1 else None
    for f in range(N):
        uv, z = project_points(pts, K[f], poses[f])
        u = np.round(uv[:, 0]).astype(np.int64)
        r = np.round(uv[:, 1]).astype(np.int64)
        ok = (z > 1e-6) & (u >= 0) & (u < W) & (r >= 0) & (r < H)
        u, r, z = u[ok], r[ok], z[ok]
        d = np.nan_to_num(depth[f][r, u], nan=0.0, posinf=0.0, neginf=0.0)
        vis = (d <= 0) | (np.abs(z - d) <= abs_tol + rel_tol * z)
        m = np.zeros((H, W), np.uint8)
        m[r[vis], u[vis]] = 1
        if kernel is not None:
            m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel)
        out[f] = m.astype(bool)
    return out


def project_segment(points: np.ndarray, scene: AlignedScene, rel_tol: float = 0.03,
                    abs_tol: float = 0.01, close_px: int = 3) -> np.ndarray:
    """(V, H, W) bool masks of the 3D segment in every keyframe: a pixel is on when a segment
    point projects into it and lies at that keyframe's own surface depth (not occluded)."""
    V = scene.pts3d.shape[0]
    depth = np.stack([transform_points(invert_pose(scene.poses[v]), scene.pts3d[v].astype(np.float64))[..., 2]
                      for v in range(V)])
    return project_to_views(points, np.asarray(scene.K), np.asarray(scene.poses), depth, rel_tol, abs_tol, close_px)


def interior_click(mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """(u, v) of the most interior pixel of a bool mask (max of its distance transform; the
    image border counts as outside): where a user clicks "in the middle of the object"; None
    for an empty mask."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if not m.any():
        return None
    d = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(c), float(r)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 1.0


def segment_iou_per_view(points: np.ndarray, scene: AlignedScene, gt_masks: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """IoU of the projected segment against (V, H, W) ground-truth masks, per keyframe."""
    pred = project_segment(points, scene)
    ious = np.array([mask_iou(pred[v], gt_masks[v]) for v in range(len(pred))])
    return ious, pred


def points_iou_3d(points: np.ndarray, gt_points: np.ndarray, voxel: float = 0.01) -> float:
    """IoU of two point sets on a voxel grid (occupancy IoU)."""
    if len(points) == 0 and len(gt_points) == 0:
        return 1.0
    if len(points) == 0 or len(gt_points) == 0:
        return 0.0
    a = np.unique(np.floor(np.asarray(points) / voxel).astype(np.int64), axis=0)
    b = np.unique(np.floor(np.asarray(gt_points) / voxel).astype(np.int64), axis=0)
    both = np.concatenate([a, b])
    _, counts = np.unique(both, axis=0, return_counts=True)
    inter = int((counts == 2).sum())
    return inter / float(len(a) + len(b) - inter)
