"""Segmenter interface shared by every segmentation backend.

A backend produces

* ``automatic_masks``: one view -> (H, W) int32 local segment ids (0 = none, non-overlapping);
* ``build_mask_cache``: all keyframes -> :class:`~wildseg3d_ros.core.scene.MaskCache` whose
  ids are *global* (the same physical object has the same id in every view) plus soft masks S;
* ``refine``: one view + positive/negative clicks (+ previous mask as prior) -> (H, W) bool mask.

Clicks are (N, 2) float arrays of pixel coordinates ``(u, v)`` with ``u`` = column and
``v`` = row (OpenCV convention).  ``pts`` / ``pts3d`` are world pointmaps (..., H, W, 3) and
``valid`` the matching bool masks; backends may ignore them.

``progress(fraction: float, message: str)`` is an optional callback; ``cancel()`` an optional
callable returning True when the caller wants the work aborted (the backend then raises
:class:`SegmenterCancelled`).

Backends are created by name with :func:`make_segmenter`:

* ``"classical"`` -> :class:`~wildseg3d_ros.core.segment.classical.ClassicalSegmenter`
  (no weights; superpixels merged by colour and 3D geometry);
* ``"geometric"`` -> :class:`~wildseg3d_ros.core.segment.geometric.GeometricSegmenter`
  (no weights; RGB-D clutter: support planes, depth discontinuities, local convexity; the
  classical segmenter where a view has no pointmap);
* ``"sam2"`` -> ``wildseg3d_ros.core.segment.sam2_backend.Sam2Segmenter`` (imported lazily).
"""
from __future__ import annotations

import abc
import importlib
from typing import Callable, Optional

import numpy as np

from ..scene import MaskCache

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


class SegmenterError(RuntimeError):
    """A segmentation backend cannot be created or cannot run (clear, user-facing message)."""


class SegmenterCancelled(SegmenterError):
    """Raised by a backend when ``cancel()`` returned True during a long operation."""


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


def check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise SegmenterCancelled("segmentation cancelled")


def report(progress: Optional[ProgressFn], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(float(fraction), message)


class Segmenter(abc.ABC):
    """Abstract segmentation backend (see module docstring)."""

    name: str = "abstract"

    @abc.abstractmethod
    def automatic_masks(self, rgb: np.ndarray, pts: Optional[np.ndarray] = None,
                        valid: Optional[np.ndarray] = None) -> np.ndarray:
        """One view -> (H, W) int32 local segment ids, 0 = none, non-overlapping."""

    @abc.abstractmethod
    def build_mask_cache(self, rgb: np.ndarray, pts3d: np.ndarray, valid: np.ndarray,
                         progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelFn] = None) -> MaskCache:
        """rgb (V,H,W,3), pts3d (V,H,W,3) world, valid (V,H,W) -> MaskCache with global ids
        consistent across views + soft masks S."""

    @abc.abstractmethod
    def refine(self, rgb: np.ndarray, pos_uv: np.ndarray, neg_uv: np.ndarray,
               prior_mask: Optional[np.ndarray] = None, pts: Optional[np.ndarray] = None,
               valid: Optional[np.ndarray] = None) -> np.ndarray:
        """One view, clicks (N,2) float (u=column, v=row) -> (H, W) bool mask."""

    def close(self) -> None:  # pragma: no cover - optional hook
        """Release resources (GPU memory, ...). Default: nothing."""


_BACKENDS = {
    "classical": (".classical", "ClassicalSegmenter"),
    "geometric": (".geometric", "GeometricSegmenter"),
    "sam2": (".sam2_backend", "Sam2Segmenter"),
}


def available_backends():
    return sorted(_BACKENDS)


def make_segmenter(name: str, **kwargs) -> Segmenter:
    """Create a backend by name (``'classical'``, ``'geometric'`` or ``'sam2'``); kwargs go to its constructor."""
    key = str(name).strip().lower()
    if key not in _BACKENDS:
        raise SegmenterError(
            f"unknown segmenter backend {name!r}; choose one of {available_backends()}")
    modname, clsname = _BACKENDS[key]
    try:
        mod = importlib.import_module(modname, package=__package__)
    except ImportError as exc:
        if key == "sam2":
            raise SegmenterError(
                "the 'sam2' segmenter backend is unavailable: could not import "
                f"wildseg3d_ros.core.segment.sam2_backend ({exc}). Install the 'sam2' Python package "
                "(pip install sam2, needs torch + torchvision) or use segmenter 'classical'."
            ) from exc
        raise SegmenterError(f"cannot import segmenter backend {name!r}: {exc}") from exc
    cls = getattr(mod, clsname, None)
    if cls is None:
        raise SegmenterError(f"backend module {modname} defines no {clsname}")
    return cls(**kwargs)
