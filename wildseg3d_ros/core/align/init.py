"""Initialisation of the global alignment: closed-form pieces (torch, batched, any device).

* :func:`batched_umeyama` — weighted similarity fits for a batch of point sets at once.
* :func:`estimate_focal` — focal from a camera-frame pointmap (DUSt3R's
  ``estimate_focal_knowing_depth``, Weiszfeld mode: IRLS on the pixel reprojection distance).
* :func:`spanning_tree_order` — maximum-confidence spanning tree of the pair graph
  (scipy's minimum_spanning_tree on negated edge scores), in breadth-first order from its
  strongest edge; raises on a disconnected graph.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from ..errors import AlignmentError


def batched_umeyama(src, dst, w, with_scale: bool = True):
    """dst ~= s R src + t for each batch element.

    src, dst: (B, N, 3); w: (B, N) non-negative. Returns s (B,), R (B,3,3), t (B,3).
    Elements with zero total weight get the identity."""
    w = w.clamp_min(0)
    wsum = w.sum(1, keepdim=True)
    wn = w / wsum.clamp_min(1e-12)
    mu_s = (wn[..., None] * src).sum(1)
    mu_d = (wn[..., None] * dst).sum(1)
    xs = src - mu_s[:, None]
    xd = dst - mu_d[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", wn, xd, xs)
    U, D, Vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.det(U) * torch.det(Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Sd = torch.ones_like(D)
    Sd[:, 2] = sign
    R = U @ torch.diag_embed(Sd) @ Vh
    var_s = (wn * xs.square().sum(-1)).sum(1)
    if with_scale:
        s = (D * Sd).sum(1) / var_s.clamp_min(1e-12)
    else:
        s = torch.ones_like(var_s)
    t = mu_d - s[:, None] * torch.einsum("bij,bj->bi", R, mu_s)
    bad = wsum[:, 0] <= 0
    if bool(bad.any()):
        R = torch.where(bad[:, None, None], torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R), R)
        s = torch.where(bad, torch.ones_like(s), s)
        t = torch.where(bad[:, None], torch.zeros_like(t), t)
    return s, R, t


def pixel_grid(h: int, w: int, device=None, dtype=torch.float32):
    """(H*W, 2) pixel coordinates (u = column, v = row), integer pixel centres."""
    v, u = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                          torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], -1)


def estimate_focal(pts_cam, pp, weights=None, iters: int = 10):
    """Focal (pixels) of a camera-frame pointmap (H, W, 3) with principal point ``pp`` (2,).

    Minimises sum_p w_p || (u_p - pp) - f (x_p, y_p)/z_p || by IRLS (Weiszfeld), starting from
    the least-squares solution, like DUSt3R's ``estimate_focal_knowing_depth(focal_mode=
    'weiszfeld')``. Points with z <= 0 or zero weight are ignored."""
    h, w = pts_cam.shape[:2]
    pix = pixel_grid(h, w, pts_cam.device, pts_cam.dtype) - pp.to(pts_cam)
    p = pts_cam.reshape(-1, 3)
    ok = torch.isfinite(p).all(-1) & (p[:, 2] > 1e-9)
    if weights is not None:
        ok &= weights.reshape(-1) > 0
    if int(ok.sum()) < 3:
        return float(max(h, w) / (2 * np.tan(np.deg2rad(60) / 2)))
    xy = p[ok, :2] / p[ok, 2:3]
    px = pix[ok]
    dxp = (xy * px).sum(-1)
    dxx = xy.square().sum(-1)
    wt = torch.ones_like(dxp)
    f = (wt * dxp).sum() / (wt * dxx).sum().clamp_min(1e-12)
    for _ in range(iters):
        dis = (px - f * xy).norm(dim=-1)
        wt = 1.0 / dis.clamp_min(1e-8)
        f = (wt * dxp).sum() / (wt * dxx).sum().clamp_min(1e-12)
    base = max(h, w) / (2 * np.tan(np.deg2rad(60) / 2))
    return float(f.clamp(0.2 * base, 10 * base))


def spanning_tree_order(edges, scores, num_views: int):
    """Edges (indices into ``edges``) of a maximum-score spanning tree, ordered so that each edge
    touches an already placed view (the first edge is the strongest tree edge).

    edges: list of (i, j); scores: per-edge positive scores (for symmetrised pairs the better
    direction is used). Raises AlignmentError when the graph does not connect all views."""
    best = {}
    for e, ((i, j), s) in enumerate(zip(edges, scores)):
        key = (min(i, j), max(i, j))
        if i == j:
            continue
        if key not in best or s > best[key][0]:
            best[key] = (float(s), e)
    rows = [k[0] for k in best]
    cols = [k[1] for k in best]
    data = [-(v[0] + 1e-12) for v in best.values()]  # negated: minimum spanning tree = maximum score
    G = sp.coo_matrix((data, (rows, cols)), shape=(num_views, num_views)).tocsr()
    ncomp, labels = connected_components(G, directed=False)
    if ncomp > 1:
        groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(ncomp)]
        raise AlignmentError(f"the pair graph is disconnected: {ncomp} components {groups}; "
                             "every view must be linked to the others through pairs")
    T = minimum_spanning_tree(G).tocoo()
    tree = sorted(((-d, best[(min(r, c), max(r, c))][1]) for d, r, c in zip(T.data, T.row, T.col)),
                  reverse=True)
    order = [tree[0][1]]
    placed = set(edges[tree[0][1]])
    todo = [e for _, e in tree[1:]]
    while todo:
        for k, e in enumerate(todo):
            i, j = edges[e]
            if (i in placed) != (j in placed):
                order.append(e)
                placed.update((i, j))
                todo.pop(k)
                break
        else:  # pragma: no cover - a spanning tree is always connected
            raise AlignmentError("internal error: spanning tree traversal failed")
    return order
