"""Real RGB-D tabletop videos in the YCB-Video layout, and the one-click evaluation protocol.

A video folder holds ``<frame>-color.png`` (RGB), ``<frame>-depth.png`` (uint16, metres =
value / depth_scale), ``<frame>-label.png`` (uint8 instance labels, 0 = background) and
``cameras.json`` (``objects`` {label: name}; per frame ``K``, ``w2c`` world->camera 4x4 OpenCV
axes, ``depth_scale``).  ``../shared/data/ycbv_train`` has two such videos (see its README).

The protocol (issue 11), shared by ``benchmarks/bench_real_tabletop.py`` and the tests:

* a few keyframes (uniformly spaced over the video) are reconstructed by the pipeline with the
  GT intrinsics and poses given as pose priors;
* one positive click at the most interior GT pixel of the object (maximum of the distance
  transform of its GT mask) in keyframe 0 (:func:`interior_click`);
* the 3D segment is projected, with a depth test against each frame's own depth, into ALL frames
  of the video (:func:`project_to_frames`) and compared with the GT mask: IoU per frame, mean
  over frames.  For that the scene is expressed in the GT world frame by a rigid full-pose fit
  of its keyframe poses onto the GT poses (:func:`fit_rigid_to_poses`), so that the score does
  not depend on how the pipeline placed its world frame; :func:`rotation_errors_deg` measures
  that placement on its own;
* an automatic corrective click (:func:`corrective_click`): negative at the most interior pixel
  of the largest false-positive region, or positive at that of the largest missed one, over the
  keyframes' projected masks.

Nothing here is specific to one video: any folder of the same layout works.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from scipy import ndimage

from .metrics import interior_click, mask_iou  # noqa: F401  (re-exported for the protocol)
from ..core.geometry import invert_pose, rotation_angle_deg, transform_points

__all__ = ["TabletopVideo", "load_video", "list_videos", "interior_click", "project_to_frames",
           "gt_geometry_scene", "frame_ious",
           "fit_rigid_to_poses", "apply_rigid", "rotation_errors_deg", "corrective_click",
           "mask_iou", "uniform_indices"]


@dataclass
class TabletopVideo:
    """One video: rgb (N,H,W,3) uint8, depth (N,H,W) float32 m (0 = invalid), labels (N,H,W)
    int32, K (N,3,3), poses (N,4,4) camera-to-world, objects {label: name}, frames names."""

    name: str
    rgb: np.ndarray
    depth: np.ndarray
    labels: np.ndarray
    K: np.ndarray
    poses: np.ndarray
    objects: Dict[int, str]
    frames: List[str]

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])


def list_videos(root) -> List[Path]:
    """Sub-folders of ``root`` that hold a ``cameras.json`` (or ``root`` itself), sorted."""
    root = Path(root)
    if (root / "cameras.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / "cameras.json").is_file()) if root.is_dir() else []


def load_video(folder, max_frames: Optional[int] = None) -> TabletopVideo:
    """Read a YCB-Video-layout folder (see module docstring).  Raises ValueError with the reason
    when a file is missing or inconsistent."""
    folder = Path(folder)
    cam_path = folder / "cameras.json"
    if not cam_path.is_file():
        raise ValueError(f"{folder}: no cameras.json (not a YCB-Video-layout folder)")
    meta = json.loads(cam_path.read_text())
    frames = meta.get("frames") or []
    if not frames:
        raise ValueError(f"{cam_path}: no frames")
    if max_frames:
        frames = frames[:int(max_frames)]
    rgb, depth, labels, Ks, poses, names = [], [], [], [], [], []
    for fr in frames:
        def read(key, flags):
            p = folder / fr[key]
            img = cv2.imread(str(p), flags)
            if img is None:
                raise ValueError(f"cannot read {p}")
            return img
        c = read("color", cv2.IMREAD_COLOR)[..., ::-1]
        d = read("depth", cv2.IMREAD_UNCHANGED)
        lab = read("label", cv2.IMREAD_UNCHANGED)
        if d.shape != c.shape[:2] or lab.shape[:2] != c.shape[:2]:
            raise ValueError(f"{folder}/{fr['frame']}: colour {c.shape[:2]}, depth {d.shape}, "
                             f"label {lab.shape[:2]} differ")
        if lab.ndim == 3:
            lab = lab[..., 0]
        scale = float(fr.get("depth_scale", 10000.0))
        rgb.append(np.ascontiguousarray(c))
        depth.append(d.astype(np.float32) / scale)
        labels.append(lab.astype(np.int32))
        Ks.append(np.asarray(fr["K"], np.float64))
        poses.append(invert_pose(np.asarray(fr["w2c"], np.float64)))
        names.append(str(fr.get("frame", len(names))))
    objects = {int(k): str(v) for k, v in (meta.get("objects") or {}).items()}
    if not objects:
        ids = np.unique(np.stack(labels))
        objects = {int(i): f"object_{int(i)}" for i in ids if i > 0}
    return TabletopVideo(str(meta.get("video", folder.name)), np.stack(rgb), np.stack(depth),
                         np.stack(labels), np.stack(Ks), np.stack(poses), objects, names)


def uniform_indices(n: int, k: int) -> List[int]:
    """``k`` evenly spaced indices of ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted(set(int(round(x)) for x in np.linspace(0, n - 1, k)))


