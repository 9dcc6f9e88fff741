"""Multi-view Group Mapping (MGM): prompt -> cached object ids -> one consistent 3D segment.

:class:`GroupMapper` is built once per aligned scene (with its mask cache); building it only
indexes the labelled pixels, so a new scene is ready in milliseconds. :meth:`GroupMapper.warm`
does the rest, one unit at a time (a node calls it on a helper thread); whatever it has not done yet is
done when a prompt needs it:

* A 3D prompt is a k-nearest-neighbour vote over the valid world points of a strided pixel grid,
  with their cache labels: by a KD-tree (scipy ``cKDTree``) once ``warm()`` built it, before that
  by an exact window search in the organised pointmaps (a point within r of the prompt lies, in
  every view, inside a small window around the prompt's projection; see ``_neighbours``).
* An object's segment is computed on first use and kept: for every pixel of the object in every
  view a *multi-view consistency* vote: the pixel's world point is projected into every other
  view; a view that sees it (inside the image, valid surface there, point not behind that
  surface by more than the depth tolerance) agrees when it labels the pixel with the same
  object, and disagrees when it labels it background / another object or when the point floats
  in front of its surface (free-space violation); a pixel is dropped when the disagreeing views
  outnumber the agreeing ones; then isolated floaters are removed (26-connected components on a
  voxel grid; components smaller than ``floater_min_frac`` of the largest are dropped); the
  object's filtered points / colours / view indices / flat pixel indices are stored.

A prompt is then a KD-tree query plus a lookup (:meth:`GroupMapper.segment`), under a
millisecond for a 5-view 512 x 384 scene once warmed.  The ``view_masks`` path (arbitrary
per-view masks from interactive refinement) runs the same lifting + consistency + floater
removal on the fly.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .types import AlignedScene, MaskCache
from .voxels import NEIGHBOURS_HALF, auto_voxel_size, pack, unpack, voxel_keys

__all__ = ["Segment3D", "GroupMapper", "remove_floaters", "subtract_voxels", "voxel_components",
           "consistency_votes"]


@dataclass
class Segment3D:
    """A 3D segment: points (N,3) float32 world, colors (N,3) uint8, view_index (N,) int32 (the
    keyframe each point comes from), pixel_masks (V,H,W) bool (pixels kept after consistency),
    object_ids (the cache ids it was built from; empty for a view_masks segment)."""

    points: np.ndarray
    colors: np.ndarray
    view_index: np.ndarray
    pixel_masks: np.ndarray
    object_ids: List[int] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def is_empty(self) -> bool:
        return self.points.shape[0] == 0


def voxel_components(points: np.ndarray, voxel: float):
    """26-connected components of the occupied voxels of (N,3) points.

    Returns (comp (N,) component of each point, n_comp, point count per component, unique keys,
    component of each unique key). Compact voxel sets (bounding box at most 64 cells per
    occupied voxel) are labelled on a dense grid (scipy.ndimage.label), others through their
    sparse neighbour graph (scipy.sparse.csgraph); the components are the same."""
    keys = voxel_keys(points, voxel)
    uk, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
    m = uk.size
    q = unpack(uk)
    lo = q.min(0)
    dims = q.max(0) - lo + 1
    if float(np.prod(dims.astype(np.float64))) <= min(64.0 * m, 16e6):
        grid = np.zeros(tuple(int(d) for d in dims), bool)
        cells = tuple((q - lo).T)
        grid[cells] = True
        lab, nc = ndimage.label(grid, structure=np.ones((3, 3, 3), bool))
        comp_v = lab[cells].astype(np.int64) - 1
    else:
        rows, cols = [], []
        for off in NEIGHBOURS_HALF:
            nk = pack(q + off)
            pos = np.clip(np.searchsorted(uk, nk), 0, m - 1)
            hit = uk[pos] == nk
            rows.append(np.flatnonzero(hit))
            cols.append(pos[hit])
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        g = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(m, m))
        nc, comp_v = connected_components(g, directed=False)
    comp_pts = np.bincount(comp_v, weights=cnt, minlength=nc)
    return comp_v[inv.reshape(-1)], nc, comp_pts, uk, comp_v


def remove_floaters(points: np.ndarray, voxel: float, min_frac: float = 0.1,
                    min_points: int = 0) -> np.ndarray:
    """Keep-mask (N,) of points in voxel-grid components (26-connectivity) holding at least
    ``min_frac`` of the largest component's points (and ``min_points``)."""
    if points.shape[0] == 0:
        return np.zeros(0, bool)
    comp, nc, comp_pts, _, _ = voxel_components(points, voxel)
    if nc == 1:
        return np.ones(points.shape[0], bool)
    good = (comp_pts >= min_frac * comp_pts.max()) & (comp_pts >= min_points)
    return good[comp]


