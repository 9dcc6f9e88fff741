"""Speed and accuracy of the project's global aligner (DGA): Gauss-Newton (default), the Adam
reference, and DUSt3R's PointCloudOptimizer, on identical inputs, plus a scaling table.

Inputs: DUSt3R-format pairwise predictions generated from the project's synthetic tabletop
scenes (wildseg3d_ros.sim.tabletop.render_sequence -> sim.pairs.synthetic_predictions):
per pair the true pointmaps of view i and of view j in camera i's frame, under a random per-pair
similarity (scale 0.5-2x, --rot-deg rotation, 1 % translation: DUSt3R predicts pair pointmaps in
camera i's frame up to scale, with some bias), Gaussian depth noise (--noise x depth),
low-confidence outliers (--outliers fraction, displaced 30 % of their depth, confidence
1-1.35) and background clutter (--clutter: rectangles on floor/wall pixels displaced 30 % of
their depth with a *normal* confidence). Confidences are DUSt3R-like (1 + exp(N(2, 0.4))).

Measured per method: wall time (inputs, weights / matching, initialisation, optimisation and the
final full-resolution solve), time per pair, peak extra memory (CPU: VmHWM growth; CUDA:
max_memory_allocated), rotation error (deg) and camera-centre error (GT units, metres) after a
Sim(3) fit of the centres (core.geometry.pose_errors), the median world-pointmap error (metres)
after a Sim(3) fit of the points, the focal error.

Headline rows (--views x --height x --width, complete graph): ``gauss_newton`` (ours, DGA
weights, projective matching), ``gn_confidence`` (the same with DUSt3R's confidence weights),
``adam`` (the Adam reference, 500 iterations, same weights), ``adam_kdtree`` (the aligner as it
was before the Gauss-Newton solver: Adam, KD-tree matching, 10 final Weiszfeld steps) and
``dust3r_pco`` (DUSt3R's PointCloudOptimizer, init='mst', 300 iterations, cosine, lr 0.01, its
log-confidence weights) when ``dust3r`` or ``mini_dust3r`` is importable (benchmark-only; e.g.
``pip install --no-deps mini-dust3r roma``).

--scaling adds the scaling table: 5 / 10 / 20 / 30 views, complete and swin-3 graphs, at
224x288 and 384x512 (H x W), for Gauss-Newton always, Adam and DUSt3R where their estimated time
(extrapolated from their headline run by pairs x pixels) fits --adam-budget-s / --dust3r-budget-s
(the skipped ones are listed with the reason). The machine load (os.getloadavg) is printed.
OMP_WAIT_POLICY defaults to PASSIVE here: on a shared, loaded machine OpenMP's spinning worker
threads otherwise slow torch's many small operations down several times (measured 3-9x at 2
threads beside other jobs). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wildseg3d_ros.core.align import align_global  # noqa: E402
from wildseg3d_ros.sim.pairs import backproject, clutter_masks, synthetic_predictions  # noqa: E402
from wildseg3d_ros.core.pointmaps.base import make_pairs  # noqa: E402
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


def dust3r_module():
    """(global_aligner, GlobalAlignerMode, name) of dust3r or mini_dust3r, or None."""
    for name in ("dust3r", "mini_dust3r"):
        try:
            mod = __import__(f"{name}.cloud_opt", fromlist=["global_aligner", "GlobalAlignerMode"])
            return mod.global_aligner, mod.GlobalAlignerMode, name
        except ImportError:
            continue
    return None


def run_dust3r(mod, pairs, device, niter, lr):
    global_aligner, mode, _ = mod
    dpairs = {"view1": {"idx": list(pairs.idx1)}, "view2": {"idx": list(pairs.idx2)},
              "pred1": {"pts3d": pairs.pts1.clone().to(device), "conf": pairs.conf1.clone().to(device)},
              "pred2": {"pts3d_in_other_view": pairs.pts2.clone().to(device), "conf": pairs.conf2.clone().to(device)}}
    scene = global_aligner(dpairs, device=device, mode=mode.PointCloudOptimizer, verbose=False)
    loss = scene.compute_global_alignment(init="mst", niter=niter, schedule="cosine", lr=lr)
    with torch.no_grad():
        poses = scene.get_im_poses().detach().cpu().double().numpy()
        pts = torch.stack(scene.get_pts3d()).detach().cpu().numpy()
        focals = scene.get_focals().detach().cpu().numpy().reshape(-1)
    return poses, pts, focals, float(loss)


def make_input(V, H, W, graph, args):
    seq = render_sequence(n_views=V, width=W, height=H, seed=args.seed)
    edges = make_pairs(V, graph)
    rng = np.random.default_rng(args.seed + 1)
    corrupt = clutter_masks(seq.instance, edges, args.clutter, rng)
    pairs, _ = synthetic_predictions(seq.depth, seq.K, seq.poses, edges=edges, seed=args.seed + 2, noise=args.noise,
                                     outlier_frac=args.outliers, rot_deg=args.rot_deg, corrupt=corrupt)
    gt_pts = np.stack([backproject(seq.depth[v], seq.K) @ seq.poses[v][:3, :3].T + seq.poses[v][:3, 3]
                       for v in range(V)]).astype(np.float32)
    return seq, pairs, gt_pts


def measure(name, fn, seq, gt_pts, E, device):
    gc.collect()
    with PeakMem(device) as pm:
        t0 = time.perf_counter()
        poses, pts, focals, extra = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    r = evaluate(poses, pts, seq.poses, gt_pts, seq.depth > 0)
    r.update(method=name, wall_s=wall, s_per_pair=wall / E, peak_mem_mib=pm.mib,
             focal_err_pct=float(np.abs(np.asarray(focals) / seq.K[0, 0] - 1).mean() * 100), **extra)
    return r


def ours(pairs, device, **kw):
    def fn():
        tm = {}
        sc = align_global(pairs, device=device, timings=tm, **kw)
        return sc.poses, sc.pts3d, sc.K[:, 0, 0], {"iters": tm["iterations"], "stages_s": {
            k: round(v, 3) for k, v in tm.items() if k.endswith("_s")}}
    return fn


def dust3r(mod, pairs, device, niter):
    def fn():
        poses, pts, focals, _ = run_dust3r(mod, pairs, device, niter, 0.01)
        return poses, pts, focals, {"iters": niter}
    return fn


def print_rows(rows):
    hdr = (f"{'config':22s} {'method':13s} {'iters':>5s} {'wall s':>8s} {'s/pair':>7s} {'peak MiB':>9s} "
           f"{'rot deg':>8s} {'centre m':>9s} {'pts m (med)':>11s} {'focal %':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r.get('config', ''):22s} {r['method']:13s} {r['iters']:5d} {r['wall_s']:8.2f} {r['s_per_pair']:7.3f} "
              f"{r['peak_mem_mib']:9.0f} {r['rot_deg']:8.4f} {r['center_err']:9.5f} {r['pts_err_median']:11.5f} "
              f"{r['focal_err_pct']:8.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adam-iters", type=int, default=500, help="Adam reference iterations (paper default 500)")
    ap.add_argument("--dust3r-iters", type=int, default=300)
    ap.add_argument("--noise", type=float, default=0.005)
    ap.add_argument("--outliers", type=float, default=0.02)
    ap.add_argument("--clutter", type=float, default=0.03)
    ap.add_argument("--rot-deg", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dust3r", action="store_true", help="skip DUSt3R even when importable")
    ap.add_argument("--scaling", action="store_true", help="add the scaling table (5/10/20/30 views, 2 graphs, 2 sizes)")
    ap.add_argument("--scaling-views", default="5,10,20,30")
    ap.add_argument("--adam-budget-s", type=float, default=300.0, help="skip Adam where its estimate exceeds this")
    ap.add_argument("--dust3r-budget-s", type=float, default=300.0, help="skip DUSt3R where its estimate exceeds this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    mod = None if args.no_dust3r else dust3r_module()
    if mod is None:
        print("dust3r / mini_dust3r not importable (or --no-dust3r): DUSt3R baseline skipped")

    V, H, W = args.views, args.height, args.width
    seq, pairs, gt_pts = make_input(V, H, W, "complete", args)
    E = len(pairs.idx1)
    align_global(pairs, iterations=2, device=args.device, num_samples=256)  # warm-up
    align_global(pairs, iterations=2, device=args.device, num_samples=256, optimizer="adam")
    cfg = f"{V}v {H}x{W} complete"
    rows = []
    for name, kw in (("gauss_newton", {}), ("gn_confidence", dict(weighting="confidence")),
                     ("adam", dict(optimizer="adam", iterations=args.adam_iters)),
                     ("adam_kdtree", dict(optimizer="adam", iterations=args.adam_iters, matcher="kdtree", final_irls=10))):
        rows.append(dict(measure(name, ours(pairs, args.device, **kw), seq, gt_pts, E, args.device), config=cfg))
        print(f"  {cfg} {name}: {rows[-1]['wall_s']:.2f} s", flush=True)
    if mod is not None:
        rows.append(dict(measure("dust3r_pco", dust3r(mod, pairs, args.device, args.dust3r_iters), seq, gt_pts, E,
                                 args.device), config=cfg))
        print(f"  {cfg} dust3r_pco ({mod[2]}): {rows[-1]['wall_s']:.2f} s", flush=True)
    del pairs
    by = {r["method"]: r for r in rows}
    print(f"\n{V} views {W}x{H}, {E} pairs, device={args.device}, threads={args.threads}, noise={args.noise}, "
          f"outliers={args.outliers}, clutter={args.clutter}, load average at start {load0[0]:.2f}")
    print_rows(rows)
    out = {"config": vars(args), "load_avg_start": load0, "rows": rows}
    if "dust3r_pco" in by:
        d = by["dust3r_pco"]
        for k in ("gauss_newton", "adam"):
            out[f"speedup_{k}_vs_dust3r"] = d["wall_s"] / by[k]["wall_s"]
            out[f"{k}_errors_le_dust3r"] = bool(by[k]["rot_deg"] <= d["rot_deg"] and by[k]["center_err"] <= d["center_err"]
                                                and by[k]["pts_err_median"] <= d["pts_err_median"])
    out["speedup_gauss_newton_vs_adam"] = by["adam"]["wall_s"] / by["gauss_newton"]["wall_s"]
    out["speedup_gauss_newton_vs_adam_kdtree"] = by["adam_kdtree"]["wall_s"] / by["gauss_newton"]["wall_s"]

    if args.scaling:
        t_adam = by["adam"]["wall_s"] / E                       # s per pair (resolution-independent sample)
        t_d = by["dust3r_pco"]["wall_s"] / (E * H * W) if "dust3r_pco" in by else None
        scal, skipped = [], []
        for (sh, sw) in ((224, 288), (384, 512)):
            for sv in (int(x) for x in args.scaling_views.split(",")):
                for graph in ("complete", "swin-3"):
                    c = f"{sv}v {sh}x{sw} {graph}"
                    gc.collect()
                    t0 = time.perf_counter()
                    try:
                        sseq, sp, sgt = make_input(sv, sh, sw, graph, args)
                    except MemoryError:
                        skipped.append({"config": c, "method": "all", "why": "input does not fit in memory"})
                        continue
                    se = len(sp.idx1)
                    print(f"  {c}: {se} pairs (input made in {time.perf_counter() - t0:.0f} s)", flush=True)
                    scal.append(dict(measure("gauss_newton", ours(sp, args.device), sseq, sgt, se, args.device), config=c,
                                     views=sv, pairs=se, height=sh, width=sw, graph=graph))
                    print(f"    gauss_newton {scal[-1]['wall_s']:.2f} s", flush=True)
                    est = t_adam * se
                    if est <= args.adam_budget_s:
                        scal.append(dict(measure("adam", ours(sp, args.device, optimizer="adam", iterations=args.adam_iters),
                                                 sseq, sgt, se, args.device), config=c, views=sv, pairs=se, height=sh,
                                         width=sw, graph=graph))
                        print(f"    adam {scal[-1]['wall_s']:.2f} s", flush=True)
                    else:
                        skipped.append({"config": c, "method": "adam", "why": f"estimated {est:.0f} s > budget {args.adam_budget_s:.0f} s"})
                    if t_d is None:
                        skipped.append({"config": c, "method": "dust3r_pco", "why": "dust3r not importable"})
                    else:
                        est = t_d * se * sh * sw
                        if est <= args.dust3r_budget_s:
                            scal.append(dict(measure("dust3r_pco", dust3r(mod, sp, args.device, args.dust3r_iters), sseq, sgt, se,
                                                     args.device), config=c, views=sv, pairs=se, height=sh, width=sw, graph=graph))
                            print(f"    dust3r_pco {scal[-1]['wall_s']:.2f} s", flush=True)
                        else:
                            skipped.append({"config": c, "method": "dust3r_pco",
                                            "why": f"estimated {est:.0f} s > budget {args.dust3r_budget_s:.0f} s"})
                    del sp, sseq, sgt
        print("\nscaling table")
        print_rows(scal)
        for s in skipped:
            print(f"skipped: {s['config']} {s['method']}: {s['why']}")
        out["scaling"] = scal
        out["scaling_skipped"] = skipped
        g20 = [r for r in scal if r["method"] == "gauss_newton" and r["views"] == 20 and r["graph"] == "complete"
               and r["height"] == 384]
        if g20:
            out["gauss_newton_20v_complete_384x512_wall_s"] = g20[0]["wall_s"]
            out["goal_20v_complete_le_30s"] = bool(g20[0]["wall_s"] <= 30.0)
    out["load_avg_end"] = os.getloadavg()
    if "speedup_gauss_newton_vs_dust3r" in out:
        out["goal_50x_dust3r_at_le_errors"] = bool(out["speedup_gauss_newton_vs_dust3r"] >= 50
                                                   and out["gauss_newton_errors_le_dust3r"])
    print(f"load average at the end {out['load_avg_end'][0]:.2f}")
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
