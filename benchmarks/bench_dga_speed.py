"""Speed and accuracy of the project's global aligner (DGA) vs DUSt3R's PointCloudOptimizer.

Measures, on identical DUSt3R-format pairwise inputs generated from the project's synthetic
tabletop scenes (wildseg3d_ros.sim.tabletop.render_sequence; complete symmetrised pair graph):
wall time (including initialisation and matching), wall time / iteration, peak extra resident
memory (CPU: VmHWM - VmRSS before the run; CUDA: max_memory_allocated), rotation error (deg) and
camera-centre error (GT units, metres) after a Sim(3) fit of the camera centres
(core.geometry.pose_errors), and the median world-pointmap error (metres) after a Sim(3) fit of
the points.

Inputs: per pair, the true pointmaps of view i and of view j in camera i's frame, under a random
per-pair similarity (scale 0.5-2x, --rot-deg rotation, 1 % translation: DUSt3R predicts pair
pointmaps in camera i's frame up to scale, with some bias), Gaussian depth noise (--noise x depth),
low-confidence outliers (--outliers fraction, displaced 30 % of their depth, confidence 1-1.35)
and background clutter (--clutter: rectangles on floor/wall pixels displaced 30 % of their depth
with a *normal* confidence). Confidences are DUSt3R-like (1 + exp(N(2, 0.4))).

Rows: DUSt3R PointCloudOptimizer (only when ``import dust3r`` works: put a checkout on
PYTHONPATH; init='mst', niter=300, schedule='cosine', lr=0.01, its default log-confidence
weights), ours with confidence weighting (same weights as DUSt3R), ours with DGA weighting
(alpha_p=0.5, alpha_n=0.9, S=1: no masks). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wildseg3d_ros.core.align import align_global  # noqa: E402
from wildseg3d_ros.sim.pairs import backproject, synthetic_predictions  # noqa: E402
from wildseg3d_ros.core.geometry import pose_errors, umeyama  # noqa: E402
from wildseg3d_ros.sim.tabletop import render_sequence  # noqa: E402


def _rss_kb(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMem:
    """Peak extra memory of a block (MiB): CUDA allocator peak, or CPU VmHWM growth."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = _rss_kb("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.mib = (_rss_kb("VmHWM:") - self.base) / 1024.0


