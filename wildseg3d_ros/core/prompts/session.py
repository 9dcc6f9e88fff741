"""Interactive prompt session (ROS-free) behind the segmentation node.

An :class:`InteractiveSession` holds the objects selected so far.  Each selection has a
``label`` (int, distinct per object), its positive / negative clicks (3D points from rviz2 and/or
pixel clicks ``(view, u, v)`` on a keyframe), its current per-view masks and a refinement round
count.

* The **first positive click** of an object answers from the mask cache: the cached object id
  under the click (``GroupMapper.object_at_point`` / ``object_at_pixel``) goes through Multi-view
  Group Mapping (``GroupMapper.segment``) -- the fast path.
* **Later clicks** on the same object refine it: ``segmenter.refine`` in the clicked view with all
  clicks so far that this view sees (3D clicks are projected, pixel clicks of other views are
  lifted through their pointmap and projected) and the previous mask as prior; the refined mask is
  then propagated to the other keyframes by reprojection through the aligned pointmaps (its pixels
  are lifted to 3D and voxel-hashed; a pixel of another view joins when its 3D point falls in one
  of those voxels, and pixels of the previous mask whose 3D point falls in a voxel the refinement
  removed -- and no kept voxel -- leave), then MGM runs again with these view masks.
* Without a segmenter, later clicks edit the set of cached object ids (positive adds the id under
  the click, negative removes it / marks it as a competing object).

A negative click with no positive one, a click outside every keyframe, or a first click on no
cached object (without a segmenter) raises :class:`PromptError` (a ``ValueError``); the session
state is left unchanged.  The session is thread-safe (one lock).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from ..types import AlignedScene
from ..voxels import dilate_keys, isin_sorted, voxel_keys

__all__ = ["PromptError", "Click", "Selection", "InteractiveSession", "propagate_mask",
           "combine_results"]

class PromptError(ValueError):
    """A prompt cannot be answered (negative click first, click outside the scene, ...)."""


@dataclass
class Click:
    """One click: ``point`` world (3,) or None (pixel click on an invalid pixel); ``view`` and
    ``uv`` the keyframe pixel (for a 3D click: its projection in the view that sees it best);
    ``object_id`` the cached object id under it (0 = none); ``kind`` 'point' or 'pixel'."""

    positive: bool
    point: Optional[np.ndarray]
    view: Optional[int]
    uv: Optional[np.ndarray]
    object_id: int = 0
    kind: str = "point"


@dataclass
class Selection:
    """One selected object: clicks, cached ids, current per-view masks, last result."""

    label: int
    clicks: List[Click] = field(default_factory=list)
    object_ids: set = field(default_factory=set)
    negative_ids: set = field(default_factory=set)
    view_masks: Optional[np.ndarray] = None  # (V, H, W) bool
    rounds: int = 0  # refinement rounds after the first click
    result: object = None  # Segment3D

    @property
    def num_positive(self) -> int:
        return sum(1 for c in self.clicks if c.positive)


def pixel_spacing(pts: np.ndarray, valid: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Median 3D distance between horizontally / vertically adjacent valid pixels of one view
    (restricted to ``mask`` when given and non-empty)."""
    ok = valid if mask is None or not (mask & valid).any() else (mask & valid)
    dh = np.linalg.norm(pts[:, 1:] - pts[:, :-1], axis=-1)[ok[:, 1:] & ok[:, :-1]]
    dv = np.linalg.norm(pts[1:] - pts[:-1], axis=-1)[ok[1:] & ok[:-1]]
    d = np.concatenate([dh, dv])
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if d.size else 0.0


