"""Aligner inputs: pairwise predictions -> per-edge tensors on the device, confidences, validity.

:func:`prepare_inputs` turns a :class:`~wildseg3d_ros.core.types.PairwisePredictions` (or the
dict of ``dust3r.inference.inference()``, converted at this edge) into :class:`AlignInputs`:

* per edge ``e = (i, j)`` and side ``k`` (0: view i, 1: view j) the pointmap (H, W, 3) float32
  on the device, in input units, with non-finite points set to 0 (copied only when the input
  has any), its raw confidence and its transformed confidence ``C`` (see
  :func:`~wildseg3d_ros.core.align.weights.transform_confidence`) with 0 wherever the point is
  invalid;
* the scene scale ``s0`` (median point distance of the first pointmaps): the optimisers work in
  normalised units (input / s0, median depth ~ 1) so that step sizes and IRLS floors are scale
  free, and the result is scaled back;
* the degenerate-input checks with their messages (fewer than two views, self pairs, views in
  no pair, inconsistent shapes, all-zero confidence).

:func:`parse_known` and :func:`principal_points` read the optional priors (known poses /
focals, principal points).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..errors import AlignmentError
from ..types import PairwisePredictions
from .weights import transform_confidence

__all__ = ["AlignInputs", "prepare_inputs", "parse_known", "principal_points", "as_tensor_list"]


@dataclass
class AlignInputs:
    """Validated aligner input (see the module docstring). Lists are indexed by edge."""

    edges: List[Tuple[int, int]]
    num_views: int
    shapes: List[Tuple[int, int]]
    pts1: List[torch.Tensor]
    pts2: List[torch.Tensor]
    conf1: List[torch.Tensor]
    conf2: List[torch.Tensor]
    ct1: List[torch.Tensor]
    ct2: List[torch.Tensor]
    scale: float
    conf_mode: str
    device: torch.device
    images: Any = None
    slots: List[List[Tuple[int, int]]] = field(default_factory=list)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def pts(self, e: int, k: int) -> torch.Tensor:
        return self.pts1[e] if k == 0 else self.pts2[e]

    def ct(self, e: int, k: int) -> torch.Tensor:
        return self.ct1[e] if k == 0 else self.ct2[e]

    def conf(self, e: int, k: int) -> torch.Tensor:
        return self.conf1[e] if k == 0 else self.conf2[e]


def as_tensor_list(x, n, name, device, trailing):
    """Stacked (E, ...) tensor/array or a list of per-edge arrays -> list of float32 tensors
    (views of the input where it already is float32 on the device)."""
    if isinstance(x, (list, tuple)):
        items = list(x)
    else:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        items = [t[e] for e in range(t.shape[0])]
    if len(items) != n:
        raise AlignmentError(f"{name}: expected {n} entries (one per pair), got {len(items)}")
    out = []
    for it in items:
        t = it.detach() if isinstance(it, torch.Tensor) else torch.as_tensor(np.asarray(it))
        t = t.to(device=device, dtype=torch.float32)
        if t.ndim == 2 + trailing + 1 and t.shape[0] == 1:  # tolerate a leading batch dim of 1
            t = t[0]
        if t.ndim != 2 + trailing:
            raise AlignmentError(f"{name}: bad shape {tuple(t.shape)}")
        out.append(t)
    return out


def prepare_inputs(pairs, num_views: Optional[int] = None, conf_mode: str = "auto",
                   device="cpu") -> AlignInputs:
    """Validate and convert the pairwise predictions (raises AlignmentError on degenerate input)."""
    dev = torch.device(device)
    if not isinstance(pairs, PairwisePredictions):
        try:
            pairs = PairwisePredictions.from_dust3r(pairs)
        except ValueError as exc:
            raise AlignmentError(f"pairs must be PairwisePredictions or a dust3r inference() dict: {exc}") from exc
    idx1, idx2 = pairs.idx1, pairs.idx2
    E = len(idx1)
    if E == 0:
        raise AlignmentError(f"need at least one pair with matching view1/view2 indices (got {E}, {len(idx2)})")
    edges = list(zip(idx1, idx2))
    if any(i == j for i, j in edges):
        raise AlignmentError("a pair links a view with itself")
    V = int(num_views) if num_views is not None else max(max(idx1), max(idx2)) + 1
    if V < 2:
        raise AlignmentError("global alignment needs at least two views (got a single view)")
    if min(min(idx1), min(idx2)) < 0 or max(max(idx1), max(idx2)) >= V:
        raise AlignmentError(f"view indices must lie in [0, {V})")

    X1 = as_tensor_list(pairs.pts1, E, "pts1", dev, 1)
    X2 = as_tensor_list(pairs.pts2, E, "pts2", dev, 1)
    C1 = as_tensor_list(pairs.conf1, E, "conf1", dev, 0)
    C2 = as_tensor_list(pairs.conf2, E, "conf2", dev, 0)
    shapes: List[Optional[Tuple[int, int]]] = [None] * V
    slots: List[List[Tuple[int, int]]] = [[] for _ in range(V)]
    for e, (i, j) in enumerate(edges):
        for k, (v, X, C) in enumerate(((i, X1[e], C1[e]), (j, X2[e], C2[e]))):
            hw = tuple(X.shape[:2])
            if X.shape[-1] != 3:
                raise AlignmentError(f"pair {e}: pointmaps must be (H, W, 3), got {tuple(X.shape)}")
            if tuple(C.shape) != hw:
                raise AlignmentError(f"pair {e}: confidence shape {tuple(C.shape)} != pointmap shape {hw}")
            if shapes[v] is not None and shapes[v] != hw:
                raise AlignmentError(f"view {v}: inconsistent image shapes {shapes[v]} and {hw}")
            shapes[v] = hw
    for e, (i, j) in enumerate(edges):  # view-major slot lists: view1 slots first, like the reference
        slots[i].append((e, 0))
    for e, (i, j) in enumerate(edges):
        slots[j].append((e, 1))
    if any(s is None for s in shapes):
        missing = [v for v in range(V) if shapes[v] is None]
        raise AlignmentError(f"the pair graph is disconnected: views {missing} are in no pair")

    # confidences, validity (non-finite points -> 0 with confidence 0)
    if conf_mode == "auto":  # 'log' when every finite confidence is >= 1 (DUSt3R's 1 + exp(x))
        inf = float("inf")
        lo = []
        for c in C1 + C2:  # smallest finite value per map (inf: none)
            m = c.amin() if c.numel() else torch.tensor(inf)
            if not bool(torch.isfinite(m)):  # NaN / inf present: ignore them
                m = torch.nan_to_num(c, nan=inf, posinf=inf, neginf=inf).amin()
            lo.append(m)
        lo = torch.stack(lo)
        fin = torch.isfinite(lo)
        conf_mode = "log" if bool(fin.any()) and bool((lo[fin] >= 1).all()) else "raw"
    Ct1, Ct2 = [], []
    total = 0.0
    for lst_x, lst_c, out in ((X1, C1, Ct1), (X2, C2, Ct2)):
        for k in range(E):
            c = transform_confidence(lst_c[k], conf_mode)
            if not bool(torch.isfinite(lst_x[k]).all()):  # one pass when everything is finite
                ok = torch.isfinite(lst_x[k]).all(-1)
                c = torch.where(ok, c, torch.zeros_like(c))
                lst_x[k] = torch.where(ok[..., None], lst_x[k], torch.zeros_like(lst_x[k]))
            out.append(c)
            total += float(c.sum())
    if total <= 0:
        raise AlignmentError(f"all confidences are zero (conf_mode={conf_mode!r}): nothing to align")

    # global normalisation: median point distance -> 1 (so step sizes / eps are scale free)
    samp = torch.cat([x[::4, ::4].reshape(-1, 3)[c[::4, ::4].reshape(-1) > 0] for x, c in zip(X1, Ct1)])
    s0 = float(samp.norm(dim=-1).median()) if samp.numel() else 1.0
    if not math.isfinite(s0) or s0 <= 0:
        s0 = 1.0
    return AlignInputs(edges=edges, num_views=V, shapes=[tuple(s) for s in shapes], pts1=X1, pts2=X2,
                       conf1=C1, conf2=C2, ct1=Ct1, ct2=Ct2, scale=s0, conf_mode=conf_mode, device=dev,
                       images=pairs.images, slots=slots)


def parse_known(known, V, kind):
    """known poses (V,4,4) with NaN rows for unknown, or a dict {view: 4x4}; focals (V,) / (V,3,3).
    Returns a float64 array (NaN = unknown) or None."""
    if known is None:
        return None
    if isinstance(known, dict):
        shape = (V, 4, 4) if kind == "pose" else (V,)
        arr = np.full(shape, np.nan)
        for k, val in known.items():
            val = np.asarray(val, dtype=np.float64)
            arr[int(k)] = val if kind == "pose" or val.ndim == 0 else val[0, 0]
        return arr
    arr = known.detach().cpu().numpy() if isinstance(known, torch.Tensor) else np.asarray(known)
    arr = arr.astype(np.float64)
    if kind == "pose":
        if arr.shape != (V, 4, 4):
            raise AlignmentError(f"known_poses must be (V,4,4) = ({V},4,4), got {arr.shape}")
    else:
        if arr.ndim == 3:
            arr = arr[:, 0, 0]
        if arr.shape != (V,):
            raise AlignmentError(f"known_focals must be (V,) or (V,3,3) with V={V}, got {arr.shape}")
    return arr


def principal_points(shapes, principal_points_=None, known_focals=None) -> np.ndarray:
    """(V, 2) principal points: the given ones, else known_focals' K (when given as matrices),
    else ((W-1)/2, (H-1)/2) (the integer-pixel-centre convention)."""
    V = len(shapes)
    pp = np.array([((w - 1) / 2.0, (h - 1) / 2.0) for h, w in shapes], dtype=np.float64).reshape(V, 2)
    if principal_points_ is not None:
        pp = np.asarray(principal_points_, dtype=np.float64).reshape(V, 2)
    elif known_focals is not None and not isinstance(known_focals, dict) and np.ndim(known_focals) == 3:
        Kk = np.asarray(known_focals.cpu() if isinstance(known_focals, torch.Tensor) else known_focals, np.float64)
        ok = np.isfinite(Kk[:, :2, 2]).all(1)
        pp[ok] = Kk[ok, :2, 2]
    return pp