def clutter_masks(instance, edges, frac, rng):
    """{(e, k): mask} rectangles on background (floor/wall) pixels, about ``frac`` of the image."""
    out = {}
    V, H, W = instance.shape
    if frac <= 0:
        return out
    for e, (i, j) in enumerate(edges):
        for k, v in enumerate((i, j)):
            m = np.zeros((H, W), bool)
            while m.mean() < frac:
                h, w = rng.integers(H // 16, H // 6), rng.integers(W // 16, W // 6)
                r, c = rng.integers(0, H - h), rng.integers(0, W - w)
                m[r:r + h, c:c + w] = True
            out[(e, k)] = m & (instance[v] <= 2)
    return out


def evaluate(poses, pts, gt_poses, gt_pts, valid):
    pe = pose_errors(poses, gt_poses)
    est = pts.reshape(-1, 3).astype(np.float64)
    gt = gt_pts.reshape(-1, 3)
    ok = valid.reshape(-1) & np.isfinite(est).all(1)
    idx = np.flatnonzero(ok)[:: max(1, ok.sum() // 200_000)]
    s, R, t = umeyama(est[idx], gt[idx])
    err = np.linalg.norm(s * est[idx] @ R.T + t - gt[idx], axis=1)
    return {"rot_deg": pe["rot_deg_mean"], "rot_deg_max": pe["rot_deg_max"],
            "center_err": pe["center_mean"], "pts_err_median": float(np.median(err)),
            "pts_err_mean": float(np.mean(err))}


def run_dust3r(pairs, device, niter, lr):
    from dust3r.cloud_opt import GlobalAlignerMode, global_aligner

    dpairs = {"view1": {"idx": list(pairs.idx1)}, "view2": {"idx": list(pairs.idx2)},
              "pred1": {"pts3d": pairs.pts1.clone().to(device), "conf": pairs.conf1.clone().to(device)},
              "pred2": {"pts3d_in_other_view": pairs.pts2.clone().to(device), "conf": pairs.conf2.clone().to(device)}}
    scene = global_aligner(dpairs, device=device, mode=GlobalAlignerMode.PointCloudOptimizer, verbose=False)
    loss = scene.compute_global_alignment(init="mst", niter=niter, schedule="cosine", lr=lr)
    with torch.no_grad():
        poses = scene.get_im_poses().detach().cpu().double().numpy()
        pts = torch.stack(scene.get_pts3d()).detach().cpu().numpy()
        focals = scene.get_focals().detach().cpu().numpy().reshape(-1)
    return poses, pts, focals, float(loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=500, help="our iterations (paper default 500)")
    ap.add_argument("--dust3r-iters", type=int, default=300)
    ap.add_argument("--num-samples", type=int, default=8192, help="our pixel subsample per view")
    ap.add_argument("--noise", type=float, default=0.005)
    ap.add_argument("--outliers", type=float, default=0.05)
    ap.add_argument("--clutter", type=float, default=0.03)
    ap.add_argument("--rot-deg", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dust3r", action="store_true", help="skip DUSt3R even when importable")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    seq = render_sequence(n_views=args.views, width=args.width, height=args.height, seed=args.seed)
    V = args.views
    edges = [(i, j) for i in range(V) for j in range(V) if i != j]
    rng = np.random.default_rng(args.seed + 1)
    corrupt = clutter_masks(seq.instance, edges, args.clutter, rng)
    pairs, _ = synthetic_predictions(seq.depth, seq.K, seq.poses, edges=edges, seed=args.seed + 2, noise=args.noise,
                          outlier_frac=args.outliers, rot_deg=args.rot_deg, corrupt=corrupt)
    gt_pts = np.stack([backproject(seq.depth[v], seq.K) @ seq.poses[v][:3, :3].T + seq.poses[v][:3, 3]
                       for v in range(V)])
    valid = seq.depth > 0

    # warm-up (lazy linalg / kernel initialisation) outside the timings
    align_global(pairs, iterations=2, device=args.device, num_samples=256)

    rows = {}
    for name, weighting in (("ours_confidence", "confidence"), ("ours_dga", "dga")):
        t_it = []
        with PeakMem(args.device) as pm:
            t0 = time.perf_counter()
            sc = align_global(pairs, iterations=args.iters, weighting=weighting, device=args.device,
                              num_samples=args.num_samples, progress=lambda i, n, l: t_it.append(time.perf_counter()))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        r = evaluate(sc.poses, sc.pts3d, seq.poses, gt_pts, valid)
        loop = (t_it[-1] - t_it[0]) / max(len(t_it) - 1, 1) if len(t_it) > 1 else float("nan")
        r.update(wall_s=wall, ms_per_iter=1000 * wall / args.iters, loop_ms_per_iter=1000 * loop,
                 iters=args.iters, peak_mem_mib=pm.mib, focal_err_pct=float(np.abs(sc.K[:, 0, 0] / seq.K[0, 0] - 1).mean() * 100))
        rows[name] = r

    have_dust3r = False
    if not args.no_dust3r:
        try:
            import dust3r  # noqa: F401
            have_dust3r = True
        except ImportError:
            print("dust3r not importable: DUSt3R baseline skipped (put a checkout on PYTHONPATH)")
    if have_dust3r:
        with PeakMem(args.device) as pm:
            t0 = time.perf_counter()
            poses, pts, focals, _ = run_dust3r(pairs, args.device, args.dust3r_iters, 0.01)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        r = evaluate(poses, pts, seq.poses, gt_pts, valid)
        r.update(wall_s=wall, ms_per_iter=1000 * wall / args.dust3r_iters, loop_ms_per_iter=float("nan"),
                 iters=args.dust3r_iters, peak_mem_mib=pm.mib, focal_err_pct=float(np.abs(focals / seq.K[0, 0] - 1).mean() * 100))
        rows["dust3r_pco"] = r

    print(f"{V} views {args.width}x{args.height}, {len(edges)} pairs, device={args.device}, threads={args.threads}, "
          f"noise={args.noise}, outliers={args.outliers}, clutter={args.clutter}")
    hdr = f"{'method':16s} {'iters':>5s} {'wall s':>8s} {'ms/iter':>8s} {'peak MiB':>9s} {'rot deg':>8s} {'centre m':>9s} {'pts m (med)':>11s} {'focal %':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for k, r in rows.items():
        print(f"{k:16s} {r['iters']:5d} {r['wall_s']:8.2f} {r['ms_per_iter']:8.1f} {r['peak_mem_mib']:9.0f} "
              f"{r['rot_deg']:8.4f} {r['center_err']:9.5f} {r['pts_err_median']:11.5f} {r['focal_err_pct']:8.3f}")
    out = {"config": vars(args), "rows": rows}
    if "dust3r_pco" in rows:
        d = rows["dust3r_pco"]
        for k in ("ours_dga", "ours_confidence"):
            out[f"speedup_{k}_vs_dust3r"] = d["wall_s"] / rows[k]["wall_s"]
            out[f"{k}_pose_err_le_dust3r"] = bool(rows[k]["rot_deg"] <= d["rot_deg"] and rows[k]["center_err"] <= d["center_err"])
            out[f"{k}_pts_err_le_dust3r"] = bool(rows[k]["pts_err_median"] <= d["pts_err_median"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
