"""Pointmap backend interface shared by every reconstruction backend.

A backend turns a list of :class:`~wildseg3d_ros.core.types.Keyframe` into *pairwise pointmap
predictions*, a :class:`~wildseg3d_ros.core.types.PairwisePredictions`: per edge ``(i, j)`` the
pointmap of view ``i`` in its own frame and of view ``j`` in ``i``'s frame with confidences, the
views' RGB images and intrinsics at the pointmaps' resolution, and whether the scale is metric.
(DUSt3R's ``inference()`` dict converts with ``PairwisePredictions.from_dust3r``.)

Tensors are ``torch.float32`` on the CPU.  Edge indices are **positions in the keyframe list**
given to :meth:`PointmapBackend.predict_pairs` (as DUSt3R's ``load_images`` numbers its images),
not ``Keyframe.index``.

Pairs are ``(i, j)`` tuples of list positions; :mod:`.scene_graph` builds them.

``progress(fraction, message)`` is an optional callback, ``cancel()`` an optional callable
returning True when the caller wants the work aborted (then :class:`~wildseg3d_ros.core.errors.Cancelled` is raised).
"""
from __future__ import annotations

import abc
from typing import List, Optional, Sequence, Tuple

from ..errors import BackendError, CancelFn, ProgressFn
from ..types import Keyframe, PairwisePredictions
from .scene_graph import Pair, make_pairs


class PointmapBackend(abc.ABC):
    """Produces pairwise pointmap predictions (:class:`PairwisePredictions`) from keyframes."""

    name: str = "base"
    #: scene graph used when ``predict_pairs`` gets ``pairs=None``
    scene_graph: str = "complete"
    #: a view's own-frame pointmap depends on that keyframe alone (depth cameras), not on the
    #: other keyframes (networks, stereo): its pre-segmentation can be done and kept ahead
    pointmaps_per_keyframe: bool = False

    def make_pairs(self, n: int, scene_graph: Optional[str] = None) -> List[Pair]:
        return make_pairs(n, scene_graph or self.scene_graph)

    def prepare(self, keyframe: Keyframe):
        """Per-keyframe work that needs no other keyframe (features, normals), done ahead of
        :meth:`predict_pairs` (the node calls it when a keyframe is accepted) and cached by the
        keyframe's content. Returns the keyframe's camera-frame pointmap and validity
        ``((H, W, 3) float32, (H, W) bool)`` when the backend knows them before pairing (depth
        cameras), else None. The default does nothing."""
        return None

    def prepare_pairs(self, keyframe: Keyframe, partners: Sequence[Keyframe]) -> int:
        """Pairwise work between ``keyframe`` and earlier keyframes it will be paired with, done
        ahead of :meth:`predict_pairs` (when the keyframe is accepted) and cached by the pair's
        content: pair ``(partner, keyframe)`` in that order. Returns how many pairs were computed.
        The default (backends whose pairs are one batched network pass) does nothing."""
        return 0

    @abc.abstractmethod
    def predict_pairs(self, keyframes: Sequence[Keyframe], pairs: Optional[Sequence[Pair]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelFn] = None) -> PairwisePredictions:
        """Pairwise predictions for ``pairs`` of list positions (None: the backend's scene graph)."""

    def _check_inputs(self, keyframes: Sequence[Keyframe],
                      pairs: Optional[Sequence[Pair]]) -> Tuple[List[Keyframe], List[Pair]]:
        """The keyframes as a list and the checked pairs (the backend's scene graph when None);
        BackendError for fewer than 2 keyframes or mixed image sizes."""
        kfs = list(keyframes)
        n = len(kfs)
        if n < 2:
            raise BackendError(f"{self.name} backend: need at least 2 keyframes, got {n}")
        pairs = self._check_pairs(n, pairs if pairs is not None else self.make_pairs(n))
        shapes = {tuple(k.rgb.shape[:2]) for k in kfs}
        if len(shapes) != 1:
            raise BackendError(f"{self.name} backend: keyframes have different image sizes {sorted(shapes)}; "
                               "resize them to one size first")
        return kfs, pairs

    @staticmethod
    def _check_pairs(n: int, pairs: Sequence[Pair]) -> List[Pair]:
        out = []
        for p in pairs:
            i, j = int(p[0]), int(p[1])
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise BackendError(f"bad pair {p!r} for {n} keyframes")
            out.append((i, j))
        if not out:
            raise BackendError("no image pairs to predict (need at least 2 keyframes)")
        return out
