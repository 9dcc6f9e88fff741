"""Benchmark: pairwise RGB-D registration of the ``rgbd`` backend (time and relative-pose error).

Measures, on adjacent keyframe pairs,

* the embedded synthetic scene (``sim.tabletop.render_sequence``, 5 views 640x480, exact depth,
  ground-truth poses, drifted odometry), and
* real Kinect data ``../shared/data/rgbd_room`` (5 frames 640x480; reference = SLAM poses, not
  ground truth; skipped with a message when absent),

the rotation error (deg) and translation error (m) of ``T_ij`` against the reference, and the
registration time per pair (features + matching + RANSAC PnP + ICP; per-keyframe preparation
excluded and reported separately), for these methods run in the same process:

* ``full``: the backend's default (SIFT, RANSAC PnP, point-to-plane ICP with feature term);
* ``ransac_only``: the same without ICP;
* ``orb``: ORB features instead of SIFT;
* baseline ``icp_identity``: point-to-plane ICP alone started from the identity (no features);
* baseline ``odometry`` (synthetic only): the drifted odometry relative pose itself.

The last line printed is one JSON object with all figures.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wildseg3d_ros.core.geometry import pose_delta  # noqa: E402
from wildseg3d_ros.core.pointmaps.rgbd import RgbdBackend  # noqa: E402
from wildseg3d_ros.core.geometry import invert_pose  # noqa: E402
from wildseg3d_ros.core.types import Keyframe  # noqa: E402
from wildseg3d_ros.eval.datasets import load_rgbd_room  # noqa: E402

ROOM = ROOT.parent / "shared" / "data" / "rgbd_room"


def load_synthetic():
    from wildseg3d_ros.sim.tabletop import render_sequence

    s = render_sequence(n_views=5, width=640, height=480, seed=0)
    kfs = [Keyframe(v, float(v), s.rgb[v], s.K, s.depth[v]) for v in range(5)]
    return kfs, s.poses, s.odom_poses


def load_room():
    d = load_rgbd_room(ROOM)
    n = min(5, len(d.rgb))
    kfs = [Keyframe(v, float(v + 1), d.rgb[v], d.K, d.depth[v]) for v in range(n)]  # no pose prior
    return kfs, d.poses[:n], None


def evaluate(kfs, ref, odom, pairs):
    methods = {"full": RgbdBackend(), "ransac_only": RgbdBackend(icp=False), "orb": RgbdBackend(feature="orb")}
    res = {}
    for name, be in methods.items():
        t0 = time.perf_counter()
        frames = [be.prepare_frame(k) for k in kfs]
        prep = (time.perf_counter() - t0) / len(kfs)
        errs, times, fails = [], [], 0
        for i, j in pairs:
            G = invert_pose(ref[i]) @ ref[j]
            t0 = time.perf_counter()
            try:
                T = be.register_pair(frames[i], frames[j], None, i, j).T
            except Exception:  # registration failure without prior
                fails += 1
                continue
            times.append(time.perf_counter() - t0)
            errs.append(_rot_trans(G, T))
        res[name] = summarise(errs, times, fails, prep)
    # baseline: ICP alone from the identity
    be = methods["full"]
    frames = [be.prepare_frame(k, with_features=False) for k in kfs]
    errs, times = [], []
    for i, j in pairs:
        G = invert_pose(ref[i]) @ ref[j]
        t0 = time.perf_counter()
        r = be._icp(frames[i], frames[j], np.eye(4))
        times.append(time.perf_counter() - t0)
        errs.append(_rot_trans(G, r.T))
    res["baseline_icp_identity"] = summarise(errs, times, 0, None)
    if odom is not None:
        errs = [_rot_trans(invert_pose(ref[i]) @ ref[j], invert_pose(odom[i]) @ odom[j]) for i, j in pairs]
        res["baseline_odometry"] = summarise(errs, [0.0], 0, None)
    res["motion"] = {"rot_deg": [round(_rot_trans(ref[i], ref[j])[0], 2) for i, j in pairs],
                     "trans_m": [round(_rot_trans(ref[i], ref[j])[1], 3) for i, j in pairs]}
    return res


def _rot_trans(a, b):
    """(rotation deg, translation m) between two poses (the table's column order)."""
    t, r = pose_delta(a, b)
    return r, t


def summarise(errs, times, fails, prep):
    e = np.array(errs) if errs else np.full((1, 2), np.nan)
    return {"rot_err_deg_mean": round(float(e[:, 0].mean()), 4), "rot_err_deg_max": round(float(e[:, 0].max()), 4),
            "trans_err_m_mean": round(float(e[:, 1].mean()), 5), "trans_err_m_max": round(float(e[:, 1].max()), 5),
            "pair_ms_mean": round(1000 * float(np.mean(times)), 1) if times else None,
            "prepare_ms_per_frame": None if prep is None else round(1000 * prep, 1), "failures": fails}


def main():
    import cv2

    cv2.setNumThreads(1)
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4)]
    out = {"pairs": pairs}
    kfs, ref, odom = load_synthetic()
    out["synthetic_640x480"] = evaluate(kfs, ref, odom, pairs)
    if ROOM.exists():
        kfs, ref, _ = load_room()
        out["rgbd_room_vs_slam"] = evaluate(kfs, ref, None, pairs)
    else:
        print(f"rgbd_room absent ({ROOM}); real-data figures skipped")
        out["rgbd_room_vs_slam"] = None
    for k, v in out.items():
        if isinstance(v, dict):
            for m, f in v.items():
                print(f"{k:20s} {m:24s} {f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