def propagate_mask(pts3d: np.ndarray, valid: np.ndarray, view: int, mask: np.ndarray,
                   prev_masks: Optional[np.ndarray] = None, voxel: Optional[float] = None,
                   voxel_factor: float = 3.0, dilate: bool = False,
                   keys: Optional[np.ndarray] = None, origin: Optional[np.ndarray] = None,
                   assign_unknown: bool = True) -> np.ndarray:
    """Propagate a refined mask of ``view`` to all views by reprojection through the pointmaps.

    pts3d (V,H,W,3) world, valid (V,H,W), mask (H,W) bool (the refined mask of ``view``),
    prev_masks (V,H,W) bool or None (the previous masks).  The refined mask's valid pixels are
    lifted to 3D and voxel-hashed (voxel edge ``voxel``, default ``voxel_factor`` x the pixel
    spacing inside the mask); so are the pixels the refinement *removed* from the previous mask
    of ``view``.  For every other view: a pixel joins when its 3D point lies in a kept voxel
    (or its 27-neighbourhood with ``dilate``) unless it lies in a removed voxel that no kept
    voxel shares; a pixel of the previous mask leaves when it lies in (the neighbourhood of) a
    removed voxel and in no kept voxel.  With ``assign_unknown`` the remaining previous-mask
    pixels that are in neither set (parts the refined view does not see, e.g. the far side of a
    wrongly merged neighbour) leave when their 3D point is nearer to the removed points than to
    the kept ones (KD-trees over one point per voxel).  ``keys`` / ``origin`` may pass precomputed voxel keys
    of all pixels for this voxel size.  Returns (V,H,W) bool; the mask of ``view`` is ``mask``.
    """
    V, H, W = valid.shape
    mask = np.asarray(mask, bool)
    new = np.zeros((V, H, W), bool) if prev_masks is None else np.asarray(prev_masks, bool).copy()
    new[view] = mask
    if voxel is None:
        sp = pixel_spacing(pts3d[view], valid[view], mask)
        if sp <= 0:
            return new
        voxel = voxel_factor * sp
    if origin is None:
        fin = pts3d[valid]
        origin = fin.min(0).astype(np.float64) if fin.size else np.zeros(3)
    if keys is None:
        keys = voxel_keys(pts3d, voxel, origin)  # invalid pixels' keys are never read (masked by valid)
    kept = np.unique(keys[view][mask & valid[view]])
    removed_px = (np.zeros((H, W), bool) if prev_masks is None
                  else np.asarray(prev_masks[view], bool) & ~mask)
    removed = np.unique(keys[view][removed_px & valid[view]])
    removed_only = removed[~isin_sorted(removed, kept)]
    kept_near = dilate_keys(kept) if dilate else kept
    removed_near = dilate_keys(removed_only) if dilate else removed_only
    if kept.size == 0 and removed_only.size == 0:
        return new
    trees = None
    if assign_unknown and removed_only.size:
        from scipy.spatial import cKDTree

        def centres(px):
            k = keys[view][px & valid[view]]
            p = pts3d[view][px & valid[view]].astype(np.float64)
            _, first = np.unique(k, return_index=True)
            return p[first]

        pk = centres(mask)
        pr = centres(removed_px)
        if len(pk) and len(pr):
            trees = (cKDTree(pk), cKDTree(pr))
    for w in range(V):
        if w == view:
            continue
        k = keys[w]
        ok = valid[w]
        in_kept = isin_sorted(k, kept)
        in_kept_near = in_kept if not dilate else isin_sorted(k, kept_near)
        in_rem = isin_sorted(k, removed_only)
        in_rem_near = in_rem if not dilate else isin_sorted(k, removed_near)
        add = in_kept_near & ~(in_rem & ~in_kept) & ok
        remove = in_rem_near & ~in_kept & ok
        new[w] = (new[w] & ~remove) | add
        if trees is not None:
            # previous-mask pixels neither refinement kept nor removed (parts the refined view
            # does not see): they follow the nearer evidence in 3D
            unknown = new[w] & ~in_kept & ~in_rem & ok
            if unknown.any():
                q = pts3d[w][unknown].astype(np.float64)
                dk, _ = trees[0].query(q)
                dr, _ = trees[1].query(q)
                drop = np.zeros((H, W), bool)
                drop[unknown] = dr < dk
                new[w] &= ~drop
    return new


