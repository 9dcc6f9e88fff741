"""Segmentation evidence on REAL photos from ``../shared/data`` (skipped when shared/ is absent).

(a) middlebury_temple (16 views, 640x480, plaster temple on black): the temple's mask from ONE
    positive click per view through ``make_segmenter('classical').refine(rgb, pos, neg)``
    (RGB only: this dataset has no depth), scored by 2D IoU against the README's pseudo ground
    truth (luminance > 45, largest connected component, holes NOT filled).
    Click rule (fixed, documented): the most interior pixel of the pseudo-GT mask (maximum of its
    Euclidean distance transform), i.e. "the user clicks in the middle of the object".  The
    centre of the projected 3D bounding box (README.txt + templeSR_par.txt) was considered and
    rejected: it falls on the black background seen through the colonnade in 7 of 16 views.
(b) rgbd_room (5 Kinect frames, real depth, 320x240): ``ReconstructionPipeline`` (rgbd backend,
    classical segmenter with the Kinect settings the segmenter's docstring recommends,
    200 DGA iterations) WITHOUT pose priors, then ``GroupMapper`` + ``InteractiveSession`` and
    one pixel click on the wing-back armchair (view 2, (u, v) = (185, 100) at 320x240, i.e. the
    centre of its upholstered back; (370, 200) in the 640x480 original).  Multi-view consistency
    of the 3D segment: share of its points, over the (point, other keyframe) pairs where the
    point is visible (projects inside the image onto a valid pixel, in front of / at that
    keyframe's surface depth within 5 % + 3 cm), that land inside the segment's own mask
    (``Segment3D.pixel_masks``) in that keyframe; also reported against the mask-cache labels
    of the clicked object, and for the baseline ``GroupMapper(consistency=False)``.

Helpers here are also used by ``benchmarks/bench_real_segmentation.py``.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"real data absent ({SHARED_DATA}): needs ../shared beside the repo")

ROOM_CLICK = (2, 185.0, 100.0)  # view, u, v at 320x240: the wing-back armchair's back
ROOM_SIZE = (320, 240)
ROOM_SEG_KW = dict(normal_smooth_sigma=1.5, plane_tol_spacing=12)  # classical.py docstring (Kinect)


# ---------------------------------------------------------------------------------------------
# helpers (shared with the benchmark)
def temple_pseudo_gt(rgb: np.ndarray) -> np.ndarray:
    """README rule: luminance > 45, largest 4-connected component, holes kept."""
    lum = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lab, n = ndimage.label(lum > 45)
    if n == 0:
        return np.zeros(lum.shape, bool)
    return lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)


def interior_click(gt: np.ndarray):
    """(u, v) of the most interior pixel of ``gt`` (max of the distance transform)."""
    r, c = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(gt))), gt.shape)
    return float(c), float(r)


def bbox_centre_click(K, T_c2w):
    lo = np.array([-0.073568, 0.021728, -0.012445])
    hi = np.array([0.028855, 0.181892, 0.062736])
    Tw = np.linalg.inv(T_c2w)
    pc = Tw[:3, :3] @ ((lo + hi) / 2) + Tw[:3, 3]
    uv = (K @ pc)[:2] / pc[2]
    return float(uv[0]), float(uv[1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
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
    from wildseg3d_ros.core.presegment.classical import ClassicalSegmenter
    return ClassicalSegmenter(color_linkage="single", color_thresh_nogeo=8.0)


def temple_results(segmenter=None):
    """Per view: dict(name, click, gt_frac, iou, precision, recall, seconds, flood_iou,
    single_linkage_iou, auto_iou, whole_iou, bbox_click_in_gt)."""
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.presegment.base import make_segmenter

    d = datasets.load_middlebury_temple(SHARED_DATA / "middlebury_temple")
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


def room_scene():
    """rgbd_room at 320x240 reconstructed without poses; returns (scene, SLAM data, timings)."""
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.config import PipelineConfig
    from wildseg3d_ros.core.pipeline import ReconstructionPipeline
    from wildseg3d_ros.core.types import Keyframe

    d = datasets.resize_data(datasets.load_rgbd_room(SHARED_DATA / "rgbd_room"), *ROOM_SIZE)
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


def room_results(scene=None):
    """One click -> 3D segment with MGM (consistency on) and without (baseline)."""
    from wildseg3d_ros.core.group_mapping import GroupMapper
    from wildseg3d_ros.core.prompts.session import InteractiveSession

    timings = {}
    if scene is None:
        t0 = time.perf_counter()
        scene, _, timings = room_scene()
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


# ---------------------------------------------------------------------------------------------
# (a) middlebury_temple
@pytest.fixture(scope="module")
def temple():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data absent ({SHARED_DATA}): needs ../shared beside the repo")
    return temple_results()


@needs_shared
def test_temple_one_click_iou(temple):
    """Measured (classical, one interior click per view, colour only): IoU 0.85-0.95, mean 0.918;
    precision 0.92-1.00 (median 0.949); mask 16-26 % of the image for a temple covering 18-28 %.
    Colour-only regions merge by average linkage (a region's mean colour must stay close), so
    the temple's shaded rim no longer chains it to the black background; the background is the
    large segment along the image border.  Before (single-linkage colour merging): IoU 0.12-0.47,
    mean 0.27, one segment over 97-99 % of the image declared background.
    Thresholds: mean IoU >= 0.85 (measured 0.918) AND median precision >= 0.9 (the whole image
    scores IoU 0.18-0.28; the colour flood-fill baseline leaks to the whole image too)."""
    ious = [r["iou"] for r in temple]
    precs = [r["precision"] for r in temple]
    print("\ntemple IoU per view", np.round(ious, 3).tolist(), "mean %.3f" % np.mean(ious),
          "precision", np.round(precs, 3).tolist(),
          "flood-fill IoU mean %.3f" % np.mean([r["flood_iou"] for r in temple]),
          "single-linkage IoU mean %.3f" % np.mean([r["single_linkage_iou"] for r in temple]),
          "whole-image IoU mean %.3f" % np.mean([r["whole_iou"] for r in temple]))
    assert len(temple) == 16
    assert temple_check(ious, precs), (np.mean(ious), np.median(precs))
    # better than the trivial whole-image mask and the single-linkage ablation, never empty
    assert np.mean(ious) > np.mean([r["whole_iou"] for r in temple])
    assert np.mean(ious) > np.mean([r["single_linkage_iou"] for r in temple]) + 0.3
    assert min(r["mask_frac"] for r in temple) > 0.002


@needs_shared
def test_temple_check_rejects_wrong_masks(temple):
    """The acceptance rule fails for the whole image, an empty mask, and the background."""
    from wildseg3d_ros.eval import datasets

    d = datasets.load_middlebury_temple(SHARED_DATA / "middlebury_temple")
    gts = [temple_pseudo_gt(im) for im in d.rgb]
    for wrong in (lambda g: np.ones_like(g), lambda g: np.zeros_like(g), lambda g: ~g,
                  lambda g: np.roll(g, g.shape[1] // 2, axis=1)):
        ms = [wrong(g) for g in gts]
        assert not temple_check([iou(m, g) for m, g in zip(ms, gts)],
                                [precision(m, g) for m, g in zip(ms, gts)])
    # and it accepts the pseudo-GT itself (the rule is satisfiable)
    assert temple_check([1.0] * 16, [1.0] * 16)


@needs_shared
def test_temple_one_click_whole_object(temple):
    """One click gives the WHOLE temple in every view, not a piece of it: IoU >= 0.75 and recall
    >= 0.85 in each of the 16 views (measured: IoU >= 0.849, recall >= 0.86)."""
    ious = np.array([r["iou"] for r in temple])
    recalls = np.array([r["recall"] for r in temple])
    print("\ntemple recall per view", np.round(recalls, 3).tolist())
    assert ious.min() >= 0.75, ious
    assert recalls.min() >= 0.85, recalls


# ---------------------------------------------------------------------------------------------
# (b) rgbd_room
@needs_shared
def test_rgbd_room_one_click_segment_consistency():
    """One click on the wing-back armchair -> 3D segment through GroupMapper + InteractiveSession.
    Measured (320x240, 200 iterations): cache object 4, 8281 points from all 5 keyframes
    (286/1050/1803/2627/2515), 2-98 % extent 0.80 x 1.14 x 1.08 m (an armchair; the full extent
    reaches 2.25 m through a few stray points), consistency 0.776 over 27k visible pairs
    (0.895 against the cache labels of the object instead of the segment's kept masks); the raw
    lifted masks without MGM's filter (baseline): 12920 points, consistency 0.745.  Looking at the
    masks: views 3-4 label only the wing/side of the chair as object 4 (its back rest is another
    segment there), so the multi-view vote erodes the (correct) view-0/1 masks to 286/1050 px,
    which caps the score.  Bounds: >= 0.70 consistency (measured 0.776), MGM not worse than the
    raw lift, object-sized (2-98 % extent < 1.5 m on every axis; the whole scene spans 3.4-7.7 m,
    so this bound rejects it), >= 300 points in >= 3 keyframes (rejects an empty segment)."""
    t0 = time.perf_counter()
    res = room_results()
    wall = time.perf_counter() - t0
    mgm, raw, whole = res["mgm"], res["raw_lift"], res["whole_scene"]
    print(f"\nrgbd_room click {ROOM_CLICK}: MGM {mgm}\nraw lift {raw}\nwhole scene {whole}\n"
          f"timings {res['timings']} total {wall:.1f} s")
    assert mgm["object_ids"] and mgm["num_points"] >= 300
    assert sum(n > 0 for n in mgm["views"]) >= 3
    assert max(mgm["extent_2_98_m"]) < 1.5
    assert max(whole["extent_2_98_m"]) > 1.5  # the same bound rejects the whole scene
    assert mgm["visible_pairs"] >= 300
    assert mgm["consistency"] >= 0.70, mgm["consistency"]
    assert mgm["consistency"] >= raw["consistency"] - 0.01
    assert mgm["num_points"] <= raw["num_points"]
