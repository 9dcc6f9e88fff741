"""Shape of the WildSeg3D alpha ablation on synthetic scenes with ground truth.

For each scene (rows; project renderer wildseg3d_ros.sim.tabletop.render_sequence, seeds
--seed .. --seed+scenes-1) we build DUSt3R-format pairwise inputs (complete symmetrised graph)
with per-pair random similarities, depth noise, low-confidence outliers and confident wrong
"clutter" blocks (as in bench_dga_speed.py, with --clutter also covering object pixels), align them
with align_global, and score the cell:

    3D-segment IoU = IoU( projection into the reference view (view --ref) of the prompted object's
                          aligned 3D points from all *other* views (z-buffered against the aligned
                          reference depth, 3x3 closing), GT instance mask of that object in the
                          reference view )

The prompted object is the largest GT object (instance id >= FIRST_OBJECT_ID) in the reference view.
Soft masks S for DGA come from the GT instance maps (1 on object pixels, 0 elsewhere, Gaussian
blurred by 1.5 px) — an oracle mask cache, the ablation is about alpha, not segmentation.

Columns: alpha in {-0.9, -0.5, 0, 0.5, 0.9} for alpha_p (alpha_n = 0) and for alpha_n
(alpha_p = 0); then the paper's setting (alpha_p, alpha_n) = (0.5, 0.9) vs the baseline:
standard confidence weighting (W = log C, DUSt3R). Mean rotation errors (deg) are printed too.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wildseg3d_ros.core.align import align_global  # noqa: E402
from wildseg3d_ros.sim.pairs import clutter_masks, synthetic_predictions  # noqa: E402
from wildseg3d_ros.core.geometry import pose_errors, project_points  # noqa: E402
from wildseg3d_ros.sim.tabletop import FIRST_OBJECT_ID, render_sequence  # noqa: E402

ALPHAS = [-0.9, -0.5, 0.0, 0.5, 0.9]


def segment_iou(sc, instance, ref, obj):
    """IoU of the other views' aligned object points projected into view ``ref``."""
    V, H, W = instance.shape
    pts = np.concatenate([sc.pts3d[v][instance[v] == obj] for v in range(V) if v != ref])
    pts = pts[np.isfinite(pts).all(1)]
    uv, z = project_points(pts, sc.K[ref], sc.poses[ref])
    u, v = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
    ok = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    u, v, z = u[ok], v[ok], z[ok]
    # z-buffer against the aligned reference depth (points hidden behind the visible surface drop)
    ref_z = project_points(sc.pts3d[ref].reshape(-1, 3), sc.K[ref], sc.poses[ref])[1].reshape(H, W)
    ref_z = np.nan_to_num(ref_z, nan=np.inf)
    vis = z <= ref_z[v, u] * 1.03
    m = np.zeros((H, W), bool)
    m[v[vis], u[vis]] = True
    m = ndimage.binary_closing(m, np.ones((3, 3)), border_value=0) | m
    gt = instance[ref] == obj
    return float((m & gt).sum() / max((m | gt).sum(), 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--ref", type=int, default=2, help="reference view")
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--outliers", type=float, default=0.1)
    ap.add_argument("--clutter", type=float, default=0.08)
    ap.add_argument("--rot-deg", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    configs = [("p", a, 0.0) for a in ALPHAS] + [("n", 0.0, a) for a in ALPHAS]
    iou = {}
    rot = {}
    scenes = []
    for s in range(args.seed, args.seed + args.scenes):
        seq = render_sequence(n_views=args.views, width=args.width, height=args.height, seed=s)
        V = args.views
        edges = [(i, j) for i in range(V) for j in range(V) if i != j]
        rng = np.random.default_rng(s + 11)
        corrupt = clutter_masks(np.zeros_like(seq.instance), edges, args.clutter, rng)  # anywhere
        pairs, _ = synthetic_predictions(seq.depth, seq.K, seq.poses, edges=edges, seed=s + 12, noise=args.noise,
                              outlier_frac=args.outliers, rot_deg=args.rot_deg, corrupt=corrupt)
        objs, counts = np.unique(seq.instance[args.ref][seq.instance[args.ref] >= FIRST_OBJECT_ID], return_counts=True)
        obj = int(objs[np.argmax(counts)])
        S = np.stack([ndimage.gaussian_filter((seq.instance[v] >= FIRST_OBJECT_ID).astype(np.float32), 1.5)
                      for v in range(V)])
        S = np.clip(S / max(S.max(), 1e-6), 0, 1)
        name = f"seed{s}/obj{obj}"
        scenes.append(name)
        cache = {}
        for key, ap_, an_ in configs + [("paper", 0.5, 0.9), ("confidence", None, None)]:
            ck = (ap_, an_)
            if ck not in cache:
                if key == "confidence":
                    sc = align_global(pairs, weighting="confidence", iterations=args.iters, device=args.device)
                else:
                    sc = align_global(pairs, soft_masks=S, alpha_p=ap_, alpha_n=an_, iterations=args.iters,
                                      device=args.device)
                cache[ck] = (segment_iou(sc, seq.instance, args.ref, obj), pose_errors(sc.poses, seq.poses)["rot_deg_mean"])
            label = key if key in ("paper", "confidence") else f"{key}{ap_ if key == 'p' else an_:+.1f}"
            iou[(name, label)], rot[(name, label)] = cache[ck]

    def table(title, tag, val):
        print(title)
        labels = [f"{tag}{a:+.1f}" for a in ALPHAS]
        print(f"{'scene':18s}" + "".join(f"{l:>8s}" for l in labels))
        for n in scenes:
            print(f"{n:18s}" + "".join(f"{val[(n, l)]:8.4f}" for l in labels))
        print(f"{'mean':18s}" + "".join(f"{np.mean([val[(n, l)] for n in scenes]):8.4f}" for l in labels))

    print(f"{args.scenes} scenes, {args.views} views {args.width}x{args.height}, {args.iters} iters, noise={args.noise}, "
          f"outliers={args.outliers}, clutter={args.clutter}, rot={args.rot_deg} deg; S from GT instance maps")
    table("3D-segment IoU, alpha_p sweep (alpha_n = 0)", "p", iou)
    table("3D-segment IoU, alpha_n sweep (alpha_p = 0)", "n", iou)
    print("(alpha_p, alpha_n) = (0.5, 0.9) vs confidence weighting: IoU | rot err deg")
    for n in scenes:
        print(f"{n:18s} dga {iou[(n, 'paper')]:.4f} | {rot[(n, 'paper')]:.4f}   confidence {iou[(n, 'confidence')]:.4f} | {rot[(n, 'confidence')]:.4f}")
    mean = {l: float(np.mean([iou[(n, l)] for n in scenes])) for _, l in sorted({k for k in iou}, key=str)}
    mean_rot = {l: float(np.mean([rot[(n, l)] for n in scenes])) for _, l in sorted({k for k in rot}, key=str)}
    print(f"{'mean':18s} dga {mean['paper']:.4f} | {mean_rot['paper']:.4f}   confidence {mean['confidence']:.4f} | {mean_rot['confidence']:.4f}")
    print(f"runtime {time.perf_counter() - t_start:.1f} s")
    print(json.dumps({"config": vars(args), "scenes": scenes, "mean_iou": mean, "mean_rot_deg": mean_rot,
                      "iou": {f"{n}|{l}": v for (n, l), v in iou.items()},
                      "dga_minus_confidence_iou": mean["paper"] - mean["confidence"]}))


if __name__ == "__main__":
    main()
