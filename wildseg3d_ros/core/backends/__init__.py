"""Reconstruction backends: keyframes -> DUSt3R-format pairwise pointmap predictions.

Create one by name with :func:`make_backend`:

* ``"rgbd"``   -> :class:`~wildseg3d_ros.core.backends.rgbd.RgbdBackend` (metric depth; CPU;
  pairwise poses by feature matching + RANSAC PnP + point-to-plane ICP);
* ``"sfm"``    -> :class:`~wildseg3d_ros.core.backends.sfm.SfmBackend` (RGB only, no weights; CPU;
  pycolmap structure from motion + OpenCV SGBM pairwise stereo);
* ``"dust3r"`` -> :class:`~wildseg3d_ros.core.backends.dust3r_backend.Dust3rBackend` (the
  ``dust3r`` / ``mast3r`` packages, cloned by the user; licence CC BY-NC-SA 4.0); imported lazily.
"""
from __future__ import annotations

import importlib

from .base import BackendError, PointmapBackend, make_pairs  # noqa: F401

_BACKENDS = {
    "rgbd": ("wildseg3d_ros.core.backends.rgbd", "RgbdBackend"),
    "sfm": ("wildseg3d_ros.core.backends.sfm", "SfmBackend"),
    "dust3r": ("wildseg3d_ros.core.backends.dust3r_backend", "Dust3rBackend"),
    "mast3r": ("wildseg3d_ros.core.backends.dust3r_backend", "Dust3rBackend"),
}


def available_backends():
    return sorted(_BACKENDS)


def make_backend(name: str, **kw) -> PointmapBackend:
    """Instantiate the backend ``name`` (``rgbd`` | ``sfm`` | ``dust3r`` | ``mast3r``) with keyword options."""
    key = str(name).lower().strip()
    if key not in _BACKENDS:
        raise BackendError(f"unknown reconstruction backend {name!r}; choose one of "
                           f"{', '.join(available_backends())}")
    mod_name, cls_name = _BACKENDS[key]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cls_name)(**kw)
