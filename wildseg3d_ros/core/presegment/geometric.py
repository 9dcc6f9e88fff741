"""Weight-free segmenter for real RGB-D clutter: support planes, depth discontinuities and local
convexity (the LCCP idea), with colour superpixels as atoms.

Everything per view works in *inverse depth* ``w = 1 / z`` over the pixel grid, where a plane is
a linear function ``w = a u + b v + c`` and the noise of structured-light / stereo depth is about
constant (``sigma_z ~ z^2``); the noise is measured on each view, so every threshold below is a
multiple of the measured noise or a physical size in metres.

Per view (:meth:`GeometricSegmenter.automatic_masks`, needs a pointmap; without one, or with
too little valid depth, the :class:`~wildseg3d_ros.core.presegment.classical.ClassicalSegmenter`
answers):

1. **Camera frame**: a world pointmap is brought back into its camera frame by a linear
   resection (:func:`~wildseg3d_ros.core.geometry.resect_pinhole`), so the result does not depend
   on the world frame (and the pre-segmentation's camera-frame pass and the mask cache's
   world-frame pass share one cached analysis).
2. **Noise** ``sigma_w`` (:func:`inverse_depth_noise`): robust spread of ``w`` about its 5x5
   mean on fully valid windows (includes the depth quantisation).
3. **Depth discontinuities** (:func:`depth_jumps`): a 4-neighbour pair is cut when its step in
   ``w`` differs from the median of the 3 steps on *each* side of it by more than
   ``jump_k * sqrt(6) sigma_w`` and by more than twice their size (a plane has equal steps in
   ``w`` whatever its slant; curved surfaces change them gradually; the medians also cut ramps
   of mixed pixels at occluding contours).
4. **Normals** (:func:`normals_from_inverse_depth`): from the gradient of ``w`` smoothed along
   continuous runs (never across a discontinuity): ``n ~ -(fx w_u, fy w_v, w - (u-cx) w_u -
   (v-cy) w_v)``, exact for planes.
5. **Support and structure planes** (:func:`structure_planes`): RANSAC in ``(u, v, w)`` (local
   pixel triples) with a normal check; a plane's pixels (within ``plane_band_m`` of it, normals
   within ``plane_normal_deg``) are background when one connected piece of them is longer than
   ``structure_extent_m`` (tables, floors, walls; no object face is that large), plus what lies
   behind the dominant one (the floor seen past a table edge); pixels within 3 noise levels of
   the plane's *local* height join it (a slightly warped table).  A thin object lying on the
   table keeps everything above ``plane_band_m``.
6. **Atoms**: watershed superpixels of the colour gradient plus the normals' crease angle (one
   marker per ``atom_px`` cell at its lowest point), split by the discontinuities; atoms under
   ``min_atom_px`` join their longest-border neighbour.
7. **Local convexity** between adjacent atoms (:func:`lccp_merge`): each atom's plane is fitted
   in ``(u, v, w)`` by least squares, giving its normal and the normal's standard error from
   the measured noise.  Two atoms touching without a discontinuity (over at least
   ``min_border_px`` pixel pairs) merge unless their junction, measured across the border, is
   *concave* by more than ``concave_deg`` and more than ``concave_sigma`` standard errors: a
   banana on a block or a box on a box come apart at their concave contact, while the faces of
   one convex object stay together.  An atom whose normal cannot be trusted -- standard error
   above a third of ``concave_deg``, or bent by more than ``concave_deg`` with a plane-fit
   residual above ``planar_k`` noise levels (it straddles a crease) -- joins a neighbour only
   where the pixel normals a few pixels either side of the border are not concave and the
   colours are within ``color_same`` (CIE Lab, lightness halved).
8. *Fragments* -- segments under ``min_segment_px`` pixels or shorter than
   ``min_object_extent_m`` (a bottle's cap cut off by its concave neck) -- join the neighbour
   they share the longest continuous border with, or are dropped when tiny.
9. *Vessels* (:func:`revolution_joins`): a mug's, bowl's or pitcher's inside seen through the
   opening shares no pixel border with its outer wall (the rim is a depth jump, and a band
   without depth on structured-light cameras).  Segments that fit ONE surface of revolution
   about the support's normal (same axis, radius and rim height) join, with the pieces of the
   inside and the vessel's floor (``join_revolution``).

Pixel sizes are given for a 640 px wide image and scale with the image.  Physical sizes assume a
metric pointmap (the ``rgbd`` backend).

:meth:`build_mask_cache` associates the per-view segments across views in 3D
(:func:`~wildseg3d_ros.core.mask_cache.associate_masks_3d`).  :meth:`refine` selects the
segments under positive clicks and removes those under negative ones; a segment that holds
clicks of both kinds is split between them along its atom graph (each atom goes to the click
with the cheapest path, edges costing their concavity and colour difference), so a negative
click on a wrongly merged neighbour removes it and a positive click on a missed part adds it.

Only numpy / scipy / scikit-image (watershed) / OpenCV; Python loops run over planes, RANSAC
rounds or views, never over pixels.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Tuple

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra

from ..errors import SegmenterError
from ..geometry import finite_points, resect_pinhole
from ..mask_cache import relabel_consecutive
from .base import Segmenter, as_uv

__all__ = ["GeometricSegmenter", "camera_frame", "inverse_depth_noise", "depth_jumps",
           "run_mean", "normals_from_inverse_depth", "structure_planes", "lccp_merge",
           "revolution_joins"]


# ---------------------------------------------------------------------------------------------
# per-pixel geometry
# ---------------------------------------------------------------------------------------------
def camera_frame(pts: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(camera-frame pointmap (H, W, 3) float64, K (3, 3)) of an organised pinhole pointmap in
    any frame, by linear resection (exact for exact pointmaps).  Raises ValueError when the
    pointmap is degenerate."""
    K, c2w = resect_pinhole(pts, valid, max_samples=1500)
    R, c = c2w[:3, :3], c2w[:3, 3]
    pc = (np.asarray(pts, np.float64) - c) @ R
    return pc, K


def inverse_depth_noise(w: np.ndarray, valid: np.ndarray, floor_rel: float = 1e-4) -> float:
    """Robust standard deviation of inverse depth about its 5x5 mean on fully valid windows
    (MAD, corrected for the window's own mean); at least ``floor_rel`` x the median ``w``
    (noise-free rendered depth)."""
    okf = valid.astype(np.float32)
    wf = np.where(valid, w, 0).astype(np.float32)
    n = cv2.boxFilter(okf, -1, (5, 5), normalize=False, borderType=cv2.BORDER_CONSTANT)
    m = cv2.boxFilter(wf, -1, (5, 5), normalize=False, borderType=cv2.BORDER_CONSTANT) / np.maximum(n, 1)
    good = valid & (n >= 25)
    med_w = float(np.median(w[valid])) if valid.any() else 1.0
    if good.sum() < 100:
        return max(floor_rel * med_w, 1e-12)
    r = np.abs(w - m)[good]
    r = r[r < 20 * np.median(r) + 1e-12]  # windows over a discontinuity are not noise
    sig = 1.4826 * float(np.median(r)) * np.sqrt(25.0 / 24.0)
    return max(sig, floor_rel * med_w, 1e-12)


