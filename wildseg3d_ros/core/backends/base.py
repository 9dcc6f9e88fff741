"""Pointmap backend interface shared by every reconstruction backend.

A backend turns a list of :class:`~wildseg3d_ros.core.scene.Keyframe` into *pairwise pointmap
predictions* in the exact dict layout of ``dust3r.inference.inference()``::

    {'view1': {'idx': [i_0, ..., i_E-1], 'img': (E, 3, H, W) float in [-1, 1], ...},
     'view2': {'idx': [j_0, ..., j_E-1], 'img': (E, 3, H, W), ...},
     'pred1': {'pts3d': (E, H, W, 3), 'conf': (E, H, W)},                 # view i in i's frame
     'pred2': {'pts3d_in_other_view': (E, H, W, 3), 'conf': (E, H, W)}}   # view j in i's frame

Tensors are ``torch.float32`` on the CPU.  ``idx`` values are **positions in the keyframe list**
given to :meth:`PointmapBackend.predict_pairs` (as DUSt3R's ``load_images`` numbers its images),
not ``Keyframe.index``.

Pairs are ``(i, j)`` tuples of list positions; :meth:`PointmapBackend.make_pairs` builds the
scene graphs that ``dust3r.image_pairs.make_pairs`` builds (same edge sets, same symmetrisation):

* ``complete``: every unordered pair, then every pair reversed;
* ``swin-k`` (cyclic; ``swin-k-noncyclic`` without wrap-around): each view with its k successors;
* ``logwin-k`` (cyclic / ``-noncyclic``): offsets 1, 2, 4, ..., 2^(k-1) both ways;
* ``oneref-r``: view ``r`` against all others.

``progress(fraction, message)`` is an optional callback, ``cancel()`` an optional callable
returning True when the caller wants the work aborted (then :class:`BackendCancelled` is raised).
"""
from __future__ import annotations

import abc
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..scene import Keyframe

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
Pair = Tuple[int, int]


class BackendError(RuntimeError):
    """A reconstruction backend cannot be created or cannot run (clear, user-facing message)."""


class BackendCancelled(BackendError):
    """Raised when ``cancel()`` returned True during a long operation."""


def check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise BackendCancelled("reconstruction cancelled by the caller")


def report(progress: Optional[ProgressFn], fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


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


def rgb_to_dust3r_img(rgb: np.ndarray):
    """(H, W, 3) uint8 -> (3, H, W) float32 torch tensor in [-1, 1] (DUSt3R's ``ImgNorm``)."""
    import torch

    a = np.ascontiguousarray(np.asarray(rgb)[..., :3])
    t = torch.from_numpy(a).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


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
                      cancel: Optional[CancelFn] = None) -> dict:
        """Pairwise predictions (DUSt3R ``inference()`` dict) for ``pairs`` of list positions."""

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
