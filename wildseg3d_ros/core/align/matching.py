"""Cross-view co-visibility ("matching") of the two pointmaps of one pair.

The WildSeg3D text does not define "matching points".  We define it per edge e = (i, j) on the
two pointmaps DUSt3R predicts in the *same* frame (camera i): X^{i,e} (view i) and X^{j,e}
(view j).  A pixel p of view i matches when

    q = NN_{X^{j,e}}(x_p)           (nearest neighbour of its 3D point in the other pointmap)
    ||x_p - q|| < tau * ||x_p||      (within a depth-relative distance threshold tau)
    ||NN_{X^{i,e}}(q) - x_p|| < tau * ||x_p||   (the round trip comes back: reciprocal)

and symmetrically for the pixels of view j.  ``mutual=True`` replaces the round-trip test by the
strict mutual-nearest-neighbour test NN(NN(p)) == p, which misses many co-visible pixels when the
two maps sample the surface at different densities (the round-trip form is the default).

Nearest neighbours come from scipy's cKDTree on the pointmaps subsampled with ``stride`` (every
``stride``-th row and column); the match flag of a subsampled pixel is given to its
``stride x stride`` block.  Invalid points (non-finite or zero confidence) never match.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def _flags(a, b, valid_a, valid_b, tau, mutual):
    """Match flags for the points a (N,3) against b (M,3) (both already subsampled)."""
    out_a = np.zeros(len(a), bool)
    out_b = np.zeros(len(b), bool)
    ia = np.flatnonzero(valid_a)
    ib = np.flatnonzero(valid_b)
    if len(ia) == 0 or len(ib) == 0:
        return out_a, out_b
    A, B = a[ia], b[ib]
    ta, tb = cKDTree(A), cKDTree(B)
    dab, nab = tb.query(A, k=1)   # A -> B
    dba, nba = ta.query(B, k=1)   # B -> A
    ra = tau * np.linalg.norm(A, axis=1)
    rb = tau * np.linalg.norm(B, axis=1)
    if mutual:
        ok_a = (nba[nab] == np.arange(len(A))) & (dab < ra)
        ok_b = (nab[nba] == np.arange(len(B))) & (dba < rb)
    else:
        ok_a = (dab < ra) & (np.linalg.norm(A[nba[nab]] - A, axis=1) < ra)
        ok_b = (dba < rb) & (np.linalg.norm(B[nab[nba]] - B, axis=1) < rb)
    out_a[ia] = ok_a
    out_b[ib] = ok_b
    return out_a, out_b


def pair_matches(pts_a, pts_b, valid_a=None, valid_b=None, threshold: float = 0.03,
                 stride: int = 1, mutual: bool = False):
    """Match masks (Ha,Wa) and (Hb,Wb) bool for two pointmaps expressed in the same frame.

    pts_a: (Ha, Wa, 3), pts_b: (Hb, Wb, 3) numpy float arrays; valid_*: optional bool masks.
    threshold: tau, relative to the point's distance from the frame origin (the edge camera)."""
    pts_a = np.asarray(pts_a, dtype=np.float64)
    pts_b = np.asarray(pts_b, dtype=np.float64)
    Ha, Wa = pts_a.shape[:2]
    Hb, Wb = pts_b.shape[:2]
    va = np.isfinite(pts_a).all(-1) if valid_a is None else (np.asarray(valid_a, bool) & np.isfinite(pts_a).all(-1))
    vb = np.isfinite(pts_b).all(-1) if valid_b is None else (np.asarray(valid_b, bool) & np.isfinite(pts_b).all(-1))
    s = max(int(stride), 1)
    sa, sb = pts_a[::s, ::s], pts_b[::s, ::s]
    fa, fb = _flags(sa.reshape(-1, 3), sb.reshape(-1, 3), va[::s, ::s].reshape(-1),
                    vb[::s, ::s].reshape(-1), float(threshold), mutual)
    fa = fa.reshape(sa.shape[:2])
    fb = fb.reshape(sb.shape[:2])
    if s > 1:
        fa = np.repeat(np.repeat(fa, s, 0), s, 1)[:Ha, :Wa]
        fb = np.repeat(np.repeat(fb, s, 0), s, 1)[:Hb, :Wb]
    return fa & va, fb & vb


def auto_stride(h: int, w: int, max_points: int = 50_000) -> int:
    """Smallest stride that keeps a subsampled pointmap under ``max_points`` points."""
    s = 1
    while ((h + s - 1) // s) * ((w + s - 1) // s) > max_points:
        s += 1
    return s
