"""Pointmap backend interface shared by every reconstruction backend.

A backend turns a list of :class:`~wildseg3d_ros.core.scene.Keyframe` into *pairwise pointmap
predictions*, a :class:`~wildseg3d_ros.core.scene.PairwisePredictions`: per edge ``(i, j)`` the
pointmap of view ``i`` in its own frame and of view ``j`` in ``i``'s frame with confidences, the
views' RGB images and intrinsics at the pointmaps' resolution, and whether the scale is metric.
(DUSt3R's ``inference()`` dict converts with ``PairwisePredictions.from_dust3r``.)

Tensors are ``torch.float32`` on the CPU.  Edge indices are **positions in the keyframe list**
given to :meth:`PointmapBackend.predict_pairs` (as DUSt3R's ``load_images`` numbers its images),
not ``Keyframe.index``.

Pairs are ``(i, j)`` tuples of list positions; :meth:`PointmapBackend.make_pairs` builds the
scene graphs that ``dust3r.image_pairs.make_pairs`` builds (same edge sets, same symmetrisation):

* ``complete``: every unordered pair, then every pair reversed;
* ``swin-k`` (cyclic; ``swin-k-noncyclic`` without wrap-around): each view with its k successors;
* ``logwin-k`` (cyclic / ``-noncyclic``): offsets 1, 2, 4, ..., 2^(k-1) both ways;
* ``oneref-r``: view ``r`` against all others.

``progress(fraction, message)`` is an optional callback, ``cancel()`` an optional callable
returning True when the caller wants the work aborted (then :class:`~wildseg3d_ros.core.errors.Cancelled` is raised).
"""
from __future__ import annotations

import abc
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..scene import Keyframe, PairwisePredictions

from ..errors import BackendError, CancelFn, ProgressFn, check_cancel, report  # noqa: F401

Pair = Tuple[int, int]




def _window_size(scene_graph: str, default: int = 3) -> int:
    parts = scene_graph.split("-")
    if len(parts) < 2:
        return default
    try:
        return int(parts[1])
    except ValueError as exc:
        raise ValueError(f"bad scene graph {scene_graph!r}: expected e.g. 'swin-3'") from exc


def make_pairs(n: int, scene_graph: str = "complete", symmetrize: bool = True) -> List[Pair]:
    """Index pairs of the scene graph ``scene_graph`` over ``n`` views (see module docstring).

    The edge set (and, for ``complete`` and ``oneref``, the order) matches
    ``dust3r.image_pairs.make_pairs``; ``swin``/``logwin`` edges come sorted (DUSt3R iterates a
    set, i.e. in an unspecified order).  With ``symmetrize`` every edge is followed, after all
    forward edges, by its reverse.
    """
    n = int(n)
    if n < 2:
        return []
    sg = str(scene_graph)
    edges: List[Pair] = []
    if sg == "complete":
        edges = [(i, j) for i in range(n) for j in range(i)]
    elif sg.startswith("swin"):
        cyclic = not sg.endswith("noncyclic")
        k = _window_size(sg)
        s = set()
        for i in range(n):
            for d in range(1, k + 1):
                j = i + d
                if cyclic:
                    j %= n
                if j >= n or j == i:
                    continue
                s.add((min(i, j), max(i, j)))
        edges = sorted(s)
    elif sg.startswith("logwin"):
        cyclic = not sg.endswith("noncyclic")
        k = _window_size(sg)
        offsets = [2 ** e for e in range(k)]
        s = set()
        for i in range(n):
            for j in [i - o for o in offsets] + [i + o for o in offsets]:
                if cyclic:
                    j %= n
                if j < 0 or j >= n or j == i:
                    continue
                s.add((min(i, j), max(i, j)))
        edges = sorted(s)
    elif sg.startswith("oneref"):
        ref = _window_size(sg, default=0)
        if not 0 <= ref < n:
            raise ValueError(f"scene graph {sg!r}: reference view {ref} not in [0, {n})")
        edges = [(ref, j) for j in range(n) if j != ref]
    else:
        raise ValueError(f"unknown scene graph {sg!r} (complete | swin-k | logwin-k | oneref-r)")
    if symmetrize:
        edges = edges + [(j, i) for i, j in edges]
    return edges


class PointmapBackend(abc.ABC):
    """Produces DUSt3R-format pairwise pointmap predictions from keyframes."""

    name: str = "base"
    #: scene graph used when ``predict_pairs`` gets ``pairs=None``
    scene_graph: str = "complete"

    def make_pairs(self, n: int, scene_graph: Optional[str] = None) -> List[Pair]:
        return make_pairs(n, scene_graph or self.scene_graph)

    @abc.abstractmethod
    def predict_pairs(self, keyframes: Sequence[Keyframe], pairs: Optional[Sequence[Pair]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelFn] = None) -> PairwisePredictions:
        """Pairwise predictions for ``pairs`` of list positions (None: the backend's scene graph)."""

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
