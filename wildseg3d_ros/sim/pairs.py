"""Synthetic DUSt3R-style pairwise predictions with ground truth (for tests and benchmarks).

:func:`sphere_scene` ray-casts a tiny analytic scene (ground plane + spheres, vectorised) so the
unit tests do not depend on the project renderer; :func:`synthetic_predictions` turns any ground-truth
depth maps / intrinsics / camera-to-world poses into the exact ``dust3r.inference.inference()``
predictions (PairwisePredictions), with per-pair random scale and a small random rigid perturbation (DUSt3R predicts pair
pointmaps in the first camera's frame up to an unknown scale), depth noise, and low-confidence
outliers. Confidences follow DUSt3R's range (1 + exp(x) >= 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch

from ..core.geometry import look_at, rotation_from_rotvec
from ..core.types import PairwisePredictions


@dataclass
class SynthViews:
    depth: np.ndarray      # (V,H,W) z-depth
    K: np.ndarray          # (3,3)
    poses: np.ndarray      # (V,4,4) c2w
    instance: np.ndarray   # (V,H,W) int32: 1 ground, 2.. spheres


def sphere_scene(n_views=4, width=64, height=48, seed=0, n_spheres=3, arc_deg=70.0, radius=2.0):
    rng = np.random.default_rng(seed)
    f = (width / 2) / np.tan(np.deg2rad(30))
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1.0]])
    centers = np.c_[rng.uniform(-0.4, 0.4, (n_spheres, 2)), np.zeros(n_spheres)]
    radii = rng.uniform(0.12, 0.25, n_spheres)
    centers[:, 2] = radii
    poses = []
    for a in np.deg2rad(np.linspace(-arc_deg / 2, arc_deg / 2, n_views) - 90 + rng.normal(0, 3)):
        eye = np.array([radius * np.cos(a), radius * np.sin(a), 1.2 + rng.normal(0, 0.05)])
        poses.append(look_at(eye, rng.normal(0, 0.05, 3)))
    poses = np.stack(poses)
    v, u = np.mgrid[0:height, 0:width].astype(float)
    rays_c = np.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, np.ones_like(u)], -1)  # z = 1
    depth = np.zeros((n_views, height, width))
    inst = np.zeros((n_views, height, width), np.int32)
    for k, T in enumerate(poses):
        d = rays_c @ T[:3, :3].T  # world ray per unit z-depth
        o = T[:3, 3]
        best = np.full((height, width), np.inf)
        lab = np.zeros((height, width), np.int32)
        tz = np.where(d[..., 2] < -1e-9, -o[2] / np.where(d[..., 2] == 0, 1, d[..., 2]), np.inf)
        upd = (tz > 0) & (tz < best)
        best[upd], lab[upd] = tz[upd], 1
        for s, (c, r) in enumerate(zip(centers, radii)):
            oc = o - c
            A = (d * d).sum(-1)
            B = 2 * (d @ oc)
            Cq = oc @ oc - r * r
            disc = B * B - 4 * A * Cq
            t = np.where(disc > 0, (-B - np.sqrt(np.maximum(disc, 0))) / (2 * A), np.inf)
            upd = (t > 0) & (t < best)
            best[upd], lab[upd] = t[upd], s + 2
        best[~np.isfinite(best)] = 0
        depth[k], inst[k] = best, lab
    return SynthViews(depth.astype(np.float32), K, poses, inst)


def backproject(depth, K):
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(float)
    return np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], -1)


def synthetic_predictions(depth, K, poses, edges=None, seed=0, scale_range=(0.5, 2.0), rot_deg=1.0,
               trans_frac=0.01, noise=0.005, outlier_frac=0.0, outlier_scale=0.3,
               corrupt=None, as_torch=True, as_list=False):
    """Pairwise predictions (:class:`PairwisePredictions`, DUSt3R-like: per-pair scale) from ground truth.

    edges: list of (i, j) (default: all ordered pairs, the symmetrised complete graph).
    Each pair's two pointmaps (view i in camera i, view j in camera i) get the same random
    similarity: scale uniform in ``scale_range``, rotation ``rot_deg`` (deg, random axis),
    translation ``trans_frac`` x median depth. ``noise``: per-pixel Gaussian noise, as a fraction
    of depth. ``outlier_frac``: pixels displaced by ``outlier_scale`` x depth, with low confidence.
    ``corrupt``: optional dict {(e, k): bool mask (H,W)} of pixels to displace while keeping a
    high confidence (confident-but-wrong predictions, e.g. occlusion hallucinations).
    Returns (pairs, info) with info['sims'] the applied (s, R, t) per edge."""
    rng = np.random.default_rng(seed)
    V = len(depth)
    if edges is None:
        edges = list(permutations(range(V), 2))
    cam_pts = [backproject(depth[v], K) for v in range(V)]
    valid = [depth[v] > 0 for v in range(V)]
    P1, P2, C1, C2, sims = [], [], [], [], []
    for e, (i, j) in enumerate(edges):
        Tij = np.linalg.inv(poses[i]) @ poses[j]
        a = cam_pts[i].copy()
        b = cam_pts[j] @ Tij[:3, :3].T + Tij[:3, 3]
        med = float(np.median(depth[i][valid[i]]))
        s = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
        R = rotation_from_rotvec(rng.normal(size=3) / np.sqrt(3) * np.deg2rad(rot_deg))
        t = rng.normal(size=3) * trans_frac * med
        out = []
        for k, (pts, vmask, dsrc) in enumerate(((a, valid[i], depth[i]), (b, valid[j], depth[j]))):
            pts = pts + rng.normal(size=pts.shape) * (noise * dsrc)[..., None]
            conf = 1 + np.exp(rng.normal(2.0, 0.4, dsrc.shape))
            if outlier_frac > 0:
                o = rng.random(dsrc.shape) < outlier_frac
                pts[o] += rng.normal(size=(int(o.sum()), 3)) * outlier_scale * dsrc[o][:, None]
                conf[o] = 1 + rng.uniform(0.0, 0.3, int(o.sum()))
            if corrupt is not None and (e, k) in corrupt:
                m = corrupt[(e, k)]
                pts[m] += np.array([0.0, 0.0, 0.3]) * dsrc[m][:, None]
            conf[~vmask] = 1.0
            pts[~vmask] = 0
            pts = s * pts @ R.T + t
            out.append((pts.astype(np.float32), conf.astype(np.float32)))
        (pa, ca), (pb, cb) = out
        P1.append(pa), C1.append(ca), P2.append(pb), C2.append(cb)
        sims.append((s, R, t))
    if as_list:
        conv = (lambda x: torch.from_numpy(x)) if as_torch else (lambda x: x)
        P1, P2, C1, C2 = ([conv(x) for x in L] for L in (P1, P2, C1, C2))
    else:
        conv = (lambda x: torch.from_numpy(np.stack(x))) if as_torch else np.stack
        P1, P2, C1, C2 = (conv(L) for L in (P1, P2, C1, C2))
    pairs = PairwisePredictions([e[0] for e in edges], [e[1] for e in edges], P1, C1, P2, C2)
    return pairs, {"edges": edges, "sims": sims}


def clutter_masks(instance, edges, frac, rng):
    """{(e, k): mask} rectangles on background (instance <= 2: floor / wall) pixels, about
    ``frac`` of the image, for ``synthetic_predictions(corrupt=...)``: confident-but-wrong
    background predictions (``rng``: numpy Generator)."""
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
