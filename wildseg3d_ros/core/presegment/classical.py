"""Weight-free segmentation backend: colour superpixels merged by colour and 3D geometry.

Per view (:meth:`ClassicalSegmenter.automatic_masks`):

1. Felzenszwalb graph-based superpixels on the RGB image (skimage).
2. When a world pointmap is given, a pixel graph whose 4-neighbour edges are *cut* at depth
   discontinuities (an edge much longer than its neighbours along the same image line: scale-free)
   and at concave creases (normals differ by more than ``crease_deg`` and the pair is locally
   concave, the LCCP criterion ``(n1 - n2) . (p1 - p2) < 0``): objects resting on a support are
   cut from it, while the faces of a convex object stay connected.  Superpixels are split by
   its connected components ("atoms").
3. With geometry, adjacent atoms are merged (union-find, most similar first) when their mean
   colours are close (CIE Lab, lightness down-weighted against shading) and most of their common
   border is geometrically connected.  Without geometry, regions merge by average linkage
   (:func:`merge_average_linkage`: the merged regions' mean colours must stay close), so a chain
   of similar atoms cannot join an object to its background.
4. Large planar regions (floor, walls, table tops; plane fit residual small against extent) become
   background 0 (without geometry: a segment over ``background_area_frac`` of the image that runs
   along ``background_border_frac`` of the image border); segments smaller than ``min_area_frac``
   are absorbed by their best geometrically-connected neighbour or dropped.

:meth:`build_mask_cache` runs this per view and associates the masks across views through the
pointmaps (:func:`~wildseg3d_ros.core.mask_cache.associate_masks_3d`).
:meth:`refine` selects segments with positive clicks and removes negative ones; inside a segment
that holds both, atoms go to the nearest click in (colour, 3D) feature space.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import SegmenterError
from .base import Segmenter, as_uv
from ..mask_cache import relabel_consecutive
from ..geometry import finite_points

__all__ = ["ClassicalSegmenter", "pointmap_normals", "geometric_edges", "detect_planes", "merge_average_linkage"]


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab
    return rgb2lab(np.asarray(rgb)[..., :3]).astype(np.float32)


def _tangents(pts: np.ndarray, valid: np.ndarray, axis: int):
    """Forward and backward differences (H, W, 3) along an image axis (NaN where invalid)."""
    p = np.where(valid[..., None], pts, np.nan).astype(np.float32)
    fwd = np.full(p.shape, np.nan, np.float32)
    bwd = np.full(p.shape, np.nan, np.float32)
    if axis == 1:
        fwd[:, :-1] = p[:, 1:] - p[:, :-1]
        bwd[:, 1:] = p[:, 1:] - p[:, :-1]
    else:
        fwd[:-1] = p[1:] - p[:-1]
        bwd[1:] = p[1:] - p[:-1]
    return fwd, bwd


def _shorter(fwd, bwd):
    nf = np.linalg.norm(fwd, axis=-1)
    nb = np.linalg.norm(bwd, axis=-1)
    nf = np.where(np.isfinite(nf), nf, np.inf)
    nb = np.where(np.isfinite(nb), nb, np.inf)
    return np.where((nf <= nb)[..., None], fwd, np.where(np.isfinite(nb)[..., None], bwd, fwd))


def _normal(tu, tv):
    n = -np.cross(tu, tv)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    n[~finite_points(n)] = 0.0
    return n


def pointmap_normals(pts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) of a pointmap, oriented towards the camera (image-grid order).

    Each tangent uses the shorter of the forward / backward difference, so normals next to a
    depth discontinuity come from the pixel's own surface."""
    tu = _shorter(*_tangents(pts, valid, 1))
    tv = _shorter(*_tangents(pts, valid, 0))
    return _normal(tu, tv)


