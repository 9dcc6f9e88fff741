"""Benchmark: Multi-view Group Mapping prompt latency (core only, no ROS).

Scene: the embedded synthetic tabletop (wildseg3d_ros.sim.tabletop), 5 views at 512 x 384,
ground-truth depth/poses as the aligned scene, mask cache from the ``classical`` segmenter.

Measures
* mask-cache build time (ClassicalSegmenter.build_mask_cache) and GroupMapper construction time;
* per prompt (>= 200 prompts, 3D surface points of the objects plus some background points):
  ``object_at_point`` + ``segment`` of the fast path after the mapper's idle warm-up (KD-tree +
  per-object consistency-filtered segments, as segmentation_node has them once idle after a scene): p50 / p95 / max in ms;
* the naive baseline in the same run: brute-force nearest neighbours over all valid points,
  then lifting the object's masks in all views + multi-view consistency + floater removal per
  prompt (GroupMapper.segment_from_masks) — no precomputation;
* that both give the same object id and the same pixel masks on every prompt.

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wildseg3d_ros.core.geometry import depth_to_world  # noqa: E402
from wildseg3d_ros.core.types import AlignedScene  # noqa: E402
from wildseg3d_ros.core.presegment.classical import ClassicalSegmenter  # noqa: E402
from wildseg3d_ros.core.group_mapping import GroupMapper  # noqa: E402
from wildseg3d_ros.sim.tabletop import render_sequence  # noqa: E402


def naive_prompt(gm: GroupMapper, pts_all: np.ndarray, lab_all: np.ndarray, p: np.ndarray,
                 k: int, max_dist: float):
    d = np.linalg.norm(pts_all - p, axis=1)
    nn = np.argpartition(d, k)[:k]
    nn = nn[np.argsort(d[nn])]
    nn = nn[d[nn] <= max_dist]
    if nn.size == 0:
        return 0, None
    labs = lab_all[nn]
    vals, cnt = np.unique(labs, return_counts=True)
    best = vals[cnt == cnt.max()]
    oid = int(next(l for l in labs if l in best))
    if oid == 0:
        return 0, None
    return oid, gm.segment_from_masks(gm.labels == oid, object_ids=[oid])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--naive-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    V, W, H = 5, 512, 384
    t0 = time.perf_counter()
    s = render_sequence(n_views=V, width=W, height=H, seed=args.seed)
    pts = np.stack([depth_to_world(s.depth[v], s.K, s.poses[v]) for v in range(V)])
    valid = np.isfinite(pts).all(-1)
    scene = AlignedScene(pts3d=pts, conf=valid.astype(np.float32), poses=s.poses,
                         K=np.repeat(s.K[None], V, 0), rgb=s.rgb)
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    scene.mask_cache = ClassicalSegmenter().build_mask_cache(s.rgb, pts, valid)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm = GroupMapper(scene)
    t_gm = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm.warm()  # what segmentation_node does while idle after a new scene (KD-tree, every object)
    t_warm = time.perf_counter() - t0
    print(f"render {t_render:.2f}s  mask cache build {t_cache:.2f}s "
          f"({len(scene.mask_cache.objects)} objects)  GroupMapper build {t_gm:.3f}s, idle warm-up {t_warm:.3f}s")

    # prompts: surface points of the GT objects (80 %) and random valid points (20 %)
    rng = np.random.default_rng(1)
    obj = np.isin(s.instance, s.scene.object_ids) & valid
    oi = np.flatnonzero(obj.ravel())
    ai = np.flatnonzero(valid.ravel())
    n_obj = int(0.8 * args.prompts)
    pick = np.concatenate([rng.choice(oi, n_obj), rng.choice(ai, args.prompts - n_obj)])
    rng.shuffle(pick)
    prompts = pts.reshape(-1, 3)[pick].astype(np.float64)
    prompts += rng.normal(0, 0.002, prompts.shape)  # a click is never exactly on a pixel point

    fast_t, fast_res = [], []
    for _ in range(3):  # warm-up
        gm.segment([gm.object_at_point(prompts[0])])
    for p in prompts:
        t0 = time.perf_counter()
        oid = gm.object_at_point(p)
        seg = gm.segment([oid]) if oid > 0 else None
        fast_t.append(time.perf_counter() - t0)
        fast_res.append((oid, seg))

    pts_all, lab_all = gm.grid_points()
    naive_t, agree_id, agree_mask = [], 0, 0
    n_naive = min(args.naive_prompts, len(prompts))
    for p, (oid_f, seg_f) in zip(prompts[:n_naive], fast_res[:n_naive]):
        t0 = time.perf_counter()
        oid, seg = naive_prompt(gm, pts_all, lab_all, p, gm.knn, gm.default_max_dist)
        naive_t.append(time.perf_counter() - t0)
        agree_id += int(oid == oid_f)
        same = (seg is None and seg_f is None) or (
            seg is not None and seg_f is not None and np.array_equal(seg.pixel_masks, seg_f.pixel_masks))
        agree_mask += int(same)

    def stats(t):
        t = np.asarray(t) * 1e3
        return {"p50_ms": round(float(np.percentile(t, 50)), 3),
                "p95_ms": round(float(np.percentile(t, 95)), 3),
                "max_ms": round(float(t.max()), 3), "n": int(t.size)}

    f, n = stats(fast_t), stats(naive_t)
    print(f"fast  (KD-tree + precomputed segments): p50 {f['p50_ms']:.3f} ms  p95 {f['p95_ms']:.3f} ms  "
          f"max {f['max_ms']:.3f} ms  over {f['n']} prompts")
    print(f"naive (brute NN + lift + consistency):  p50 {n['p50_ms']:.3f} ms  p95 {n['p95_ms']:.3f} ms  "
          f"max {n['max_ms']:.3f} ms  over {n['n']} prompts")
    print(f"same id {agree_id}/{n_naive}, same pixel masks {agree_mask}/{n_naive}; "
          f"{sum(1 for o, _ in fast_res if o > 0)} prompts hit an object")
    out = {"bench": "group_mapping_core", "views": V, "width": W, "height": H,
           "cpu_count": os.cpu_count(), "mask_cache_build_s": round(t_cache, 3),
           "group_mapper_warm_s": round(t_warm, 3), "group_mapper_build_s": round(t_gm, 3), "fast": f, "naive": n,
           "speedup_p50": round(n["p50_ms"] / max(f["p50_ms"], 1e-9), 1),
           "same_id": agree_id, "same_masks": agree_mask, "compared": n_naive,
           "target_p95_ms": 10.0, "meets_target": f["p95_ms"] <= 10.0}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
