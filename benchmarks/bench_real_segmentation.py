"""Segmentation quality on real photos (``../shared/data``), with baselines from the same run.

Measures:

* middlebury_temple (16 views, 640x480, RGB only): per view, the 2D IoU / precision / recall
  against the README pseudo ground truth (luminance > 45, largest component, holes kept) of the
  mask from ONE positive click (the most interior pseudo-GT pixel) through
  ``make_segmenter('classical').refine``, and its time; baselines: a 4-connected colour flood
  fill from the same click (floating range +-20 per channel), the same segmenter with
  single-linkage colour merging (the ablation of its average-linkage merge), the automatic-mask
  segment under the click (no refinement), and the whole image.  Also how many projected 3D-bounding-box centres
  fall on the object (why that click rule was not used).
* rgbd_room (5 Kinect frames at 320x240, no pose priors, rgbd backend + classical segmenter,
  200 DGA iterations): one pixel click on the wing-back armchair (view 2, (185, 100)) through
  ``GroupMapper`` + ``InteractiveSession``; the 3D segment's point count, extent and multi-view
  consistency (share of visible (point, other view) pairs landing in the segment's own masks),
  against the baseline of the raw lifted masks (``GroupMapper(consistency=False)``); timings.

Prints tables, then as its LAST line one JSON object with the figures.
Run: ``.venv/bin/python benchmarks/bench_real_segmentation.py`` (about 20 s on 1 core).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))


def main():
    import torch

    torch.set_num_threads(1)
    from wildseg3d_ros.eval import real_segmentation as H

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, default=HERE.parents[2] / "shared" / "data",
                    help="folder holding middlebury_temple/ and rgbd_room/ (default ../shared/data)")
    args = ap.parse_args()
    if not args.data_root.is_dir():
        print(f"real data absent ({args.data_root}): needs ../shared beside the repo")
        print(json.dumps({"skipped": True, "reason": "shared data absent"}))
        return

    t0 = time.perf_counter()
    tr = H.temple_results(args.data_root)
    temple_s = time.perf_counter() - t0
    print("middlebury_temple: one interior click per view, classical refine vs baselines")
    print(f"{'view':18s} {'click(u,v)':>12s} {'gt%':>5s} {'IoU':>6s} {'prec':>6s} {'recall':>6s} "
          f"{'ms':>6s} {'flood':>6s} {'single':>6s} {'auto':>6s} {'whole':>6s}")
    for r in tr:
        print(f"{r['name']:18s} {'(%d,%d)' % tuple(map(int, r['click'])):>12s} {100 * r['gt_frac']:5.1f} "
              f"{r['iou']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f} {1e3 * r['seconds']:6.0f} "
              f"{r['flood_iou']:6.3f} {r['single_linkage_iou']:6.3f} {r['auto_iou']:6.3f} {r['whole_iou']:6.3f}")
    mean = lambda k: float(np.mean([r[k] for r in tr]))  # noqa: E731
    print(f"{'mean':18s} {'':>12s} {100 * mean('gt_frac'):5.1f} {mean('iou'):6.3f} {mean('precision'):6.3f} "
          f"{mean('recall'):6.3f} {1e3 * mean('seconds'):6.0f} {mean('flood_iou'):6.3f} {mean('single_linkage_iou'):6.3f} "
          f"{mean('auto_iou'):6.3f} {mean('whole_iou'):6.3f}")
    n_bbox = sum(r["bbox_click_in_gt"] for r in tr)
    print(f"projected bbox centre on the object in {n_bbox}/{len(tr)} views")

    t0 = time.perf_counter()
    rr = H.room_results(args.data_root)
    room_s = time.perf_counter() - t0
    print(f"\nrgbd_room: click view {H.ROOM_CLICK[0]} (u, v) = {H.ROOM_CLICK[1:]} at {H.ROOM_SIZE}")
    for k in ("mgm", "raw_lift"):
        r = rr[k]
        print(f"  {k:9s} ids {r['object_ids']} points {r['num_points']:6d} per view {r['views']} "
              f"consistency {r['consistency']:.3f} (vs cache labels {r['consistency_vs_cache_labels']:.3f}, "
              f"{r['visible_pairs']} visible pairs) extent 2-98% {np.round(r['extent_2_98_m'], 2).tolist()} m "
              f"full {np.round(r['extent_full_m'], 2).tolist()} m  mapper {1e3 * r['mapper_build_s']:.0f} ms "
              f"prompt {1e3 * r['prompt_s']:.1f} ms")
    print(f"  whole scene: {rr['whole_scene']['num_points']} points, extent 2-98% "
          f"{np.round(rr['whole_scene']['extent_2_98_m'], 2).tolist()} m")
    print(f"  reconstruction timings {({k: round(v, 2) for k, v in rr['timings'].items()})}")

    out = {
        "temple_iou_per_view": [round(r["iou"], 4) for r in tr],
        "temple_iou_mean": round(mean("iou"), 4),
        "temple_precision_mean": round(mean("precision"), 4),
        "temple_recall_mean": round(mean("recall"), 4),
        "temple_refine_ms_mean": round(1e3 * mean("seconds"), 1),
        "baseline_temple_floodfill_iou_mean": round(mean("flood_iou"), 4),
        "baseline_temple_single_linkage_iou_mean": round(mean("single_linkage_iou"), 4),
        "baseline_temple_auto_mask_iou_mean": round(mean("auto_iou"), 4),
        "baseline_temple_whole_image_iou_mean": round(mean("whole_iou"), 4),
        "temple_bbox_centre_on_object_views": int(n_bbox),
        "temple_total_s": round(temple_s, 2),
        "room_consistency": round(rr["mgm"]["consistency"], 4),
        "room_consistency_vs_cache_labels": round(rr["mgm"]["consistency_vs_cache_labels"], 4),
        "room_points": rr["mgm"]["num_points"],
        "room_points_per_view": rr["mgm"]["views"],
        "room_extent_2_98_m": [round(x, 3) for x in rr["mgm"]["extent_2_98_m"]],
        "room_prompt_ms": round(1e3 * rr["mgm"]["prompt_s"], 2),
        "room_mapper_build_ms": round(1e3 * rr["mgm"]["mapper_build_s"], 1),
        "baseline_room_raw_lift_consistency": round(rr["raw_lift"]["consistency"], 4),
        "baseline_room_raw_lift_points": rr["raw_lift"]["num_points"],
        "room_reconstruction_s": round(rr["timings"].get("wall_s", float("nan")), 2),
        "room_total_s": round(room_s, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
