"""Reconstruction backends: keyframes -> DUSt3R-format pairwise pointmap predictions.

Create one by name with :func:`make_backend`:

* ``"rgbd"``   -> :class:`~wildseg3d_ros.core.pointmaps.rgbd.RgbdBackend` (metric depth; CPU;
  pairwise poses by feature matching + RANSAC PnP + point-to-plane ICP);
* ``"sfm"``    -> :class:`~wildseg3d_ros.core.pointmaps.sfm.SfmBackend` (RGB only, no weights; CPU;
  pycolmap structure from motion + OpenCV SGBM pairwise stereo);
* ``"dust3r"`` -> :class:`~wildseg3d_ros.core.pointmaps.dust3r.Dust3rBackend` (DUSt3R or MASt3R
  checkpoints, the network class read from the checkpoint; the ``dust3r`` / ``mast3r`` clones or
  ``mini_dust3r``; licence CC BY-NC-SA 4.0); imported lazily.
"""
from __future__ import annotations

from ..registry import Entry, Registry
from .base import BackendError, PointmapBackend
from .scene_graph import make_pairs

__all__ = ["BACKENDS", "BackendError", "PointmapBackend", "make_pairs", "make_backend", "available_backends"]

_D3 = {"dust3r.checkpoint": "model", "dust3r.image_size": "image_size", "dust3r.batch_size": "batch_size"}
BACKENDS = Registry("reconstruction backend", BackendError, {
    "rgbd": Entry("wildseg3d_ros.core.pointmaps.rgbd", "RgbdBackend", metric=True),
    "sfm": Entry("wildseg3d_ros.core.pointmaps.sfm", "SfmBackend",
                 {"sfm.refine_intrinsics": "refine_intrinsics", "sfm.max_pairs_per_view": "max_pairs_per_view",
                  "sfm.max_image_size": "max_image_size"}, uses_device=True, presegment_geometry=False),
    "dust3r": Entry("wildseg3d_ros.core.pointmaps.dust3r", "Dust3rBackend", _D3, uses_device=True),
})


def available_backends():
    return BACKENDS.names()


def make_backend(name: str, **kw) -> PointmapBackend:
    """Instantiate the backend ``name`` (``rgbd`` | ``sfm`` | ``dust3r``) with keyword options."""
    return BACKENDS.create(name, **kw)
