"""The reference optimiser: Adam on the reduced problem, depths eliminated in closed form.

The free variables are the poses (axis-angle update of the initial rotation + centre),
log-focals and per-pair axis-angle / translation / log-scale; per-pixel depths are solved inside
every iteration (one IRLS / Weiszfeld step with the residuals of the previous iteration) and the
exact non-squared objective on the pixel subsample is differentiated through them. Adam
(beta 0.9, 0.9), lr cosine-decayed to lr * lr_min_ratio, ``iterations`` steps (paper: 500).
This is the aligner of the project before the Gauss-Newton solver (``optimise_gn.py``), kept
selectable (``optimizer='adam'``) as the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..errors import Cancelled

__all__ = ["OptimResult", "Problem", "optimise_adam", "RES_EPS", "MIN_DEPTH"]

RES_EPS = 1e-4       # IRLS floor on residuals (normalised scene units: median depth ~ 1)
MIN_DEPTH = 1e-4


@dataclass
class Problem:
    """What both optimisers need besides the samples (normalised scene units)."""

    pp: torch.Tensor                 # (V, 2) principal points
    known_pose_mask: torch.Tensor    # (V,) bool
    known_focal_mask: torch.Tensor   # (V,) bool
    known_poses: Optional[torch.Tensor]   # (V, 4, 4) (NaN -> 0) or None
    hard_poses: bool                 # known poses fixed (pose_prior_weight = inf)
    pose_prior_weight: float
    norm_scale: bool                 # hold the mean log pair scale (prod sigma_e) at log_scale_mean
    scale: float                     # s0: input units per normalised unit (loss history)
    log_scale_mean: float = 0.0      # 0 (prod sigma_e = 1), or the known poses' scale (soft priors)


@dataclass
class OptimResult:
    R: torch.Tensor       # (V, 3, 3) camera-to-world rotations
    c: torch.Tensor       # (V, 3) centres
    f: torch.Tensor       # (V,) focals
    sig: torch.Tensor     # (E,) pair scales
    Re: torch.Tensor      # (E, 3, 3) pair rotations
    te: torch.Tensor      # (E, 3) pair translations
    history: List[float]
    rejected: int = 0     # Gauss-Newton: damped steps that did not lower the objective


def so3_exp(w):
    """Rotation matrices (B,3,3) from axis-angle vectors (B,3) (differentiable)."""
    z = torch.zeros_like(w[:, 0])
    K = torch.stack([z, -w[:, 2], w[:, 1], w[:, 2], z, -w[:, 0], -w[:, 1], w[:, 0], z], -1)
    return torch.linalg.matrix_exp(K.reshape(-1, 3, 3))


def _gather(onehot, x):
    """x[v_index] written as a matmul: deterministic forward and backward on CPU threads
    (index gathers accumulate their gradients in a thread-dependent order)."""
    return (onehot.T @ x.reshape(x.shape[0], -1)).reshape((onehot.shape[1],) + x.shape[1:])


def solve_depth(a, c, Y, omega, v_index, n_views):
    """Closed-form weighted least-squares depth along each ray (a: (V,n,3) world ray
    directions, c: (V,3) centres, Y: (S,n,3) targets of slots with views v_index (S,))."""
    onehot = torch.nn.functional.one_hot(v_index, n_views).T.to(Y.dtype)  # (V, S)
    proj = (_gather(onehot, a) * (Y - (onehot.T @ c)[:, None])).sum(-1)
    num = onehot @ (omega * proj)
    den = onehot @ omega
    den = den * a.square().sum(-1)
    return (num / den.clamp_min(1e-12)).clamp_min(MIN_DEPTH), den > 0


def optimise_adam(init, edges, uv, Xs, Ws, prob: Problem, iterations: int = 500, lr: float = 0.01,
                  lr_min_ratio: float = 0.01, progress: Optional[Callable] = None,
                  cancel: Optional[Callable[[], bool]] = None) -> OptimResult:
    """Adam on the subsample (uv (V,n,2), Xs (E,2,n,3), Ws (E,2,n), see subsample.edge_major)."""
    dev = Xs.device
    V, E, N = uv.shape[0], Xs.shape[0], Xs.shape[2]
    ev = torch.tensor(edges, device=dev)  # (E, 2) view of slot k
    norm_s = float(E * N)  # DUSt3R normalises each side by its total area: sum / (E * HW)
    f32 = dict(device=dev, dtype=torch.float32)
    pp_t = prob.pp.to(**f32)
    cam_R0 = init.cam_R.float()
    p_cam_w = torch.zeros(V, 3, **f32, requires_grad=True)
    p_cam_c = init.cam_c.float().clone().requires_grad_(True)
    p_logf = torch.zeros(V, **f32, requires_grad=True)
    f0 = torch.as_tensor(init.focal, **f32)
    e_R0 = init.e_R.float()
    p_e_w = torch.zeros(E, 3, **f32, requires_grad=True)
    p_e_t = init.e_t.float().clone().requires_grad_(True)
    p_e_ls = torch.log(init.e_s).float().clone().requires_grad_(True)
    kfm, kpm = prob.known_focal_mask, prob.known_pose_mask
    n_known = int(kpm.sum())
    hard_poses = prob.hard_poses and n_known > 0
    kp_t = prob.known_poses.to(**f32) if n_known else None
    params = [p_cam_w, p_cam_c, p_e_w, p_e_t, p_e_ls]
    if not bool(kfm.all()):
        params.append(p_logf)

    def cameras():
        R = so3_exp(p_cam_w) @ cam_R0
        c = p_cam_c
        if hard_poses:
            R = torch.where(kpm[:, None, None], kp_t[:, :3, :3], R)
            c = torch.where(kpm[:, None], kp_t[:, :3, 3], c)
        f = torch.where(kfm, f0, f0 * torch.exp(p_logf))
        return R, c, f

    def edge_sims():
        ls = p_e_ls - p_e_ls.mean() + prob.log_scale_mean if prob.norm_scale else p_e_ls
        return torch.exp(ls), so3_exp(p_e_w) @ e_R0, p_e_t

    flat_v = ev.reshape(-1)
    onehot_v = torch.nn.functional.one_hot(flat_v, V).T.float()  # (V, 2E)
    irls = torch.ones_like(Ws)
    history: List[float] = []
    n_it = int(iterations)
    if n_it > 0:
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.9))
    lr_min = lr * lr_min_ratio
    for it in range(n_it):
        if cancel is not None and cancel():
            raise Cancelled(f"alignment cancelled at iteration {it}/{n_it}")
        cur_lr = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * it / max(n_it, 1))) / 2
        for gp in opt.param_groups:
            gp["lr"] = cur_lr
        opt.zero_grad(set_to_none=True)
        R, c, f = cameras()
        rays = torch.cat([(uv - pp_t[:, None]) / f[:, None, None], torch.ones_like(uv[..., :1])], -1)
        a = torch.einsum("vij,vnj->vni", R, rays)
        sig, Re, te = edge_sims()
        Y = sig[:, None, None, None] * torch.einsum("eij,eknj->ekni", Re, Xs) + te[:, None, None, :]
        Yf = Y.reshape(E * 2, N, 3)
        d, _ = solve_depth(a, c, Yf, (Ws * irls).reshape(E * 2, N), flat_v, V)
        chi = c[:, None] + d[..., None] * a
        res = (_gather(onehot_v, chi) - Yf).norm(dim=-1).reshape(E, 2, N)
        loss = (Ws * res).sum() / norm_s
        total = loss
        if n_known and not hard_poses:
            total = total + float(prob.pose_prior_weight) * (
                (R[kpm] - kp_t[kpm][:, :3, :3]).flatten(1).norm(dim=-1).sum()
                + (c[kpm] - kp_t[kpm][:, :3, 3]).norm(dim=-1).sum())
        total.backward()
        opt.step()
        irls = 1.0 / res.detach().clamp_min(RES_EPS)
        lv = float(loss.detach()) * prob.scale
        history.append(lv)
        if progress is not None:
            progress(it, n_it, lv)
    with torch.no_grad():
        R, c, f = (x.detach() for x in cameras())
        sig, Re, te = (x.detach() for x in edge_sims())
    return OptimResult(R, c, f, sig, Re, te, history)
