"""The reconstruction pipeline: keyframes -> pairwise pointmaps -> per-view masks -> DGA ->
mask cache, as one cancellable call shared by the ROS node, the demo and the offline CLI.

Order of the steps follows the paper: the soft object masks S must exist before alignment
(they enter DGA's weights), so every keyframe is pre-segmented on its own first; after
alignment the per-view masks are associated across views (tracking for SAM2, 3D overlap for
the classical segmenter) into the mask cache with global object ids.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from .errors import AlignmentError, PipelineError, check_cancel
from .geometry import apply_sim3_to_poses, invert_pose, transform_points, umeyama
from .scene import AlignedScene, Keyframe


@dataclass
class PipelineConfig:
    backend: str = "rgbd"
    backend_kwargs: Dict = field(default_factory=dict)
    segmenter: str = "classical"
    segmenter_kwargs: Dict = field(default_factory=dict)
    scene_graph: str = "complete"
    device: str = "cpu"
    # DGA (names as the node's dga.* parameters)
    alpha_p: float = 0.5
    alpha_n: float = 0.9
    iterations: int = 500
    weighting: str = "dga"
    match_threshold: float = 0.03
    optimizer: str = "gauss_newton"   # or "adam" (the reference optimiser)
    # use odometry/TF poses (registration initialisation in the backend, output frame);
    # pose_prior_weight > 0 also ties DGA's poses to them (inf: keep them fixed, for trusted poses)
    use_pose_priors: bool = True
    pose_prior_weight: float = 0.0
    align_to_priors: bool = True
    min_keyframes: int = 2


class ReconstructionPipeline:
    """Builds the backend and segmenter once (model loading is slow) and runs reconstructions."""

    def __init__(self, cfg: PipelineConfig):
        from .backends import make_backend
        from .segment.base import make_segmenter

        self.cfg = cfg
        bkw = dict(cfg.backend_kwargs)
        if cfg.backend != "rgbd":  # the rgbd backend is numpy/OpenCV only
            bkw.setdefault("device", cfg.device)
        self.backend = make_backend(cfg.backend, **bkw)
        self.segmenter = make_segmenter(cfg.segmenter, device=cfg.device, **cfg.segmenter_kwargs) \
            if cfg.segmenter == "sam2" else make_segmenter(cfg.segmenter, **cfg.segmenter_kwargs)

    def run(self, keyframes: Sequence[Keyframe], cancel: Optional[Callable[[], bool]] = None,
            progress: Optional[Callable[[str, float], None]] = None, frame_id: str = "map"):
        """Returns (AlignedScene, timings dict in seconds). Raises PipelineError / errors.Cancelled."""
        from .align import align_global
        from .segment.mask_cache import build_soft_masks

        cfg = self.cfg
        kfs = list(keyframes)
        if len(kfs) < max(2, cfg.min_keyframes):
            raise PipelineError(f"reconstruction needs at least {max(2, cfg.min_keyframes)} keyframes, "
                                f"the buffer holds {len(kfs)}")
        shapes = {kf.rgb.shape for kf in kfs}
        if len(shapes) != 1:
            raise PipelineError(f"keyframes have different image sizes {sorted(shapes)}; "
                                "the camera resolution changed mid-buffer: reset and start again")
        say = progress or (lambda stage, frac: None)
        t = {}
        t0 = time.perf_counter()
        pairs = self.backend.make_pairs(len(kfs), cfg.scene_graph)
        say("pointmaps", 0.0)
        preds = self.backend.predict_pairs(kfs, pairs, cancel=cancel)
        t["pointmaps_s"] = time.perf_counter() - t0
        check_cancel(cancel, "reconstruction")

        # per-view pre-segmentation (camera-frame pointmaps help the classical segmenter)
        t1 = time.perf_counter()
        say("segmentation", 0.25)
        cam_pts = preds.camera_pointmaps()
        rgb = self._images_at_pointmap_size(kfs, preds, cam_pts)
        local = []
        for v in range(len(kfs)):  # one cancel check per view (a view can take seconds at 640x480)
            check_cancel(cancel, "reconstruction")
            local.append(self.segmenter.automatic_masks(rgb[v], cam_pts[v][0], cam_pts[v][1]))
        local = np.stack(local)
        soft = build_soft_masks(local)
        t["presegment_s"] = time.perf_counter() - t1
        check_cancel(cancel, "reconstruction")

        # DGA
        t2 = time.perf_counter()
        say("alignment", 0.5)
        priors = None
        if cfg.use_pose_priors and cfg.pose_prior_weight > 0 and all(kf.pose_prior is not None for kf in kfs):
            priors = np.stack([kf.pose_prior for kf in kfs])
        try:
            scene = align_global(preds, num_views=len(kfs), soft_masks=soft, known_poses=priors,
                                 pose_prior_weight=cfg.pose_prior_weight if priors is not None else 0.0,
                                 weighting=cfg.weighting, alpha_p=cfg.alpha_p, alpha_n=cfg.alpha_n,
                                 iterations=cfg.iterations, match_threshold=cfg.match_threshold,
                                 optimizer=cfg.optimizer, device=cfg.device, cancel=cancel)
        except AlignmentError as e:
            raise PipelineError(f"alignment failed: {e}") from e
        t["alignment_s"] = time.perf_counter() - t2
        check_cancel(cancel, "reconstruction")

        scene.rgb = rgb
        scene.frame_id = frame_id
        scene.stamps = np.array([kf.stamp for kf in kfs], dtype=np.float64)
        # metric depth: only a rigid transform to the pose priors, never a rescale to drifting odometry
        scene.metric = scene.metric or preds.metric
        priors_all = [kf.pose_prior for kf in kfs]
        self._express_in_world(scene, priors_all if cfg.align_to_priors else [None] * len(kfs))

        # mask cache with global ids
        t3 = time.perf_counter()
        say("mask cache", 0.8)
        valid = scene.valid_mask()
        scene.mask_cache = self.segmenter.build_mask_cache(rgb, scene.pts3d, valid, cancel=cancel)
        t["mask_cache_s"] = time.perf_counter() - t3
        t["total_s"] = time.perf_counter() - t0
        say("done", 1.0)
        return scene, t

    @staticmethod
    def _images_at_pointmap_size(kfs, preds, cam_pts) -> np.ndarray:
        """Keyframe images at the pointmaps' resolution: the backend's own (network backends such
        as DUSt3R predict at their input size, e.g. 512 x 384 after resize + crop), else the
        keyframes resized."""
        import cv2

        shape = next(p.shape[:2] for p, _ in cam_pts if p is not None)
        if preds.images is not None and len(preds.images) == len(kfs) and preds.images.shape[1:3] == shape:
            return np.asarray(preds.images, np.uint8)
        if all(kf.rgb.shape[:2] == shape for kf in kfs):
            return np.stack([kf.rgb for kf in kfs])
        return np.stack([cv2.resize(kf.rgb, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) for kf in kfs])

    @staticmethod
    def _express_in_world(scene: AlignedScene, priors: Sequence[Optional[np.ndarray]]):
        """Sim(3)-align the reconstruction to known camera poses (odometry/TF) so the scene comes
        out in the robot's frame at metric scale; without poses, anchor it at the first keyframe."""
        known = [i for i, p in enumerate(priors) if p is not None]
        if len(known) >= 3:
            src = scene.poses[known, :3, 3]
            dst = np.stack([priors[i][:3, 3] for i in known])
            spread = np.linalg.norm(dst - dst.mean(0), axis=1).max()
            if spread > 1e-3:
                s, R, t = umeyama(src, dst, with_scale=not scene.metric)
                _apply_similarity(scene, s, R, t)
                return
        if known:
            i = known[0]
            M = priors[i] @ invert_pose(scene.poses[i])
            _apply_similarity(scene, 1.0, M[:3, :3], M[:3, 3])
            return
        M = invert_pose(scene.poses[0])
        _apply_similarity(scene, 1.0, M[:3, :3], M[:3, 3])


def _apply_similarity(scene: AlignedScene, s: float, R: np.ndarray, t: np.ndarray):
    T = np.eye(4)
    T[:3, :3] = s * R
    T[:3, 3] = t
    scene.pts3d = transform_points(T, scene.pts3d.astype(np.float32)).astype(np.float32)
    scene.poses = apply_sim3_to_poses(s, R, t, scene.poses)