def _side_median(d: np.ndarray, k: int, side: int) -> np.ndarray:
    """Per step of ``d`` (H, N; NaN = no step): the median of the ``k`` (3) steps before it
    (``side`` -1) or after it (+1) along axis 1, over those that exist (the larger of two); 0
    where none exists."""
    H, N = d.shape
    pad = np.full((H, N + 2 * k), np.nan, d.dtype)
    pad[:, k:k + N] = d
    sh = [pad[:, k + side * o:k + side * o + N] for o in range(1, k + 1)]
    if k == 3:  # NaN-ignoring median of three: fmin / fmax skip NaN
        a, b, c = sh
        med = np.fmax(np.fmin(a, b), np.fmin(np.fmax(a, b), c))
    else:
        st = np.sort(np.stack(sh, -1), axis=-1)  # NaN last
        n = np.isfinite(st).sum(-1)
        med = np.take_along_axis(st, np.maximum(n // 2, 0)[..., None], -1)[..., 0]
    return np.where(np.isfinite(med), med, 0.0)


def depth_jumps(w: np.ndarray, valid: np.ndarray, tau: float, k: int = 3, ratio: float = 2.0):
    """Continuity of 4-neighbour pairs: (horizontal (H, W-1), vertical (H-1, W)) bool, True =
    connected.  A pair is cut when either pixel is invalid, or when its step in inverse depth
    differs by more than ``tau`` from the median of the ``k`` steps on *each* side of it along
    the same line, and is more than ``ratio`` times that median (a plane has equal steps in
    ``w`` whatever its slant, a curved surface gradually changing ones; a side without steps
    counts as flat), and the step itself exceeds ``tau``.  The medians make a ramp of up to
    ``k - 1`` mixed pixels across an occluding contour a cut, too."""
    def one(a, ok):  # along axis 1
        d = a[:, 1:] - a[:, :-1]
        okp = ok[:, 1:] & ok[:, :-1]
        d = np.where(okp, d, np.nan)
        with np.errstate(invalid="ignore"):
            ml, mr = _side_median(d, k, -1), _side_median(d, k, +1)
            ad = np.abs(d)
            # a step is a jump when it stands out from the steps on both sides by more than
            # the noise AND by more than ``ratio`` times their size (curved surfaces change
            # their steps gradually, even at grazing angles)
            jl = (np.abs(d - ml) > tau) & (ad > ratio * np.abs(ml))
            jr = (np.abs(d - mr) > tau) & (ad > ratio * np.abs(mr))
            jump = jl & jr & (ad > tau)
        return okp & ~jump

    eh = one(w, valid)
    ev = one(w.T, valid.T).T
    return eh, ev


def run_mean(a: np.ndarray, conn: np.ndarray, r: int) -> np.ndarray:
    """Mean of ``a`` over ``[x - r, x + r]`` along axis 1, restricted to the run of connected
    pixels (``conn`` (H, W-1): pixel x connected to x + 1) that holds x."""
    H, W = a.shape
    idx = np.arange(W)
    starts = np.ones((H, W), bool)
    starts[:, 1:] = ~conn
    start = np.maximum.accumulate(np.where(starts, idx[None], 0), axis=1)
    ends = np.ones((H, W), bool)
    ends[:, :-1] = ~conn
    end = np.minimum.accumulate(np.where(ends, idx[None], W - 1)[:, ::-1], axis=1)[:, ::-1]
    lo = np.maximum(idx[None] - r, start)
    hi = np.minimum(idx[None] + r, end)
    cs = np.zeros((H, W + 1), np.float64)
    np.cumsum(a, axis=1, out=cs[:, 1:])
    s = np.take_along_axis(cs, hi + 1, 1) - np.take_along_axis(cs, lo, 1)
    return (s / (hi - lo + 1)).astype(a.dtype)


def _diff_along(a: np.ndarray, conn: np.ndarray) -> np.ndarray:
    """Derivative along axis 1: central difference where both neighbours are connected, else
    one-sided, else 0."""
    H, W = a.shape
    f = np.zeros((H, W), a.dtype)
    b = np.zeros((H, W), a.dtype)
    fo = np.zeros((H, W), bool)
    bo = np.zeros((H, W), bool)
    f[:, :-1] = a[:, 1:] - a[:, :-1]
    fo[:, :-1] = conn
    b[:, 1:] = a[:, 1:] - a[:, :-1]
    bo[:, 1:] = conn
    both = fo & bo
    out = np.where(both, 0.5 * (f + b), np.where(fo, f, np.where(bo, b, 0.0)))
    return out.astype(a.dtype), fo | bo


def normals_from_inverse_depth(ws: np.ndarray, K: np.ndarray, eh: np.ndarray, ev: np.ndarray):
    """Unit normals (H, W, 3) facing the camera from a (smoothed) inverse-depth map, and a bool
    map of where both derivatives exist.  For a plane ``w = a u + b v + c`` the unnormalised
    normal is ``(fx a, fy b, c + a cx + b cy)`` (it satisfies ``n . X = 1`` on the plane)."""
    H, W = ws.shape
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    wu, oku = _diff_along(ws, eh)
    wv, okv = _diff_along(ws.T, ev.T)
    wv, okv = wv.T, okv.T
    u = np.arange(W, dtype=np.float64)[None]
    v = np.arange(H, dtype=np.float64)[:, None]
    n = np.stack([fx * wu, fy * wv, ws - (u - cx) * wu - (v - cy) * wv], -1)
    ln = np.linalg.norm(n, axis=-1, keepdims=True)
    n = -n / np.maximum(ln, 1e-30)
    return n.astype(np.float32), oku & okv & (ln[..., 0] > 0)


def _fit_plane_w(u, v, w, wt=None):
    """Least-squares ``w = a u + b v + c`` -> (a, b, c)."""
    A = np.stack([u, v, np.ones_like(u)], 1)
    if wt is not None:
        A = A * wt[:, None]
        w = w * wt
    coef, *_ = np.linalg.lstsq(A, w, rcond=None)
    return coef


def _plane_normal(coef, K):
    a, b, c = coef
    n = np.array([K[0, 0] * a, K[1, 1] * b, c + a * K[0, 2] + b * K[1, 2]])
    return -n / max(np.linalg.norm(n), 1e-30)


def _extent(points: np.ndarray, q: float = 2.0) -> np.ndarray:
    """Robust extents (q..100-q percentile) of (N, 3) points along their principal axes."""
    if len(points) < 3:
        return np.zeros(3)
    c = points - points.mean(0)
    _, _, Vt = np.linalg.svd(c[:: max(1, len(c) // 4000)], full_matrices=False)
    p = c @ Vt.T
    lo, hi = np.percentile(p, [q, 100 - q], axis=0)
    return hi - lo


def structure_planes(pc: np.ndarray, w: np.ndarray, valid: np.ndarray, normals: np.ndarray,
                     n_ok: np.ndarray, K: np.ndarray, sigma_w: float, band_m: float = 0.01,
                     normal_deg: float = 20.0, extent_m: float = 0.3, max_planes: int = 4,
                     inlier_k: float = 3.0, n_hyp: int = 150, n_sample: int = 3000,
                     min_frac: float = 0.02, hyp_px: int = 25, tighten_px: int = 31, seed: int = 0):
    """Background planes (tables, floors, walls) of one view.

    Returns (structure (H, W) bool, behind (H, W) bool, planes list of dicts).  Sequential RANSAC
    in ``(u, v, w)`` (hypotheses from local pixel triples): a hypothesis scores the pixels within ``inlier_k * sigma_w`` of it whose
    normal agrees within ``normal_deg``.  The plane is refitted on them; its *band* is every
    valid pixel within ``band_m`` metres of it (along the ray) with an agreeing normal.  A plane
    whose band holds a connected piece longer than ``extent_m`` (robust principal extent) is
    structure: its whole band, and the pixels lying farther than the band behind it, are
    background.  Then the band is tightened to the plane's *local* height (the mean residual of
    nearby structure pixels), so what stands on a slightly warped table keeps all but its
    lowest ``inlier_k`` noise levels."""
    H, W = w.shape
    rng = np.random.default_rng(seed)
    uu = np.broadcast_to(np.arange(W, dtype=np.float32)[None], (H, W))
    vv = np.broadcast_to(np.arange(H, dtype=np.float32)[:, None], (H, W))
    w32 = w.astype(np.float32)
    z2 = np.where(valid, pc[..., 2], np.inf).astype(np.float32) ** 2
    nrm = normals.astype(np.float32)
    cos_n = np.cos(np.deg2rad(normal_deg))
    free = valid & n_ok
    structure = np.zeros((H, W), bool)
    behind = np.zeros((H, W), bool)
    planes = []
    tol_w = inlier_k * sigma_w
    n_valid = max(int(valid.sum()), 1)
    for _ in range(max_planes):
        idx = np.flatnonzero(free.ravel())
        if idx.size < min_frac * n_valid:
            break
        samp = idx[rng.choice(idx.size, min(n_sample, idx.size), replace=False)]
        su, sv = uu.ravel()[samp].astype(np.float64), vv.ravel()[samp].astype(np.float64)
        sw = w.ravel()[samp].astype(np.float64)
        sn = nrm.reshape(-1, 3)[samp].astype(np.float64)
        sz2 = z2.ravel()[samp].astype(np.float64)
        # local triples: a random free pixel and two more within +-hyp_px of it (a plane's
        # pixels cluster, so a triple is all-inlier far more often than three random pixels)
        p0 = idx[rng.integers(0, idx.size, n_hyp)]
        r0, c0 = np.divmod(p0, W)
        rr = np.clip(r0[:, None] + rng.integers(-hyp_px, hyp_px + 1, (n_hyp, 2)), 0, H - 1)
        cc = np.clip(c0[:, None] + rng.integers(-hyp_px, hyp_px + 1, (n_hyp, 2)), 0, W - 1)
        rr = np.concatenate([r0[:, None], rr], 1)
        cc = np.concatenate([c0[:, None], cc], 1)
        A = np.stack([cc.astype(np.float64), rr.astype(np.float64), np.ones(rr.shape)], -1)
        good = (np.abs(np.linalg.det(A)) > 1.0) & free[rr, cc].all(1)
        if not good.any():
            break
        coef = np.linalg.solve(A[good], w[rr, cc][good].astype(np.float64)[..., None])[..., 0]
        nh = np.stack([K[0, 0] * coef[:, 0], K[1, 1] * coef[:, 1],
                       coef[:, 2] + coef[:, 0] * K[0, 2] + coef[:, 1] * K[1, 2]], 1)
        nh = -nh / np.maximum(np.linalg.norm(nh, axis=1, keepdims=True), 1e-30)
        res = np.abs(coef[:, 0:1] * su[None] + coef[:, 1:2] * sv[None] + coef[:, 2:3] - sw[None])
        inl = (res < tol_w) & ((nh @ sn.T) > cos_n)
        best = int(np.argmax(inl.sum(1)))
        if inl[best].sum() < min_frac * samp.size:
            break
        # refit on the sampled pixels in the plane's loose band (normals agreeing), then
        # classify every pixel once
        cf = coef[best]
        for _ in range(2):
            r = np.abs(cf[0] * su + cf[1] * sv + cf[2] - sw) * sz2
            sel = (r < band_m) & ((sn @ _plane_normal(cf, K)) > cos_n)
            if sel.sum() < 10:
                break
            cf = _fit_plane_w(su[sel], sv[sel], sw[sel])
        n_p = _plane_normal(cf, K).astype(np.float32)
        wp = np.float32(cf[0]) * uu + np.float32(cf[1]) * vv + np.float32(cf[2])
        dz = (w32 - wp) * z2  # > 0: the pixel is nearer than the plane (on the camera side)
        inband = valid & (np.abs(dz) < band_m)
        band = inband & n_ok & ((nrm @ n_p) > cos_n)
        nlab, comp = cv2.connectedComponents(band.astype(np.uint8), connectivity=8)
        sizes = np.bincount(comp.ravel(), minlength=nlab)
        sizes[0] = 0
        is_struct = False
        ext_best = 0.0
        sub = comp[::2, ::2]
        psub = pc[::2, ::2]
        for ci in np.argsort(-sizes)[:3]:
            if sizes[ci] < 200:
                break
            e = _extent(psub[sub == ci])
            ext_best = max(ext_best, float(e[0]))
            if e[0] > extent_m:
                is_struct = True
                break
        planes.append({"coef": [float(x) for x in cf], "normal": n_p.tolist(), "band_px": int(band.sum()),
                       "extent_m": ext_best, "structure": bool(is_struct)})
        if is_struct:
            structure |= band
            if not behind.any():  # the dominant (first, largest) structure plane: the support
                behind |= valid & (wp > 0) & (dz < -band_m)
        free &= ~inband
    if structure.any():
        # local height of the structure: pixels near it within the noise of that height join it
        # (rims whose smoothed normals mix the table and an object's foot); the rest stays
        structure = _tighten(structure, w32, valid, z2, sigma_w, inlier_k, planes, uu, vv,
                             win=max(3, int(tighten_px) | 1))
    return structure, behind & ~structure, planes


def _tighten(structure, w, valid, z2, sigma_w, k, planes, uu, vv, win: int = 31):
    """Add the valid pixels next to structure whose inverse depth is within ``k`` noise levels
    of the structure's local height (a normalised box mean of the plane's residual over
    structure pixels), whatever their normal."""
    out = structure.copy()
    for p in planes:
        if not p["structure"]:
            continue
        a, b, c = (np.float32(x) for x in p["coef"])
        res = (a * uu + b * vv + c) - w  # plane residual in w
        on = structure & (np.abs(res * z2) < 0.02)
        if not on.any():
            continue
        num = cv2.boxFilter(np.where(on, res, 0).astype(np.float32), -1, (win, win), normalize=False)
        den = cv2.boxFilter(on.astype(np.float32), -1, (win, win), normalize=False)
        local = num / np.maximum(den, 1e-6)
        out |= valid & (den > 0.2 * win * win) & (np.abs(res - local) < k * sigma_w)
    return out


# ---------------------------------------------------------------------------------------------
# surfaces of revolution about the support's normal (vessels seen through their opening)
# ---------------------------------------------------------------------------------------------
def _support_frame(planes, K):
    """(N, up, e1, e2) of the support (the first structure plane, ``w = a u + b v + c`` in the
    camera frame): points on it satisfy ``N . X = 1``; the height of X above it is
    ``(1 - N . X) / |N|`` (positive on the camera's side); ``e1, e2`` span it.  None without a
    structure plane."""
    sp = [p for p in planes if p.get("structure")]
    if not sp:
        return None
    a, b, c = sp[0]["coef"]
    N = np.array([a * K[0, 0], b * K[1, 1], a * K[0, 2] + b * K[1, 2] + c], np.float64)
    nn = float(np.linalg.norm(N))
    if not np.isfinite(nn) or nn < 1e-12:
        return None
    up = -N / nn
    ref = np.eye(3)[int(np.argmin(np.abs(up)))]
    e1 = np.cross(up, ref)
    e1 /= np.linalg.norm(e1)
    return N, up, e1, np.cross(up, e1)


def _revolution_solve(G, b, tt, st, n, sx, sy):
    """Batched least-squares fit of ``x^2 + y^2 = 2 cx x + 2 cy y + k0 + k1 h + k2 h^2`` from
    its normal equations: (axis (.., 2), mean radius (..), rms radial residual (..),
    coefficients (.., 5))."""
    tr = np.trace(G, axis1=-2, axis2=-1)[..., None, None]
    beta = np.linalg.solve(G + (1e-9 * tr + 1e-12) * np.eye(5), b[..., None])[..., 0]
    rss = np.maximum(tt - (beta * b).sum(-1), 0.0)
    c = 0.5 * beta[..., :2]
    nn = np.maximum(n, 1.0)
    rho2 = (st - 2.0 * (c[..., 0] * sx + c[..., 1] * sy)) / nn + (c * c).sum(-1)
    rho = np.sqrt(np.maximum(rho2, 1e-12))
    return c, rho, np.sqrt(rss / nn) / (2.0 * rho), beta


def revolution_joins(labels: np.ndarray, pc: np.ndarray, valid: np.ndarray, planes, K: np.ndarray,
                     sigma_w: float, max_radius_m: float = 0.15, min_radius_m: float = 0.01,
                     top_tol_m: float = 0.01, rel_tol: float = 0.05, stride: int = 2,
                     min_samples: int = 30) -> np.ndarray:
    """Pairs of segments (P, 2) that are two sides of ONE surface of revolution standing on the
    support: a mug's, bowl's or pitcher's outer wall and its inside seen through the opening,
    which no pixel joins (the rim is a depth discontinuity, often a band without depth) and
    local convexity keeps apart.

    Per segment (``labels`` 1..S; pixels 2 px inside it, every ``stride``-th): heights ``h``
    above the support and coordinates ``(x, y)`` in it; a linear least-squares fit of
    ``x^2 + y^2 = 2 c . (x, y) + k0 + k1 h + k2 h^2`` -- an axis perpendicular to the support
    at ``c`` and a radius profile ``rho(h)^2`` quadratic in the height, exact for cylinders,
    cones and spheres.  A segment is a *wall* when its mean radius is within
    [``min_radius_m``, ``max_radius_m``], its horizontal extent is at least that radius (an
    arc, not a patch) around an axis within 1.5 radii of it, and its rms radial residual is
    within ``rel_tol`` x radius + 3 depth-noise levels.  Two walls join when their axes are
    within 0.2 radii, their radii within 0.2 radii, their tops (98th height percentile: the
    front and back rim) within ``top_tol_m``, and the fit of their union is a wall too.  Then
    any other segment not above their rim joins them when 90 % of its points lie on the
    union's surface (a piece of the inside cut off by its own concavity), or when it is
    *level* (height spread within ``top_tol_m / 2``), below the rim, with 95 % of its points
    inside the radius (the vessel's floor).  Flat
    faces fit no axis near them; two objects side by side have axes two radii apart; a stack
    has its tops apart.  Sums are accumulated with ``bincount`` and every pair is solved in
    one batch."""
    out = np.zeros((0, 2), np.int64)
    S = int(labels.max()) + 1 if labels.size else 0
    frame = _support_frame(planes, K)
    if S < 3 or frame is None:
        return out
    N, up, e1, e2 = frame
    L = labels
    inner = L > 0
    inner[2:-2] &= (L[:-4] == L[2:-2]) & (L[4:] == L[2:-2])
    inner[:, 2:-2] &= (L[:, :-4] == L[:, 2:-2]) & (L[:, 4:] == L[:, 2:-2])
    inner[:2] = False
    inner[-2:] = False
    inner[:, :2] = False
    inner[:, -2:] = False
    st_ = max(1, int(stride))
    m = (inner & valid)[::st_, ::st_]
    s = L[::st_, ::st_][m].astype(np.int64)
    if s.size < min_samples:
        return out
    P = pc[::st_, ::st_][m].astype(np.float64)
    h = (1.0 - P @ N) / np.linalg.norm(N)
    x, y = P @ e1, P @ e2
    x, y, hc = x - x.mean(), y - y.mean(), h - h.mean()  # conditioning; the model is invariant
    t = x * x + y * y
    X = np.stack([x, y, np.ones_like(x), hc, hc * hc], 1)

    def bc(wt):
        return np.bincount(s, weights=wt, minlength=S)

    G = np.zeros((S, 5, 5))
    for i in range(5):
        for j in range(i, 5):
            G[:, i, j] = G[:, j, i] = bc(X[:, i] * X[:, j])
    b = np.stack([bc(X[:, i] * t) for i in range(5)], 1)
    n = np.bincount(s, minlength=S).astype(np.float64)
    sums = dict(b=b, tt=bc(t * t), st=bc(t), n=n, sx=bc(x), sy=bc(y))
    c, rho, rms, _ = _revolution_solve(G, **sums)
    nn = np.maximum(n, 1.0)
    mx, my = sums["sx"] / nn, sums["sy"] / nn
    cxx, cyy = bc(x * x) / nn - mx * mx, bc(y * y) / nn - my * my
    cxy = bc(x * y) / nn - mx * my
    lam = 0.5 * (cxx + cyy) + np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy ** 2)
    ext = np.sqrt(12.0 * np.maximum(lam, 0.0))
    z = bc(P[:, 2]) / nn
    sig_z = 3.0 * sigma_w * z * z
    # 98th height percentile per segment
    o = np.lexsort((h, s))
    start = np.searchsorted(s[o], np.arange(S))
    cnt = n.astype(np.int64)
    top = h[o][np.minimum(start + (0.98 * np.maximum(cnt - 1, 0)).astype(np.int64), s.size - 1)]
    off = np.hypot(c[:, 0] - mx, c[:, 1] - my)
    wall = ((n >= min_samples) & (rho >= min_radius_m) & (rho <= max_radius_m) & (ext >= rho)
            & (off <= 1.5 * rho) & (rms <= rel_tol * rho + sig_z) & np.isfinite(rms))
    wall[0] = False
    wi = np.flatnonzero(wall)
    if wi.size < 2:
        return out
    ia, ib = np.triu_indices(wi.size, 1)
    i, j = wi[ia], wi[ib]
    r_ = 0.5 * (rho[i] + rho[j])
    near = ((np.hypot(*(c[i] - c[j]).T) <= 0.2 * r_) & (np.abs(rho[i] - rho[j]) <= 0.2 * r_)
            & (np.abs(top[i] - top[j]) <= top_tol_m))
    i, j = i[near], j[near]
    if i.size == 0:
        return out
    cu, ru, rmsu, bu = _revolution_solve(G[i] + G[j], **{k: v[i] + v[j] for k, v in sums.items()})
    ok = (rmsu <= rel_tol * ru + np.maximum(sig_z[i], sig_z[j])) & (ru <= max_radius_m)
    pairs = [np.stack([i[ok], j[ok]], 1)]
    # more of the same vessel: a piece of wall on the joined surface (the inside split by its
    # own concavity), or its floor -- a level segment (height spread within half the rim
    # tolerance) below the rim with its points inside the radius
    free = (n >= min_samples)
    free[0] = False
    free[pairs[0].ravel()] = False
    mh = G[:, 2, 3] / nn
    level = np.sqrt(np.maximum(G[:, 3, 3] / nn - mh * mh, 0.0)) <= 0.5 * top_tol_m
    for v, cv, rv, bv in zip(i[ok], cu[ok], ru[ok], bu[ok]):
        cand = free & (top <= top[v] + top_tol_m)
        if not cand.any():
            continue
        r_s = np.hypot(x - cv[0], y - cv[1])
        r_model = np.sqrt(np.maximum(bv[2] + bv[3] * hc + bv[4] * hc * hc + cv @ cv, 0.0))
        tol = rel_tol * rv + sig_z[v]
        on = np.bincount(s, weights=(np.abs(r_s - r_model) <= tol).astype(np.float64), minlength=S) / nn
        inside = np.bincount(s, weights=(r_s <= rv + tol).astype(np.float64), minlength=S) / nn
        more = np.flatnonzero(cand & ((on >= 0.9) | (level & (top <= top[v] - top_tol_m) & (inside >= 0.95))))
        pairs.append(np.stack([np.full(more.size, v), more], 1))
        free[more] = False
    return np.concatenate(pairs).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# atoms and local convexity
# ---------------------------------------------------------------------------------------------
def _components(mask: np.ndarray, eh: np.ndarray, ev: np.ndarray) -> np.ndarray:
    """Connected components (H, W) int64 (-1 outside ``mask``) of the pixel graph of ``mask``
    with the given 4-neighbour connectivity."""
    H, W = mask.shape
    idx = np.arange(H * W).reshape(H, W)
    eh = eh & mask[:, :-1] & mask[:, 1:]
    ev = ev & mask[:-1] & mask[1:]
    r = np.concatenate([idx[:, :-1][eh], idx[:-1][ev]])
    c = np.concatenate([idx[:, 1:][eh], idx[1:][ev]])
    g = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(H * W, H * W))
    _, lab = connected_components(g, directed=False)
    lab = lab.reshape(H, W).astype(np.int64)
    lab[~mask] = -1
    return lab


def _lab_image(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _crease(normals: np.ndarray, n_ok: np.ndarray, step: int = 2) -> np.ndarray:
    """Per pixel: the largest angle (deg) between the normals ``step`` pixels to either side,
    horizontally or vertically (0 where a side has no normal)."""
    H, W = n_ok.shape
    out = np.zeros((H, W), np.float32)
    s = step
    for sl_a, sl_b, sl_o in (((slice(None), slice(0, W - 2 * s)), (slice(None), slice(2 * s, W)),
                              (slice(None), slice(s, W - s))),
                             ((slice(0, H - 2 * s), slice(None)), (slice(2 * s, H), slice(None)),
                              (slice(s, H - s), slice(None)))):
        c = np.clip((normals[sl_a] * normals[sl_b]).sum(-1), -1.0, 1.0)
        ok = n_ok[sl_a] & n_ok[sl_b]
        ang = np.where(ok, np.degrees(np.arccos(c)), 0.0)
        out[sl_o] = np.maximum(out[sl_o], ang)
    return out


def _atoms(lab: np.ndarray, fg: np.ndarray, eh: np.ndarray, ev: np.ndarray, step: int,
           crease: Optional[np.ndarray] = None, crease_weight: float = 2.0) -> np.ndarray:
    """Watershed superpixels inside ``fg`` of the colour gradient (plus ``crease_weight`` x the
    normal crease angle in degrees, so atoms also stop at creases between same-coloured
    surfaces), one marker per ``step`` x ``step`` cell at its lowest point; split by the
    discontinuities: (H, W) int64 0..A-1, -1 outside ``fg``."""
    from skimage.segmentation import watershed

    H, W = fg.shape
    blur = cv2.GaussianBlur(lab, (0, 0), 1.0)
    g2 = np.zeros((H, W), np.float32)
    for k in range(3):
        gx = cv2.Sobel(blur[..., k], cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(blur[..., k], cv2.CV_32F, 0, 1, ksize=3)
        g2 += gx * gx + gy * gy
    elev = np.sqrt(g2)
    if crease is not None:
        elev = elev + crease_weight * crease
    # one marker per cell, at the cell's lowest foreground pixel
    Hc, Wc = H // step, W // step
    e = np.where(fg, elev, np.inf)[:Hc * step, :Wc * step]
    cells = e.reshape(Hc, step, Wc, step).transpose(0, 2, 1, 3).reshape(Hc, Wc, step * step)
    arg = np.argmin(cells, axis=2)
    ok = np.isfinite(np.take_along_axis(cells, arg[..., None], 2)[..., 0])
    cy, cx = np.divmod(arg, step)
    yy = (np.arange(Hc)[:, None] * step + cy)[ok]
    xx = (np.arange(Wc)[None] * step + cx)[ok]
    markers = np.zeros((H, W), np.int32)
    markers[yy, xx] = np.arange(1, yy.size + 1, dtype=np.int32)
    ws = watershed(elev, markers, mask=fg)
    same_h = ws[:, :-1] == ws[:, 1:]
    same_v = ws[:-1] == ws[1:]
    comp = _components(fg, eh & same_h, ev & same_v)
    out = np.full((H, W), -1, np.int64)
    out[fg] = relabel_consecutive(comp[fg] + 1) - 1
    return out


def _join_best_neighbour(src, dst, wgt, size, n: int) -> np.ndarray:
    """Region remap (n,): every region in ``src`` joins the ``dst`` it has the largest ``wgt``
    with (candidate arrays of equal length); of two regions choosing each other the larger
    (``size``) stays; chains are followed (6 hops)."""
    o = np.lexsort((-wgt, src))
    s_, d_ = src[o], dst[o]
    first = np.ones(s_.size, bool)
    first[1:] = s_[1:] != s_[:-1]
    s_, d_ = s_[first], d_[first]
    remap = np.arange(n)
    remap[s_] = d_
    back = remap[d_] == s_
    stay = back & (size[s_] >= size[d_])
    remap[s_[stay]] = s_[stay]
    for _ in range(6):
        remap = remap[remap]
    return remap


def _absorb_small_atoms(atoms, A, eh, ev, min_px: int):
    """Atoms under ``min_px`` pixels (too small for a plane fit; they would bridge two surfaces
    with an arbitrary normal) join the neighbour they share the longest continuous border with
    (repeated twice for chains).  Returns (atoms relabelled 0..A'-1, A')."""
    for _ in range(2):
        n = np.bincount(atoms[atoms >= 0], minlength=A)
        small = n < min_px
        if not small.any():
            break
        ea, eb, cnt = _adjacency(atoms, eh, ev, A)
        src = np.concatenate([ea[small[ea]], eb[small[eb]]])
        dst = np.concatenate([eb[small[ea]], ea[small[eb]]])
        wgt = (np.concatenate([cnt[small[ea]], cnt[small[eb]]])
               + 1e-3 * np.concatenate([n[eb[small[ea]]], n[ea[small[eb]]]]))  # ties: larger one
        if src.size == 0:
            break
        remap = _join_best_neighbour(src, dst, wgt, n, A)
        m = atoms >= 0
        atoms = atoms.copy()
        atoms[m] = remap[atoms[m]]
        ids = np.unique(atoms[m])
        lut = np.full(A, -1, np.int64)
        lut[ids] = np.arange(ids.size)
        atoms[m] = lut[atoms[m]]
        A = int(ids.size)
    return atoms, A


def _atom_stats(atoms, A, pc, w, valid, lab, K, sigma_w):
    """Per atom: pixel count, centroid (camera frame), unit normal (facing the camera), its
    angular standard error (rad), rms fit residual in w, mean Lab colour."""
    m = atoms >= 0
    a = atoms[m]
    H, W = atoms.shape
    vv, uu = np.nonzero(m)
    u = uu.astype(np.float64)
    v = vv.astype(np.float64)
    ww = w[m].astype(np.float64)

    def s(x):
        return np.bincount(a, weights=x, minlength=A)

    n = np.bincount(a, minlength=A).astype(np.float64)
    nn = np.maximum(n, 1)
    mu, mv, mw = s(u) / nn, s(v) / nn, s(ww) / nn
    du, dv, dw = u - mu[a], v - mv[a], ww - mw[a]
    Suu, Suv, Svv = s(du * du), s(du * dv), s(dv * dv)
    Suw, Svw, Sww = s(du * dw), s(dv * dw), s(dw * dw)
    det = Suu * Svv - Suv * Suv
    ok = (n >= 6) & (det > 1e-6 * np.maximum(Suu * Svv, 1e-12)) & (det > 1.0)
    dets = np.where(ok, det, 1.0)
    ga = np.where(ok, (Svv * Suw - Suv * Svw) / dets, 0.0)
    gb = np.where(ok, (Suu * Svw - Suv * Suw) / dets, 0.0)
    gc = mw - ga * mu - gb * mv
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    nv = np.stack([fx * ga, fy * gb, gc + ga * cx + gb * cy], 1)
    ln = np.linalg.norm(nv, axis=1)
    normal = -nv / np.maximum(ln, 1e-30)[:, None]
    # residual of the fit and the standard error of the normal direction
    rss = np.maximum(Sww - ga * Suw - gb * Svw, 0.0)
    sig = np.sqrt(np.maximum(rss / np.maximum(n - 3, 1), sigma_w ** 2))
    var_a = sig ** 2 * Svv / dets
    var_b = sig ** 2 * Suu / dets
    # the gradient's angular error: perpendicular part of (fx da, fy db, cx da + cy db)
    ang = np.sqrt(fx * fx * var_a + fy * fy * var_b + (cx * cx * var_a + cy * cy * var_b)) / np.maximum(ln, 1e-30)
    ang = np.where(ok, np.minimum(ang, np.pi), np.pi)
    P = pc[m]
    cen = np.stack([s(P[:, k]) for k in range(3)], 1) / nn[:, None]
    # raw second moments (about the atom centroid) for segment extents
    Q = P - cen[a]
    mom = np.stack([s(Q[:, i] * Q[:, j]) for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))], 1)
    col = np.stack([s(lab[m][:, k].astype(np.float64)) for k in range(3)], 1) / nn[:, None]
    return dict(n=n, cen=cen, mom=mom, normal=normal, ang_se=ang, ok=ok, col=col,
                rms=np.sqrt(rss / np.maximum(n, 1)))


def segment_extents(seg: np.ndarray, n: np.ndarray, cen: np.ndarray, mom: np.ndarray) -> np.ndarray:
    """Per segment id (0..S-1): the length (m) along its principal axis, ``sqrt(12) * sigma``
    (exact for a uniform bar), from its atoms' pixel counts, centroids and second moments."""
    S = int(seg.max()) + 1 if seg.size else 0
    N = np.bincount(seg, weights=n, minlength=S)
    Nn = np.maximum(N, 1)
    c = np.stack([np.bincount(seg, weights=n * cen[:, k], minlength=S) for k in range(3)], 1) / Nn[:, None]
    d = cen - c[seg]
    C = np.zeros((S, 3, 3))
    for q, (i, j) in enumerate(((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))):
        v = np.bincount(seg, weights=mom[:, q] + n * d[:, i] * d[:, j], minlength=S) / Nn
        C[:, i, j] = v
        C[:, j, i] = v
    ev = np.linalg.eigvalsh(C)[:, -1]
    return np.sqrt(12.0 * np.maximum(ev, 0.0))


def _adjacency(atoms, eh, ev, A, pc=None, reach: int = 4, normals=None):
    """Atom pairs (i < j) touching through connected 4-neighbour pairs, with the count of such
    pixel pairs: (ea, eb, count).  With ``pc`` also, per pair, the mean 3D point of the border
    (``mid``) and the mean 3D points ``reach`` pixels into each atom across the border
    (``loc_a`` for ``ea``, ``loc_b`` for ``eb``; the border pixel itself where the atom is
    thinner than that): the local geometry on both sides of the junction."""
    H, W = atoms.shape
    # pixel pairs (p, q) that join two different atoms, q = p + (0, 1) or (1, 0)
    bh = eh & (atoms[:, :-1] != atoms[:, 1:]) & (atoms[:, :-1] >= 0) & (atoms[:, 1:] >= 0)
    bv = ev & (atoms[:-1] != atoms[1:]) & (atoms[:-1] >= 0) & (atoms[1:] >= 0)
    rr, cc = np.nonzero(bh)
    r2, c2 = np.nonzero(bv)
    pr = np.concatenate([rr, r2])
    pcol = np.concatenate([cc, c2])
    dr = np.concatenate([np.zeros(rr.size, np.int64), np.ones(r2.size, np.int64)])
    dc = 1 - dr
    qr, qc = pr + dr, pcol + dc
    a1, a2 = atoms[pr, pcol], atoms[qr, qc]
    lo = np.minimum(a1, a2)
    hi = np.maximum(a1, a2)
    key, inv, cnt = np.unique(lo * A + hi, return_inverse=True, return_counts=True)
    if pc is None:
        return key // A, key % A, cnt
    P, Q = pc[pr, pcol], pc[qr, qc]
    # reach pixels back from p (into a1) and forward from q (into a2)
    br = np.clip(pr - reach * dr, 0, H - 1)
    bc = np.clip(pcol - reach * dc, 0, W - 1)
    fr = np.clip(qr + reach * dr, 0, H - 1)
    fc = np.clip(qc + reach * dc, 0, W - 1)
    Pb = np.where((atoms[br, bc] == a1)[:, None], pc[br, bc], P)
    Qf = np.where((atoms[fr, fc] == a2)[:, None], pc[fr, fc], Q)
    first_is_lo = (a1 == lo)[:, None]
    La = np.where(first_is_lo, Pb, Qf)
    Lb = np.where(first_is_lo, Qf, Pb)

    def mean(x):
        return np.stack([np.bincount(inv, weights=x[:, c], minlength=key.size) for c in range(3)],
                        1) / cnt[:, None]

    geo = dict(mid=mean(0.5 * (P + Q)), loc_a=mean(La), loc_b=mean(Lb))
    if normals is not None:
        # pixel normals at the same points: the local surface orientation on each side
        Nb = normals[br, bc].astype(np.float64)
        Nf = normals[fr, fc].astype(np.float64)
        na, nb = mean(np.where(first_is_lo, Nb, Nf)), mean(np.where(first_is_lo, Nf, Nb))
        geo["nloc_a"] = na / np.maximum(np.linalg.norm(na, axis=1, keepdims=True), 1e-12)
        geo["nloc_b"] = nb / np.maximum(np.linalg.norm(nb, axis=1, keepdims=True), 1e-12)
    return key // A, key % A, cnt, geo


def lccp_merge(ea, eb, normal, ang_se, nok, geo, concave_deg: float = 20.0,
               concave_sigma: float = 3.0):
    """Classify atom adjacencies: returns (merge (E,) bool, concave angle (E,) deg, convex (E,)
    bool).  The junction of atoms i and j (normals ``n`` facing the camera, from their plane
    fits) is convex when, seen from the middle ``m`` of their common border, the points a few
    pixels into each atom lie behind the other atom's plane:
    ``(l_i - m) . n_j + (l_j - m) . n_i < 0`` -- the local convexity criterion of LCCP, measured
    across the border (``geo`` from :func:`_adjacency`) so that elongated atoms cannot flip it.
    An edge merges unless it is concave with a normal angle above ``concave_deg`` and above
    ``concave_sigma`` times the combined standard error of the two normals; ``nok`` marks atoms
    with a reliable plane fit (others merge here; callers decide)."""
    ni, nj = normal[ea], normal[eb]
    m = geo["mid"]
    s = ((geo["loc_a"] - m) * nj).sum(1) + ((geo["loc_b"] - m) * ni).sum(1)
    cosang = np.clip((ni * nj).sum(1), -1.0, 1.0)
    ang = np.degrees(np.arccos(cosang))
    convex = s < 0
    se = np.degrees(np.sqrt(ang_se[ea] ** 2 + ang_se[eb] ** 2))
    concave_cut = ~convex & (ang > concave_deg) & (ang > concave_sigma * se) & nok[ea] & nok[eb]
    return ~concave_cut, np.where(convex, 0.0, ang), convex


class GeometricSegmenter(Segmenter):
    """Support planes + discontinuities + local convexity on RGB-D pointmaps (module docstring).

    Parameters (defaults measured on real Xtion / Kinect data, see the module docstring for what
    each one does): noise multiples ``jump_k``, ``concave_sigma``, ``planar_k``; angles
    ``concave_deg``, ``plane_normal_deg``; metres ``plane_band_m``, ``structure_extent_m``,
    ``min_object_extent_m``; pixels at 640 px width ``smooth_px``, ``atom_px``, ``min_atom_px``,
    ``min_segment_px``, ``min_border_px``; ``color_same`` (Lab); ``crease_weight`` (watershed
    elevation per degree of crease); ``max_planes``; ``voxel`` / ``min_overlap`` for the
    association across views; ``cache_size`` analysed views kept (refinement reuses them);
    ``join_revolution`` joins a vessel's inside to its outer wall (step 9).
    Without a pointmap (or with under ``min_valid_frac`` valid depth) the classical colour
    segmenter (``classical_kwargs``) answers."""

    name = "geometric"

    def __init__(self, jump_k: float = 4.0, concave_deg: float = 20.0, concave_sigma: float = 3.0,
                 planar_k: float = 10.0, color_same: float = 12.0,
                 plane_band_m: float = 0.01, plane_normal_deg: float = 20.0,
                 structure_extent_m: float = 0.3, max_planes: int = 4,
                 min_object_extent_m: float = 0.04,
                 smooth_px: int = 4, atom_px: int = 12, min_atom_px: int = 25,
                 min_segment_px: int = 150, min_border_px: int = 3, crease_weight: float = 2.0,
                 min_valid_frac: float = 0.05, voxel: Optional[float] = None,
                 min_overlap: float = 0.25, cache_size: int = 8, join_revolution: bool = True,
                 classical_kwargs: Optional[dict] = None):
        self.jump_k = float(jump_k)
        self.concave_deg = float(concave_deg)
        self.concave_sigma = float(concave_sigma)
        self.planar_k = float(planar_k)
        self.color_same = float(color_same)
        self.plane_band_m = float(plane_band_m)
        self.plane_normal_deg = float(plane_normal_deg)
        self.structure_extent_m = float(structure_extent_m)
        self.max_planes = int(max_planes)
        self.min_object_extent_m = float(min_object_extent_m)
        self.smooth_px = int(smooth_px)
        self.atom_px = int(atom_px)
        self.min_atom_px = int(min_atom_px)
        self.min_segment_px = int(min_segment_px)
        self.min_border_px = int(min_border_px)
        self.crease_weight = float(crease_weight)
        self.min_valid_frac = float(min_valid_frac)
        self.voxel = voxel
        self.min_overlap = float(min_overlap)
        self.join_revolution = bool(join_revolution)
        self._classical_kwargs = dict(classical_kwargs or {})
        self._classical = None
        self._cache: "OrderedDict[str, dict]" = OrderedDict()
        self._cache_size = int(cache_size)

    # ------------------------------------------------------------------ helpers
    @property
    def classical(self):
        if self._classical is None:
            from .classical import ClassicalSegmenter
            self._classical = ClassicalSegmenter(**self._classical_kwargs)
        return self._classical

    @staticmethod
    def _rgb(rgb):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise SegmenterError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
        rgb = rgb[..., :3]
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def _prepare(self, rgb, pts, valid):
        """(rgb, camera-frame pointmap, valid, K) or None when the view has too little geometry."""
        rgb = self._rgb(rgb)
        if pts is None:
            return rgb, None, None, None
        pts = np.asarray(pts, np.float64)
        if pts.shape[:2] != rgb.shape[:2] or pts.shape[-1] != 3:
            raise SegmenterError(f"pointmap shape {pts.shape} does not match image {rgb.shape[:2]}")
        v = finite_points(pts)
        if valid is not None:
            v &= np.asarray(valid, bool)
        if v.mean() < self.min_valid_frac:
            return rgb, None, None, None
        try:
            pc, K = camera_frame(pts, v)
        except (ValueError, np.linalg.LinAlgError):
            return rgb, None, None, None
        v &= pc[..., 2] > 0
        if v.mean() < self.min_valid_frac:
            return rgb, None, None, None
        return rgb, pc, v, K

    def _key(self, rgb, pc, valid):
        """Cache key of a view: its image, validity and camera-frame depth on a coarse grid in
        1 cm bins (the same keyframe seen as a camera-frame pointmap by the pre-segmentation and
        as a resected world pointmap by the mask cache gets the same key)."""
        h = hashlib.blake2b(rgb.tobytes(), digest_size=16)
        h.update(np.packbits(valid).tobytes())
        z = np.where(valid, pc[..., 2], 0)[::16, ::16]
        h.update(np.round(z * 100.0).astype(np.int32).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ per-view analysis
    def analyse(self, rgb, pts, valid=None) -> Optional[dict]:
        """All intermediate results of one view (cached), or None without usable geometry."""
        rgb, pc, valid, K = self._prepare(rgb, pts, valid)
        if pc is None:
            return None
        key = self._key(rgb, pc, valid)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        info = self._analyse(rgb, pc, valid, K)
        self._cache[key] = info
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return info

    def _analyse(self, rgb, pc, valid, K):
        H, W = valid.shape
        z = pc[..., 2]
        w = np.where(valid, 1.0 / np.where(valid, z, 1.0), 0.0).astype(np.float64)
        sigma_w = inverse_depth_noise(w, valid)
        tau = self.jump_k * np.sqrt(6.0) * sigma_w
        eh, ev = depth_jumps(w, valid, tau)
        # pixel sizes are given for a 640 px wide image and scale with the image
        sc = W / 640.0
        px = dict(smooth=max(1, int(round(self.smooth_px * sc))),
                        atom=max(4, int(round(self.atom_px * sc))),
                        min_atom=max(4, int(round(self.min_atom_px * sc * sc))),
                        min_segment=max(10, int(round(self.min_segment_px * sc * sc))),
                        hyp=max(5, int(round(25 * sc))), tighten=max(5, int(round(31 * sc))),
                        sample=max(1, int(round(2 * sc))))
        ws = run_mean(w, eh, px["smooth"])
        ws = run_mean(ws.T, ev.T, px["smooth"]).T
        normals, n_ok = normals_from_inverse_depth(ws, K, eh, ev)
        n_ok &= valid
        structure, behind, planes = structure_planes(
            pc, w, valid, normals, n_ok, K, sigma_w, band_m=self.plane_band_m,
            normal_deg=self.plane_normal_deg, extent_m=self.structure_extent_m,
            max_planes=self.max_planes, hyp_px=px["hyp"], tighten_px=px["tighten"])
        fg = valid & ~structure & ~behind
        lab = _lab_image(rgb)
        crease = _crease(normals, n_ok)
        atoms = _atoms(lab, fg, eh, ev, px["atom"], crease, self.crease_weight)
        A = int(atoms.max()) + 1 if fg.any() else 0
        info = dict(H=H, W=W, K=K, sigma_w=sigma_w, valid=valid, structure=structure, behind=behind,
                    planes=planes, atoms=atoms, A=A, eh=eh, ev=ev, lab=lab)
        if A == 0:
            info.update(labels=np.zeros((H, W), np.int32), seg_of_atom=np.zeros(0, np.int64),
                        ea=np.zeros(0, np.int64), eb=np.zeros(0, np.int64), cost=np.zeros(0))
            return info
        atoms, A = _absorb_small_atoms(atoms, A, eh, ev, px["min_atom"])
        info.update(atoms=atoms, A=A)
        st = _atom_stats(atoms, A, pc, w, valid, lab, K, sigma_w)
        ea, eb, cnt, geo = _adjacency(atoms, eh, ev, A, pc, normals=normals)
        # a normal known to worse than a third of the cut angle cannot vouch for a junction
        # and an atom bent by more than the cut angle (it straddles a crease or an unresolved
        # depth step) has a meaningless mean normal: a V of angle t over an atom of size L
        # leaves a plane-fit residual of L tan(t/2) / (4 sqrt 3), so t ~ 8 sqrt(3) rms / L;
        # only residuals well above the noise (planar_k sigma) say anything
        zc = np.maximum(st["cen"][:, 2], 1e-6)
        size = np.sqrt(st["n"]) * zc / K[0, 0]
        bend = 8.0 * np.sqrt(3.0) * st["rms"] * zc ** 2 / np.maximum(size, 1e-12)
        bent = (st["rms"] > self.planar_k * sigma_w) & (bend > np.radians(self.concave_deg))
        info["bent"] = bent
        reliable = st["ok"] & (np.degrees(st["ang_se"]) < self.concave_deg / 3.0) & ~bent
        info["reliable"] = reliable
        merge, concave_ang, convex = lccp_merge(ea, eb, st["normal"], st["ang_se"], reliable, geo,
                                                self.concave_deg, self.concave_sigma)
        # a junction with an unreliable atom (bent, or too noisy / small for its normal) is
        # judged by the pixel normals a few pixels either side of the border instead (a smooth
        # sphere at coarse resolution bends its atoms, far noisy depth blurs them), and only
        # between similar colours: an atom folded over a contact line must not bridge two
        # objects
        cdist = np.linalg.norm((st["col"][ea] - st["col"][eb]) * np.array([0.5, 1.0, 1.0]), axis=1)
        wb = ~(reliable[ea] & reliable[eb])
        if wb.any():
            nla, nlb = geo["nloc_a"][wb], geo["nloc_b"][wb]
            m_ = geo["mid"][wb]
            sl = ((geo["loc_a"][wb] - m_) * nlb).sum(1) + ((geo["loc_b"][wb] - m_) * nla).sum(1)
            angl = np.degrees(np.arccos(np.clip((nla * nlb).sum(1), -1.0, 1.0)))
            ok_b = ((sl < 0) | (angl < self.concave_deg)) & (cdist[wb] < self.color_same)
            merge_b = np.zeros(merge.shape, bool)
            merge_b[np.flatnonzero(wb)[ok_b]] = True
        else:
            merge_b = np.zeros(merge.shape, bool)
        merge &= reliable[ea] & reliable[eb]
        merge |= merge_b
        # a junction seen over one or two pixel pairs is no evidence of a shared surface (a
        # missed depth step at a corner); atoms that touch share a border of many pixels
        merge &= cnt >= self.min_border_px
        seg = self._merge(A, ea, eb, cnt, merge, st, px)
        labels = np.zeros((H, W), np.int32)
        labels[atoms >= 0] = seg[atoms[atoms >= 0]]
        joins = np.zeros((0, 2), np.int64)
        if self.join_revolution:
            # a vessel's outer wall and its inside seen through the opening: one object
            try:
                joins = revolution_joins(labels, pc, valid, planes, K, sigma_w,
                                         max_radius_m=0.5 * self.structure_extent_m,
                                         top_tol_m=self.plane_band_m, stride=px["sample"])
            except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                joins = np.zeros((0, 2), np.int64)  # degenerate geometry: nothing is joined
        if joins.size:
            S1 = int(seg.max()) + 1
            g = coo_matrix((np.ones(len(joins), np.int8), (joins[:, 0], joins[:, 1])), shape=(S1, S1))
            nc, comp = connected_components(g, directed=False)
            root = np.full(nc, S1, np.int64)
            np.minimum.at(root, comp, np.arange(S1))
            seg = relabel_consecutive(root[comp][seg]).astype(np.int64)
            labels[atoms >= 0] = seg[atoms[atoms >= 0]]
        # path costs for refinement: concavity (in units of the cut angle) + colour difference
        cost = 1e-3 + concave_ang / max(self.concave_deg, 1e-6) + cdist / 20.0 + np.where(merge, 0.0, 10.0)
        info.update(labels=labels, seg_of_atom=seg, ea=ea, eb=eb, cnt=cnt, merge=merge, joins=joins,
                    concave_ang=concave_ang, convex=convex, cdist=cdist, cost=cost, stats=st)
        return info

    def _merge(self, A, ea, eb, cnt, merge, st, px):
        """Connected components of the merge edges; then *fragments* -- segments under
        ``min_segment_px`` pixels or shorter than ``min_object_extent_m`` (a bottle's cap cut
        off by its concave neck, a rim) -- join the neighbour they share the longest
        continuous border with (smallest fragments first, repeated); a fragment without such a
        neighbour is kept when it has ``min_segment_px`` pixels, dropped otherwise.  Returns
        the segment id of every atom (1..S, 0 = dropped)."""
        n_px = st["n"]
        g = coo_matrix((np.ones(int(merge.sum()), np.int8), (ea[merge], eb[merge])), shape=(A, A))
        _, seg = connected_components(g, directed=False)
        for _ in range(4):
            S = int(seg.max()) + 1
            area = np.bincount(seg, weights=n_px, minlength=S)
            ext = segment_extents(seg, n_px, st["cen"], st["mom"])
            frag = (area < px["min_segment"]) | (ext < self.min_object_extent_m)
            sa, sb = seg[ea], seg[eb]
            cross = sa != sb
            fa, fb = cross & frag[sa], cross & frag[sb]
            src = np.concatenate([sa[fa], sb[fb]])
            dst = np.concatenate([sb[fa], sa[fb]])
            wgt = np.concatenate([cnt[fa], cnt[fb]]).astype(np.float64)
            if src.size == 0:
                break
            key = src * S + dst  # a fragment's border with each neighbour, summed
            uk, inv = np.unique(key, return_inverse=True)
            remap = _join_best_neighbour(uk // S, uk % S, np.bincount(inv, weights=wgt), area, S)
            if np.array_equal(remap, np.arange(S)):
                break
            seg = remap[seg]
        area = np.bincount(seg, weights=n_px, minlength=seg.max() + 1)
        keep = area >= px["min_segment"]
        seg = np.where(keep[seg], seg + 1, 0)
        return relabel_consecutive(seg).astype(np.int64)

    # ------------------------------------------------------------------ Segmenter API
    def automatic_masks(self, rgb, pts=None, valid=None) -> np.ndarray:
        info = self.analyse(rgb, pts, valid)
        if info is None:
            return self.classical.automatic_masks(rgb, pts, valid)
        return info["labels"].copy()

    def refine(self, rgb, pos_uv, neg_uv, prior_mask=None, pts=None, valid=None) -> np.ndarray:
        """The prior mask plus the segments under positive clicks, minus those under negative
        ones; a segment holding clicks of both kinds is split between them (each atom goes to
        the click with the cheapest path over the atom graph: concavity + colour, non-merged
        junctions expensive).  A negative click on a structure plane (or on what lies behind
        the support) removes that background from the prior.  Clicks on pixels without depth
        change nothing."""
        info = self.analyse(rgb, pts, valid)
        if info is None:
            return self.classical.refine(rgb, pos_uv, neg_uv, prior_mask=prior_mask, pts=pts, valid=valid)
        H, W = info["H"], info["W"]
        mask = np.zeros((H, W), bool) if prior_mask is None else np.asarray(prior_mask, bool).copy()
        if mask.shape != (H, W):
            raise SegmenterError(f"prior mask shape {mask.shape} != image {(H, W)}")
        pos, neg = as_uv(pos_uv), as_uv(neg_uv)
        if pos.shape[0] == 0 and neg.shape[0] == 0:
            return mask
        atoms, A = info["atoms"], info["A"]
        if A == 0:
            return mask
        pa, na = self._click_atoms(info, pos), self._click_atoms(info, neg)
        sel = np.zeros(A, bool)
        rem = np.zeros(A, bool)
        for a in pa[pa >= 0]:
            sel |= self._region(info, a)
        for a in na[na >= 0]:
            rem |= self._region(info, a)
        both = sel & rem
        pa_ok, na_ok = pa[pa >= 0], na[na >= 0]
        if both.any() and pa_ok.size and na_ok.size:
            # split the contested atoms between the clicks along the atom graph
            ea, eb, cost = info["ea"], info["eb"], info["cost"]
            g = coo_matrix((cost, (ea, eb)), shape=(A, A)).tocsr()
            dp = dijkstra(g, directed=False, indices=np.unique(pa_ok), min_only=True)
            dn = dijkstra(g, directed=False, indices=np.unique(na_ok), min_only=True)
            to_neg = both & (dn < dp)
            sel &= ~to_neg
            rem &= ~(both & ~to_neg)
        sel[pa_ok] = True
        rem[na_ok] = True
        sel &= ~rem
        in_atom = atoms >= 0
        a_img = np.where(in_atom, atoms, 0)
        mask |= in_atom & sel[a_img]
        mask &= ~(in_atom & rem[a_img])
        # a positive click on structure / unlabelled pixels without an atom selects nothing new;
        # a negative click there removes the prior's pixels of that plane
        for (u, v) in neg:
            r, c = int(np.clip(round(v), 0, H - 1)), int(np.clip(round(u), 0, W - 1))
            if info["structure"][r, c]:
                mask &= ~info["structure"]
            elif info["behind"][r, c]:
                mask &= ~info["behind"]
        return mask

    @staticmethod
    def _click_atoms(info, uv, radius: int = 1):
        """Atom under each click (nearest atom pixel within ``radius`` px), -1 when none: a
        click on a pixel without depth never grabs a surface beside it (it may lie at any
        depth)."""
        atoms = info["atoms"]
        H, W = atoms.shape
        out = np.full(uv.shape[0], -1, np.int64)
        for i, (u, v) in enumerate(uv):
            r0, c0 = int(round(v)), int(round(u))
            r = np.clip(np.arange(r0 - radius, r0 + radius + 1), 0, H - 1)
            c = np.clip(np.arange(c0 - radius, c0 + radius + 1), 0, W - 1)
            rr, cc = np.meshgrid(r, c, indexing="ij")
            a = atoms[rr, cc]
            if not (a >= 0).any():
                continue
            d = np.where(a >= 0, (rr - v) ** 2 + (cc - u) ** 2, np.inf)
            out[i] = a.ravel()[int(np.argmin(d))]
        return out

    @staticmethod
    def _region(info, a):
        seg = info["seg_of_atom"]
        if seg[a] > 0:
            return seg == seg[a]
        r = np.zeros(info["A"], bool)
        r[a] = True
        return r
