"""Mask cache helpers: geometric association of per-view masks and soft masks S.

* :func:`associate_masks_3d` turns per-view *local* segment ids into *global* ids that are
  consistent across views: every local mask is lifted through the aligned world pointmaps and
  voxel-hashed; two masks of different views are matched by the overlap of their voxel sets
  (restricted to the voxels both views observe), and matches are merged greedily, best first,
  with a union-find that never puts two masks of the same view into one object (prevents an
  over-segmented view from chaining distinct objects together).
* :func:`build_soft_masks` gives the soft object mask S used by DGA weighting: 1 inside a mask,
  ramping down towards mask borders (distance transform), a small constant where unlabelled.
* :func:`object_table` / :func:`make_mask_cache` assemble :class:`~wildseg3d_ros.core.types.MaskCache`.

All functions are vectorised with numpy (loops run over views / view pairs / objects only).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from scipy import ndimage

from .types import MaskCache
from .voxels import auto_voxel_size, voxel_keys
from .geometry import finite_points

__all__ = ["associate_masks_3d", "build_soft_masks", "object_table", "make_mask_cache",
           "relabel_consecutive", "mask_iou_table"]


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Map the positive ids of ``labels`` to 1..K (order of first sorted id); 0 stays 0."""
    labels = np.asarray(labels)
    ids, inv = np.unique(labels, return_inverse=True)
    new = np.zeros(ids.shape, np.int32)
    pos = ids > 0
    new[pos] = np.arange(1, int(pos.sum()) + 1, dtype=np.int32)
    return new[inv].reshape(labels.shape).astype(np.int32)


