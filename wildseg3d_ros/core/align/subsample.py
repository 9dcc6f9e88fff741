"""The pixel subsample the optimisers work on (fixed for a run, drawn from the seed).

Per view ``n`` random pixels with a positive weight in at least one of the view's pairs
(all pixels when fewer are valid). Two layouts of the same samples:

* :func:`edge_major` — (E, 2, n, ...) per pair and side (the Adam reference);
* :func:`view_major` — (V, S, n) per view and slot (points planar: (3, V, S, n)) (a slot is one (pair, side) the view is
  in; S = the largest number of slots of a view, padded with zero weight), so that every sum over
  the observations of a pixel is a plain reduction over S (Gauss-Newton).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .init import pixel_grid, view_weight

__all__ = ["Samples", "draw_samples", "edge_major", "view_major", "ViewMajor"]


@dataclass
class Samples:
    idx: List[torch.Tensor]   # per view (n,) flat pixel indices
    uv: torch.Tensor          # (V, n, 2) float32 pixel coordinates (u = column, v = row)

    @property
    def n(self) -> int:
        return int(self.uv.shape[1])


def draw_samples(inp, W1, W2, n: int, gen) -> Samples:
    """n pixels per view (n is capped at the smallest image), from the torch CPU generator gen."""
    dev = inp.device
    N = int(min(n, min(h * w for h, w in inp.shapes)))
    idx, uv = [], []
    for v in range(inp.num_views):
        h, w = inp.shapes[v]
        tot = view_weight(v, inp.edges, W1, W2).reshape(-1)
        cand = torch.nonzero(tot > 0).reshape(-1).cpu()
        if len(cand) >= N:
            sel = cand[torch.randperm(len(cand), generator=gen)[:N]]
        else:
            sel = torch.randperm(h * w, generator=gen)[:N]
        sel = sel.to(dev)
        idx.append(sel)
        uv.append(pixel_grid(h, w, dev)[sel])
    return Samples(idx, torch.stack(uv))


def edge_major(inp, W1, W2, smp: Samples, dtype=torch.float32):
    """(Xs (E, 2, n, 3) normalised points, Ws (E, 2, n) weights) of the samples."""
    inv = 1.0 / inp.scale
    Xs = torch.stack([torch.stack([inp.pts1[e].reshape(-1, 3)[smp.idx[i]], inp.pts2[e].reshape(-1, 3)[smp.idx[j]]])
                      for e, (i, j) in enumerate(inp.edges)]).to(dtype) * inv
    Ws = torch.stack([torch.stack([W1[e].reshape(-1)[smp.idx[i]], W2[e].reshape(-1)[smp.idx[j]]])
                      for e, (i, j) in enumerate(inp.edges)]).to(dtype)
    return Xs, Ws


@dataclass
class ViewMajor:
    X: torch.Tensor        # (3, V, S, n) normalised points of every slot of the view (planar)
    W: torch.Tensor        # (V, S, n) weights (0 on padding slots)
    slot_e: torch.Tensor   # (V, S) long edge of each slot (0 on padding)
    slot_ok: torch.Tensor  # (V, S) bool: a real slot


def view_major(inp, W1, W2, smp: Samples, dtype=torch.float64) -> ViewMajor:
    V = inp.num_views
    S = max(len(s) for s in inp.slots)
    N = smp.n
    dev = inp.device
    inv = 1.0 / inp.scale
    X = torch.zeros(3, V, S, N, dtype=dtype, device=dev)
    W = torch.zeros(V, S, N, dtype=dtype, device=dev)
    slot_e = torch.zeros(V, S, dtype=torch.long, device=dev)
    slot_ok = torch.zeros(V, S, dtype=torch.bool, device=dev)
    for v in range(V):
        for s, (e, k) in enumerate(inp.slots[v]):
            X[:, v, s] = inp.pts(e, k).reshape(-1, 3)[smp.idx[v]].to(dtype).T * inv
            W[v, s] = (W1 if k == 0 else W2)[e].reshape(-1)[smp.idx[v]].to(dtype)
            slot_e[v, s] = e
            slot_ok[v, s] = True
    return ViewMajor(X, W, slot_e, slot_ok)
