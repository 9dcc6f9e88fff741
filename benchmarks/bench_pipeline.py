"""Per-stage time of the reconstruction pipeline on the demo's keyframes, and of the
segmentation side's scene preparation and first click.

Input: the demo's 5 RGB-D keyframes (sim.tabletop.render_sequence, 512x384, seed 0, the
camera simulator's odometry drift: 5 mm / 0.3 deg per step), the demo's settings (rgbd backend,
segmenter auto = geometric for rgbd (--segmenter), complete pair graph, DGA with the paper's alphas,
pose priors on).

Per run (--runs, default 5; p50 / p95 reported): ReconstructionPipeline.run stages (pointmaps,
pre-segmentation, alignment, mask cache, total) on a fresh pipeline (cold: nothing cached), then
the same with every keyframe prepared first (prepared_*: as the node does with
keyframes.prepare_ahead: ReconstructionPipeline.prepare per accepted keyframe, then its queued pairs, timed per keyframe), the scene cloud packed for publication
(core.cloud.pack_scene_cloud + bytes), then what the segmentation node does with it
(ros/segmentation_node._load_scene): the data as rclpy delivers it (array.array) -> structured
array (cloud_from_bytes) -> AlignedScene (scene_from_cloud_array: one batched resection of all
keyframes) while the scene identity (BLAKE2) is hashed on another thread, GroupMapper (indexes
the labelled pixels; object segments are computed on first use) and InteractiveSession
(together: scene preparation), the first click (a 3D point on the largest object -> its
segment, computed now -> packed object cloud), then the idle warm-up
(idle_warm_s: the KD-tree and the other objects). eager_mapper_baseline_s: GroupMapper + all of it, i.e. what the mapper's
construction cost when it computed all objects up front.
Baseline in the same run: --baseline-runs reconstructions with the Adam reference optimiser
(optimizer='adam', 500 iterations). The machine load (os.getloadavg) is printed.
OMP_WAIT_POLICY defaults to PASSIVE (see bench_dga_speed.py). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import array
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wildseg3d_ros.core.output import cloud  # noqa: E402
from wildseg3d_ros.sim import tabletop as synthetic
from wildseg3d_ros.core.pipeline import PipelineConfig, ReconstructionPipeline  # noqa: E402
from wildseg3d_ros.core.types import Keyframe  # noqa: E402
from wildseg3d_ros.core.output.scene_codec import scene_from_cloud_array  # noqa: E402
from wildseg3d_ros.core.presegment.base import make_segmenter  # noqa: E402
from wildseg3d_ros.core.group_mapping import GroupMapper  # noqa: E402
from wildseg3d_ros.core.prompts.session import InteractiveSession  # noqa: E402
from wildseg3d_ros.core.prompts.session_file import scene_identity  # noqa: E402


def keyframes(width, height, n, seed):
    seq = synthetic.render_sequence(n_views=n, width=width, height=height, seed=seed)
    odom = synthetic.add_odometry_drift(seq.poses, seed=seed + 1, trans_sigma=0.005, rot_sigma_deg=0.3)
    return [Keyframe(index=i, stamp=float(seq.stamps[i]), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i],
                     pose_prior=odom[i]) for i in range(n)]


def segmentation_side(scene, segmenter, pool):
    """Times (s) of the segmentation node's work on a new scene message and its first click,
    done as the node does it (ros/segmentation_node._load_scene): the message data as rclpy
    delivers it (array.array), the scene identity hashed on another thread while the cloud is
    decoded, then GroupMapper and InteractiveSession."""
    t = {}
    t0 = time.perf_counter()
    arr, h, w = cloud.pack_scene_cloud(scene)
    lay = cloud.cloud_layout(arr, h, w)
    data = array.array("B", cloud.cloud_to_bytes(arr))
    t["pack_scene_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sid = pool.submit(scene_identity, h, w, lay.point_step, scene.frame_id, data,
                      [(f.name, f.offset, f.datatype, f.count) for f in lay.fields])
    struct = cloud.cloud_from_bytes(data, lay.fields, lay.point_step, lay.height, lay.width, False,
                                    row_step=lay.row_step)
    t["decode_bytes_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sc = scene_from_cloud_array(struct, scene.frame_id)
    t["scene_from_cloud_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    sid.result()
    t["identity_wait_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    mapper = GroupMapper(sc)
    t["group_mapper_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    session = InteractiveSession(sc, mapper, segmenter)
    t["session_s"] = time.perf_counter() - t1
    t["scene_preparation_s"] = time.perf_counter() - t0
    # the first click: the most interior pixel of the largest cached object of keyframe 0
    lab = sc.mask_cache.labels[0]
    ids, cnt = np.unique(lab[lab > 0], return_counts=True)
    if ids.size:
        m = lab == ids[np.argmax(cnt)]
        import cv2

        dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
        v, u = np.unravel_index(np.argmax(dist), dist.shape)
        p = sc.pts3d[0, v, u]
        t1 = time.perf_counter()
        seg = session.add_point_prompt(p, True)
        cloud.pack_object_cloud(seg.points, seg.colors)
        t["first_click_s"] = time.perf_counter() - t1
    # what the node then does while idle (the rest of the objects), and what building the
    # mapper cost when it computed every object up front (before objects were computed lazily)
    t1 = time.perf_counter()
    mapper.warm()
    t["idle_warm_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    GroupMapper(sc).warm()
    t["eager_mapper_baseline_s"] = time.perf_counter() - t1
    return t


def pct(values, q):
    return float(np.percentile(np.asarray(values, np.float64), q))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline-runs", type=int, default=1, help="reconstructions with the Adam reference")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segmenter", default="auto", help="auto (geometric for rgbd), geometric, classical")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    kfs = keyframes(args.width, args.height, args.frames, args.seed)
    # the node's defaults = the demo's settings (rgbd, segmenter auto -> geometric, complete, DGA)
    cfg = PipelineConfig(segmenter=args.segmenter)
    ReconstructionPipeline(cfg).run(kfs[:2])  # warm-up (imports, lazy initialisation)
    seg = make_segmenter(ReconstructionPipeline(cfg).cfg.segmenter)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # the node's scene-identity thread
    runs = []
    for r in range(args.runs):
        # cold: a fresh pipeline, nothing of these keyframes cached (the segmenters and the rgbd
        # backend cache per-keyframe work by content; reusing one pipeline would hit the caches)
        pipe = ReconstructionPipeline(cfg)
        scene, t = pipe.run(kfs)
        # as the node runs: every keyframe prepared when it was accepted (keyframes.prepare_ahead),
        # then the reconstruction
        pipe = ReconstructionPipeline(cfg)
        tp = time.perf_counter()
        for kf in kfs:
            pipe.prepare(kf)
        pipe.prepare_pending_pairs()  # what the node does while no keyframe waits
        t["prepare_per_keyframe_s"] = (time.perf_counter() - tp) / len(kfs)
        _, tw = pipe.run(kfs)
        t.update({f"prepared_{k}": v for k, v in tw.items()})
        t.update(segmentation_side(scene, seg, pool))
        runs.append(t)
        print(f"  run {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    base = []
    if args.baseline_runs > 0:
        for r in range(args.baseline_runs):
            pipe = ReconstructionPipeline(dataclasses.replace(cfg, optimizer="adam"))  # cold, as above
            _, t = pipe.run(kfs)
            base.append(t)
            print(f"  baseline (adam) run {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    keys = list(runs[0])
    stats = {k: {"p50": pct([x[k] for x in runs], 50), "p95": pct([x[k] for x in runs], 95)} for k in keys}
    bstats = {k: {"p50": pct([x[k] for x in base], 50), "p95": pct([x[k] for x in base], 95)} for k in base[0]} if base else {}
    print(f"\n{args.frames} RGB-D keyframes {args.width}x{args.height}, {args.runs} runs, load average at start "
          f"{load0[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
    print(f"{'stage':22s} {'p50 s':>8s} {'p95 s':>8s} {'adam p50 s':>11s}")
    for k in keys:
        b = f"{bstats[k]['p50']:11.3f}" if k in bstats else " " * 11
        print(f"{k:22s} {stats[k]['p50']:8.3f} {stats[k]['p95']:8.3f} {b}")
    out = {"config": vars(args), "load_avg_start": load0, "load_avg_end": os.getloadavg(), "stages": stats,
           "baseline_adam": bstats, "runs": runs,
           "goal_reconstruction_le_5s_p50": bool(stats["total_s"]["p50"] <= 5.0),
           "goal_reconstruction_le_5s_p50_prepared_ahead": bool(stats["prepared_total_s"]["p50"] <= 5.0),
           "goal_scene_preparation_le_100ms_p95": bool(stats["scene_preparation_s"]["p95"] <= 0.1),
           "goal_first_click_le_10ms_p95": bool(stats["first_click_s"]["p95"] <= 0.01)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
