"""Segmentation experiments on real photos (Middlebury temple, Kinect room), shared by
``test/test_real_segmentation.py`` (which asserts on them) and
``benchmarks/bench_real_segmentation.py`` (which prints them). The data root (the folder holding
``middlebury_temple/`` and ``rgbd_room/``) is passed in.

Temple: one positive click per view at the most interior pixel of the README's pseudo ground
truth, through the classical segmenter's ``refine`` (RGB only), scored by 2D IoU; baselines
single-linkage colour merging, colour flood fill, the whole image. Room: the rgbd pipeline
without poses at 320x240, one click on the wing-back armchair, multi-view consistency of the
3D segment with MGM and without (raw lift).
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from .datasets import temple_pseudo_gt
from .metrics import interior_click

__all__ = ["temple_results", "temple_check", "room_scene", "room_results", "multiview_consistency",
           "temple_pseudo_gt", "interior_click", "ROOM_CLICK", "ROOM_SIZE"]

ROOM_CLICK = (2, 185.0, 100.0)  # view, u, v at 320x240: the wing-back armchair's back
ROOM_SIZE = (320, 240)
ROOM_SEG_KW = dict(normal_smooth_sigma=1.5, plane_tol_spacing=12)  # classical.py docstring (Kinect)


# ---------------------------------------------------------------------------------------------
# helpers (shared with the benchmark)
def bbox_centre_click(K, T_c2w):
    lo = np.array([-0.073568, 0.021728, -0.012445])
    hi = np.array([0.028855, 0.181892, 0.062736])
    Tw = np.linalg.inv(T_c2w)
    pc = Tw[:3, :3] @ ((lo + hi) / 2) + Tw[:3, 3]
    uv = (K @ pc)[:2] / pc[2]
    return float(uv[0]), float(uv[1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Mask IoU, 0 for two empty masks (a missing object is a failure here)."""
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(np.logical_and(pred, gt).sum() / max(int(pred.sum()), 1))


