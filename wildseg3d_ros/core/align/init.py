"""Initialisation of the global alignment: closed-form pieces (torch, batched, any device).

* :func:`batched_umeyama` — weighted similarity fits for a batch of point sets at once.
* :func:`estimate_focal` — focal from a camera-frame pointmap (DUSt3R's
  ``estimate_focal_knowing_depth``, Weiszfeld mode: IRLS on the pixel reprojection distance).
* :func:`spanning_tree_order` — maximum-confidence spanning tree of the pair graph
  (scipy's minimum_spanning_tree on negated edge scores), in breadth-first order from its
  strongest edge; raises on a disconnected graph.
* :func:`initialise` — the whole initial state of the global alignment (DUSt3R's ``init='mst'``
  and then some): views placed along the spanning tree by weighted Umeyama fits, cameras from
  each view's own-frame prediction (rigid part + Weiszfeld focal), views seen only as the
  second image of their pairs placed by PnP (OpenCV), pairwise similarities fitted onto the
  initial world (batched). The known-pose gauge is applied afterwards (``gauge.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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


def estimate_focal(pts_cam, pp, weights=None, iters: int = 10, stride: int = 1):
    """Focal (pixels) of a camera-frame pointmap (H, W, 3) with principal point ``pp`` (2,)
    (``stride``: the map is every stride-th row and column of the image, pp in image pixels).

    Minimises sum_p w_p || (u_p - pp) - f (x_p, y_p)/z_p || by IRLS (Weiszfeld), starting from
    the least-squares solution, like DUSt3R's ``estimate_focal_knowing_depth(focal_mode=
    'weiszfeld')``. Points with z <= 0 or zero weight are ignored."""
    h, w = pts_cam.shape[:2]
    pix = pixel_grid(h, w, pts_cam.device, pts_cam.dtype) * stride - pp.to(pts_cam)
    p = pts_cam.reshape(-1, 3)
    ok = torch.isfinite(p).all(-1) & (p[:, 2] > 1e-9)
    if weights is not None:
        ok &= weights.reshape(-1) > 0
    if int(ok.sum()) < 3:
        return float(max(h, w) * stride / (2 * np.tan(np.deg2rad(60) / 2)))
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
    base = max(h, w) * stride / (2 * np.tan(np.deg2rad(60) / 2))
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


@dataclass
class InitState:
    """Cameras and pairwise similarities in normalised scene units (float64 tensors).

    cam_R (V,3,3) camera-to-world rotations, cam_c (V,3) centres, focal (V,) numpy pixels;
    e_s (E,), e_R (E,3,3), e_t (E,3): the pair similarity y = s R x + t taking a pair's
    normalised prediction into the world."""

    cam_R: torch.Tensor
    cam_c: torch.Tensor
    focal: np.ndarray
    e_s: torch.Tensor
    e_R: torch.Tensor
    e_t: torch.Tensor

    def replace(self, **kw) -> "InitState":
        return replace(self, **kw)


def view_weight(v, edges, W1, W2):
    """Sum over every slot of view v of its weights (W1 where v is view1, W2 where view2)."""
    tot = None
    for e, (i, j) in enumerate(edges):
        for Wl, u in ((W1, i), (W2, j)):
            if u == v:
                tot = Wl[e] if tot is None else tot + Wl[e]
    return tot


def _sim(src, dst, w):
    s, R, t = batched_umeyama(src.reshape(1, -1, 3).double(), dst.reshape(1, -1, 3).double(),
                              w.reshape(1, -1).double())
    return float(s[0]), R[0], t[0]


def initialise(inp, W1, W2, pp, known_focal_mask, known_focals, gen, cancel=None,
               n_fit: int = 4096) -> InitState:
    """Initial state (see the module docstring) from an
    :class:`~wildseg3d_ros.core.align.inputs.AlignInputs` and its weights.

    pp: (V, 2) principal points; known_focal_mask / known_focals: (V,) (NaN = unknown);
    gen: the torch CPU generator (pairwise-fit pixel draws). cancel() raises errors.Cancelled."""
    from ..errors import Cancelled

    edges, V, E, dev = inp.edges, inp.num_views, inp.num_edges, inp.device
    inv = 1.0 / inp.scale

    def X1(e):  # normalised predictions, made on demand (no copy of every pair at once)
        return inp.pts1[e] * inv

    def X2(e):
        return inp.pts2[e] * inv

    scores = [float(inp.ct1[e].mean() * inp.ct2[e].mean()) for e in range(E)]
    order = spanning_tree_order(edges, scores, V)
    pts_w = [None] * V
    e0 = order[0]
    pts_w[edges[e0][0]], pts_w[edges[e0][1]] = X1(e0).double(), X2(e0).double()
    for e in order[1:]:  # similarity fits on every other row / column, applied to the full map
        i, j = edges[e]
        if pts_w[i] is not None:
            s, R, t = _sim(X1(e)[::2, ::2], pts_w[i][::2, ::2], W1[e][::2, ::2])
            pts_w[j] = s * X2(e).double() @ R.T + t
        else:
            s, R, t = _sim(X2(e)[::2, ::2], pts_w[j][::2, ::2], W2[e][::2, ::2])
            pts_w[i] = s * X1(e).double() @ R.T + t

    pp_t = torch.as_tensor(pp, dtype=torch.float32, device=dev)
    cam_R = torch.zeros(V, 3, 3, dtype=torch.float64, device=dev)
    cam_c = torch.zeros(V, 3, dtype=torch.float64, device=dev)
    focal0 = np.zeros(V)
    for v in range(V):
        if cancel is not None and cancel():
            raise Cancelled("alignment cancelled during initialisation")
        own = [e for e, _ in inp.slots[v] if edges[e][0] == v]
        if own:
            e = max(own, key=lambda k: scores[k])
            x1 = X1(e)[::2, ::2]  # every other row / column: the same fit at a quarter of the cost
            _, R, t = _sim(x1, pts_w[v][::2, ::2], W1[e][::2, ::2])
            cam_R[v], cam_c[v] = R, t
            focal0[v] = estimate_focal(x1, pp_t[v], W1[e][::2, ::2], stride=2)
        else:
            focal0[v] = np.nan
    for v in range(V):
        if known_focal_mask[v]:
            focal0[v] = known_focals[v]
        elif not np.isfinite(focal0[v]):
            fin = focal0[np.isfinite(focal0)]
            focal0[v] = float(np.median(fin)) if fin.size else max(inp.shapes[v]) / (2 * np.tan(np.pi / 6))
    for v in range(V):
        if not any(edges[e][0] == v for e in range(E)):  # only seen as view2: resection (PnP)
            cam_R[v], cam_c[v] = pnp(pts_w[v], focal0[v], pp[v], view_weight(v, edges, W1, W2) > 0)

    # pairwise similarities from the initial world pointmaps (batched over edges): n_fit pixels
    # drawn from the pair's two maps
    src, dst, wts = [], [], []
    for e, (i, j) in enumerate(edges):
        hw = inp.pts1[e].shape[0] * inp.pts1[e].shape[1]
        sel = torch.randint(0, 2 * hw, (n_fit,), generator=gen).to(dev)
        first = sel < hw
        k1, k2 = sel.clamp_max(hw - 1), (sel - hw).clamp_min(0)
        pick = lambda a, b: torch.where(first[:, None], a.reshape(-1, 3)[k1], b.reshape(-1, 3)[k2])  # noqa: E731
        src.append(pick(inp.pts1[e], inp.pts2[e]).double() * inv)
        dst.append(pick(pts_w[i], pts_w[j]))
        wts.append(torch.where(first, W1[e].reshape(-1)[k1], W2[e].reshape(-1)[k2]).double())
    e_s, e_R, e_t = batched_umeyama(torch.stack(src), torch.stack(dst), torch.stack(wts))
    return InitState(cam_R, cam_c, focal0, e_s, e_R, e_t)


def pnp(pts_world, focal, pp, valid):
    """Camera-to-world pose (R, c) of a view from its world pointmap (H,W,3) by PnP (OpenCV)."""
    import cv2

    from ..errors import AlignmentError

    h, w = pts_world.shape[:2]
    P = pts_world.reshape(-1, 3).cpu().numpy().astype(np.float64)
    uv = pixel_grid(h, w).numpy().astype(np.float64)
    ok = valid.reshape(-1).cpu().numpy() & np.isfinite(P).all(1)
    sel = np.flatnonzero(ok)
    if len(sel) > 4000:
        sel = sel[np.linspace(0, len(sel) - 1, 4000).astype(int)]
    if len(sel) < 6:
        raise AlignmentError("cannot place a view seen only as the second image of its pairs (too few valid points)")
    K = np.array([[focal, 0, pp[0]], [0, focal, pp[1]], [0, 0, 1]], np.float64)
    okp, rvec, tvec, _ = cv2.solvePnPRansac(P[sel], uv[sel], K, None, iterationsCount=100,
                                           reprojectionError=5.0, flags=cv2.SOLVEPNP_SQPNP)
    if not okp:
        raise AlignmentError("PnP failed for a view seen only as the second image of its pairs")
    Rw2c, _ = cv2.Rodrigues(rvec)
    R = Rw2c.T
    c = -R @ tvec.reshape(3)
    return (torch.as_tensor(R, dtype=torch.float64, device=pts_world.device),
            torch.as_tensor(c, dtype=torch.float64, device=pts_world.device))