def smooth_pointmap(pts: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian smoothing of a pointmap over valid pixels (for normals on noisy
    depth); invalid pixels stay as they are."""
    if sigma <= 0:
        return pts
    w = valid.astype(np.float32)
    den = ndimage.gaussian_filter(w, sigma)
    out = np.array(pts, np.float32, copy=True)
    for k in range(3):
        num = ndimage.gaussian_filter(np.where(valid, pts[..., k], 0).astype(np.float32), sigma)
        out[..., k] = np.where(valid & (den > 1e-3), num / np.maximum(den, 1e-3), pts[..., k])
    return out


def geometric_edges(pts: np.ndarray, valid: np.ndarray, jump_ratio: float = 3.0,
                    crease_deg: float = 35.0, normals: Optional[np.ndarray] = None,
                    pts_smooth: Optional[np.ndarray] = None):
    """Connectivity of 4-neighbour pixel pairs: (horizontal (H, W-1) bool, vertical (H-1, W) bool).

    An edge is connected when both pixels are valid, its 3D length is at most ``jump_ratio``
    times the shorter of its two neighbouring edges on the same image line (no depth jump), and
    it is not a concave crease sharper than ``crease_deg``."""
    p = pts.astype(np.float32)
    cos_t = np.cos(np.deg2rad(crease_deg))
    # side-specific normals: across an edge, each pixel's normal uses the difference pointing
    # away from the edge (so a crease is never smoothed by a difference that straddles it)
    ps = pts if pts_smooth is None else pts_smooth
    fu, bu = _tangents(ps, valid, 1)
    fv, bv = _tangents(ps, valid, 0)
    su, sv = _shorter(fu, bu), _shorter(fv, bv)
    n_s = _normal(su, sv)

    def side(n):  # fall back to the shorter-difference normal where one side is missing
        return np.where((np.abs(n).sum(-1) > 0)[..., None], n, n_s)

    def one(axis):
        if axis == 1:
            a, b = p[:, :-1], p[:, 1:]
            na = side(_normal(bu, sv))[:, :-1]
            nb = side(_normal(fu, sv))[:, 1:]
            ok = valid[:, :-1] & valid[:, 1:]
        else:
            a, b = p[:-1], p[1:]
            na = side(_normal(su, bv))[:-1]
            nb = side(_normal(su, fv))[1:]
            ok = valid[:-1] & valid[1:]
        diff = a - b
        d = np.linalg.norm(diff, axis=-1)
        d = np.where(ok & np.isfinite(d), d, np.inf)
        # neighbouring edges along the same line
        prev = np.full(d.shape, np.inf, np.float32)
        nxt = np.full(d.shape, np.inf, np.float32)
        if axis == 1:
            prev[:, 1:] = d[:, :-1]
            nxt[:, :-1] = d[:, 1:]
        else:
            prev[1:] = d[:-1]
            nxt[:-1] = d[1:]
        ref = np.minimum(prev, nxt)
        # isolated edges (both neighbours invalid) compare with themselves
        ref = np.where(np.isfinite(ref), ref, d)
        # robust to quantised / noisy depth (RGB-D): also accept edges up to jump_ratio x the
        # median edge length over a window along the line
        big = np.where(np.isfinite(d), d, np.float32(1e30))
        med = ndimage.median_filter(big, size=(1, 9) if axis == 1 else (9, 1), mode="nearest")
        ref = np.maximum(ref, np.where(med < 1e29, med, 0.0))
        no_jump = d <= jump_ratio * np.maximum(ref, 1e-12)
        cosang = (na * nb).sum(-1)
        convexity = ((na - nb) * diff).sum(-1)
        # concave crease: sharp normal change and normals converge
        crease = (cosang < cos_t) & (convexity < 0)
        return ok & np.isfinite(d) & no_jump & ~crease

    return one(1), one(0)


def _min_spacing(pts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per pixel: the shortest 3D distance to a valid 4-neighbour (inf if none)."""
    p = pts.astype(np.float32)
    out = np.full(valid.shape, np.inf, np.float32)
    dh = np.linalg.norm(p[:, 1:] - p[:, :-1], axis=-1)
    dh = np.where(valid[:, 1:] & valid[:, :-1] & np.isfinite(dh), dh, np.inf)
    dv = np.linalg.norm(p[1:] - p[:-1], axis=-1)
    dv = np.where(valid[1:] & valid[:-1] & np.isfinite(dv), dv, np.inf)
    out[:, :-1] = np.minimum(out[:, :-1], dh)
    out[:, 1:] = np.minimum(out[:, 1:], dh)
    out[:-1] = np.minimum(out[:-1], dv)
    out[1:] = np.minimum(out[1:], dv)
    return out


def detect_planes(pts: np.ndarray, valid: np.ndarray, normals: np.ndarray,
                  min_frac: float = 0.03, min_component_frac: float = 0.01,
                  tol_spacing: float = 5.0, normal_deg: float = 25.0, max_planes: int = 6,
                  n_hyp: int = 200, n_sample: int = 4000, seed: int = 0) -> np.ndarray:
    """Sequential RANSAC on a pointmap: (H, W) int32, k > 0 = pixel belongs to the k-th large
    planar region (one connected component of one plane's inliers), 0 = not planar background.

    Inlier: distance to the plane below ``tol_spacing`` x the pixel's 3D spacing (scale-free) and
    normal within ``normal_deg``.  Planes need ``min_frac`` of the pixels, components
    ``min_component_frac``."""
    H, W = valid.shape
    rng = np.random.default_rng(seed)
    tol = tol_spacing * _min_spacing(pts, valid)
    ok_n = valid & (np.abs(normals).sum(-1) > 0) & np.isfinite(tol)
    free = ok_n.copy()
    out = np.zeros((H, W), np.int32)
    cos_n = np.cos(np.deg2rad(normal_deg))
    P = pts.astype(np.float64)
    k = 0
    for _ in range(max_planes):
        idx = np.flatnonzero(free.ravel())
        if idx.size < min_frac * H * W:
            break
        samp = idx[rng.choice(idx.size, min(n_sample, idx.size), replace=False)]
        sp = P.reshape(-1, 3)[samp]
        sn = normals.reshape(-1, 3)[samp]
        st = tol.ravel()[samp]
        tri = rng.integers(0, samp.size, (n_hyp, 3))
        a, b, c = sp[tri[:, 0]], sp[tri[:, 1]], sp[tri[:, 2]]
        nrm = np.cross(b - a, c - a)
        ln = np.linalg.norm(nrm, axis=1)
        good = ln > 1e-12
        if not good.any():
            break
        nrm = nrm[good] / ln[good, None]
        a = a[good]
        dist = np.abs(nrm @ sp.T - (nrm * a).sum(1)[:, None])
        inl = (dist < st[None]) & (np.abs(sn @ nrm.T).T > cos_n)
        best = int(np.argmax(inl.sum(1)))
        if inl[best].sum() < min_frac * samp.size:
            break
        # refine on the sampled inliers, then classify every pixel
        Q = sp[inl[best]]
        cen = Q.mean(0)
        n = np.linalg.svd(Q - cen, full_matrices=False)[2][2]
        d_all = np.abs((P - cen) @ n)
        inl_all = free & (d_all < tol) & (np.abs(normals @ n) > cos_n)
        if inl_all.sum() < min_frac * H * W:
            free &= ~inl_all
            continue
        comp, nc = ndimage.label(inl_all)
        sizes = np.bincount(comp.ravel(), minlength=nc + 1)
        for ci in np.flatnonzero(sizes >= min_component_frac * H * W):
            if ci == 0:
                continue
            k += 1
            out[comp == ci] = k
        free &= ~inl_all
    return out


def _components(H, W, eh, ev) -> np.ndarray:
    idx = np.arange(H * W).reshape(H, W)
    r = np.concatenate([idx[:, :-1][eh], idx[:-1, :][ev]])
    c = np.concatenate([idx[:, 1:][eh], idx[1:, :][ev]])
    g = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(H * W, H * W))
    _, lab = connected_components(g, directed=False)
    return lab.reshape(H, W)