def combine_results(results) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate selection results ``[(label, Segment3D)]`` into one labelled cloud: points
    (N, 3) float32, colours (N, 3) uint8, labels (N,) int32 (the selection label of each point)."""
    pts, cols, labs = [], [], []
    for label, res in results:
        p = np.asarray(res.points, np.float32).reshape(-1, 3)
        pts.append(p)
        cols.append(np.asarray(res.colors).reshape(-1, 3).astype(np.uint8, copy=False))
        labs.append(np.full(len(p), label, np.int32))
    if not pts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(0, np.int32)
    return np.concatenate(pts), np.concatenate(cols), np.concatenate(labs)


class InteractiveSession:
    """Prompt session over an aligned scene (see module docstring).

    scene: :class:`AlignedScene` with its ``mask_cache``; mapper: ``GroupMapper`` over it;
    segmenter: a :class:`~wildseg3d_ros.core.presegment.base.Segmenter` for refinement, or None
    (cache-only refinement).  ``max_click_dist``: distance passed to ``object_at_point`` (None:
    the mapper's default).  ``visibility_tol``: relative depth tolerance used to decide that a
    view sees a 3D point (plus 2 pixel footprints).  ``voxel`` / ``voxel_factor`` / ``dilate``:
    propagation voxel (see :func:`propagate_mask`).
    """

    def __init__(self, scene: AlignedScene, mapper, segmenter=None,
                 max_click_dist: Optional[float] = None, visibility_tol: float = 0.03,
                 voxel: Optional[float] = None, voxel_factor: float = 3.0, dilate: bool = False):
        self.scene = scene
        self.mapper = mapper
        self.segmenter = segmenter
        self.max_click_dist = max_click_dist
        self.visibility_tol = float(visibility_tol)
        self.voxel = voxel
        self.voxel_factor = float(voxel_factor)
        self.dilate = bool(dilate)
        # the mapper's validity when it was built on this very scene (the same arrays): computed once
        same = getattr(mapper, "scene", None) is scene and getattr(mapper, "valid", None) is not None
        self._valid = mapper.valid if same else scene.valid_mask()
        self._keys_cache: Tuple[Optional[float], Optional[np.ndarray]] = (None, None)
        self._lock = threading.RLock()
        self._selections: List[Selection] = []
        self._current: Optional[Selection] = None
        self._next_label = 1

    @functools.cached_property
    def _pts(self) -> np.ndarray:
        """(V,H,W,3) float32 world points, NaN where invalid (built on the first refinement: a
        click answered from the mask cache never needs it)."""
        return np.where(self._valid[..., None], self.scene.pts3d, np.nan).astype(np.float32, copy=False)

    @functools.cached_property
    def _origin(self) -> np.ndarray:
        """Voxel-grid origin of the propagation keys: the scene's minimum corner."""
        # per coordinate (a reduction over the length-3 axis of all points is ~5x slower)
        return (np.array([np.nanmin(self._pts[..., k]) for k in range(3)], np.float64)
                if self._valid.any() else np.zeros(3))

    # ------------------------------------------------------------------ public API
    @property
    def selections(self) -> List[Selection]:
        return list(self._selections)

    @property
    def current_label(self) -> Optional[int]:
        return None if self._current is None else self._current.label

    def reset(self) -> None:
        """Forget every selection; labels restart at 1."""
        with self._lock:
            self._selections = []
            self._current = None
            self._next_label = 1

    def select(self, label: int) -> None:
        """Make an existing selection the one that further clicks refine."""
        with self._lock:
            self._current = self._get(label)

    def results(self):
        """[(label, Segment3D)] of every selection, in creation order."""
        with self._lock:
            return [(s.label, s.result) for s in self._selections if s.result is not None]

    def combined_cloud(self):
        """All selections' points (N,3) float32, colors (N,3) uint8, labels (N,) int32."""
        with self._lock:
            return combine_results(self.results())

    def add_point_prompt(self, p_world, positive: bool, new_object: bool = False,
                         label: Optional[int] = None):
        """A 3D click (world frame).  Returns the updated Segment3D of the affected object."""
        p = np.asarray(p_world, np.float64).reshape(-1)
        if p.shape != (3,) or not np.isfinite(p).all():
            raise PromptError(f"a 3D prompt must be 3 finite numbers, got {p_world!r}")
        with self._lock:
            view, uv = self._best_view(p)
            kw = {} if self.max_click_dist is None else {"max_dist": self.max_click_dist}
            oid = int(self.mapper.object_at_point(p, **kw))
            click = Click(bool(positive), p, view, uv, oid, "point")
            return self._handle(click, new_object, label)

    def add_pixel_prompt(self, view: int, u: float, v: float, positive: bool,
                         new_object: bool = False, label: Optional[int] = None):
        """A click on keyframe ``view`` at column ``u``, row ``v``."""
        V = self.scene.num_views
        H, W = self.scene.image_shape
        if not 0 <= int(view) < V:
            raise PromptError(f"view {view} out of range (scene has {V} keyframes)")
        if not (0 <= u <= W - 1 and 0 <= v <= H - 1):
            raise PromptError(f"pixel ({u}, {v}) outside the {W}x{H} keyframe")
        view = int(view)
        with self._lock:
            p = self._lift(view, u, v)
            oid = int(self.mapper.object_at_pixel(view, u, v))
            click = Click(bool(positive), p, view, np.array([u, v], np.float64), oid, "pixel")
            return self._handle(click, new_object, label)

    # ------------------------------------------------------------------ geometry helpers
    def _get(self, label: int) -> Selection:
        for s in self._selections:
            if s.label == int(label):
                return s
        raise PromptError(f"no selected object with label {label}")

    def _lift(self, view: int, u: float, v: float) -> Optional[np.ndarray]:
        """World point under a pixel (nearest valid pixel within 2 px), or None."""
        H, W = self.scene.image_shape
        r0, c0 = int(round(v)), int(round(u))
        r = np.clip(np.arange(r0 - 2, r0 + 3), 0, H - 1)
        c = np.clip(np.arange(c0 - 2, c0 + 3), 0, W - 1)
        rr, cc = np.meshgrid(r, c, indexing="ij")
        ok = self._valid[view][rr, cc]
        if not ok.any():
            return None
        d = (rr - v) ** 2 + (cc - u) ** 2
        d = np.where(ok, d, np.inf)
        i = np.unravel_index(np.argmin(d), d.shape)
        return self.scene.pts3d[view][rr[i], cc[i]].astype(np.float64)

    def _project(self, p: np.ndarray):
        """p (3,) -> uv (V,2), z (V,), visible (V,) bool, score (V,) (lower = better)."""
        sc = self.scene
        V = sc.num_views
        H, W = sc.image_shape
        R = sc.poses[:, :3, :3]
        t = sc.poses[:, :3, 3]
        pc = np.einsum("vji,vj->vi", R, p[None] - t)  # R^T (p - t)
        z = pc[:, 2]
        zs = np.where(np.abs(z) < 1e-12, 1e-12, z)
        u = sc.K[:, 0, 0] * pc[:, 0] / zs + sc.K[:, 0, 2]
        v = sc.K[:, 1, 1] * pc[:, 1] / zs + sc.K[:, 1, 2]
        uv = np.stack([u, v], -1)
        inside = (z > 0) & (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)
        ci = np.clip(np.round(u), 0, W - 1).astype(np.int64)
        ri = np.clip(np.round(v), 0, H - 1).astype(np.int64)
        ok = inside & self._valid[np.arange(V), ri, ci]
        q = np.where(ok[:, None], sc.pts3d[np.arange(V), ri, ci], np.nan).astype(np.float64)
        d = np.linalg.norm(np.nan_to_num(q - p[None], nan=np.inf), axis=1)
        tol = self.visibility_tol * np.abs(z) + 2.0 * np.abs(z) / np.maximum(sc.K[:, 0, 0], 1e-9)
        visible = ok & (d <= tol)
        border = np.minimum.reduce([u, v, W - 1 - u, H - 1 - v]) / max(min(H, W), 1)
        score = np.where(inside, d / np.maximum(tol, 1e-12) - 0.5 * np.clip(border, 0, 0.5), np.inf)
        return uv, z, visible, score

    def _best_view(self, p: np.ndarray):
        uv, z, visible, score = self._project(p)
        if visible.any():
            w = int(np.argmin(np.where(visible, score, np.inf)))
        elif np.isfinite(score).any():
            w = int(np.argmin(score))  # inside some image but occluded / off-surface
        else:
            raise PromptError(f"3D prompt {p.tolist()} projects into none of the "
                              f"{self.scene.num_views} keyframes")
        return w, uv[w]

    def _clicks_in_view(self, sel: Selection, view: int):
        pos, neg = [], []
        for c in sel.clicks:
            uv = None
            if c.view == view and c.uv is not None:
                uv = c.uv
            elif c.point is not None:
                uvs, _, vis, _ = self._project(c.point)
                if vis[view]:
                    uv = uvs[view]
            if uv is not None:
                (pos if c.positive else neg).append(np.asarray(uv, np.float64))
        as2 = lambda a: np.asarray(a, np.float64).reshape(-1, 2)  # noqa: E731
        return as2(pos), as2(neg)

    def _keys(self, voxel: float) -> np.ndarray:
        cv, ck = self._keys_cache
        if cv != voxel or ck is None:
            # _pts is NaN where invalid (stored as key 0; every use of the keys is masked by validity)
            ck = voxel_keys(self._pts, voxel, self._origin)
            self._keys_cache = (voxel, ck)
        return ck

    def _propagate(self, view: int, mask: np.ndarray, prev: Optional[np.ndarray]) -> np.ndarray:
        voxel = self.voxel
        if voxel is None:
            ref = mask if mask.any() else (prev[view] if prev is not None else None)
            sp = pixel_spacing(self._pts[view], self._valid[view], ref)
            if sp <= 0:
                new = np.zeros(self._valid.shape, bool) if prev is None else prev.copy()
                new[view] = mask
                return new
            # quantise so that successive rounds reuse the cached voxel keys
            voxel = float(2.0 ** (np.round(np.log2(self.voxel_factor * sp) * 4) / 4))
        return propagate_mask(self._pts, self._valid, view, mask, prev, voxel=voxel,
                              dilate=self.dilate, keys=self._keys(voxel), origin=self._origin)

    # ------------------------------------------------------------------ prompt handling
    def _segment(self, sel: Selection, view_masks: Optional[np.ndarray]):
        ids = sorted(int(i) for i in sel.object_ids)
        neg = sorted(int(i) for i in sel.negative_ids if i not in sel.object_ids)
        if view_masks is None:
            return self.mapper.segment(ids, negative_ids=neg)
        return self.mapper.segment(ids, negative_ids=neg, view_masks=view_masks)

    def _handle(self, click: Click, new_object: bool, label: Optional[int]):
        if label is not None:
            sel = self._get(label)
        elif new_object:
            sel = None
        else:
            sel = self._current
        if sel is None:
            if not click.positive:
                raise PromptError("a negative click needs a selected object: start the object "
                                  "with a positive click")
            sel = Selection(label=self._next_label)
            res = self._first(sel, click)
            self._selections.append(sel)
            self._next_label += 1
            self._current = sel
            return res
        self._current = sel
        return self._refine(sel, click)

    def _first(self, sel: Selection, click: Click):
        if click.object_id > 0:
            sel.clicks = [click]
            sel.object_ids = {click.object_id}
            res = self._segment(sel, None)
            masks = np.asarray(res.pixel_masks, bool)
            if not masks.any():
                labels = self.scene.mask_cache.labels if self.scene.mask_cache is not None else None
                if labels is not None:
                    masks = (labels == click.object_id) & self._valid
            sel.view_masks = masks
            sel.result = res
            return res
        if self.segmenter is None:
            raise PromptError("no cached object under the click (background or unlabelled); "
                              "click on an object or enable a segmenter for free-form selection")
        sel.clicks = [click]
        res, masks = self._refine_with_segmenter(sel, click, prior=None)
        sel.view_masks = masks
        sel.result = res
        return res

    def _refine(self, sel: Selection, click: Click):
        if not click.positive and sel.num_positive == 0:  # pragma: no cover - defensive
            raise PromptError("a negative click needs a positive one first")
        if self.segmenter is None:
            oid = click.object_id
            if oid <= 0:
                raise PromptError("no cached object under the click; without a segmenter only "
                                  "cached objects can be added or removed")
            ids, negs = set(sel.object_ids), set(sel.negative_ids)
            if click.positive:
                ids.add(oid)
                negs.discard(oid)
            else:
                if ids == {oid}:
                    raise PromptError("negative click on the selected object itself: without a "
                                      "segmenter the cached object cannot be split")
                ids.discard(oid)
                negs.add(oid)
            sel.clicks.append(click)
            sel.object_ids, sel.negative_ids = ids, negs
            res = self._segment(sel, None)
            sel.view_masks = np.asarray(res.pixel_masks, bool)
        else:
            sel.clicks.append(click)
            try:
                res, masks = self._refine_with_segmenter(sel, click, prior=sel.view_masks)
            except Exception:
                sel.clicks.pop()
                raise
            sel.view_masks = masks
        sel.rounds += 1
        sel.result = res
        return res

    def _refine_with_segmenter(self, sel: Selection, click: Click, prior: Optional[np.ndarray]):
        view = click.view
        if view is None:
            raise PromptError("the click is seen by no keyframe; cannot refine")
        pos_uv, neg_uv = self._clicks_in_view(sel, view)
        prior_v = None if prior is None else prior[view]
        mask = self.segmenter.refine(self.scene.rgb[view], pos_uv, neg_uv, prior_mask=prior_v,
                                     pts=self._pts[view], valid=self._valid[view])
        mask = np.asarray(mask, bool)
        masks = self._propagate(view, mask, prior)
        # bookkeeping of cached ids: a negative click on another cached object marks it as a
        # competitor (MGM's consistency drops points other views attribute to it)
        if click.object_id > 0:
            if click.positive:
                sel.object_ids.add(click.object_id)
                sel.negative_ids.discard(click.object_id)
            elif click.object_id not in sel.object_ids:
                sel.negative_ids.add(click.object_id)
        res = self._segment(sel, masks)
        return res, masks
