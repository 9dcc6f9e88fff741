"""The final full-resolution solve: every pixel's depth for the optimised cameras and pairs.

For pixel i of view v with world ray ``c + d a`` and the targets ``y_s`` of the view's slots s
(pair similarity applied to the pair's prediction), the depth minimises
``sum_s W_s || c + d a - y_s ||`` (the objective, non-squared). Each target reduces to two
scalars: its position along the ray ``t_s = a.(y_s - c) / |a|^2`` and its squared distance to
the ray ``q_s`` (from the perpendicular component itself: no cancellation in float32), so
``||c + d a - y_s||^2 = |a|^2 (d - t_s)^2 + q_s`` and the IRLS / Weiszfeld iterations
``d = sum w t / sum w``, ``w = W / max(r, eps)`` run on scalars, in pixel chunks that bound the
memory. Three Weiszfeld steps (the default) reach the depths of ten to 1e-5 of the objective.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .optimise_adam import MIN_DEPTH, RES_EPS

__all__ = ["solve_full_resolution"]


def _weiszfeld(t, q, A2, wv, n_iter: int):
    """Depths (n,) minimising sum_s wv ||c + d a - y_s|| per pixel from the scalars t, q (S, n)
    and |a|^2 (n,), by n_iter IRLS / Weiszfeld steps from the weighted least-squares depth;
    returns (d, the objective at d in float64)."""
    omega = wv
    for _ in range(max(n_iter, 1)):
        d = ((omega * t).sum(0) / omega.sum(0).clamp_min(1e-30)).clamp_min(MIN_DEPTH)
        r = torch.addcmul(q, A2, (d - t).square()).sqrt_()
        omega = wv / r.clamp_min(RES_EPS)
    return d, float((wv.double() * r).sum())


def solve_full_resolution(inp, W1, W2, res, pp, final_irls: int = 10,
                          chunk_elems: int = 1 << 22) -> Tuple[list, list, list, float]:
    """(world points per view (H,W,3) float32 tensors in normalised units (NaN where no slot
    weighs the pixel), confidence per view (max input confidence, 0 = invalid), mean weight per
    view, loss = the full-resolution objective in input units normalised like DUSt3R's).

    res: an optimiser result (R, c, f, sig, Re, te in normalised units)."""
    dev = inp.device
    inv = 1.0 / inp.scale
    R = res.R.double()
    c = res.c.double()
    f = res.f.double()
    sig, Re, te = res.sig.double(), res.Re.double(), res.te.double()
    pp_t = torch.as_tensor(pp, dtype=torch.float64, device=dev)
    pts_out, conf_out, w_out = [], [], []
    total_loss, area = 0.0, 0.0
    for v in range(inp.num_views):
        h, w = inp.shapes[v]
        slots = inp.slots[v]
        S = len(slots)
        pts = torch.empty(h * w, 3, dtype=torch.float32, device=dev)
        conf = torch.empty(h * w, dtype=torch.float32, device=dev)
        wmean = torch.empty(h * w, dtype=torch.float32, device=dev)
        step = max(1024, chunk_elems // max(S, 1))
        es = torch.tensor([e for e, _ in slots], device=dev)
        M = ((sig[es] * inv)[:, None, None] * Re[es]).float()         # (S, 3, 3) input units -> world
        tt = (te[es] - c[v]).float()                                   # (S, 3) relative to the centre
        Rv = R[v].float()
        fv, ppv = float(f[v]), pp_t[v].float()
        for a0 in range(0, h * w, step):
            a1 = min(a0 + step, h * w)
            n = a1 - a0
            pix = torch.arange(a0, a1, device=dev)
            rays = torch.stack([((pix % w).float() - ppv[0]) / fv, ((pix // w).float() - ppv[1]) / fv,
                                torch.ones(n, device=dev)])            # (3, n)
            a = Rv @ rays                                              # (3, n) planar
            A2 = (a * a).sum(0)
            t = torch.empty(S, n, device=dev)
            q = torch.empty(S, n, device=dev)
            wv = torch.empty(S, n, device=dev)
            cmax = torch.zeros(n, device=dev)
            for k, (e, side) in enumerate(slots):
                X = inp.pts(e, side).reshape(-1, 3)[a0:a1]
                u = torch.addmm(tt[k][:, None], M[k], X.T)             # (3, n): y_s - c
                tk = (u * a).sum(0) / A2
                perp = u - tk * a                                      # no cancellation
                t[k] = tk
                q[k] = (perp * perp).sum(0)
                wv[k] = (W1 if side == 0 else W2)[e].reshape(-1)[a0:a1]
                cmax = torch.maximum(cmax, torch.nan_to_num(inp.conf(e, side).reshape(-1)[a0:a1], nan=0.0))
            d, loss = _weiszfeld(t, q, A2, wv, int(final_irls) + 1)
            total_loss += loss
            ok = wv.sum(0) > 0
            chi = c[v].float()[:, None] + d * a                        # (3, n)
            pts[a0:a1] = torch.where(ok[:, None], chi.T, torch.full_like(chi.T, float("nan")))
            conf[a0:a1] = torch.where(ok, cmax.clamp_min(0), torch.zeros_like(cmax))
            wmean[a0:a1] = wv.mean(0)
        area += h * w * S
        pts_out.append(pts.reshape(h, w, 3))
        conf_out.append(conf.reshape(h, w))
        w_out.append(wmean.reshape(h, w))
    final_loss = total_loss / (area / 2.0) * inp.scale
    return pts_out, conf_out, w_out, final_loss


def stack_views(lst) -> np.ndarray:
    """np.stack, or an object array of per-view maps when the views differ in size."""
    try:
        return np.stack(lst)
    except ValueError:
        out = np.empty(len(lst), dtype=object)
        for k, a in enumerate(lst):
            out[k] = a
        return out


__all__ += ["stack_views"]
