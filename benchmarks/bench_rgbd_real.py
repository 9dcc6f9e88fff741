"""rgbd_room (real Kinect RGB-D, 5 frames, shared/data): reconstruction errors and timings of the
``rgbd`` backend + full core pipeline (pairwise registration -> pre-segmentation -> DGA -> mask
cache) WITHOUT the SLAM poses, against the SLAM poses.

Figures: adjacent relative pose errors (deg / m), first-frame-aligned trajectory errors, cloud
consistency (median distance of view i+1's points to view i's nearest points in the overlap,
next to the same measure for the cloud built from the SLAM poses), stage timings. Baseline in
the same run: chaining the backend's adjacent pairwise registrations alone (no DGA).
Last line: one JSON object. Skips (JSON with "skipped") when shared/ is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100, help="DGA iterations (paper: 500)")
    ap.add_argument("--scene-graph", default="complete")
    ap.add_argument("--width", type=int, default=640, help="640 = native; smaller resizes (K scaled)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder holding rgbd_room/ (default: ../shared/data beside the repo)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from wildseg3d_ros.eval import datasets
    from wildseg3d_ros.core.geometry import depth_to_world, invert_pose, pose_errors
    from wildseg3d_ros.core.keyframes import pose_delta
    from wildseg3d_ros.core.config import PipelineConfig
    from wildseg3d_ros.core.pipeline import ReconstructionPipeline
    from wildseg3d_ros.core.types import Keyframe

    if not (args.data_root / "rgbd_room").is_dir():
        print(json.dumps({"skipped": f"{args.data_root / 'rgbd_room'} absent"}))
        return
    from scipy.spatial import cKDTree

    d = datasets.load_rgbd_room(args.data_root / "rgbd_room")
    if args.width != 640:
        d = datasets.resize_data(d, args.width, int(round(args.width * 0.75)))
    V = len(d.rgb)
    kfs = [Keyframe(v, float(v), d.rgb[v], d.K, d.depth[v]) for v in range(V)]
    t0 = time.perf_counter()
    pipe = ReconstructionPipeline(PipelineConfig(backend="rgbd", iterations=args.iterations,
                                                 scene_graph=args.scene_graph))
    setup_s = time.perf_counter() - t0
    scene, timings = pipe.run(kfs)

    def rel_errors(poses):
        out = []
        for i in range(V - 1):
            G = invert_pose(d.poses[i]) @ d.poses[i + 1]
            dt, dr = pose_delta(G, invert_pose(poses[i]) @ poses[i + 1])
            out.append((dr, dt))
        return np.array(out)

    # baseline: the backend's adjacent registrations chained (no global alignment)
    chain = [np.eye(4)]
    for i in range(V - 1):
        chain.append(chain[-1] @ pipe.backend.relative_poses[(i, i + 1)])
    chain = np.stack(chain)

    def consistency(pts):
        res = []
        for i in range(V - 1):
            a = pts[i][np.isfinite(pts[i]).all(-1)]
            b = pts[i + 1][::3, ::3].reshape(-1, 3)
            b = b[np.isfinite(b).all(-1)]
            dist, _ = cKDTree(a).query(b, distance_upper_bound=0.25, workers=1)
            ok = np.isfinite(dist)
            res.append((float(np.median(dist[ok])), float(ok.mean())))
        return res

    est = np.where(scene.valid_mask()[..., None], scene.pts3d, np.nan)
    slam = np.stack([depth_to_world(d.depth[v], d.K, d.poses[v]) for v in range(V)])
    slam[np.stack(d.depth) <= 0] = np.nan
    re, rb = rel_errors(scene.poses), rel_errors(chain)
    ce, cs = consistency(est), consistency(slam)
    res = {
        "views": V, "size": f"{d.rgb[0].shape[1]}x{d.rgb[0].shape[0]}", "scene_graph": args.scene_graph,
        "dga_iterations": args.iterations,
        "pipeline_rel_rot_deg": np.round(re[:, 0], 3).tolist(), "pipeline_rel_trans_m": np.round(re[:, 1], 4).tolist(),
        "pipeline_first_aligned": {k: round(v, 4) for k, v in pose_errors(scene.poses, d.poses, "first").items()},
        "baseline_chain_rel_rot_deg": np.round(rb[:, 0], 3).tolist(),
        "baseline_chain_rel_trans_m": np.round(rb[:, 1], 4).tolist(),
        "baseline_chain_first_aligned": {k: round(v, 4) for k, v in pose_errors(chain, d.poses, "first").items()},
        "consistency_median_m_pipeline": [round(m, 4) for m, _ in ce],
        "consistency_overlap_pipeline": [round(f, 3) for _, f in ce],
        "consistency_median_m_slam": [round(m, 4) for m, _ in cs],
        "consistency_overlap_slam": [round(f, 3) for _, f in cs],
        "registration_status": [r["status"] for r in pipe.backend.registration_summary()],
        "setup_s": round(setup_s, 3), **{k: round(v, 3) for k, v in timings.items()},
    }
    print(f"rgbd_room: pipeline rel rot {res['pipeline_rel_rot_deg']} deg, trans {res['pipeline_rel_trans_m']} m; "
          f"chain baseline rot {res['baseline_chain_rel_rot_deg']} deg; total {res['total_s']} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
