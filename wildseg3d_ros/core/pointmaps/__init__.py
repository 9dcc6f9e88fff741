"""Reconstruction backends: keyframes -> DUSt3R-format pairwise pointmap predictions.

Create one by name with :func:`make_backend`:

* ``"rgbd"``   -> :class:`~wildseg3d_ros.core.pointmaps.rgbd.RgbdBackend` (metric depth; CPU;
  pairwise poses by feature matching + RANSAC PnP + point-to-plane ICP);
* ``"dust3r"`` -> :class:`~wildseg3d_ros.core.pointmaps.dust3r.Dust3rBackend` (the
  ``dust3r`` / ``mast3r`` packages, cloned by the user; licence CC BY-NC-SA 4.0); imported lazily.
"""
from __future__ import annotations

import importlib

from .base import BackendError, PointmapBackend
from .scene_graph import make_pairs

__all__ = ["BackendError", "PointmapBackend", "make_pairs", "make_backend", "available_backends"]

_BACKENDS = {
    "rgbd": ("wildseg3d_ros.core.pointmaps.rgbd", "RgbdBackend"),
    "dust3r": ("wildseg3d_ros.core.pointmaps.dust3r", "Dust3rBackend"),
    "mast3r": ("wildseg3d_ros.core.pointmaps.dust3r", "Dust3rBackend"),
}


def available_backends():
    return sorted(_BACKENDS)


def make_backend(name: str, **kw) -> PointmapBackend:
    """Instantiate the backend ``name`` (``rgbd`` | ``dust3r`` | ``mast3r``) with keyword options."""
    key = str(name).lower().strip()
    if key not in _BACKENDS:
        raise BackendError(f"unknown reconstruction backend {name!r}; choose one of "
                           f"{', '.join(available_backends())}")
    mod_name, cls_name = _BACKENDS[key]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cls_name)(**kw)