def subtract_voxels(points: np.ndarray, voxel: float, remove_keys: np.ndarray) -> np.ndarray:
    """Keep-mask (N,): drop points in ``remove_keys`` voxels, then drop every remaining component
    that touches a removed voxel unless it is the largest (the rest of a negative object that only
    the positive masks saw)."""
    keys = voxel_keys(points, voxel)
    keep = ~np.isin(keys, remove_keys)
    if not keep.any() or keep.all():
        return keep
    idx = np.flatnonzero(keep)
    comp, nc, comp_pts, uk, comp_v = voxel_components(points[idx], voxel)
    if nc == 1:
        return keep
    q = unpack(uk)
    rk = np.sort(remove_keys)
    touch = np.zeros(uk.size, bool)
    for off in np.concatenate([NEIGHBOURS_HALF, -NEIGHBOURS_HALF]):
        nk = pack(q + off)
        pos = np.clip(np.searchsorted(rk, nk), 0, rk.size - 1)
        touch |= rk[pos] == nk
    comp_touch = np.bincount(comp_v, weights=touch, minlength=nc) > 0
    drop_comp = comp_touch & (np.arange(nc) != int(np.argmax(comp_pts)))
    keep[idx[drop_comp[comp]]] = False
    return keep


def precompute_kept(scene: AlignedScene) -> Optional[np.ndarray]:
    """Store in ``scene.mask_cache.kept`` (and return) the pixels :class:`GroupMapper` keeps with
    its default settings (every object's consistency vote and floater filter, ~50 ms for 5 x
    512x384): published with the scene (the sign of the scene cloud's ``label``), it lets a
    segmentation node with the default settings cut each object from it at once. None (nothing
    stored) without a mask cache."""
    mc = getattr(scene, "mask_cache", None)
    if mc is None:
        return None
    mc.kept = GroupMapper(scene).kept
    return mc.kept


def _as_view_K(K, V):
    K = np.asarray(K, np.float64)
    if K.ndim == 2:
        K = np.broadcast_to(K, (V, 3, 3))
    return K


