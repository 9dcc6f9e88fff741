"""Per-pixel alignment weights: DUSt3R's confidence weighting and WildSeg3D's DGA weighting.

DGA (WildSeg3D, ICCV 2025):

    F = sigmoid(S * C)
    A = (F + a F (1 - F)) / (1 + |a| F (1 - F) + eps)
    W = A,   a = +alpha_p for matching pixels, a = -alpha_n for non-matching pixels

``S`` is the soft object mask of the pixel's view (1 everywhere when no masks are given) and
``C`` the (transformed, see :func:`transform_confidence`) pairwise confidence.
Everything here is vectorised and works on numpy arrays or torch tensors.
:func:`edge_weights` computes the weights of every pair of an aligner input (matching included).
"""
from __future__ import annotations

import numpy as np
import torch

EPS = 1e-6


def _is_torch(x):
    return isinstance(x, torch.Tensor)


def sigmoid(x):
    if _is_torch(x):
        return torch.sigmoid(x)
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def adaptive_weight(F, alpha, eps: float = EPS):
    """A = (F + a F(1-F)) / (1 + |a| F(1-F) + eps), elementwise; ``alpha`` broadcasts.

    Properties (for F in [0, 1]): a = 0 gives F/(1+eps) ~= F; a > 0 raises, a < 0 lowers the
    weight (strictly for 0 < F < 1); 0 <= A < 1 whenever |a| <= 1."""
    if _is_torch(F):
        alpha = torch.as_tensor(alpha, dtype=F.dtype, device=F.device)
        g = F * (1 - F)
        return (F + alpha * g) / (1 + alpha.abs() * g + eps)
    F = np.asarray(F, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    g = F * (1 - F)
    return (F + alpha * g) / (1 + np.abs(alpha) * g + eps)


def transform_confidence(conf, mode: str = "auto"):
    """Confidence C used by both weightings.

    mode 'log': log(C) clipped at 0 (DUSt3R's ``conf='log'``; its confidences are 1 + exp(x) >= 1);
    'raw': C unchanged (clipped at 0); 'auto': 'log' when every finite value is >= 1 (a DUSt3R /
    MASt3R confidence map), else 'raw' (e.g. [0, 1] confidences from an RGB-D backend).
    Non-finite confidences become 0."""
    is_t = _is_torch(conf)
    c = conf if is_t else torch.as_tensor(np.asarray(conf, dtype=np.float32))
    c = torch.nan_to_num(c.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "auto":
        mode = "log" if bool((c >= 1).all()) else "raw"
    if mode == "log":
        out = torch.log(c.clamp_min(1.0))
    elif mode == "raw":
        out = c.clamp_min(0.0)
    else:
        raise ValueError(f"unknown conf mode {mode!r} (use 'auto', 'log' or 'raw')")
    return out if is_t else out.numpy()


def dga_weights(conf_t, soft_mask, matching, alpha_p: float = 0.5, alpha_n: float = 0.9,
                eps: float = EPS):
    """DGA weight W = A(F = sigmoid(S C), a = +alpha_p if matching else -alpha_n).

    conf_t: transformed confidence C (any shape); soft_mask: S broadcastable to it (or None ->
    S = 1); matching: bool array of the same shape. Pixels with C <= 0 (invalid) get W = 0."""
    is_t = _is_torch(conf_t)
    if not is_t:
        conf_t = torch.as_tensor(np.asarray(conf_t, dtype=np.float32))
        if soft_mask is not None:
            soft_mask = torch.as_tensor(np.asarray(soft_mask, dtype=np.float32))
        matching = torch.as_tensor(np.asarray(matching, dtype=bool))
    S = 1.0 if soft_mask is None else soft_mask.to(conf_t)
    F = torch.sigmoid(S * conf_t)
    alpha = torch.where(matching.to(conf_t.device), torch.tensor(float(alpha_p), device=conf_t.device),
                        torch.tensor(-float(alpha_n), device=conf_t.device)).to(conf_t.dtype)
    W = adaptive_weight(F, alpha, eps)
    W = torch.where(conf_t > 0, W, torch.zeros_like(W))
    return W if is_t else W.numpy()


def confidence_weights(conf_t):
    """Standard (DUSt3R) weighting: W = C (the transformed confidence, i.e. log C by default)."""
    return conf_t


def edge_weights(inp, soft_masks=None, weighting: str = "dga", alpha_p: float = 0.5,
                 alpha_n: float = 0.9, match_threshold: float = 0.03, matcher: str = "projective",
                 match_stride=None, match_radius: int = 2, match_points: int = 16_384,
                 mutual: bool = False, cancel=None):
    """Per-edge weights (W1, W2): lists of (H, W) float32 tensors on the input's device.

    inp: :class:`~wildseg3d_ros.core.align.inputs.AlignInputs`; soft_masks: per-view S (list of
    (H, W) tensors) or None (S = 1). weighting 'dga': matching of each pair (matcher
    'projective' (default, torch, on the device; stride keeping <= ``match_points`` points per
    map) or 'kdtree' (scipy, the reference definition; stride keeping <= 50 000)), then
    :func:`dga_weights`; 'confidence': W = C. ``cancel()`` is checked before every pair."""
    from ..errors import Cancelled
    from .matching import auto_stride, pair_matches, projective_matches_batch

    if matcher not in ("projective", "kdtree"):
        raise ValueError(f"matcher must be 'projective' or 'kdtree', got {matcher!r}")
    dev = inp.device
    E = inp.num_edges
    M1: list = [None] * E
    M2: list = [None] * E
    if weighting == "dga":
        chunk = 16  # pairs per cancel check (the projective matcher batches them)
        for e0 in range(0, E, chunk):
            if cancel is not None and cancel():  # matching is the longest stretch before the loop
                raise Cancelled(f"alignment cancelled while matching pair {e0}/{E}")
            es = range(e0, min(E, e0 + chunk))
            if matcher == "kdtree":
                for e in es:
                    st = match_stride or auto_stride(*inp.shapes[inp.edges[e][0]])
                    m1, m2 = pair_matches(inp.pts1[e].cpu().numpy(), inp.pts2[e].cpu().numpy(),
                                          (inp.ct1[e] > 0).cpu().numpy(), (inp.ct2[e] > 0).cpu().numpy(),
                                          threshold=match_threshold, stride=st, mutual=mutual)
                    M1[e], M2[e] = torch.as_tensor(m1, device=dev), torch.as_tensor(m2, device=dev)
            else:
                st = match_stride or auto_stride(*inp.shapes[inp.edges[e0][0]], max_points=match_points)
                got = projective_matches_batch([(inp.pts1[e], inp.pts2[e], inp.ct1[e] > 0, inp.ct2[e] > 0)
                                                for e in es], threshold=match_threshold, stride=st,
                                               radius=match_radius, mutual=mutual, finite=True)
                for e, (m1, m2) in zip(es, got):
                    M1[e], M2[e] = m1, m2
    elif cancel is not None and cancel():
        raise Cancelled("alignment cancelled while weighting")
    W1, W2 = [], []
    for e, (i, j) in enumerate(inp.edges):
        c1, c2 = inp.ct1[e], inp.ct2[e]
        if weighting != "dga":
            W1.append(confidence_weights(c1))
            W2.append(confidence_weights(c2))
            continue
        W1.append(dga_weights(c1, None if soft_masks is None else soft_masks[i], M1[e], alpha_p, alpha_n))
        W2.append(dga_weights(c2, None if soft_masks is None else soft_masks[j], M2[e], alpha_p, alpha_n))
    return W1, W2