def merge_average_linkage(n: int, ea: np.ndarray, eb: np.ndarray, size: np.ndarray,
                          feat: np.ndarray, thresh: float) -> np.ndarray:
    """Region merging by average linkage on a region adjacency graph.

    Repeatedly merges the adjacent pair of regions whose size-weighted mean features are
    closest, updating the means, until the closest pair is at least ``thresh`` apart.  Unlike
    single linkage (a union of every atom pair closer than the threshold), a chain of similar
    neighbours cannot join two regions whose means differ, e.g. a bright object and its dark
    background through the shaded atoms of its rim.  ``ea``/``eb``: the adjacent atom pairs;
    ``size``: atom areas; ``feat``: (n, F) atom mean features.  Returns each atom's region root.
    The loop runs over region merges (hundreds per image), never over pixels."""
    import heapq

    tot = np.asarray(feat, np.float64) * np.asarray(size, np.float64)[:, None]
    cnt = np.asarray(size, np.float64).copy()
    parent = np.arange(n)
    version = np.zeros(n, np.int64)
    nbrs = [set() for _ in range(n)]
    for a, b in zip(np.asarray(ea).tolist(), np.asarray(eb).tolist()):
        if a != b:
            nbrs[a].add(b)
            nbrs[b].add(a)

    def dist(a, b):  # mean-feature distances between regions a and b (index arrays)
        return np.linalg.norm(tot[a] / cnt[a, None] - tot[b] / cnt[b, None], axis=1)

    ea_u, eb_u = np.asarray(ea, np.int64), np.asarray(eb, np.int64)
    d0 = dist(ea_u, eb_u)
    heap = [(float(d), int(a), int(b), 0, 0) for d, a, b in zip(d0, ea_u, eb_u) if d < thresh and a != b]
    heapq.heapify(heap)
    while heap:
        d, a, b, va, vb = heapq.heappop(heap)
        if version[a] != va or version[b] != vb or parent[a] != a or parent[b] != b:
            continue  # stale: one side has merged since this entry was pushed
        if len(nbrs[a]) < len(nbrs[b]):
            a, b = b, a  # keep the region with more neighbours (fewer set updates)
        tot[a] += tot[b]
        cnt[a] += cnt[b]
        parent[b] = a
        version[a] += 1
        nbrs[a] |= nbrs[b]
        nbrs[a] -= {a, b}
        for c in nbrs[b]:
            if c != a:
                nbrs[c].discard(b)
                nbrs[c].add(a)
        nbrs[b] = set()
        if nbrs[a]:
            nb = np.fromiter(nbrs[a], np.int64, len(nbrs[a]))
            dc = dist(np.full(nb.size, a), nb)
            close = dc < thresh
            for c, dcc in zip(nb[close].tolist(), dc[close].tolist()):
                heapq.heappush(heap, (dcc, a, c, int(version[a]), int(version[c])))
    while True:  # resolve merge chains to roots
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt


class ClassicalSegmenter(Segmenter):
    """Felzenszwalb superpixels merged by colour (Lab) and pointmap geometry (no weights).

    Defaults suit clean pointmaps (rendered / DUSt3R-like).  For noisy, quantised RGB-D depth
    (Kinect) use ``normal_smooth_sigma=1.5, plane_tol_spacing=12`` (smoothed normals, looser
    plane inliers): on ``shared/data/rgbd_room`` this turns a speckled over-segmentation into
    floor / table removed as planes and chairs / sofa / dresser as segments."""

    name = "classical"

    def __init__(self, fz_scale: float = 80.0, fz_sigma: float = 0.8, fz_min_size: int = 20,
                 color_thresh: float = 14.0, color_thresh_nogeo: float = 16.0,
                 lightness_weight: float = 0.35, geo_frac: float = 0.5,
                 jump_ratio: float = 3.0, crease_deg: float = 35.0,
                 min_area_frac: float = 6e-4, background_area_frac: float = 0.15,
                 background_border_frac: float = 0.25, color_linkage: str = "average",
                 detect_planes: bool = True, plane_min_frac: float = 0.03,
                 plane_tol_spacing: float = 5.0, object_max_frac: float = 0.12,
                 keep_background: bool = False, normal_smooth_sigma: float = 0.0,
                 voxel: Optional[float] = None, min_overlap: float = 0.25,
                 cache_size: int = 8):
        self.fz_scale = float(fz_scale)
        self.fz_sigma = float(fz_sigma)
        self.fz_min_size = int(fz_min_size)
        self.color_thresh = float(color_thresh)
        self.color_thresh_nogeo = float(color_thresh_nogeo)
        self.lightness_weight = float(lightness_weight)
        self.geo_frac = float(geo_frac)
        self.jump_ratio = float(jump_ratio)
        self.crease_deg = float(crease_deg)
        self.min_area_frac = float(min_area_frac)
        self.background_area_frac = float(background_area_frac)
        self.background_border_frac = float(background_border_frac)
        if color_linkage not in ("average", "single"):
            raise ValueError(f"color_linkage must be 'average' or 'single', got {color_linkage!r}")
        self.color_linkage = color_linkage
        self.detect_planes = bool(detect_planes)
        self.plane_min_frac = float(plane_min_frac)
        self.plane_tol_spacing = float(plane_tol_spacing)
        self.object_max_frac = float(object_max_frac)
        self.normal_smooth_sigma = float(normal_smooth_sigma)
        self.keep_background = bool(keep_background)
        self.voxel = voxel
        self.min_overlap = float(min_overlap)
        self._cache: "OrderedDict[tuple, dict]" = OrderedDict()
        self._cache_size = int(cache_size)

    # ------------------------------------------------------------------ per-view analysis
    def _key(self, rgb, pts):
        import hashlib
        h = hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=12)
        if pts is not None:
            h.update(np.ascontiguousarray(pts[::7, ::7]).tobytes())
        return h.hexdigest()

    def _analyse(self, rgb: np.ndarray, pts: Optional[np.ndarray], valid: Optional[np.ndarray]):
        """Atoms, features, adjacency and the merged segment labels of one view (cached)."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise SegmenterError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
        rgb = rgb[..., :3]
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        H, W = rgb.shape[:2]
        use_geo = pts is not None
        if use_geo:
            pts = np.asarray(pts, np.float32)
            v = finite_points(pts)
            if valid is not None:
                v &= np.asarray(valid, bool)
            valid = v
            use_geo = valid.mean() > 0.05
        key = self._key(rgb, pts if use_geo else None)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        from skimage.segmentation import felzenszwalb
        sp = felzenszwalb(rgb, scale=self.fz_scale, sigma=self.fz_sigma,
                          min_size=self.fz_min_size).astype(np.int64)
        lab = _lab(rgb)
        planes = np.zeros((H, W), np.int32)
        if use_geo:
            ps = smooth_pointmap(pts, valid, self.normal_smooth_sigma)
            normals = pointmap_normals(ps, valid)
            eh, ev = geometric_edges(pts, valid, self.jump_ratio, self.crease_deg, normals,
                                     pts_smooth=ps)
            if self.detect_planes:
                planes = detect_planes(pts, valid, normals, min_frac=self.plane_min_frac,
                                       min_component_frac=self.plane_min_frac / 3.0,
                                       tol_spacing=self.plane_tol_spacing)
            # planar regions are cut from everything else
            pl = planes > 0
            eh &= (planes[:, :-1] == planes[:, 1:])
            ev &= (planes[:-1, :] == planes[1:, :])
            # geometric components of the non-planar pixels (objects after support removal)
            geo = _components(H, W, eh & ~pl[:, :-1], ev & ~pl[:-1, :])
            # atoms: superpixels split by geometry; a planar region is one atom
            eh_sp = eh & ((sp[:, :-1] == sp[:, 1:]) | pl[:, :-1])
            ev_sp = ev & ((sp[:-1, :] == sp[1:, :]) | pl[:-1, :])
            atoms = _components(H, W, eh_sp, ev_sp)
        else:
            normals = None
            eh = np.ones((H, W - 1), bool)
            ev = np.ones((H - 1, W), bool)
            atoms = sp
            geo = np.zeros((H, W), np.int64)
        atoms = relabel_consecutive(atoms + 1).astype(np.int64) - 1  # 0..A-1
        A = int(atoms.max()) + 1
        flat0 = atoms.ravel()
        atom_plane = np.zeros(A, np.int64)
        atom_plane[flat0] = planes.ravel()
        atom_geo = np.zeros(A, np.int64)
        atom_geo[flat0] = geo.ravel()
        geo_area = np.bincount(geo.ravel())
        atom_geo_area = geo_area[atom_geo].astype(np.float64)
        atom_geo_area[atom_plane > 0] = np.inf
        if not use_geo:
            atom_geo_area[:] = np.inf
        flat = atoms.ravel()
        area = np.bincount(flat, minlength=A).astype(np.float64)
        col = np.stack([np.bincount(flat, weights=lab[..., k].ravel(), minlength=A)
                        for k in range(3)], 1) / np.maximum(area, 1)[:, None]
        if use_geo:
            pv = np.where(valid[..., None], pts, 0.0).reshape(-1, 3)
            nval = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=A)
            xyz = np.stack([np.bincount(flat, weights=pv[:, k], minlength=A) for k in range(3)], 1)
            xyz /= np.maximum(nval, 1)[:, None]
        else:
            nval = np.zeros(A)
            xyz = None
        # adjacency between atoms with border statistics
        a1 = np.concatenate([atoms[:, :-1].ravel(), atoms[:-1, :].ravel()])
        a2 = np.concatenate([atoms[:, 1:].ravel(), atoms[1:, :].ravel()])
        conn = np.concatenate([eh.ravel(), ev.ravel()])
        diff = a1 != a2
        lo = np.minimum(a1[diff], a2[diff])
        hi = np.maximum(a1[diff], a2[diff])
        pk = lo * A + hi
        upk, inv, n_border = np.unique(pk, return_counts=True, return_inverse=True)
        n_conn = np.bincount(inv, weights=conn[diff].astype(np.float64), minlength=upk.size)
        ea, eb = upk // A, upk % A
        geo_ok = (n_conn / np.maximum(n_border, 1)) >= self.geo_frac
        w = np.array([self.lightness_weight, 1.0, 1.0])
        cdist = np.linalg.norm((col[ea] - col[eb]) * w, axis=1)
        info = dict(H=H, W=W, atoms=atoms, A=A, area=area, col=col, xyz=xyz, nval=nval,
                    atom_plane=atom_plane, atom_geo=atom_geo, atom_geo_area=atom_geo_area,
                    ea=ea, eb=eb, n_border=n_border, geo_ok=geo_ok, cdist=cdist, use_geo=use_geo,
                    pts=pts if use_geo else None, valid=valid if use_geo else None)
        info["labels"], info["seg_of_atom"] = self._merge(info)
        self._cache[key] = info
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return info

    def _merge(self, info):
        A, H, W = info["A"], info["H"], info["W"]
        ea, eb, cdist, geo_ok = info["ea"], info["eb"], info["cdist"], info["geo_ok"]
        area = info["area"]
        thr = self.color_thresh if info["use_geo"] else self.color_thresh_nogeo
        plane = info["atom_plane"]
        nonplane = (plane[ea] == 0) & (plane[eb] == 0)
        # a compact geometric component (an object cut from its support) is one segment
        compact = info["atom_geo_area"] < self.object_max_frac * H * W
        same_obj = nonplane & compact[ea] & (info["atom_geo"][ea] == info["atom_geo"][eb])
        if info["use_geo"] or self.color_linkage == "single":
            ok = nonplane & geo_ok & (cdist < thr)
            ok |= same_obj
            g = coo_matrix((np.ones(int(ok.sum()), np.int8), (ea[ok], eb[ok])), shape=(A, A))
            seg = connected_components(g, directed=False)[1].astype(np.int64)
        else:
            # colour only: no geometric cut can stop a chain of similar atoms across an object's
            # outline, so regions merge by average linkage (their means must stay close);
            # color_linkage="single" keeps the union of close atom pairs (an ablation baseline)
            w = np.array([self.lightness_weight, 1.0, 1.0])
            seg = merge_average_linkage(A, ea, eb, area, info["col"] * w, thr)
        # absorb small segments into their best geometrically connected neighbour
        min_area = self.min_area_frac * H * W
        for _ in range(2):
            seg_area = np.bincount(seg, weights=area, minlength=A)
            sa, sb = seg[ea], seg[eb]
            cross = (sa != sb) & geo_ok & nonplane
            small_a = seg_area[sa] < min_area
            small_b = seg_area[sb] < min_area
            cand_src = np.concatenate([sa[cross & small_a], sb[cross & small_b]])
            cand_dst = np.concatenate([sb[cross & small_a], sa[cross & small_b]])
            cand_w = np.concatenate([info["n_border"][cross & small_a],
                                     info["n_border"][cross & small_b]]).astype(np.float64)
            cand_c = np.concatenate([cdist[cross & small_a], cdist[cross & small_b]])
            if cand_src.size == 0:
                break
            # best neighbour per small segment: longest border, then closest colour
            o = np.lexsort((cand_c, -cand_w, cand_src))
            s_, d_ = cand_src[o], cand_dst[o]
            first = np.ones(s_.size, bool)
            first[1:] = s_[1:] != s_[:-1]
            remap = np.arange(A)
            remap[s_[first]] = d_[first]
            # resolve chains (small -> small): a few passes are enough
            for _ in range(4):
                remap = remap[remap]
            seg = remap[seg]
        seg_area = np.bincount(seg, weights=area, minlength=A)
        keep = seg_area >= min_area
        # large planar regions (RANSAC planes) are background unless keep_background
        if not self.keep_background:
            keep[seg[plane > 0]] = False
            if not info["use_geo"]:
                # no geometry: a very large segment that runs along much of the image border is
                # background (a large object filling the middle of the view stays an object)
                lab_px = seg[info["atoms"]]
                rim = np.concatenate([lab_px[0], lab_px[-1], lab_px[1:-1, 0], lab_px[1:-1, -1]])
                rim_frac = np.bincount(rim, minlength=A) / rim.size
                keep &= (seg_area < self.background_area_frac * H * W) | \
                    (rim_frac < self.background_border_frac)
        seg = np.where(keep[seg], seg + 1, 0)
        labels_atoms = relabel_consecutive(seg)
        labels = labels_atoms[info["atoms"]].astype(np.int32)
        return labels, labels_atoms

    # ------------------------------------------------------------------ Segmenter API
    def automatic_masks(self, rgb, pts=None, valid=None) -> np.ndarray:
        return self._analyse(rgb, pts, valid)["labels"].copy()

    def refine(self, rgb, pos_uv, neg_uv, prior_mask=None, pts=None, valid=None) -> np.ndarray:
        info = self._analyse(rgb, pts, valid)
        H, W = info["H"], info["W"]
        atoms, seg_of_atom = info["atoms"], info["seg_of_atom"]
        pos = as_uv(pos_uv)
        neg = as_uv(neg_uv)

        def pick(uv):
            if uv.shape[0] == 0:
                return np.zeros(0, np.int64)
            c = np.clip(np.round(uv[:, 0]).astype(np.int64), 0, W - 1)
            r = np.clip(np.round(uv[:, 1]).astype(np.int64), 0, H - 1)
            return atoms[r, c]

        pa, na = pick(pos), pick(neg)
        mask = np.zeros((H, W), bool) if prior_mask is None else np.asarray(prior_mask, bool).copy()
        if mask.shape != (H, W):
            raise SegmenterError(f"prior mask shape {mask.shape} != image {(H, W)}")
        if pa.size == 0 and na.size == 0:
            return mask
        # atom features for nearest-click assignment: colour and (scaled) 3D position
        feat = info["col"] * np.array([self.lightness_weight, 1.0, 1.0])
        if info["use_geo"]:
            xyz = info["xyz"]
            okx = info["nval"] > 0
            ext = np.nanmedian(np.linalg.norm(xyz[okx] - np.median(xyz[okx], 0), axis=1)) if okx.any() else 1.0
            geo = np.where(okx[:, None], xyz / max(ext, 1e-9) * 40.0, 0.0)
            feat = np.concatenate([feat, geo], 1)
        A = info["A"]
        sel_atoms = np.zeros(A, bool)
        # region of each click: its segment, or its atom plus similar connected neighbours
        def region(a):
            s = seg_of_atom[a]
            if s > 0:
                return seg_of_atom == s
            r = np.zeros(A, bool)
            r[a] = True
            ea, eb = info["ea"], info["eb"]
            near = (info["geo_ok"]) & (info["cdist"] < self.color_thresh)
            for _ in range(3):
                grow = (near & (r[ea] | r[eb]))
                r[ea[grow]] = True
                r[eb[grow]] = True
            return r

        pos_regions = [region(a) for a in pa]
        neg_regions = [region(a) for a in na]
        for r in pos_regions:
            sel_atoms |= r
        remove = np.zeros(A, bool)
        for a, r in zip(na, neg_regions):
            remove |= r
        # atoms wanted by both sides: nearest click in feature space decides
        both = sel_atoms & remove
        if both.any() and pa.size and na.size:
            idx = np.flatnonzero(both)
            dp = np.linalg.norm(feat[idx][:, None] - feat[pa][None], axis=2).min(1)
            dn = np.linalg.norm(feat[idx][:, None] - feat[na][None], axis=2).min(1)
            to_neg = dn < dp
            sel_atoms[idx[to_neg]] = False
            remove[idx[~to_neg]] = False
        sel_atoms[pa] = True
        remove[na] = True
        sel_atoms &= ~remove
        # removal also applies to the prior; a prior region touching a negative atom loses the
        # atoms nearer to the negative click than to the prior's positive clicks
        mask |= sel_atoms[atoms]
        mask &= ~remove[atoms]
        return mask
