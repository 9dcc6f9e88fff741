"""Weight-free RGB backend: structure from motion (pycolmap) + dense pairwise stereo (OpenCV).

Keyframes with RGB only (no depth, no network weights) -> pairwise pointmaps for DGA:

1. :func:`~wildseg3d_ros.core.pointmaps.colmap_sfm.run_sfm` registers the keyframes (SIFT,
   exhaustive matching, global mapping with an incremental fallback, robust bundle adjustment)
   with the keyframes' intrinsics fixed (``refine_intrinsics=False``: CameraInfo /
   ``--intrinsics`` are trusted) or refined from them as an initial guess.
2. Pairs of the scene graph are kept when the SfM model says they overlap (shared sparse points)
   with a usable triangulation angle; per view the ``max_pairs_per_view`` best are kept (a
   maximum spanning tree first, so the pair graph stays connected).
3. :func:`~wildseg3d_ros.core.pointmaps.stereo.pair_pointmaps` rectifies each kept pair with the
   SfM relative pose, runs SGBM both ways with a left-right check and gives per-pixel
   pointmaps + confidences of both views: edge (i, j) carries view i in its frame and view j
   in i's frame, in the SfM model's scale (``metric=False``).

Views SfM cannot place, or that end up in no usable stereo pair, are left out: the returned
:class:`~wildseg3d_ros.core.types.PairwisePredictions` covers the remaining views only
(re-numbered 0..V'-1), ``info['views']`` lists their positions in the input and
``dropped_views`` says why each other view was left out (the pipeline reconstructs the
remaining keyframes when at least two remain).

**SfM poses reach DGA as fixed known poses** (``known_poses``, with
``known_poses_weight = inf``; the intrinsics as known focals): bundle adjustment over
sub-pixel feature tracks is more accurate than anything DGA could infer from dense stereo that
was itself rectified with those poses (on the Middlebury temple: 0.1 % of the ring's span), so
DGA keeps them and does what it is good at — fusing the overlapping pairwise depth maps per
view with its mask- and match-aware weights, and putting every view in one frame.
"""
from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree

from ..geometry import finite_points, invert_pose, transform_points
from ..types import Keyframe, PairwisePredictions
from ..errors import BackendError, CancelFn, ProgressFn, check_cancel, report
from .base import Pair, PointmapBackend
from .scene_graph import graph_components
from .colmap_sfm import SfmOptions, SfmResult, run_sfm
from .stereo import StereoError, StereoOptions, pair_pointmaps


def _resize_keyframe(rgb: np.ndarray, K: np.ndarray, max_size: int) -> Tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = rgb.shape[:2]
    s = max_size / float(max(h, w)) if max_size and max(h, w) > max_size else 1.0
    if s >= 1.0:
        return np.ascontiguousarray(rgb[..., :3]).astype(np.uint8), np.asarray(K, np.float64)
    nw, nh = int(round(w * s)), int(round(h * s))
    sx, sy = nw / w, nh / h
    K2 = np.asarray(K, np.float64).copy()
    K2[0, 0] *= sx
    K2[0, 1] *= sx
    K2[1, 1] *= sy
    K2[0, 2] = (K2[0, 2] + 0.5) * sx - 0.5
    K2[1, 2] = (K2[1, 2] + 0.5) * sy - 0.5
    return cv2.resize(np.ascontiguousarray(rgb[..., :3]), (nw, nh), interpolation=cv2.INTER_AREA), K2


def _max_spanning_forest(weights: Dict[Tuple[int, int], float]) -> set:
    """The edges of a maximum-weight spanning forest of the undirected graph ``{edge: weight}``
    (scipy's minimum spanning tree on ``max + 1 - weight``)."""
    if not weights:
        return set()
    edges = list(weights)
    nodes = sorted({v for e in edges for v in e})
    idx = {v: k for k, v in enumerate(nodes)}
    w = np.array([weights[e] for e in edges], np.float64)
    g = coo_matrix(((w.max() + 1.0) - w, ([idx[a] for a, _ in edges], [idx[b] for _, b in edges])),
                   shape=(len(nodes),) * 2).tocsr()
    t = minimum_spanning_tree(g).tocoo()
    back = {(idx[a], idx[b]): (a, b) for a, b in edges}
    back.update({(idx[b], idx[a]): (a, b) for a, b in edges})
    return {back[(int(i), int(j))] for i, j in zip(t.row, t.col)}


