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

The experiments live in ``wildseg3d_ros.eval.real_segmentation`` (shared with
``benchmarks/bench_real_segmentation.py``); this file asserts on them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"real data absent ({SHARED_DATA}): needs ../shared beside the repo")

from wildseg3d_ros.eval.real_segmentation import (ROOM_CLICK, iou, precision, room_results,  # noqa: E402
                                                  temple_check, temple_pseudo_gt,
                                                  temple_results as _temple_results)


# ---------------------------------------------------------------------------------------------
# (a) middlebury_temple
@pytest.fixture(scope="module")
def temple():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data absent ({SHARED_DATA}): needs ../shared beside the repo")
    return _temple_results(SHARED_DATA)


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
    res = room_results(SHARED_DATA)
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