def consistency_votes(src_view: np.ndarray, points: np.ndarray, src_label: np.ndarray,
                      target_labels: np.ndarray, valid: np.ndarray, z_own: np.ndarray,
                      R_w2c: np.ndarray, t_w2c: np.ndarray, K: np.ndarray,
                      depth_tol_rel: float, depth_tol_abs: float, chunk: int = 1 << 21):
    """Agree / disagree counts (N,) of world points (N,3) seen from view ``src_view`` (N,) against
    every other view, batched over points and views (in chunks of ~``chunk`` point-view pairs).

    ``target_labels`` (V,H,W): a view agrees when its label at the projection equals
    ``src_label`` (N,) (pass bool masks and ``src_label`` True for mask consistency)."""
    V, H, W = valid.shape
    n = points.shape[0]
    agree = np.zeros(n, np.int16)
    disagree = np.zeros(n, np.int16)
    src_view = np.asarray(src_view).reshape(-1)
    # all views' world->camera rotations side by side: one (m,3) x (3,3V) float32 product gives
    # every point in every camera (30x faster than a batched (V,m,3) matmul in float64)
    M = np.concatenate(list(np.swapaxes(np.asarray(R_w2c, np.float64), 1, 2)), 1).astype(np.float32)
    t = np.asarray(t_w2c, np.float32)
    fx, fy = K[:, 0, 0].astype(np.float32), K[:, 1, 1].astype(np.float32)
    cx, cy = K[:, 0, 2].astype(np.float32), K[:, 1, 2].astype(np.float32)
    valid_flat, z_own_flat, target_flat = valid.reshape(-1), z_own.reshape(-1), target_labels.reshape(-1)
    step = max(1, chunk // max(V, 1))
    for s0 in range(0, n, step):
        P = np.asarray(points[s0:s0 + step], np.float32)
        m = P.shape[0]
        Xc = (P @ M).reshape(m, V, 3) + t                               # (m, V, 3)
        z = Xc[..., 2]
        front = z > 1e-9
        zs = np.where(front, z, 1.0)
        ui = np.round(fx * Xc[..., 0] / zs + cx).astype(np.int64)
        vi = np.round(fy * Xc[..., 1] / zs + cy).astype(np.int64)
        inside = front & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
        inside &= np.arange(V)[None] != src_view[s0:s0 + m, None]      # not against its own view
        ni, bi = np.nonzero(inside)
        if ni.size == 0:
            continue
        lin = (bi * H + vi[ni, bi]) * W + ui[ni, bi]                    # one linear index for every gather
        zsurf = np.where(valid_flat[lin], z_own_flat[lin], np.nan)      # NaN: no surface there
        tol = depth_tol_rel * zsurf + depth_tol_abs
        zi = z[ni, bi]
        on_surface = np.abs(zi - zsurf) <= tol                          # NaN compares False
        in_front = zi < zsurf - tol
        same = target_flat[lin] == src_label[s0 + ni]
        agree[s0:s0 + m] = np.bincount(ni[on_surface & same], minlength=m)
        disagree[s0:s0 + m] = np.bincount(ni[(on_surface & ~same) | in_front], minlength=m)
    return agree, disagree


class GroupMapper:
    """Multi-view Group Mapping over one :class:`AlignedScene` and its :class:`MaskCache`.

    Parameters: ``mask_cache`` (default ``scene.mask_cache``); ``kd_stride`` pixel stride of the
    grid of points a 3D prompt votes over; ``voxel`` floater-grid voxel (default 3 x median pixel spacing);
    ``depth_tol_rel`` / ``depth_tol_abs`` visibility tolerance ``rel * depth + abs`` (scene
    units); ``min_agree_frac`` a pixel is kept when agree >= min_agree_frac * (agree +
    disagree) (0.5: majority, ties kept); ``floater_min_frac`` see :func:`remove_floaters`;
    ``knn`` neighbours voted in :meth:`object_at_point`; ``use_kept``: cut each object from the
    mask cache's precomputed ``kept`` pixels (:func:`precompute_kept`) when it has them and the
    vote and filter settings are the defaults they were computed with (else computed here).
    """

    def __init__(self, scene: AlignedScene, mask_cache: Optional[MaskCache] = None,
                 kd_stride: int = 2, voxel: Optional[float] = None, depth_tol_rel: float = 0.02,
                 depth_tol_abs: float = 0.0, min_agree_frac: float = 0.5,
                 floater_min_frac: float = 0.1, knn: int = 8, consistency: bool = True,
                 use_kept: bool = False):
        cache = mask_cache if mask_cache is not None else scene.mask_cache
        self.scene = scene
        V, H, W = scene.pts3d.shape[:3]
        self.V, self.H, self.W = V, H, W
        self.valid = scene.valid_mask()
        self.labels = (np.asarray(cache.labels, np.int32) if cache is not None
                       else np.zeros((V, H, W), np.int32))
        if self.labels.shape != (V, H, W):
            raise ValueError(f"mask cache labels {self.labels.shape} != scene {(V, H, W)}")
        self.labels = np.where(self.valid, self.labels, np.int32(0)).astype(np.int32, copy=False)
        # the scene's own float32 points (no copy when they are float32 already); invalid pixels
        # (NaN) are never read: every lookup goes through ``valid``
        self._pts_flat = np.ascontiguousarray(scene.pts3d, dtype=np.float32).reshape(-1, 3)
        self._rgb_flat = np.asarray(scene.rgb, np.uint8).reshape(-1, 3)
        self.K = _as_view_K(scene.K, V)
        poses = np.asarray(scene.poses, np.float64)
        R = poses[:, :3, :3]
        # similarity-safe inverse of camera-to-world
        Rinv = np.linalg.inv(R)
        self.R_w2c = Rinv
        self.t_w2c = -np.einsum("vij,vj->vi", Rinv, poses[:, :3, 3])
        self._w2c_scale = np.cbrt(np.abs(np.linalg.det(Rinv)))  # 1 for rigid poses
        # each pixel's depth in its own view (float32 batched matmul: 6x faster than einsum)
        P = self._pts_flat.reshape(V, H * W, 3)
        self.z_own = ((P @ Rinv[:, 2, :, None].astype(np.float32))[..., 0]
                      + self.t_w2c[:, 2:3].astype(np.float32)).reshape(V, H, W)
        self.depth_tol_rel = float(depth_tol_rel)
        self.depth_tol_abs = float(depth_tol_abs)
        self.min_agree_frac = float(min_agree_frac)
        self.floater_min_frac = float(floater_min_frac)
        self.consistency = bool(consistency)
        self.knn = int(knn)
        self.voxel = float(voxel) if voxel is not None else auto_voxel_size(scene.pts3d, self.valid, 3.0)
        self.default_max_dist = 3.0 * self.voxel
        self.kd_stride = max(1, int(kd_stride))
        self._pts_vhw = self._pts_flat.reshape(V, H, W, 3)
        # per-object consistency-filtered segments, computed on first use (or by warm())
        self._lock = threading.RLock()
        self._objects: Dict[int, dict] = {}
        self._raw_keys: Dict[int, np.ndarray] = {}
        self._tree: Optional[cKDTree] = None  # over grid_points(), built by warm() / build_index()
        self._tree_labels = np.zeros(0, np.int32)
        self._index_raw_pixels()
        # use_kept: the objects are cut from the mask cache's precomputed ``kept`` pixels, which
        # hold for the vote and filter settings precompute_kept used (this class's defaults)
        filter_settings = (voxel, self.depth_tol_rel, self.depth_tol_abs, self.min_agree_frac,
                           self.floater_min_frac, self.consistency)
        kept = getattr(cache, "kept", None) if use_kept and filter_settings == _DEFAULT_FILTER else None
        self._kept_flat = None
        if kept is not None and np.shape(kept) == (V, H, W):
            self._kept_flat = np.asarray(kept, bool).reshape(-1)

    # ------------------------------------------------------------------ internals
    def _lift_consistent(self, flat: np.ndarray, labels: np.ndarray, target) -> np.ndarray:
        """The flat pixel indices (into V*H*W) of ``flat`` that pass the consistency vote: one
        batched vote, each pixel with its label in ``labels`` against ``target`` (V,H,W)."""
        if flat.size == 0 or not self.consistency:
            return flat
        ag, dis = consistency_votes(flat // (self.H * self.W), self._pts_flat[flat], labels, target, self.valid,
                                    self.z_own, self.R_w2c, self.t_w2c, self.K, self.depth_tol_rel,
                                    self.depth_tol_abs)
        ok = ag.astype(np.float32) >= self.min_agree_frac * (ag + dis).astype(np.float32)
        return flat[ok]

    def _defloat(self, flat: np.ndarray) -> np.ndarray:
        if flat.size == 0 or self.floater_min_frac <= 0:
            return flat
        keep = remove_floaters(self._pts_flat[flat], self.voxel, self.floater_min_frac)
        return flat[keep]

    def _pack(self, flat: np.ndarray) -> dict:
        flat = np.sort(flat)
        pts = self._pts_flat[flat]
        return {"flat": flat, "points": pts, "colors": self._rgb_flat[flat],
                "view": (flat // (self.H * self.W)).astype(np.int32)}

    def _index_raw_pixels(self):
        """Every object's raw (unfiltered) labelled pixels, from one sort of the labels."""
        lab_all = self.labels.ravel()
        nz = np.flatnonzero(lab_all > 0)
        raw_order = nz[np.argsort(lab_all[nz], kind="stable")]  # per object: ascending flat index
        ids, starts, counts = np.unique(lab_all[raw_order], return_index=True, return_counts=True)
        self._raw = {int(i): raw_order[a:a + c] for i, a, c in zip(ids, starts, counts)}

    def _object(self, i: int) -> dict:
        """Object ``i``'s consistency-filtered, floater-free segment (computed once, on first use)."""
        with self._lock:
            ob = self._objects.get(i)
            if ob is not None:
                return ob
            raw = self._raw[i]
            if self._kept_flat is not None:
                flat = raw[self._kept_flat[raw]]
            else:
                flat = self._defloat(self._lift_consistent(raw, np.full(raw.size, i, np.int32), self.labels))
            ob = self._objects[i] = self._pack(flat)
            return ob

    @property
    def uses_kept(self) -> bool:
        """True when the objects are cut from the mask cache's precomputed ``kept`` pixels."""
        return self._kept_flat is not None

    def _negative_keys(self, ids: Iterable[int]) -> Optional[np.ndarray]:
        """Sorted voxel keys of the raw (unfiltered) masks of ``ids``: what a negative prompt on
        them removes (computed once per object, on its first negative use); None when no id is known."""
        ks = []
        with self._lock:
            for i in ids:
                if i not in self._raw:
                    continue
                k = self._raw_keys.get(i)
                if k is None:
                    k = self._raw_keys[i] = np.unique(voxel_keys(self._pts_flat[self._raw[i]], self.voxel))
                ks.append(k)
        return np.unique(np.concatenate(ks)) if ks else None

    def pending_objects(self) -> List[int]:
        """Cached ids whose segment is not computed yet, largest first (the order warm() takes)."""
        with self._lock:
            todo = [i for i in self._raw if i not in self._objects]
        return sorted(todo, key=lambda i: -self._raw[i].size)

    def pending_work(self, index: bool = True) -> int:
        """Units of work :meth:`warm` has left: the KD-tree (when not built; with ``index``) and
        the pending objects."""
        return int(index and self._tree is None) + len(self.pending_objects())

    def warm(self, max_units: Optional[int] = None, index: bool = True, negatives: bool = True) -> int:
        """Do up to ``max_units`` (None: all) units of the work left: first the KD-tree that then
        answers 3D prompts (until it exists the window search does, with the same answers; not
        with ``index=False``: :meth:`build_index` on another thread), then the pending object
        segments (and their negative keys), largest first. Returns the units left (as
        :meth:`pending_work` with the same ``index``). ``negatives=False``: not the objects'
        negative-prompt keys (computed on the first negative prompt then). A node calls it off
        its worker thread so that no click pays for it."""
        n = None if max_units is None else max(0, int(max_units))
        if index and self._tree is None and (n is None or n > 0):
            self.build_index()
            n = None if n is None else n - 1
        todo = self.pending_objects()
        n = len(todo) if n is None else n
        for i in todo[:n]:
            self._object(i)
            if negatives:
                self._negative_keys([i])
        return self.pending_work(index)

    def prepare_negatives(self) -> None:
        """Compute every object's negative-prompt keys now (else on its first negative prompt)."""
        for i in self.object_ids():
            self._negative_keys([i])

    def build_index(self) -> None:
        """Build the KD-tree now (no-op when built). Thread-safe, and scipy releases the GIL while
        building, so a node runs it on a thread of its own while its worker answers clicks (the
        largest unit of :meth:`warm`: 50-70 ms for 5 x 512x384)."""
        if self._tree is None:
            self._build_tree()

    def _build_tree(self) -> None:
        pts, labels = self.grid_points()
        # an unbalanced tree with larger leaves builds faster (~30 ms for 5 x 512x384 at stride 2)
        # and answers the few prompt queries as fast
        tree = cKDTree(pts, leafsize=64, balanced_tree=False, compact_nodes=False) if len(pts) else None
        with self._lock:
            self._tree_labels = labels
            self._tree = tree if tree is not None else False

    @property
    def kept(self) -> np.ndarray:
        """(V,H,W) bool: the labelled pixels kept by the consistency vote and the floater filter
        (computes every pending object's segment)."""
        out = np.zeros(self.V * self.H * self.W, bool)
        for i in self.object_ids():
            out[self._object(i)["flat"]] = True
        return out.reshape(self.V, self.H, self.W)

    def _neighbours(self, p: np.ndarray, max_dist: float, stride: int):
        """Distances (sorted) and labels of the valid scene points (pixels on the ``stride`` grid)
        within ``max_dist`` of world point p.

        Exact without a spatial index: a point within r of p projects, in view b, within
        f * r * (1 + |x/z|) / (z - r) pixels (per axis) of p's projection, so each view is
        searched in that window only (the whole image when p is within r of the camera plane)."""
        s = max(1, int(stride))
        pc = np.einsum("vij,j->vi", self.R_w2c, p) + self.t_w2c
        pts, labs = [], []
        for b in range(self.V):
            x, y, z = pc[b]
            r = max_dist * self._w2c_scale[b]  # max_dist in this camera's units
            if z + r <= 0:
                continue  # every point within max_dist is behind this camera
            if z - r <= 1e-9 * max(abs(z), 1.0):
                r0, r1, c0, c1 = 0, self.H, 0, self.W
            else:
                fx, fy, cx, cy = self.K[b, 0, 0], self.K[b, 1, 1], self.K[b, 0, 2], self.K[b, 1, 2]
                u, v = fx * x / z + cx, fy * y / z + cy
                ru = abs(fx) * r * (1.0 + abs(x / z)) / (z - r) + 1.0
                rv = abs(fy) * r * (1.0 + abs(y / z)) / (z - r) + 1.0
                if not (np.isfinite(ru) and np.isfinite(rv)) or u + ru < 0 or v + rv < 0 \
                        or u - ru > self.W - 1 or v - rv > self.H - 1:
                    continue
                r0, r1 = max(0, int(np.floor(v - rv))), min(self.H, int(np.ceil(v + rv)) + 1)
                c0, c1 = max(0, int(np.floor(u - ru))), min(self.W, int(np.ceil(u + ru)) + 1)
            r0, c0 = -(-r0 // s) * s, -(-c0 // s) * s  # on the stride grid (rows / cols multiple of s)
            ok = self.valid[b, r0:r1:s, c0:c1:s]
            if not ok.any():
                continue
            pts.append(self._pts_vhw[b, r0:r1:s, c0:c1:s][ok])
            labs.append(self.labels[b, r0:r1:s, c0:c1:s][ok])
        if not pts:
            return np.zeros(0), np.zeros(0, np.int32)
        q = np.concatenate(pts).astype(np.float64)
        lab = np.concatenate(labs)
        d = np.sqrt(((q - p) ** 2).sum(1))
        near = np.flatnonzero(d <= max_dist)
        order = near[np.argsort(d[near], kind="stable")]
        return d[order], lab[order]

    def _make_segment(self, parts: List[dict], object_ids: List[int],
                      remove_keys: Optional[np.ndarray] = None) -> Segment3D:
        if len(parts) == 1:
            p = parts[0]
            flat, pts, col, vw = p["flat"], p["points"], p["colors"], p["view"]
        elif parts:
            flat = np.concatenate([p["flat"] for p in parts])
            pts = np.concatenate([p["points"] for p in parts])
            col = np.concatenate([p["colors"] for p in parts])
            vw = np.concatenate([p["view"] for p in parts])
        else:
            flat = np.zeros(0, np.int64)
            pts = np.zeros((0, 3), np.float32)
            col = np.zeros((0, 3), np.uint8)
            vw = np.zeros(0, np.int32)
        if remove_keys is not None and remove_keys.size and flat.size:
            k = subtract_voxels(pts, self.voxel, remove_keys)
            if not k.all():
                flat, pts, col, vw = flat[k], pts[k], col[k], vw[k]
        masks = np.zeros(self.V * self.H * self.W, bool)
        masks[flat] = True
        return Segment3D(points=pts, colors=col, view_index=vw,
                         pixel_masks=masks.reshape(self.V, self.H, self.W),
                         object_ids=list(object_ids))

    # ------------------------------------------------------------------ public API
    def object_ids(self) -> List[int]:
        return sorted(self._raw)

    def object_at_point(self, p, max_dist: Optional[float] = None) -> int:
        """Cache id under a 3D point: majority among the ``knn`` nearest points (of the
        ``kd_stride`` pixel grid) within ``max_dist`` (default 3 voxels); 0 when none is that close
        or background wins; a tie goes to the label of the nearest tied point. Answered by the
        KD-tree once :meth:`warm` or :meth:`build_index` built it, by the window search before (same neighbours)."""
        p = np.asarray(p, np.float64).reshape(3)
        if not np.isfinite(p).all():
            return 0
        md = self.default_max_dist if max_dist is None else float(max_dist)
        tree = self._tree
        if tree is False:  # no valid point at all
            return 0
        if tree is not None:
            d, i = tree.query(p, k=self.knn, distance_upper_bound=md)
            d, i = np.atleast_1d(d), np.atleast_1d(i)
            labs = self._tree_labels[i[np.isfinite(d)]]
        else:
            # a small radius first: when it already holds knn points they are the knn nearest
            r1 = min(md, 1.5 * self.voxel)
            d, labs = self._neighbours(p, r1, self.kd_stride)
            if d.size < self.knn and r1 < md:
                _, labs = self._neighbours(p, md, self.kd_stride)
            labs = labs[:self.knn]
        if labs.size == 0:
            return 0
        vals, cnt = np.unique(labs, return_counts=True)
        best = vals[cnt == cnt.max()]
        if best.size == 1:
            return int(best[0])
        return int(labs[np.isin(labs, best)][0])  # labs are ordered by distance

    def grid_points(self):
        """(points (M,3) float32, labels (M,) int32) of the valid pixels on the ``kd_stride`` grid:
        the points :meth:`object_at_point` votes over (for brute-force references)."""
        sub = np.zeros((self.V, self.H, self.W), bool)
        sub[:, ::self.kd_stride, ::self.kd_stride] = True
        sub &= self.valid
        return self._pts_vhw[sub], self.labels[sub]

    def nearest_distance(self, p, max_dist: float) -> float:
        """Distance from world point p to a valid scene point within ``max_dist``, or inf when
        there is none (exact). The nearest of the ``kd_stride`` grid when that grid has one (at
        most a grid step farther than the true nearest, and 4x cheaper), else of every pixel."""
        p = np.asarray(p, np.float64).reshape(3)
        if not np.isfinite(p).all():
            return float("inf")
        tree = self._tree
        if tree:
            d, _ = tree.query(p, k=1, distance_upper_bound=float(max_dist))
            if np.isfinite(d):
                return float(d)
        for stride in dict.fromkeys((self.kd_stride, 1) if not tree else (1,)):
            d, _ = self._neighbours(p, float(max_dist), stride)
            if d.size:
                return float(d[0])
        return float("inf")

    def object_at_pixel(self, view: int, u: float, v: float) -> int:
        """Cache id at pixel (u = column, v = row) of keyframe ``view`` (0 if outside/none)."""
        if not (0 <= int(view) < self.V):
            return 0
        c, r = int(round(float(u))), int(round(float(v)))
        if not (0 <= c < self.W and 0 <= r < self.H):
            return 0
        return int(self.labels[int(view), r, c])

    def point_at_pixel(self, view: int, u: float, v: float) -> Optional[np.ndarray]:
        c, r = int(round(float(u))), int(round(float(v)))
        if not (0 <= int(view) < self.V and 0 <= c < self.W and 0 <= r < self.H):
            return None
        if not self.valid[int(view), r, c]:
            return None
        return self.scene.pts3d[int(view), r, c].astype(np.float64)

    def segment(self, object_ids: Sequence[int], negative_ids: Iterable[int] = (),
                view_masks: Optional[np.ndarray] = None) -> Segment3D:
        """Merge the consistency-filtered masks of ``object_ids`` into one 3D segment.

        ``negative_ids``: those objects are excluded, and points of the selected objects that
        fall into voxels occupied by a negative object's (unfiltered) masks are removed, with any
        remaining component touching them except the largest (a neighbour wrongly merged
        into a selected object's mask in some view).  ``view_masks`` (V,H,W) bool: use these
        per-view masks instead of cache ids (lifting + consistency + floaters run now)."""
        neg = {int(i) for i in negative_ids if int(i) > 0}
        if view_masks is not None:
            return self.segment_from_masks(view_masks, negative_ids=neg, object_ids=object_ids)
        ids = [int(i) for i in object_ids if int(i) > 0 and int(i) not in neg and int(i) in self._raw]
        ids = list(dict.fromkeys(ids))
        parts = [self._object(i) for i in ids]
        rk = self._negative_keys(sorted(neg)) if neg and parts else None
        return self._make_segment(parts, ids, rk)

    def segment_from_masks(self, view_masks: np.ndarray, negative_ids: Iterable[int] = (),
                           object_ids: Sequence[int] = ()) -> Segment3D:
        """The (slower) arbitrary-mask path: lift masks (V,H,W) bool, check consistency against
        the same masks in the other views, remove floaters (and negative objects' voxels)."""
        m = np.asarray(view_masks, bool)
        if m.shape != (self.V, self.H, self.W):
            raise ValueError(f"view_masks shape {m.shape} != {(self.V, self.H, self.W)}")
        m = m & self.valid
        flat = np.flatnonzero(m.ravel())
        flat = self._defloat(self._lift_consistent(flat, np.ones(flat.size, bool), m))
        rk = self._negative_keys(int(i) for i in negative_ids)
        return self._make_segment([self._pack(flat)], [int(i) for i in object_ids], rk)


# the settings of the vote and the floater filter that precompute_kept uses (GroupMapper's
# defaults): a mapper with other settings computes its objects instead of cutting them
_FILTER_PARAMS = ("voxel", "depth_tol_rel", "depth_tol_abs", "min_agree_frac", "floater_min_frac", "consistency")
_DEFAULT_FILTER = tuple(inspect.signature(GroupMapper.__init__).parameters[n].default for n in _FILTER_PARAMS)