class SfmBackend(PointmapBackend):
    """Pairwise pointmaps from RGB keyframes by SfM + dense stereo (see the module docstring).

    ``refine_intrinsics``: treat the keyframes' K as an initial guess (refine the focal length in
    bundle adjustment) instead of fixed calibration. ``max_pairs_per_view``: stereo pairs kept
    per view (ranked by verified feature matches and triangulation angle). ``min_matches`` /
    ``min_shared_points``: verified matches / triangulated points two views must share to be a
    stereo pair (the points set its disparity search range and triangulation angle). ``min_pair_angle_deg`` /
    ``max_pair_angle_deg``: the pair's median triangulation angle must lie in this range (too
    small: depth is noise; too large: the views see different sides). ``max_image_size``: long
    side the keyframes are brought to first (0: keep). ``sfm`` / ``stereo``: dicts of
    :class:`SfmOptions` / :class:`StereoOptions` fields. ``device`` is accepted and ignored
    (CPU only)."""

    name = "sfm"

    def __init__(self, refine_intrinsics: bool = False, max_pairs_per_view: int = 3,
                 min_matches: int = 15, min_shared_points: int = 5, min_pair_angle_deg: float = 1.5,
                 max_pair_angle_deg: float = 50.0, max_image_size: int = 1024,
                 scene_graph: str = "complete", num_threads: int = -1, seed: int = 0,
                 sfm: Optional[dict] = None, stereo: Optional[dict] = None, device: str = "cpu",
                 verbose: bool = False):
        from .colmap_sfm import _import_pycolmap

        _import_pycolmap()  # a clear BackendError when pycolmap is missing
        if int(max_pairs_per_view) < 1:
            raise BackendError(f"max_pairs_per_view must be >= 1, got {max_pairs_per_view}")
        if not 0 <= float(min_pair_angle_deg) < float(max_pair_angle_deg) <= 180:
            raise BackendError(f"bad pair angle range [{min_pair_angle_deg}, {max_pair_angle_deg}] deg")
        self.refine_intrinsics = bool(refine_intrinsics)
        self.max_pairs_per_view = int(max_pairs_per_view)
        self.min_matches = int(min_matches)
        self.min_shared_points = int(min_shared_points)
        self.angle_range = (float(min_pair_angle_deg), float(max_pair_angle_deg))
        self.max_image_size = int(max_image_size)
        self.scene_graph = scene_graph
        try:
            self.sfm_options = SfmOptions(num_threads=int(num_threads), seed=int(seed), verbose=bool(verbose),
                                          **(sfm or {}))
            self.stereo_options = StereoOptions(**(stereo or {}))
        except TypeError as exc:
            raise BackendError(f"sfm backend: unknown option ({exc})") from exc
        self.last_sfm: Optional[SfmResult] = None
        self._spare: List[Tuple[int, int]] = []  # usable pairs select_pairs set aside (next best first)
        self.last_info: dict = {}

    # ------------------------------------------------------------------------------------------
    def _pair_stats(self, r: SfmResult, i: int, j: int) -> Tuple[int, float]:
        """(shared sparse points, median triangulation angle in degrees) of views i, j."""
        P = r.shared_points(i, j)
        if len(P) == 0:
            return 0, 0.0
        ci, cj = r.poses[i][:3, 3], r.poses[j][:3, 3]
        a, b = P - ci, P - cj
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return len(P), float(np.degrees(np.median(np.arccos(np.clip(cos, -1, 1)))))

    def select_pairs(self, r: SfmResult, candidates: Sequence[Tuple[int, int]]):
        """(kept undirected pairs, {pair: why refused}) among ``candidates`` of registered views."""
        lo, hi = self.angle_range
        usable, refused = {}, {}
        for i, j in candidates:
            n, ang = self._pair_stats(r, i, j)
            m = int(r.inliers[i, j])
            if m < self.min_matches:
                refused[(i, j)] = f"views {i} and {j} share {m} verified feature matches (need >= {self.min_matches})"
            elif n < self.min_shared_points:
                refused[(i, j)] = f"views {i} and {j} share {n} sparse 3D points (need >= {self.min_shared_points})"
            elif not lo <= ang <= hi:
                refused[(i, j)] = (f"views {i} and {j}: median triangulation angle {ang:.1f} deg outside "
                                   f"[{lo:g}, {hi:g}]")
            else:
                # favour many verified matches at a well-conditioned angle (~8 deg and up)
                usable[(i, j)] = m * min(1.0, ang / 8.0)
        # maximum spanning forest first (connectivity), then the best partners per view
        kept = _max_spanning_forest(usable)
        nodes = sorted({v for e in usable for v in e})
        deg = {v: sum(v in e for e in kept) for v in nodes}
        for e in sorted(usable, key=lambda e: -usable[e]):
            if e in kept:
                continue
            if deg[e[0]] < self.max_pairs_per_view and deg[e[1]] < self.max_pairs_per_view:
                kept.add(e)
                deg[e[0]] += 1
                deg[e[1]] += 1
        self._spare = [e for e in sorted(usable, key=lambda e: -usable[e]) if e not in kept]
        for e in self._spare:
            refused[e] = f"views {e[0]} and {e[1]}: not among the {self.max_pairs_per_view} best pairs per view"
        return sorted(kept), refused

    @staticmethod
    def _fill_holes(edges, pts1, conf1, pts2, conf2, poses, Ks) -> None:
        """Give every pixel a point in every edge (in place): where one pair's stereo left a
        pixel invalid, its point is taken from the per-view fusion (median depth along the
        pixel's ray over all the view's pairs) **with confidence 0**, so it carries no weight.

        Why: each stereo pair validates different pixels, while the aligner compares a view's
        pointmaps across edges pixel by pixel (its spanning-tree initialisation fits one edge's
        pointmap onto another's); an invalid pixel would enter those fits as the origin. Pixels
        no pair validates stay NaN (invalid everywhere)."""
        views = sorted({v for e in edges for v in e})
        T_inv = {v: invert_pose(poses[v]) for v in views}
        # every slot of view v as a depth map along v's rays (z in v's own frame)
        slots: Dict[int, list] = {v: [] for v in views}
        for e, (i, j) in enumerate(edges):
            slots[i].append((e, 1, np.eye(4)))
            slots[j].append((e, 2, T_inv[j] @ poses[i]))  # i's frame -> j's frame
        for v, sl in slots.items():
            P = []
            for e, k, T in sl:
                X = pts1[e] if k == 1 else pts2[e]
                c = conf1[e] if k == 1 else conf2[e]
                Xv = transform_points(T, X.astype(np.float64))
                Xv[~(c > 0)] = np.nan
                P.append(Xv)
            P = np.stack(P)  # (S, H, W, 3) in v's frame; all on v's pixel rays
            z = P[..., 2]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
                zmed = np.nanmedian(z, axis=0)
            have = np.isfinite(zmed) & (zmed > 0)
            H, W = z.shape[1:]
            u, w = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
            Kv = Ks[v]
            ray = np.stack([(u - Kv[0, 2]) / Kv[0, 0], (w - Kv[1, 2]) / Kv[1, 1], np.ones_like(u)], -1)
            fused = np.where(have[..., None], ray * np.where(have, zmed, 0.0)[..., None], np.nan)
            for (e, k, T), Xv in zip(sl, P):
                hole = ~finite_points(Xv) & have
                if not hole.any():
                    continue
                back = transform_points(invert_pose(T), fused[hole])
                if k == 1:
                    pts1[e][hole] = back.astype(np.float32)
                    conf1[e][hole] = 0.0
                else:
                    pts2[e][hole] = back.astype(np.float32)
                    conf2[e][hole] = 0.0

    # ------------------------------------------------------------------------------------------
    def predict_pairs(self, keyframes: Sequence[Keyframe], pairs: Optional[Sequence[Pair]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelFn] = None) -> PairwisePredictions:
        import torch

        kfs, pairs = self._check_inputs(keyframes, pairs)
        n = len(kfs)
        t0 = time.perf_counter()
        imgs, Ks = zip(*[_resize_keyframe(np.asarray(kf.rgb), kf.K, self.max_image_size) for kf in kfs])
        check_cancel(cancel, "sfm backend")
        report(progress, 0.02, f"sfm: structure from motion on {n} keyframes")
        r = run_sfm(imgs, Ks, refine_intrinsics=self.refine_intrinsics, options=self.sfm_options,
                    cancel=cancel, progress=lambda f, m: report(progress, 0.02 + 0.4 * f, m))
        self.last_sfm = r
        t_sfm = time.perf_counter() - t0
        dropped: Dict[int, str] = {v: f"not registered by structure from motion: {why}" for v, why in r.reasons.items()}
        reg = [v for v in range(n) if r.registered[v]]
        if len(reg) < 2:
            raise BackendError("sfm backend: structure from motion placed fewer than 2 keyframes: "
                               + "; ".join(f"keyframe {v}: {why}" for v, why in sorted(dropped.items())))
        und = sorted({(min(i, j), max(i, j)) for i, j in pairs if r.registered[i] and r.registered[j]})
        sel, refused = self.select_pairs(r, und)

        # dense stereo on the kept pairs
        t1 = time.perf_counter()
        results = {}
        failed: Dict[Tuple[int, int], str] = dict(refused)

        def stereo(i, j):
            check_cancel(cancel, "sfm backend (stereo)")
            T_ij = invert_pose(r.poses[i]) @ r.poses[j]
            shared = transform_points(invert_pose(r.poses[i]), r.shared_points(i, j))
            try:
                st = pair_pointmaps(imgs[i], imgs[j], r.K[i], r.K[j], T_ij, shared, self.stereo_options)
            except StereoError as e:
                failed[(i, j)] = f"stereo on views {i} and {j} failed: {e}"
                return
            if min(st.info["valid_i"], st.info["valid_j"]) < 0.005:
                failed[(i, j)] = (f"stereo on views {i} and {j} matched only {100 * st.info['valid_i']:.1f} % / "
                                  f"{100 * st.info['valid_j']:.1f} % of the pixels")
                return
            failed.pop((i, j), None)
            results[(i, j)] = (st, T_ij)

        for c, (i, j) in enumerate(sel):
            stereo(i, j)
            report(progress, 0.45 + 0.5 * (c + 1) / max(len(sel), 1), f"sfm: stereo pair {c + 1}/{len(sel)} ({i}, {j})")
        # a view left without a pair, or a pair graph in pieces (stereo refuses some geometries):
        # the next-best pairs the per-view limit had set aside, where they help
        for e in list(self._spare):
            comps = graph_components(reg, list(results))
            if len(comps) == 1:
                break
            comp_of = {v: k for k, cc in enumerate(comps) for v in cc}
            if comp_of[e[0]] != comp_of[e[1]]:
                stereo(*e)
        t_stereo = time.perf_counter() - t1

        # views in no usable pair, then the largest connected part of the pair graph
        in_pair = sorted({v for e in results for v in e})
        for v in reg:
            if v not in in_pair:
                why = [m for e, m in failed.items() if v in e]
                dropped[v] = ("registered, but in no usable stereo pair"
                              + (f" ({'; '.join(why[:3])})" if why else " (the scene graph pairs it with no registered view)"))
        comps = graph_components(in_pair, list(results))
        if not comps or len(comps[0]) < 2:
            raise BackendError("sfm backend: no stereo pair could be built between the registered keyframes: "
                               + ("; ".join(list(failed.values())[:6]) or "no pairs") + "; the views may not overlap, "
                               "or the camera barely moved between them")
        keep = comps[0]
        for comp in comps[1:]:
            for v in comp:
                dropped[v] = f"its stereo pairs {comp} are not connected to the larger group {keep}"
        keep_set = set(keep)
        new = {v: k for k, v in enumerate(keep)}
        edges = [(i, j) for i, j in pairs if (min(i, j), max(i, j)) in results and i in keep_set and j in keep_set]
        # pairs of the graph given in one direction only still yield both halves of the edge
        E = len(edges)
        H, W = imgs[0].shape[:2]
        pts1 = np.empty((E, H, W, 3), np.float32)
        pts2 = np.empty((E, H, W, 3), np.float32)
        conf1 = np.empty((E, H, W), np.float32)
        conf2 = np.empty((E, H, W), np.float32)
        for e, (i, j) in enumerate(edges):
            st, T_ij = results[(min(i, j), max(i, j))]
            if i < j:
                pts1[e], conf1[e], pts2[e], conf2[e] = st.pts_i, st.conf_i, st.pts_j_in_i, st.conf_j
            else:  # reversed edge: view j of the stereo pair is first
                T_ji = invert_pose(T_ij)
                pts1[e] = transform_points(T_ji, st.pts_j_in_i.astype(np.float64)).astype(np.float32)
                pts2[e] = transform_points(T_ji, st.pts_i.astype(np.float64)).astype(np.float32)
                conf1[e], conf2[e] = st.conf_j, st.conf_i
        self._fill_holes(edges, pts1, conf1, pts2, conf2, r.poses, r.K)
        known = np.stack([r.poses[v] for v in keep])
        info = {
            "known_intrinsics": not self.refine_intrinsics,
            "failed_pairs": {f"{a}-{b}": m for (a, b), m in sorted(failed.items())},
            "stereo_pairs": [dict(i=int(i), j=int(j), **{k: v for k, v in st.info.items()})
                             for (i, j), (st, _) in sorted(results.items())],
            "sfm": dict(mapper=r.mapper, registered=[int(v) for v in reg], features=r.features.tolist(),
                        points=int(len(r.points)), reprojection_error_px=r.reprojection_error,
                        intrinsics_refined=r.intrinsics_refined, timings=r.timings),
            "timings": dict(sfm_s=t_sfm, stereo_s=t_stereo, total_s=time.perf_counter() - t0),
        }
        self.last_info = info
        out = PairwisePredictions(
            idx1=[new[i] for i, _ in edges], idx2=[new[j] for _, j in edges],
            pts1=torch.from_numpy(pts1), conf1=torch.from_numpy(conf1),
            pts2=torch.from_numpy(pts2), conf2=torch.from_numpy(conf2),
            images=np.stack([imgs[v] for v in keep]), intrinsics=np.stack([r.K[v] for v in keep]),
            metric=False, info=info, views=list(keep),
            dropped_views={int(v): str(m) for v, m in sorted(dropped.items())},
            known_poses=known, known_poses_weight=float("inf"))
        report(progress, 1.0, f"sfm: {E} pairwise predictions over {len(keep)} of {n} keyframes")
        return out
