"""RGB-only reconstruction and segmentation with the weight-free ``sfm`` backend, on real photos
(``../shared/data``) and on the embedded synthetic scene, with baselines from the same run.

Measures:

* **middlebury_temple** (16 views 640x480, exact calibration): views registered by the
  backend's structure from motion and their rotation / centre error against the exact cameras
  after a similarity fit (centre error in % of the ring's diameter); baseline: pycolmap's
  incremental mapping alone with the same features, matches and fixed intrinsics (the anchor of
  issue 12). Then the whole pipeline (sfm backend, classical segmenter, DGA) and ONE click (the
  most interior pseudo-GT pixel of view 0) -> 3D segment projected into all 16 views -> IoU per
  view against the pseudo ground truth (luminance > 45, largest component, holes kept). Two
  diagnostics separate reconstruction from segmentation: the same click on a mask cache built
  from colour-only per-view masks of the same classical segmenter (associated across views in
  3D with the package's ``associate_masks_3d``), and the "oracle" where every view's own
  pseudo-GT pixels are lifted (what the reconstruction + projection allow at best).
* **llff_fern** (20 views 504x378, COLMAP poses in poses_bounds.npy): pose agreement with
  poses_bounds.npy (all 20 views, focal refined); the NVOS click (266.5, 183.5) on view 12
  through the pipeline on 5 views around it: points, multi-view consistency of the segment
  (share of visible (point, other view) pairs inside the segment's own masks), and a montage.
* **5 views 640x480, RGB only, end to end** (the time goal: <= 60 s on the 2-core CPU): the
  synthetic scene (ground truth poses and masks) with the sfm backend, beside the rgbd backend
  on the same frames WITH depth (baseline), and dust3r when ``--dust3r-checkpoint`` is given
  (not run otherwise: no weights here); plus 5 neighbouring temple views.

DGA runs ``--iterations`` (default 100): with the SfM poses fixed, DGA only solves the pairwise
similarities and fuses the depths, which 100 Adam iterations settle (see docs/sfm.md).

Prints tables, writes montages into ``--out`` (default $TMPDIR/wildseg3d_bench_rgb_real), and as its LAST
line one JSON object with the figures.
Run: ``.venv/bin/python benchmarks/bench_rgb_real.py`` (several minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import cv2  # noqa: F401  (OpenCV before pycolmap: see core/pointmaps/colmap_sfm.py)
import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

from wildseg3d_ros.eval.datasets import temple_pseudo_gt  # noqa: E402
from wildseg3d_ros.eval.metrics import interior_click  # noqa: E402
from wildseg3d_ros.eval.real_segmentation import multiview_consistency  # noqa: E402


def _span(poses):
    C = np.asarray(poses)[:, :3, 3]
    return float(max(np.linalg.norm(a - b) for a, b in itertools.combinations(C, 2)))


def _pose_summary(est, gt, registered):
    from wildseg3d_ros.core.geometry import pose_errors

    m = np.asarray(registered, bool)
    if m.sum() < 3:
        return {"registered": int(m.sum())}
    pe = pose_errors(est[m], gt[m], "sim3")
    span = _span(gt)
    return {"registered": int(m.sum()), "rot_deg_mean": pe["rot_deg_mean"], "rot_deg_max": pe["rot_deg_max"],
            "centre_pct_span_mean": 100 * pe["center_mean"] / span, "centre_pct_span_max": 100 * pe["center_max"] / span}


def incremental_only_baseline(images, K, threads):
    """pycolmap's incremental mapping alone (default options, intrinsics fixed), same SIFT and
    exhaustive matching: the anchor the issue measured (13/16 on the temple)."""
    import shutil
    import tempfile

    import pycolmap

    tmp = tempfile.mkdtemp(prefix="bench_inc_")
    try:
        names = []
        os.makedirs(f"{tmp}/img")
        for v, im in enumerate(images):
            names.append(f"{v:04d}.bmp")
            cv2.imwrite(f"{tmp}/img/{names[-1]}", im[..., ::-1])
        ro = pycolmap.ImageReaderOptions()
        ro.camera_model = "PINHOLE"
        ro.camera_params = ",".join(str(float(x)) for x in (K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5))
        eo = pycolmap.FeatureExtractionOptions()
        eo.num_threads = threads
        t0 = time.perf_counter()
        pycolmap.extract_features(f"{tmp}/db.db", f"{tmp}/img", image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=ro, extraction_options=eo, device=pycolmap.Device.cpu)
        mo = pycolmap.FeatureMatchingOptions()
        mo.num_threads = threads
        pycolmap.match_exhaustive(f"{tmp}/db.db", matching_options=mo, device=pycolmap.Device.cpu)
        io = pycolmap.IncrementalPipelineOptions()
        io.ba_refine_focal_length = io.ba_refine_extra_params = io.ba_refine_principal_point = False
        io.num_threads = threads
        os.makedirs(f"{tmp}/out")
        recs = pycolmap.incremental_mapping(f"{tmp}/db.db", f"{tmp}/img", f"{tmp}/out", io)
        wall = time.perf_counter() - t0
        poses = np.full((len(images), 4, 4), np.nan)
        reg = np.zeros(len(images), bool)
        if recs:
            rec = max(recs.values(), key=lambda r: r.num_reg_images())
            for _, im in rec.images.items():
                if im.has_pose:
                    v = names.index(im.name)
                    T = np.eye(4)
                    T[:3, :4] = im.cam_from_world().matrix()
                    poses[v] = np.linalg.inv(T)
                    reg[v] = True
        return poses, reg, wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_pipeline(kfs, iterations, threads, backend="sfm", backend_kwargs=None):
    from wildseg3d_ros.core.pipeline import PipelineConfig, ReconstructionPipeline

    kw = dict(backend_kwargs or {})
    if backend == "sfm":
        kw.setdefault("num_threads", threads)
    pipe = ReconstructionPipeline(PipelineConfig(backend=backend, backend_kwargs=kw, iterations=iterations))
    t0 = time.perf_counter()
    scene, timings = pipe.run(kfs)
    timings = dict(timings, wall_s=time.perf_counter() - t0)
    return pipe, scene, timings


def click_segment(scene, segmenter, view, u, v):
    from wildseg3d_ros.core.group_mapping import GroupMapper
    from wildseg3d_ros.core.prompts.session import InteractiveSession

    sess = InteractiveSession(scene, GroupMapper(scene), segmenter)
    seg = sess.add_pixel_prompt(view, u, v, True)
    return seg


def colour_only_cache(scene):
    """Diagnostic: per-view masks of the classical segmenter WITHOUT geometry, associated across
    views through the aligned pointmaps (the package's associate_masks_3d)."""
    import copy

    from wildseg3d_ros.core.presegment.classical import ClassicalSegmenter
    from wildseg3d_ros.core.mask_cache import associate_masks_3d, make_mask_cache

    valid = scene.valid_mask()
    seg = ClassicalSegmenter()
    local = np.stack([np.where(valid[v], seg.automatic_masks(scene.rgb[v]), 0) for v in range(scene.num_views)])
    glob = associate_masks_3d(local, scene.pts3d, valid)
    s2 = copy.copy(scene)
    s2.mask_cache = make_mask_cache(glob, scene.pts3d, valid)
    return s2, seg


def snap(valid, u, v):
    """The click moved to the nearest pixel with a reconstructed point (as the CLI does)."""
    from wildseg3d_ros.apps.offline import _snap_to_reconstructed

    uu, vv, _ = _snap_to_reconstructed(valid, u, v, 40)
    return uu, vv


# ---------------------------------------------------------------------------------------------
def temple(args, out_dir):
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.output import montage
    from wildseg3d_ros.core.pointmaps.colmap_sfm import SfmOptions, run_sfm
    from wildseg3d_ros.eval.metrics import segment_iou_per_view
    from wildseg3d_ros.core.types import Keyframe

    d = datasets.load_middlebury_temple(args.data_root / "middlebury_temple")
    res = {}
    t0 = time.perf_counter()
    r = run_sfm(d.rgb, [d.K] * 16, options=SfmOptions(num_threads=args.threads))
    res["sfm"] = dict(_pose_summary(r.poses, d.poses, r.registered), mapper=r.mapper, seconds=time.perf_counter() - t0,
                      reprojection_px=r.reprojection_error, not_registered=r.reasons)
    bp, breg, bwall = incremental_only_baseline(d.rgb, d.K, args.threads)
    res["baseline_incremental_only"] = dict(_pose_summary(bp, d.poses, breg), seconds=bwall,
                                            missing=[int(v) for v in np.flatnonzero(~breg)])
    print("middlebury_temple structure from motion (16 views, exact intrinsics), errors after a Sim(3) fit:")
    for k in ("sfm", "baseline_incremental_only"):
        s = res[k]
        print(f"  {k:26s} registered {s['registered']:2d}/16  rot mean/max {s.get('rot_deg_mean', float('nan')):.3f}/"
              f"{s.get('rot_deg_max', float('nan')):.3f} deg  centre mean/max {s.get('centre_pct_span_mean', float('nan')):.3f}/"
              f"{s.get('centre_pct_span_max', float('nan')):.3f} % of the ring diameter  {s['seconds']:.1f} s")

    kfs = [Keyframe(k, float(k), d.rgb[k], d.K) for k in range(16)]
    pipe, scene, tim = run_pipeline(kfs, args.iterations, args.threads)
    kept = scene.info["kept_views"]
    gts = np.stack([temple_pseudo_gt(d.rgb[v]) for v in kept])
    valid = scene.valid_mask()
    u, v = interior_click(gts[0])
    u, v = snap(valid[0], u, v)
    seg = click_segment(scene, pipe.segmenter, 0, u, v)
    ious, pred = segment_iou_per_view(seg.points, scene, gts)
    sc2, seg2 = colour_only_cache(scene)
    segc = click_segment(sc2, seg2, 0, u, v)
    ious_c, pred_c = segment_iou_per_view(segc.points, scene, gts)
    ious_o, _ = segment_iou_per_view(scene.pts3d[valid & gts], scene, gts)
    cover = [float((valid[k] & gts[k]).sum() / gts[k].sum()) for k in range(len(kept))]
    res["segment"] = dict(views=len(kept), click=[u, v], iou_per_view=[round(float(x), 4) for x in ious],
                          iou_mean=float(ious.mean()), points=int(seg.num_points),
                          colour_only_cache_iou_per_view=[round(float(x), 4) for x in ious_c],
                          colour_only_cache_iou_mean=float(ious_c.mean()),
                          oracle_iou_mean=float(ious_o.mean()), oracle_iou_min=float(ious_o.min()),
                          gt_coverage_by_depth_mean=float(np.mean(cover)),
                          pipeline_s={k: round(float(x), 2) for k, x in tim.items()},
                          dga_pose=_pose_summary(scene.poses, d.poses[kept], np.ones(len(kept), bool)))
    montage.make_montage(scene.rgb, pred, seg.points, seg.colors, None, None, out_dir / "temple_montage.png",
                         gt_masks=gts, titles=[f"view {k}" for k in kept], view_from=scene.poses[0])
    montage.make_montage(scene.rgb, pred_c, segc.points, segc.colors, None, None,
                         out_dir / "temple_montage_colour_only_cache.png", gt_masks=gts,
                         titles=[f"view {k}" for k in kept], view_from=scene.poses[0])
    s = res["segment"]
    print(f"\ntemple pipeline (sfm + classical + DGA {args.iterations} it.), one click on view 0 at ({u:.0f}, {v:.0f}):")
    print(f"  3D segment IoU per view {s['iou_per_view']}  mean {s['iou_mean']:.3f}  ({s['points']} points)")
    print(f"  diagnostic, colour-only per-view masks associated in 3D: mean {s['colour_only_cache_iou_mean']:.3f} "
          f"{s['colour_only_cache_iou_per_view']}")
    print(f"  oracle (each view's pseudo-GT pixels lifted): mean {s['oracle_iou_mean']:.3f} (min {s['oracle_iou_min']:.3f}); "
          f"pseudo-GT pixels with a reconstructed point {100 * s['gt_coverage_by_depth_mean']:.0f} %")
    print(f"  timings {s['pipeline_s']}")
    return res


def fern(args, out_dir):
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.output import montage
    from wildseg3d_ros.core.pointmaps.colmap_sfm import SfmOptions, run_sfm
    from wildseg3d_ros.eval.metrics import project_segment
    from wildseg3d_ros.core.types import Keyframe

    d = datasets.load_llff_fern(args.data_root / "llff_fern")
    V = len(d.rgb)
    t0 = time.perf_counter()
    r = run_sfm(d.rgb, [d.K] * V, refine_intrinsics=True, options=SfmOptions(num_threads=args.threads))
    res = {"sfm": dict(_pose_summary(r.poses, d.poses, r.registered), views=V, mapper=r.mapper,
                       seconds=time.perf_counter() - t0, focal_px=float(r.K[0, 0, 0]),
                       focal_poses_bounds_px=float(d.K[0, 0]))}
    s = res["sfm"]
    print(f"\nllff_fern structure from motion vs poses_bounds.npy (COLMAP, full resolution): registered "
          f"{s['registered']}/{V}, rot mean/max {s['rot_deg_mean']:.3f}/{s['rot_deg_max']:.3f} deg, centre mean/max "
          f"{s['centre_pct_span_mean']:.3f}/{s['centre_pct_span_max']:.3f} % of the span, focal {s['focal_px']:.1f} px "
          f"(poses_bounds {s['focal_poses_bounds_px']:.1f}), {s['seconds']:.1f} s")
    views = [8, 10, 12, 14, 16]
    kfs = [Keyframe(k, float(k), d.rgb[v], d.K) for k, v in enumerate(views)]
    pipe, scene, tim = run_pipeline(kfs, args.iterations, args.threads, backend_kwargs=dict(refine_intrinsics=True))
    kept = [views[k] for k in scene.info["kept_views"]]
    valid = scene.valid_mask()
    cv = kept.index(12)
    u, v = snap(valid[cv], 266.5, 183.5)
    seg = click_segment(scene, pipe.segmenter, cv, u, v)
    share, pairs, seen = multiview_consistency(seg.points, seg.view_index, seg.pixel_masks, scene.pts3d, valid,
                                                  scene.poses, scene.K)
    masks = project_segment(seg.points, scene) if seg.num_points else np.zeros(valid.shape, bool)
    montage.make_montage(scene.rgb, masks, seg.points, seg.colors, None, None, out_dir / "fern_montage.png",
                         titles=[f"view {k}" for k in kept], view_from=scene.poses[cv])
    res["segment"] = dict(views=kept, click_view=12, click=[u, v], points=int(seg.num_points),
                          points_per_view=np.bincount(seg.view_index, minlength=len(kept)).tolist() if seg.num_points else [],
                          consistency=float(share), visible_pairs=int(pairs), points_seen_elsewhere=int(seen),
                          mask_area_per_view=[int(m.sum()) for m in masks],
                          pipeline_s={k: round(float(x), 2) for k, x in tim.items()})
    s = res["segment"]
    print(f"fern NVOS click (266.5, 183.5) on view 12, pipeline on views {kept}: {s['points']} points "
          f"{s['points_per_view']}, multi-view consistency {s['consistency']:.3f} over {s['visible_pairs']} visible "
          f"(point, view) pairs, projected mask area per view {s['mask_area_per_view']}; timings {s['pipeline_s']}")
    return res


def timing_5_views(args, out_dir):
    """5 views 640x480, RGB only, end to end; rgbd (with depth) and dust3r beside it."""
    import cv2 as _cv2

    from wildseg3d_ros.eval.metrics import segment_iou_per_view
    from wildseg3d_ros.core.types import Keyframe
    from wildseg3d_ros.sim.tabletop import render_sequence

    seq = render_sequence(5, 640, 480, seed=0)
    gt = seq.instance
    areas = {o: int((gt[0] == o).sum()) for o in seq.scene.object_ids}
    res = {}
    for name in ("sfm", "rgbd", "dust3r"):
        if name == "dust3r" and not args.dust3r_checkpoint:
            res[name] = {"run": False, "why": "no DUSt3R weights on this machine (pass --dust3r-checkpoint)"}
            continue
        kfs = [Keyframe(k, float(k), seq.rgb[k], seq.K, seq.depth[k] if name == "rgbd" else None) for k in range(5)]
        bkw = {"model": args.dust3r_checkpoint, "image_size": 512} if name == "dust3r" else {}
        t0 = time.perf_counter()
        pipe, scene, tim = run_pipeline(kfs, args.iterations, args.threads, backend=name, backend_kwargs=bkw)
        wall = time.perf_counter() - t0
        kept = scene.info["kept_views"]
        g = gt[kept]
        valid = scene.valid_mask()
        out = []
        for oid in sorted(areas, key=lambda o: -areas[o])[:3]:  # the three largest objects of view 0
            m = ((g[0] == oid) & valid[0]).astype(np.uint8)
            if not m.any():
                out.append(0.0)
                continue
            dist = _cv2.distanceTransform(m, _cv2.DIST_L2, 5)
            vv, uu = np.unravel_index(np.argmax(dist), dist.shape)
            seg = click_segment(scene, pipe.segmenter, 0, float(uu), float(vv))
            ious, _ = segment_iou_per_view(seg.points, scene, g == oid) if scene.image_shape == g.shape[1:] else (np.zeros(1), None)
            out.append(float(ious.mean()))
        from wildseg3d_ros.core.geometry import pose_errors

        pe = pose_errors(scene.poses, seq.poses[kept], "sim3")
        res[name] = dict(run=True, wall_s=wall, timings={k: round(float(x), 2) for k, x in tim.items()},
                         views=len(kept), rot_deg_max=pe["rot_deg_max"], centre_max_m=pe["center_max"],
                         click_iou_mean_3_objects=float(np.mean(out)), click_iou_per_object=out)
    print(f"\n5 views 640x480 end to end (synthetic scene, DGA {args.iterations} it.):")
    for name, r in res.items():
        if not r["run"]:
            print(f"  {name:6s} not run: {r['why']}")
            continue
        print(f"  {name:6s} {'RGB only' if name != 'rgbd' else 'RGB-D   '} {r['wall_s']:6.1f} s  poses max {r['rot_deg_max']:.3f} deg / "
              f"{100 * r['centre_max_m']:.2f} cm  3 largest objects, one click each: IoU {np.round(r['click_iou_per_object'], 3).tolist()}"
              f"  {r['timings']}")
    return res


def temple_5_views(args):
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.types import Keyframe

    if not args.data_root.is_dir():
        return {"run": False}
    d = datasets.load_middlebury_temple(args.data_root / "middlebury_temple")
    views = [5, 6, 7, 8, 9]  # neighbours on the ring (longitude 65 .. 157 deg)
    kfs = [Keyframe(k, float(k), d.rgb[v], d.K) for k, v in enumerate(views)]
    t0 = time.perf_counter()
    pipe, scene, tim = run_pipeline(kfs, args.iterations, args.threads)
    wall = time.perf_counter() - t0
    print(f"  temple views {views} (RGB only, 640x480): {wall:.1f} s end to end {dict((k, round(v, 2)) for k, v in tim.items())}")
    return dict(run=True, views=views, wall_s=wall, timings={k: round(float(x), 2) for k, x in tim.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "wildseg3d_bench_rgb_real"))
    ap.add_argument("--dust3r-checkpoint", default=os.environ.get("WILDSEG3D_DUST3R_CHECKPOINT", ""))
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--data-root", type=Path, default=HERE.parents[2] / "shared" / "data",
                    help="folder holding middlebury_temple/ and llff_fern/ (default ../shared/data)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"iterations": args.iterations, "threads": args.threads}
    t0 = time.perf_counter()
    result["five_views_640x480"] = timing_5_views(args, out_dir)
    if not args.skip_real and args.data_root.is_dir():
        result["five_views_640x480"]["temple"] = temple_5_views(args)
        result["temple"] = temple(args, out_dir)
        result["fern"] = fern(args, out_dir)
    else:
        print(f"real data absent ({args.data_root}) or skipped: temple / fern not measured")
        result["real_data"] = "absent"
    result["bench_wall_s"] = time.perf_counter() - t0
    print(f"\nmontages in {out_dir}")
    print(json.dumps(result, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