def flood_fill(rgb: np.ndarray, uv, tol: int = 20) -> np.ndarray:
    """Baseline: 4-connected colour flood fill from the click, floating range +-tol per channel."""
    H, W = rgb.shape[:2]
    ff = np.zeros((H + 2, W + 2), np.uint8)
    cv2.floodFill(rgb.copy(), ff, (int(round(uv[0])), int(round(uv[1]))), 0, (tol,) * 3, (tol,) * 3,
                  4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
    return ff[1:-1, 1:-1] > 0


def segmenter_single_linkage():
    """The ablation baseline: the classical segmenter with single-linkage colour merging (the
    union of close atom pairs, as the geometric path merges), at its former colour threshold."""
    from ..core.presegment.classical import ClassicalSegmenter
    return ClassicalSegmenter(color_linkage="single", color_thresh_nogeo=8.0)


def temple_results(data_root, segmenter=None):
    """Per view: dict(name, click, gt_frac, iou, precision, recall, seconds, flood_iou,
    single_linkage_iou, auto_iou, whole_iou, bbox_click_in_gt)."""
    from . import datasets
    from ..core.presegment.base import make_segmenter

    d = datasets.load_middlebury_temple(Path(data_root) / "middlebury_temple")
    seg = segmenter if segmenter is not None else make_segmenter("classical")
    single = segmenter_single_linkage()
    out = []
    for v, im in enumerate(d.rgb):
        gt = temple_pseudo_gt(im)
        uv = interior_click(gt)
        t0 = time.perf_counter()
        m = np.asarray(seg.refine(im, np.array([uv]), np.zeros((0, 2))), bool)
        dt = time.perf_counter() - t0
        auto = seg.automatic_masks(im)
        a_id = auto[int(uv[1]), int(uv[0])]
        m_single = np.asarray(single.refine(im, np.array([uv]), np.zeros((0, 2))), bool)
        bu, bv = bbox_centre_click(d.K, d.poses[v])
        out.append(dict(name=d.names[v], click=uv, gt_frac=float(gt.mean()), iou=iou(m, gt),
                        precision=precision(m, gt), recall=float((m & gt).sum() / gt.sum()),
                        mask_frac=float(m.mean()), seconds=dt,
                        flood_iou=iou(flood_fill(im, uv), gt), single_linkage_iou=iou(m_single, gt),
                        auto_iou=iou(auto == a_id, gt) if a_id > 0 else 0.0,
                        whole_iou=iou(np.ones_like(gt), gt),
                        bbox_click_in_gt=bool(gt[int(round(bv)), int(round(bu))])))
    return out


def temple_check(ious, precs, min_mean_iou=0.85, min_median_prec=0.9):
    """The acceptance rule used below (also applied to wrong masks in the sanity test)."""
    return float(np.mean(ious)) >= min_mean_iou and float(np.median(precs)) >= min_median_prec


def room_scene(data_root):
    """rgbd_room at 320x240 reconstructed without poses; returns (scene, SLAM data, timings)."""
    from . import datasets
    from ..core.config import PipelineConfig
    from ..core.pipeline import ReconstructionPipeline
    from ..core.types import Keyframe

    d = datasets.resize_data(datasets.load_rgbd_room(Path(data_root) / "rgbd_room"), *ROOM_SIZE)
    kfs = [Keyframe(v, float(v), d.rgb[v], d.K, depth=d.depth[v]) for v in range(len(d.rgb))]
    pipe = ReconstructionPipeline(PipelineConfig(backend="rgbd", segmenter="classical", iterations=200,
                                                 segmenter_kwargs=dict(ROOM_SEG_KW)))
    scene, timings = pipe.run(kfs)
    return scene, d, timings


def multiview_consistency(points, view_index, masks, pts3d, valid, poses, K,
                          tol_rel=0.05, tol_abs=0.03):
    """Share of (point, other view) pairs where the point is visible in that view (inside the
    image, valid surface pixel, z <= surface z + tol) whose projection is inside ``masks``.
    Returns (share, number of visible pairs, number of points visible in >= 1 other view)."""
    V, H, W = valid.shape
    K = np.broadcast_to(np.asarray(K, np.float64), (V, 3, 3))
    P = np.asarray(points, np.float64)
    hits = vis_n = 0
    seen = np.zeros(P.shape[0], bool)
    for b in range(V):
        Tw = np.linalg.inv(poses[b])
        Xc = P @ Tw[:3, :3].T + Tw[:3, 3]
        z = Xc[:, 2]
        zs = np.where(z > 1e-9, z, 1.0)
        u = np.round(K[b, 0, 0] * Xc[:, 0] / zs + K[b, 0, 2]).astype(np.int64)
        v = np.round(K[b, 1, 1] * Xc[:, 1] / zs + K[b, 1, 2]).astype(np.int64)
        ok = (view_index != b) & (z > 1e-9) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        idx = np.flatnonzero(ok)
        uu, vv = u[idx], v[idx]
        sv = valid[b, vv, uu]
        q = pts3d[b, vv, uu].astype(np.float64)
        zsurf = q @ Tw[2, :3] + Tw[2, 3]
        vis = sv & (z[idx] <= zsurf + tol_rel * zsurf + tol_abs)
        hits += int((vis & masks[b, vv, uu]).sum())
        vis_n += int(vis.sum())
        seen[idx[vis]] = True
    return (hits / vis_n if vis_n else 0.0), vis_n, int(seen.sum())


def robust_extent(points, lo=2.0, hi=98.0):
    p = np.asarray(points, np.float64)
    return np.percentile(p, hi, axis=0) - np.percentile(p, lo, axis=0)


def room_results(data_root, scene=None):
    """One click -> 3D segment with MGM (consistency on) and without (baseline)."""
    from ..core.group_mapping import GroupMapper
    from ..core.prompts.session import InteractiveSession

    timings = {}
    if scene is None:
        t0 = time.perf_counter()
        scene, _, timings = room_scene(data_root)
        timings = dict(timings, wall_s=time.perf_counter() - t0)
    valid = scene.valid_mask()
    out = {"timings": timings}
    view, u, v = ROOM_CLICK
    for name, cons in (("mgm", True), ("raw_lift", False)):
        t0 = time.perf_counter()
        mapper = GroupMapper(scene, consistency=cons)
        t1 = time.perf_counter()
        sess = InteractiveSession(scene, mapper)
        seg = sess.add_pixel_prompt(view, u, v, positive=True)
        t2 = time.perf_counter()
        share, pairs, seen = multiview_consistency(seg.points, seg.view_index, seg.pixel_masks,
                                                   scene.pts3d, valid, scene.poses, scene.K)
        lab = scene.mask_cache.labels
        obj_masks = np.isin(lab, list(seg.object_ids)) & valid
        share_cache, _, _ = multiview_consistency(seg.points, seg.view_index, obj_masks,
                                                  scene.pts3d, valid, scene.poses, scene.K)
        ext = robust_extent(seg.points) if seg.num_points else np.zeros(3)
        out[name] = dict(object_ids=list(map(int, seg.object_ids)), num_points=seg.num_points,
                         views=np.bincount(seg.view_index, minlength=scene.num_views).tolist(),
                         consistency=share, visible_pairs=pairs, points_seen_elsewhere=seen,
                         consistency_vs_cache_labels=share_cache,
                         extent_2_98_m=ext.tolist(),
                         extent_full_m=(np.ptp(seg.points, 0).tolist() if seg.num_points else [0, 0, 0]),
                         mapper_build_s=t1 - t0, prompt_s=t2 - t1)
    # sanity reference: the whole valid scene as a "segment"
    allpts = scene.pts3d[valid]
    out["whole_scene"] = dict(num_points=int(allpts.shape[0]),
                              extent_2_98_m=robust_extent(allpts).tolist())
    return out