def project_to_frames(points: np.ndarray, K: np.ndarray, poses: np.ndarray, depth: np.ndarray,
                      rel_tol: float = 0.03, abs_tol: float = 0.01, close_px: int = 3) -> np.ndarray:
    """(N, H, W) bool: the 3D segment seen by each frame, tested against the frame's measured
    depth (:func:`wildseg3d_ros.eval.metrics.project_to_views`)."""
    from .metrics import project_to_views

    return project_to_views(points, K, poses, depth, rel_tol, abs_tol, close_px)


def gt_geometry_scene(video: TabletopVideo, frames: Sequence[int]):
    """An :class:`~wildseg3d_ros.core.types.AlignedScene` of the given frames built from their
    own depth, GT intrinsics and GT poses (no registration, no alignment): isolates what
    segmentation does from what the reconstruction does.  No mask cache yet."""
    from ..core.geometry import depth_to_world
    from ..core.types import AlignedScene

    frames = list(frames)
    pts = np.stack([depth_to_world(video.depth[f], video.K[f], video.poses[f]) for f in frames])
    valid = video.depth[frames] > 0
    pts[~valid] = 0.0
    return AlignedScene(pts3d=pts.astype(np.float32), conf=valid.astype(np.float32),
                        poses=video.poses[frames].copy(), K=video.K[frames].copy(),
                        rgb=video.rgb[frames].copy())


def frame_ious(points: np.ndarray, video: TabletopVideo, label: int) -> np.ndarray:
    """IoU per frame of the 3D segment ``points`` (GT world frame) projected into every frame
    of the video (:func:`project_to_frames`) against the GT mask of ``label``."""
    pred = project_to_frames(points, video.K, video.poses, video.depth)
    gt = video.labels == label
    return np.array([mask_iou(pred[f], gt[f]) for f in range(video.num_frames)])


def fit_rigid_to_poses(est_poses: np.ndarray, gt_poses: np.ndarray) -> np.ndarray:
    """The rigid transform T (4x4) that best maps the estimated camera poses onto the GT ones
    (``T @ est_i ~ gt_i``), from rotations AND centres: R is the chordal mean of
    ``R_gt_i R_est_i^T`` (SVD projection), t the mean of ``c_gt_i - R c_est_i``.  Exact for exact
    poses, whatever the camera motion (one pose suffices)."""
    E = np.asarray(est_poses, np.float64)
    G = np.asarray(gt_poses, np.float64)
    M = np.einsum("nij,nkj->ik", G[:, :3, :3], E[:, :3, :3])
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    t = (G[:, :3, 3] - E[:, :3, 3] @ R.T).mean(0)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def apply_rigid(scene, T: np.ndarray):
    """Express an AlignedScene in another frame (in place): points and poses through T."""
    scene.pts3d = transform_points(T, scene.pts3d.astype(np.float32)).astype(np.float32)
    scene.poses = np.einsum("ij,njk->nik", T, np.asarray(scene.poses, np.float64))
    return scene


def rotation_errors_deg(est_poses: np.ndarray, gt_poses: np.ndarray) -> np.ndarray:
    """Per camera: the angle (deg) between its estimated and GT orientation in the same frame."""
    E = np.asarray(est_poses, np.float64)[:, :3, :3]
    G = np.asarray(gt_poses, np.float64)[:, :3, :3]
    return np.asarray(rotation_angle_deg(np.einsum("nji,njk->nik", G, E)), np.float64).reshape(-1)


def corrective_click(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None,
                     boundary_px: int = 5, min_depth_px: float = 5.0):
    """The automatic corrective click over views: ``pred`` / ``gt`` (V,H,W) bool.  Finds the
    largest connected error region -- false positive ``pred`` outside the GT mask dilated by
    ``boundary_px``, or missed: the GT mask eroded by ``boundary_px`` outside ``pred`` -- over
    all views, restricted to ``valid`` pixels (those with depth, the only ones a click can
    change) when given.  The band of ``boundary_px`` around the GT outline is ignored because
    no user clicks on an outline disagreement of a few pixels (YCB-Video's depth is
    misregistered with its colour by about that much); so are regions without a pixel
    ``min_depth_px`` away from their border (strips).  Returns (view, u, v, positive) at the
    region's most interior pixel, or None when no error region is left."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    k = 2 * max(0, int(boundary_px)) + 1
    ker = np.ones((k, k), np.uint8)
    best = (0, None)
    for v in range(pred.shape[0]):
        g8 = gt[v].astype(np.uint8)
        inner = cv2.erode(g8, ker) > 0
        outer = cv2.dilate(g8, ker) > 0
        for positive, err in ((False, pred[v] & ~outer), (True, inner & ~pred[v])):
            if valid is not None:
                err = err & valid[v]
            lab, n = ndimage.label(err)
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel())[1:]
            depth = ndimage.maximum(ndimage.distance_transform_edt(np.pad(err, 1))[1:-1, 1:-1],
                                    lab, np.arange(1, n + 1))
            sizes = np.where(np.asarray(depth) >= min_depth_px, sizes, 0)
            j = int(np.argmax(sizes)) + 1
            if sizes[j - 1] > best[0]:
                best = (int(sizes[j - 1]), (v, lab == j, positive))
    if best[1] is None:
        return None
    v, region, positive = best[1]
    u, r = interior_click(region)
    return v, u, r, positive
