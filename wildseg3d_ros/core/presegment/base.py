"""Segmenter interface shared by every segmentation backend.

A backend produces

* ``automatic_masks``: one view -> (H, W) int32 local segment ids (0 = none, non-overlapping);
* ``build_mask_cache``: all keyframes -> :class:`~wildseg3d_ros.core.types.MaskCache` whose
  ids are *global* (the same physical object has the same id in every view) plus soft masks S;
* ``refine``: one view + positive/negative clicks (+ previous mask as prior) -> (H, W) bool mask.

Clicks are (N, 2) float arrays of pixel coordinates ``(u, v)`` with ``u`` = column and
``v`` = row (OpenCV convention).  ``pts`` / ``pts3d`` are world pointmaps (..., H, W, 3) and
``valid`` the matching bool masks; backends may ignore them.

``progress(fraction: float, message: str)`` is an optional callback; ``cancel()`` an optional
callable returning True when the caller wants the work aborted (the backend then raises
:class:`~wildseg3d_ros.core.errors.Cancelled`).

Backends are created by name with :func:`make_segmenter`:

* ``"classical"`` -> :class:`~wildseg3d_ros.core.presegment.classical.ClassicalSegmenter`
  (no weights; superpixels merged by colour and 3D geometry);
* ``"geometric"`` -> :class:`~wildseg3d_ros.core.presegment.geometric.GeometricSegmenter`
  (no weights; RGB-D clutter: support planes, depth discontinuities, local convexity; the
  classical segmenter where a view has no pointmap);
* ``"sam2"`` -> ``wildseg3d_ros.core.presegment.sam2.Sam2Segmenter`` (imported lazily).

The flat name ``auto`` (the nodes' and CLI's default) means geometric for metric pointmaps
(depth cameras) and classical otherwise (:func:`wildseg3d_ros.core.config.resolve_segmenter`).
"""
from __future__ import annotations

import abc
from typing import Optional

import numpy as np

from ..errors import CancelFn, ProgressFn, SegmenterError, check_cancel, report
from ..registry import Entry, Registry
from ..types import MaskCache


def _empty_uv() -> np.ndarray:
    return np.zeros((0, 2), np.float64)


def as_uv(uv) -> np.ndarray:
    """Normalise a click list to an (N, 2) float64 array (N may be 0)."""
    if uv is None:
        return _empty_uv()
    a = np.asarray(uv, dtype=np.float64)
    if a.size == 0:
        return _empty_uv()
    return a.reshape(-1, 2)


class Segmenter(abc.ABC):
    """Abstract segmentation backend (see module docstring)."""

    name: str = "abstract"

    @abc.abstractmethod
    def automatic_masks(self, rgb: np.ndarray, pts: Optional[np.ndarray] = None,
                        valid: Optional[np.ndarray] = None) -> np.ndarray:
        """One view -> (H, W) int32 local segment ids, 0 = none, non-overlapping."""

    #: 3D association of per-view masks (see mask_cache.associate_masks_3d): voxel size (None:
    #: automatic) and the overlap two masks need to be the same object
    voxel: Optional[float] = None
    min_overlap: float = 0.25

    def build_mask_cache(self, rgb: np.ndarray, pts3d: np.ndarray, valid: np.ndarray,
                         progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelFn] = None, local: Optional[np.ndarray] = None) -> MaskCache:
        """rgb (V,H,W,3), pts3d (V,H,W,3) world, valid (V,H,W) -> MaskCache with global ids
        consistent across views + soft masks S. Default: the per-view masks ``local`` (V,H,W)
        (the pre-segmentation the pipeline already made; :meth:`automatic_masks` per view when
        None), associated across views by 3D overlap. Segmenters that track across views (SAM2)
        override it."""
        from ..mask_cache import associate_masks_3d, make_mask_cache

        rgb = np.asarray(rgb)
        pts3d = np.asarray(pts3d)
        valid = np.asarray(valid, bool)
        if rgb.ndim != 4 or pts3d.shape[:3] != rgb.shape[:3] or valid.shape != rgb.shape[:3]:
            raise SegmenterError(f"shape mismatch: rgb {rgb.shape}, pts3d {pts3d.shape}, "
                                 f"valid {valid.shape} (expected V,H,W,3 / V,H,W,3 / V,H,W)")
        V = rgb.shape[0]
        if local is not None:
            local = np.asarray(local, np.int32)
            if local.shape != rgb.shape[:3]:
                raise SegmenterError(f"per-view masks {local.shape} != images {rgb.shape[:3]}")
        else:
            local = np.zeros(rgb.shape[:3], np.int32)
            for v in range(V):
                check_cancel(cancel, "segmentation")
                report(progress, v / (V + 1), f"{self.name} masks view {v + 1}/{V}")
                local[v] = self.automatic_masks(rgb[v], pts3d[v], valid[v])
        check_cancel(cancel, "segmentation")
        report(progress, V / (V + 1), "associating masks across views")
        glob = associate_masks_3d(local, pts3d, valid, voxel=self.voxel, min_overlap=self.min_overlap)
        cache = make_mask_cache(glob, pts3d, valid)
        for t in cache.objects.values():
            t["score"] = 1.0
        report(progress, 1.0, f"{len(cache.objects)} objects")
        return cache

    @abc.abstractmethod
    def refine(self, rgb: np.ndarray, pos_uv: np.ndarray, neg_uv: np.ndarray,
               prior_mask: Optional[np.ndarray] = None, pts: Optional[np.ndarray] = None,
               valid: Optional[np.ndarray] = None) -> np.ndarray:
        """One view, clicks (N,2) float (u=column, v=row) -> (H, W) bool mask."""

    def close(self) -> None:  # pragma: no cover - optional hook
        """Release resources (GPU memory, ...). Default: nothing."""


SEGMENTERS = Registry("segmenter", SegmenterError, {
    "classical": Entry("wildseg3d_ros.core.presegment.classical", "ClassicalSegmenter"),
    "geometric": Entry("wildseg3d_ros.core.presegment.geometric", "GeometricSegmenter"),
    "sam2": Entry("wildseg3d_ros.core.presegment.sam2", "Sam2Segmenter",
                  {"sam2.config": "config", "sam2.checkpoint": "checkpoint",
                   "sam2.points_per_side": "points_per_side"}, uses_device=True,
                  import_hint="Install the 'sam2' Python package (pip install sam2, needs torch + torchvision) "
                              "or use segmenter 'classical'"),
})


def available_backends():
    return SEGMENTERS.names()


def make_segmenter(name: str, **kwargs) -> Segmenter:
    """Create a segmenter by name (``'classical'``, ``'geometric'`` or ``'sam2'``); kwargs go to its constructor."""
    return SEGMENTERS.create(name, **kwargs)