class _UnionFind:
    def __init__(self, n: int, view_of: np.ndarray):
        self.parent = list(range(n))
        self.views = [{int(v)} for v in view_of]

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union_if_disjoint(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.views[ra] & self.views[rb]:
            return False
        self.parent[rb] = ra
        self.views[ra] |= self.views[rb]
        self.views[rb] = set()
        return True


def _view_voxels(keys: np.ndarray, seg: np.ndarray):
    """Per view: unique voxel keys with their dominant segment index (-1 = unlabelled), and the
    unique (key, segment) pairs of labelled pixels."""
    # dominant label per voxel
    order = np.lexsort((seg, keys))
    k, s = keys[order], seg[order]
    change = np.ones(k.size, bool)
    change[1:] = (k[1:] != k[:-1]) | (s[1:] != s[:-1])
    starts = np.flatnonzero(change)
    counts = np.diff(np.append(starts, k.size))
    pk, ps = k[starts], s[starts]
    # pick the max-count segment per key
    o2 = np.lexsort((-counts, pk))
    pk2, ps2 = pk[o2], ps[o2]
    first = np.ones(pk2.size, bool)
    first[1:] = pk2[1:] != pk2[:-1]
    vox_keys, vox_dom = pk2[first], ps2[first]
    lab = ps >= 0
    return vox_keys, vox_dom, pk[lab], ps[lab]


def associate_masks_3d(local_labels: np.ndarray, pts3d: np.ndarray, valid: np.ndarray,
                       voxel: Optional[float] = None, min_overlap: float = 0.25,
                       min_voxels: int = 3, fragment_containment: float = 0.6,
                       return_info: bool = False):
    """Per-view local ids (V, H, W) -> global ids (V, H, W) int32 consistent across views.

    Each local mask m of view a is voxelised (voxel edge ``voxel``; default
    :func:`auto_voxel_size`).  For a pair of views (a, b) the overlap of masks m (view a) and
    n (view b) is ``I / (|A_b| + |B_a| - I)`` where ``I`` counts voxels of m whose dominant label
    in view b is n, and ``A_b`` (``B_a``) are m's voxels seen by view b (n's seen by view a): an
    IoU restricted to what both views observe, so partial occlusion does not prevent a match.
    Pairs with overlap >= ``min_overlap`` (and >= ``min_voxels`` common voxels) are merged in
    decreasing order, never joining two masks of the same view; then a mask left unmatched whose
    voxels lie mostly (>= ``fragment_containment``) inside a mask of a multi-view object joins it
    as a fragment (over-segmentation in its view).  Unmatched masks keep their own
    global id.  Global ids are 1..K ordered by first view then decreasing area.
    """
    L = np.asarray(local_labels)
    V = L.shape[0]
    pts3d = np.asarray(pts3d)
    valid = np.asarray(valid, bool) & finite_points(pts3d)
    if voxel is None:
        voxel = auto_voxel_size(pts3d, valid)
    # enumerate local segments
    seg_view, seg_local, seg_area = [], [], []
    per_view = []
    finite = pts3d[valid]
    origin = finite.min(0) if finite.size else np.zeros(3)
    offset = 0
    for v in range(V):
        lv = L[v]
        ok = valid[v]
        ids, inv, cnt = np.unique(lv, return_inverse=True, return_counts=True)
        inv = inv.reshape(lv.shape)
        pos = ids > 0
        seg_index_of_local = np.full(ids.size, -1, np.int64)
        seg_index_of_local[pos] = offset + np.arange(int(pos.sum()))
        seg_view.extend([v] * int(pos.sum()))
        seg_local.extend(ids[pos].tolist())
        seg_area.extend(cnt[pos].tolist())
        offset += int(pos.sum())
        seg = seg_index_of_local[inv[ok]]
        keys = voxel_keys(pts3d[v][ok], voxel, origin)
        per_view.append(_view_voxels(keys, seg))
    n_seg = offset
    seg_view = np.asarray(seg_view, np.int64)
    seg_area = np.asarray(seg_area, np.int64)
    edges = []  # (score, i, j)
    for a in range(V):
        ka, da, pka, psa = per_view[a]
        for b in range(a + 1, V):
            kb, db, pkb, psb = per_view[b]
            # voxels of segments of a, looked up in view b
            pos_b = np.searchsorted(kb, pka)
            pos_b = np.clip(pos_b, 0, max(kb.size - 1, 0))
            seen_b = (kb.size > 0) & (kb[pos_b] == pka) if kb.size else np.zeros(pka.size, bool)
            A_b = np.bincount(psa[seen_b], minlength=n_seg)
            dom_b = np.where(seen_b, db[pos_b] if kb.size else -1, -1)
            hit = seen_b & (dom_b >= 0)
            # voxels of segments of b, looked up in view a
            pos_a = np.searchsorted(ka, pkb)
            pos_a = np.clip(pos_a, 0, max(ka.size - 1, 0))
            seen_a = (ka[pos_a] == pkb) if ka.size else np.zeros(pkb.size, bool)
            B_a = np.bincount(psb[seen_a], minlength=n_seg)
            dom_a = np.where(seen_a, da[pos_a] if ka.size else -1, -1)
            hit2 = seen_a & (dom_a >= 0)
            # intersections counted from both sides, averaged
            pairs1 = psa[hit] * n_seg + dom_b[hit]
            pairs2 = dom_a[hit2] * n_seg + psb[hit2]
            allp = np.concatenate([pairs1, pairs2])
            if allp.size == 0:
                continue
            up, cnt = np.unique(allp, return_counts=True)
            inter = cnt / 2.0
            i, j = up // n_seg, up % n_seg
            denom = A_b[i] + B_a[j] - inter
            score = inter / np.maximum(denom, 1e-9)
            c_ij = inter / np.maximum(A_b[i], 1e-9)   # share of i (seen by b) inside j
            c_ji = inter / np.maximum(B_a[j], 1e-9)   # share of j (seen by a) inside i
            keep = (inter >= min_voxels) & ((score >= min_overlap) | (np.maximum(c_ij, c_ji) >= fragment_containment))
            for s, ii, jj, cij, cji in zip(score[keep], i[keep], j[keep], c_ij[keep], c_ji[keep]):
                edges.append((float(s), int(ii), int(jj), float(cij), float(cji)))
    uf = _UnionFind(n_seg, seg_view)
    edges.sort(key=lambda e: -e[0])
    # pass 1: best matches first, never two masks of one view in one object
    for s, i, j, _, _ in edges:
        if s >= min_overlap:
            uf.union_if_disjoint(i, j)
    # pass 2: a mask left alone that lies mostly inside a multi-view object is a fragment of it
    # (over-segmentation in its view); only singletons, so under-segmented masks cannot chain
    # two multi-view objects together
    roots = np.array([uf.find(i) for i in range(n_seg)], np.int64)
    comp_size = np.bincount(roots, minlength=n_seg)
    best_frag = {}
    for s, i, j, cij, cji in edges:
        for frag, other, c in ((i, j, cij), (j, i, cji)):
            if comp_size[roots[frag]] == 1 and comp_size[roots[other]] > 1 and c >= fragment_containment:
                if c > best_frag.get(frag, (0.0, -1))[0]:
                    best_frag[frag] = (c, other)
    for frag, (c, other) in best_frag.items():
        ra, rb = uf.find(other), uf.find(frag)
        if ra != rb:
            uf.parent[rb] = ra
            uf.views[ra] |= uf.views[rb]
    roots = np.array([uf.find(i) for i in range(n_seg)], np.int64)
    # order components by first view, then decreasing total area
    comp_ids, comp_inv = np.unique(roots, return_inverse=True)
    first_view = np.full(comp_ids.size, V, np.int64)
    np.minimum.at(first_view, comp_inv, seg_view)
    tot_area = np.bincount(comp_inv, weights=seg_area, minlength=comp_ids.size)
    order = np.lexsort((-tot_area, first_view))
    gid_of_comp = np.empty(comp_ids.size, np.int32)
    gid_of_comp[order] = np.arange(1, comp_ids.size + 1, dtype=np.int32)
    seg_gid = gid_of_comp[comp_inv] if n_seg else np.zeros(0, np.int32)
    out = np.zeros(L.shape, np.int32)
    seg_local = np.asarray(seg_local, np.int64)
    for v in range(V):
        sel = seg_view == v
        if not sel.any():
            continue
        lut_keys = seg_local[sel]
        lut_vals = seg_gid[sel]
        lv = L[v]
        o = np.argsort(lut_keys)
        lk, lg = lut_keys[o], lut_vals[o]
        p = np.clip(np.searchsorted(lk, lv), 0, lk.size - 1)
        out[v] = np.where((lv > 0) & (lk[p] == lv), lg[p], 0)
    if return_info:
        return out, {"voxel": float(voxel), "n_local": int(n_seg), "n_global": int(comp_ids.size),
                     "n_edges": len(edges)}
    return out


def build_soft_masks(labels: np.ndarray, border_px: float = 6.0, edge_value: float = 0.5,
                     unlabelled: float = 0.1) -> np.ndarray:
    """Soft object mask S (V, H, W) float32 from labels (V, H, W) (or one (H, W) view).

    Inside a mask S ramps linearly from ``edge_value`` at a label border (a pixel with a
    4-neighbour of another label) to 1 at ``border_px`` pixels from it; unlabelled pixels get
    ``unlabelled``."""
    lab = np.asarray(labels)
    single = lab.ndim == 2
    if single:
        lab = lab[None]
    out = np.empty(lab.shape, np.float32)
    for v in range(lab.shape[0]):
        l = lab[v]
        border = np.zeros(l.shape, bool)
        dh = l[:, 1:] != l[:, :-1]
        dv = l[1:, :] != l[:-1, :]
        border[:, 1:] |= dh
        border[:, :-1] |= dh
        border[1:, :] |= dv
        border[:-1, :] |= dv
        if border.any():
            d = ndimage.distance_transform_edt(~border)
        else:
            d = np.full(l.shape, np.inf)
        ramp = edge_value + (1.0 - edge_value) * np.clip(d / max(border_px, 1e-6), 0.0, 1.0)
        out[v] = np.where(l > 0, ramp, unlabelled).astype(np.float32)
    return out[0] if single else out


def _per_view_counts(lab: np.ndarray):
    """(V, N) integer labels -> (ids sorted (K,), counts (V, K) pixels of each id per view)."""
    V = lab.shape[0]
    if lab.size and int(lab.min()) >= 0 and int(lab.max()) < (1 << 22):
        n = int(lab.max()) + 1  # small non-negative ids: one counting pass, no sort
        counts = np.bincount((lab + np.arange(V, dtype=np.int64)[:, None] * n).ravel(),
                             minlength=V * n).reshape(V, n)
        ids = np.flatnonzero(counts.sum(0))
        return ids, counts[:, ids]
    ids, inv = np.unique(lab, return_inverse=True)  # negative or huge ids: count by sorting
    counts = np.bincount((inv.reshape(V, -1) + np.arange(V)[:, None] * ids.size).ravel(),
                         minlength=V * ids.size).reshape(V, ids.size)
    return ids, counts


def object_table(labels: np.ndarray, pts3d: Optional[np.ndarray] = None,
                 valid: Optional[np.ndarray] = None) -> Dict[int, dict]:
    """id -> {'views': [v...], 'area': {v: pixels}, 'n_pixels', and 'centroid' / 'bbox_min' /
    'bbox_max' (world, from valid points) when pointmaps are given}.  Ids <= 0 are background."""
    lab = np.asarray(labels)
    V = lab.shape[0]
    ids, counts = _per_view_counts(lab.reshape(V, -1))
    table: Dict[int, dict] = {}
    for k in np.flatnonzero(ids > 0):
        col = counts[:, k]
        vs = np.flatnonzero(col)
        table[int(ids[k])] = {"views": vs.tolist(), "area": {int(v): int(col[v]) for v in vs},
                              "n_pixels": int(col.sum())}
    if pts3d is None or not table:
        return table
    pts3d = np.asarray(pts3d)
    ok = finite_points(pts3d) & (lab > 0)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    if not ok.any():
        return table  # objects seen only on invalid pixels have no geometry
    k = np.searchsorted(ids, lab[ok])
    p = pts3d[ok].astype(np.float64)
    order = np.argsort(k, kind="stable")
    k, p = k[order], p[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    cnt = np.diff(np.r_[starts, k.size])
    cen = np.add.reduceat(p, starts, axis=0) / cnt[:, None]
    mn = np.minimum.reduceat(p, starts, axis=0)
    mx = np.maximum.reduceat(p, starts, axis=0)
    for j, kk in enumerate(k[starts]):
        t = table[int(ids[kk])]
        t["centroid"] = cen[j].tolist()
        t["bbox_min"] = mn[j].tolist()
        t["bbox_max"] = mx[j].tolist()
    return table


def make_mask_cache(global_labels: np.ndarray, pts3d: Optional[np.ndarray] = None,
                    valid: Optional[np.ndarray] = None, **soft_kwargs) -> MaskCache:
    """Assemble a :class:`MaskCache` (labels int32, soft masks S, object table)."""
    lab = np.asarray(global_labels).astype(np.int32)
    return MaskCache(labels=lab, soft=build_soft_masks(lab, **soft_kwargs),
                     objects=object_table(lab, pts3d, valid))


def mask_iou_table(pred: np.ndarray, gt: np.ndarray, gt_ids) -> Dict[int, list]:
    """For each GT id and view: IoU of the predicted label with maximal overlap (0 if absent).

    Returns gt id -> list over views of (iou, matched predicted id); views where the GT object
    has no pixel give (nan, 0)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    res: Dict[int, list] = {}
    for g in gt_ids:
        row = []
        for v in range(gt.shape[0]):
            m = gt[v] == g
            if not m.any():
                row.append((float("nan"), 0))
                continue
            ids, cnt = np.unique(pred[v][m], return_counts=True)
            sel = ids > 0
            if not sel.any():
                row.append((0.0, 0))
                continue
            ids, cnt = ids[sel], cnt[sel]
            best = int(ids[np.argmax(cnt)])
            p = pred[v] == best
            iou = float((p & m).sum() / (p | m).sum())
            row.append((iou, best))
        res[int(g)] = row
    return res
