"""Dynamic Global Aligning (WildSeg3D, ICCV 2025) on DUSt3R-style pairwise pointmaps.

Objective (DUSt3R's global alignment, the paper's weights):

    min_{chi, P, sigma}  sum_e sum_{v in e} sum_i  W_i^{v,e} || chi_i^v - sigma_e P_e X_i^{v,e} ||
    with  chi_i^v = T_v (d_i^v K_v^{-1} [u_i, 1]),   prod_e sigma_e = 1

(T_v camera-to-world pose, K_v focal + principal point, d per-pixel depth, P_e rigid, sigma_e
scale). See docs/dga.md for the optimiser: Adam on poses / focals / pairwise similarities over
a random pixel subsample, with every per-pixel depth eliminated in closed form (variable
projection; an IRLS/Weiszfeld step for the non-squared norm), then the full-resolution depths
solved in closed form at the end.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..types import AlignedScene, PairwisePredictions
from ..errors import AlignmentError, Cancelled
from .init import batched_umeyama, estimate_focal, pixel_grid, spanning_tree_order
from .matching import auto_stride, pair_matches
from .weights import confidence_weights, dga_weights, transform_confidence

__all__ = ["align_global"]

_RES_EPS = 1e-4       # IRLS floor on residuals (normalised scene units: median depth ~ 1)
_MIN_DEPTH = 1e-4


# ------------------------------------------------------------------------------------------
# input parsing
# ------------------------------------------------------------------------------------------
def _as_index_list(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return [int(i) for i in np.asarray(x).reshape(-1)]


def _as_tensor_list(x, n, name, device, trailing):
    """Stacked (E, ...) tensor/array or a list of per-edge arrays -> list of float32 tensors."""
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


def _so3_exp(w):
    """Rotation matrices (B,3,3) from axis-angle vectors (B,3) (differentiable)."""
    z = torch.zeros_like(w[:, 0])
    K = torch.stack([z, -w[:, 2], w[:, 1], w[:, 2], z, -w[:, 0], -w[:, 1], w[:, 0], z], -1)
    return torch.linalg.matrix_exp(K.reshape(-1, 3, 3))


def _parse_known(known, V, kind):
    """known poses (V,4,4) with NaN rows for unknown, or a dict {view: 4x4}; focals (V,) / (V,3,3)."""
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


# ------------------------------------------------------------------------------------------
# main entry point
# ------------------------------------------------------------------------------------------
def align_global(pairs, num_views: Optional[int] = None, soft_masks=None, known_poses=None,
                 known_focals=None, pose_prior_weight: float = float("inf"), weighting: str = "dga",
                 alpha_p: float = 0.5, alpha_n: float = 0.9, iterations: int = 500,
                 lr: float = 0.01, match_threshold: float = 0.03, device: str = "cpu",
                 seed: int = 0, progress: Optional[Callable] = None,
                 cancel: Optional[Callable[[], bool]] = None, *, num_samples: int = 8192,
                 conf_mode: str = "auto", match_stride: Optional[int] = None,
                 mutual: bool = False, final_irls: int = 10, lr_min_ratio: float = 0.01,
                 principal_points=None) -> AlignedScene:
    """Globally align DUSt3R-style pairwise pointmaps with Dynamic Global Aligning.

    pairs: :class:`~wildseg3d_ros.core.types.PairwisePredictions`, or the dict of
        ``dust3r.inference.inference()`` (converted with ``PairwisePredictions.from_dust3r``);
        torch or numpy, stacked over pairs (E,H,W,3) or lists of per-pair arrays when image
        sizes differ.
    soft_masks: per-view soft object masks S (V,H,W) in [0,1] (or a list); None -> S = 1.
    known_poses: (V,4,4) camera-to-world with NaN for unknown views, or {view: 4x4}.
        pose_prior_weight = inf (default) fixes the known poses; a finite value adds the penalty
        ``w * sum_v (||R_v - R_v^known||_F + ||c_v - c_v^known|| / scene_scale)``.
    known_focals: (V,) pixels (NaN = unknown) or (V,3,3) intrinsics (their fx); fixed when given.
    weighting: 'dga' (paper) or 'confidence' (DUSt3R baseline, W = C = log conf by default).
    alpha_p / alpha_n: DGA alpha for matching / non-matching pixels.
    iterations, lr: Adam iterations and initial learning rate (cosine schedule to lr*lr_min_ratio).
    match_threshold: tau of the co-visibility test (relative to point distance), see matching.py.
    device: 'cpu' or 'cuda' (any torch device). seed: pixel-subsample seed (deterministic).
    progress(i, n, loss): called every iteration. cancel(): return True to abort
        (raises errors.Cancelled).
    num_samples: pixels per view used while optimising poses / focals / pairwise similarities.
    conf_mode: 'auto' | 'log' | 'raw' (see weights.transform_confidence).
    principal_points: (V,2) or None -> known_focals' K (when given as matrices) or ((W-1)/2, (H-1)/2).

    Returns an AlignedScene (world pointmaps, conf = per-view max input confidence (0 = invalid),
    poses, K, rgb, weights = per-view mean of W over the pairs containing the view, loss = the
    full-resolution objective in input units, loss_history = the per-iteration subsample estimate
    of the same normalised objective).
    Raises AlignmentError on degenerate input (fewer than two views, a disconnected pair graph,
    all-zero confidence, inconsistent shapes)."""
    dev = torch.device(device)
    if weighting not in ("dga", "confidence"):
        raise ValueError(f"weighting must be 'dga' or 'confidence', got {weighting!r}")
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

    X1 = _as_tensor_list(pairs.pts1, E, "pts1", dev, 1)
    X2 = _as_tensor_list(pairs.pts2, E, "pts2", dev, 1)
    C1 = _as_tensor_list(pairs.conf1, E, "conf1", dev, 0)
    C2 = _as_tensor_list(pairs.conf2, E, "conf2", dev, 0)
    shapes = [None] * V
    for e, (i, j) in enumerate(edges):
        for v, X, C in ((i, X1[e], C1[e]), (j, X2[e], C2[e])):
            hw = tuple(X.shape[:2])
            if tuple(C.shape) != hw:
                raise AlignmentError(f"pair {e}: confidence shape {tuple(C.shape)} != pointmap shape {hw}")
            if shapes[v] is not None and shapes[v] != hw:
                raise AlignmentError(f"view {v}: inconsistent image shapes {shapes[v]} and {hw}")
            shapes[v] = hw
    if any(s is None for s in shapes):
        missing = [v for v in range(V) if shapes[v] is None]
        raise AlignmentError(f"the pair graph is disconnected: views {missing} are in no pair")

    # -- confidences, validity ------------------------------------------------------------
    if conf_mode == "auto":
        allc = torch.cat([c.reshape(-1) for c in C1 + C2])
        allc = allc[torch.isfinite(allc)]
        conf_mode = "log" if allc.numel() and bool((allc >= 1).all()) else "raw"
    Ct1, Ct2 = [], []
    for lst_x, lst_c, out in ((X1, C1, Ct1), (X2, C2, Ct2)):
        for k in range(E):
            ok = torch.isfinite(lst_x[k]).all(-1)
            c = transform_confidence(lst_c[k], conf_mode)
            out.append(torch.where(ok, c, torch.zeros_like(c)))
            lst_x[k] = torch.where(ok[..., None], lst_x[k], torch.zeros_like(lst_x[k]))
    if float(sum(float(c.sum()) for c in Ct1 + Ct2)) <= 0:
        raise AlignmentError(f"all confidences are zero (conf_mode={conf_mode!r}): nothing to align")

    # global normalisation: median point distance -> 1 (so lr / eps are scale free)
    samp = torch.cat([x[::4, ::4].reshape(-1, 3)[c[::4, ::4].reshape(-1) > 0] for x, c in zip(X1, Ct1)])
    s0 = float(samp.norm(dim=-1).median()) if samp.numel() else 1.0
    if not math.isfinite(s0) or s0 <= 0:
        s0 = 1.0
    X1 = [x / s0 for x in X1]
    X2 = [x / s0 for x in X2]

    # -- weights ---------------------------------------------------------------------------
    S = None
    if soft_masks is not None:
        S = _as_tensor_list(soft_masks, V, "soft_masks", dev, 0)
        for v in range(V):
            if tuple(S[v].shape) != shapes[v]:
                raise AlignmentError(f"soft_masks[{v}] shape {tuple(S[v].shape)} != image shape {shapes[v]}")
    W1, W2 = [], []
    M1, M2 = [], []
    for e, (i, j) in enumerate(edges):
        if cancel is not None and cancel():  # matching is the longest stretch before the loop
            raise Cancelled(f"alignment cancelled while matching pair {e}/{len(edges)}")
        if weighting == "dga":
            st = match_stride or auto_stride(*shapes[i])
            m1, m2 = pair_matches(X1[e].cpu().numpy(), X2[e].cpu().numpy(),
                                  (Ct1[e] > 0).cpu().numpy(), (Ct2[e] > 0).cpu().numpy(),
                                  threshold=match_threshold, stride=st, mutual=mutual)
            m1 = torch.as_tensor(m1, device=dev)
            m2 = torch.as_tensor(m2, device=dev)
            W1.append(dga_weights(Ct1[e], None if S is None else S[i], m1, alpha_p, alpha_n))
            W2.append(dga_weights(Ct2[e], None if S is None else S[j], m2, alpha_p, alpha_n))
            M1.append(m1)
            M2.append(m2)
        else:
            W1.append(confidence_weights(Ct1[e]))
            W2.append(confidence_weights(Ct2[e]))

    # -- priors ----------------------------------------------------------------------------
    kp = _parse_known(known_poses, V, "pose")
    kf = _parse_known(known_focals, V, "focal")
    known_pose_mask = np.zeros(V, bool) if kp is None else np.isfinite(kp).all((1, 2))
    known_focal_mask = np.zeros(V, bool) if kf is None else (np.isfinite(kf) & (kf > 0))
    n_known = int(known_pose_mask.sum())
    hard_poses = n_known > 0 and not math.isfinite(pose_prior_weight)
    if kp is not None:
        kp = kp.copy()
        kp[known_pose_mask, :3, 3] /= s0
    pp = np.zeros((V, 2))
    for v in range(V):
        H, Wd = shapes[v]
        pp[v] = ((Wd - 1) / 2.0, (H - 1) / 2.0)
    if principal_points is not None:
        pp = np.asarray(principal_points, dtype=np.float64).reshape(V, 2)
    elif known_focals is not None and not isinstance(known_focals, dict) and np.ndim(known_focals) == 3:
        Kk = np.asarray(known_focals.cpu() if isinstance(known_focals, torch.Tensor) else known_focals, np.float64)
        ok = np.isfinite(Kk[:, :2, 2]).all(1)
        pp[ok] = Kk[ok, :2, 2]
    pp_t = torch.as_tensor(pp, dtype=torch.float32, device=dev)

    # -- initialisation: spanning tree + closed-form similarities -----------------------------
    scores = [float(Ct1[e].mean() * Ct2[e].mean()) for e in range(E)]
    order = spanning_tree_order(edges, scores, V)
    pts_w = [None] * V

    def _sim(src, dst, w):
        s, R, t = batched_umeyama(src.reshape(1, -1, 3).double(), dst.reshape(1, -1, 3).double(),
                                  w.reshape(1, -1).double())
        return float(s[0]), R[0], t[0]

    e0 = order[0]
    pts_w[edges[e0][0]], pts_w[edges[e0][1]] = X1[e0].double(), X2[e0].double()
    for e in order[1:]:
        i, j = edges[e]
        if pts_w[i] is not None:
            s, R, t = _sim(X1[e], pts_w[i], W1[e])
            pts_w[j] = s * X2[e].double() @ R.T + t
        else:
            s, R, t = _sim(X2[e], pts_w[j], W2[e])
            pts_w[i] = s * X1[e].double() @ R.T + t

    cam_R = torch.zeros(V, 3, 3, dtype=torch.float64, device=dev)
    cam_c = torch.zeros(V, 3, dtype=torch.float64, device=dev)
    focal0 = np.zeros(V)
    for v in range(V):
        if cancel is not None and cancel():
            raise Cancelled("alignment cancelled during initialisation")
        own = [e for e in range(E) if edges[e][0] == v]
        if own:
            e = max(own, key=lambda k: scores[k])
            _, R, t = _sim(X1[e], pts_w[v], W1[e])
            cam_R[v], cam_c[v] = R, t
            focal0[v] = estimate_focal(X1[e], pp_t[v], W1[e])
        else:
            focal0[v] = np.nan
    for v in range(V):
        if known_focal_mask[v]:
            focal0[v] = kf[v]
        elif not np.isfinite(focal0[v]):
            fin = focal0[np.isfinite(focal0)]
            focal0[v] = float(np.median(fin)) if fin.size else max(shapes[v]) / (2 * np.tan(np.pi / 6))
    for v in range(V):
        if not any(edges[e][0] == v for e in range(E)):  # only seen as view2: resection (PnP)
            cam_R[v], cam_c[v] = _pnp(pts_w[v], focal0[v], pp[v], (_view_weight(v, edges, W2) > 0))

    # pairwise similarities from the initial world pointmaps (batched over edges)
    n_fit = 4096
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    src, dst, wts = [], [], []
    for e, (i, j) in enumerate(edges):
        a = torch.cat([X1[e].reshape(-1, 3), X2[e].reshape(-1, 3)]).double()
        b = torch.cat([pts_w[i].reshape(-1, 3), pts_w[j].reshape(-1, 3)])
        w = torch.cat([W1[e].reshape(-1), W2[e].reshape(-1)]).double()
        sel = torch.randint(0, len(a), (n_fit,), generator=gen).to(dev)
        src.append(a[sel]), dst.append(b[sel]), wts.append(w[sel])
    e_s, e_R, e_t = batched_umeyama(torch.stack(src), torch.stack(dst), torch.stack(wts))

    # bring the initial world onto the known poses
    if n_known >= 2:
        g_s, g_R, g_t = _align_poses(cam_R[known_pose_mask], cam_c[known_pose_mask],
                                     torch.as_tensor(kp[known_pose_mask], device=dev))
        cam_R = g_R @ cam_R
        cam_c = g_s * cam_c @ g_R.T + g_t
        e_R = g_R @ e_R
        e_t = g_s * e_t @ g_R.T + g_t
        e_s = g_s * e_s
    norm_scale = n_known < 2
    if norm_scale:
        g = torch.exp(torch.log(e_s).mean())
        e_s, e_t, cam_c = e_s / g, e_t / g, cam_c / g
    if n_known == 1:  # one known pose: move the gauge onto it (rigid)
        v = int(np.flatnonzero(known_pose_mask)[0])
        Kv = torch.as_tensor(kp[v], device=dev)
        G_R = Kv[:3, :3] @ cam_R[v].T
        G_t = Kv[:3, 3] - G_R @ cam_c[v]
        cam_R, cam_c = G_R @ cam_R, cam_c @ G_R.T + G_t
        e_R, e_t = G_R @ e_R, e_t @ G_R.T + G_t

    # -- pixel subsample ---------------------------------------------------------------------
    N = int(min(num_samples, min(h * w for h, w in shapes)))
    ev = torch.tensor(edges, device=dev)  # (E, 2) view of slot k
    sample_idx, uv = [], []
    for v in range(V):
        h, w = shapes[v]
        tot = _view_weight(v, edges, W1, W2).reshape(-1)
        cand = torch.nonzero(tot > 0).reshape(-1).cpu()
        if len(cand) >= N:
            sel = cand[torch.randperm(len(cand), generator=gen)[:N]]
        else:
            sel = torch.randperm(h * w, generator=gen)[:N]
        sel = sel.to(dev)
        sample_idx.append(sel)
        uv.append(pixel_grid(h, w, dev)[sel])
    uv = torch.stack(uv)  # (V, N, 2)
    Xs = torch.stack([torch.stack([X1[e].reshape(-1, 3)[sample_idx[i]], X2[e].reshape(-1, 3)[sample_idx[j]]])
                      for e, (i, j) in enumerate(edges)])  # (E, 2, N, 3)
    Ws = torch.stack([torch.stack([W1[e].reshape(-1)[sample_idx[i]], W2[e].reshape(-1)[sample_idx[j]]])
                      for e, (i, j) in enumerate(edges)])  # (E, 2, N)
    norm_s = float(E * N)  # DUSt3R normalises each side by its total area: sum / (E * HW)

    # -- parameters ----------------------------------------------------------------------------
    f32 = dict(device=dev, dtype=torch.float32)
    cam_R0 = cam_R.float()
    p_cam_w = torch.zeros(V, 3, **f32, requires_grad=True)
    p_cam_c = cam_c.float().clone().requires_grad_(True)
    p_logf = torch.zeros(V, **f32, requires_grad=True)
    f0 = torch.as_tensor(focal0, **f32)
    e_R0 = e_R.float()
    p_e_w = torch.zeros(E, 3, **f32, requires_grad=True)
    p_e_t = e_t.float().clone().requires_grad_(True)
    p_e_ls = torch.log(e_s).float().clone().requires_grad_(True)
    kfm = torch.as_tensor(known_focal_mask, device=dev)
    kpm = torch.as_tensor(known_pose_mask, device=dev)
    if n_known:
        kp_t = torch.as_tensor(np.nan_to_num(kp), **f32)
    params = [p_cam_w, p_cam_c, p_e_w, p_e_t, p_e_ls]
    if not known_focal_mask.all():
        params.append(p_logf)

    def cameras():
        R = _so3_exp(p_cam_w) @ cam_R0
        c = p_cam_c
        if hard_poses:
            R = torch.where(kpm[:, None, None], kp_t[:, :3, :3], R)
            c = torch.where(kpm[:, None], kp_t[:, :3, 3], c)
        f = torch.where(kfm, f0, f0 * torch.exp(p_logf))
        return R, c, f

    def edge_sims():
        ls = p_e_ls - p_e_ls.mean() if norm_scale else p_e_ls
        return torch.exp(ls), _so3_exp(p_e_w) @ e_R0, p_e_t

    flat_v = ev.reshape(-1)
    onehot_v = torch.nn.functional.one_hot(flat_v, V).T.float()  # (V, 2E)

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
        return (num / den.clamp_min(1e-12)).clamp_min(_MIN_DEPTH), den > 0

    irls = torch.ones_like(Ws)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.9))
    history = []
    lr_min = lr * lr_min_ratio
    n_it = int(iterations)
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
            total = total + float(pose_prior_weight) * (
                (R[kpm] - kp_t[kpm][:, :3, :3]).flatten(1).norm(dim=-1).sum()
                + (c[kpm] - kp_t[kpm][:, :3, 3]).norm(dim=-1).sum())
        total.backward()
        opt.step()
        irls = 1.0 / res.detach().clamp_min(_RES_EPS)
        lv = float(loss.detach()) * s0
        history.append(lv)
        if progress is not None:
            progress(it, n_it, lv)

    # -- final: full-resolution closed-form depths ------------------------------------------------
    with torch.no_grad():
        R, c, f = (x.detach() for x in cameras())
        sig, Re, te = (x.detach() for x in edge_sims())
        pts_out, conf_out, w_out = [], [], []
        total_loss = 0.0
        area = 0.0
        for v in range(V):
            h, w = shapes[v]
            slots = [(e, 0) for e in range(E) if edges[e][0] == v] + [(e, 1) for e in range(E) if edges[e][1] == v]
            grid = pixel_grid(h, w, dev)
            rays = torch.cat([(grid - pp_t[v]) / f[v], torch.ones_like(grid[:, :1])], -1)
            a = (rays @ R[v].T)[None]  # (1, HW, 3)
            Yv = torch.stack([sig[e] * ((X1[e] if k == 0 else X2[e]).reshape(-1, 3) @ Re[e].T) + te[e]
                              for e, k in slots])  # (S, HW, 3)
            wv = torch.stack([(W1[e] if k == 0 else W2[e]).reshape(-1) for e, k in slots])
            cv = torch.stack([(C1[e] if k == 0 else C2[e]).reshape(-1) for e, k in slots])
            vi = torch.zeros(len(slots), dtype=torch.long, device=dev)
            omega = wv.clone()
            for _ in range(max(int(final_irls), 0) + 1):
                d, ok = solve_depth(a, c[v:v + 1], Yv, omega, vi, 1)
                chi = c[v] + d[0, :, None] * a[0]
                r = (chi[None] - Yv).norm(dim=-1)
                omega = wv / r.clamp_min(_RES_EPS)
            total_loss += float((wv * r).sum())
            area += h * w * len(slots)
            ok = ok[0]
            pts = torch.where(ok[:, None], chi, torch.full_like(chi, float("nan")))
            conf = torch.where(ok, torch.nan_to_num(cv, nan=0.0).amax(0).clamp_min(0), torch.zeros_like(ok, dtype=torch.float32))
            pts_out.append(pts.reshape(h, w, 3))
            conf_out.append(conf.reshape(h, w))
            w_out.append(wv.mean(0).reshape(h, w))
        final_loss = total_loss / (area / 2.0) * s0

    poses = np.tile(np.eye(4), (V, 1, 1))
    poses[:, :3, :3] = R.double().cpu().numpy()
    poses[:, :3, 3] = c.double().cpu().numpy() * s0
    pts_np = [p.cpu().numpy() * s0 for p in pts_out]
    # gauge: world = camera 0 when nothing is known (the loss is invariant to it)
    if n_known == 0:
        G = np.linalg.inv(poses[0])
        poses = G @ poses
        poses[0] = np.eye(4)
        pts_np = [(p.reshape(-1, 3) @ G[:3, :3].T + G[:3, 3]).reshape(p.shape) for p in pts_np]
    for v in range(V):  # re-orthonormalise (float32 round-off)
        U, _, Vt = np.linalg.svd(poses[v, :3, :3])
        poses[v, :3, :3] = U @ np.diag([1, 1, np.linalg.det(U @ Vt)]) @ Vt
    Ks = np.tile(np.eye(3), (V, 1, 1))
    fv = f.double().cpu().numpy()
    Ks[:, 0, 0] = Ks[:, 1, 1] = fv
    Ks[:, :2, 2] = pp

    rgb = [np.zeros(shapes[v] + (3,), np.uint8) for v in range(V)]
    if pairs.images is not None and len(pairs.images) == V:
        rgb = [im if tuple(np.shape(im)[:2]) == shapes[v] else rgb[v] for v, im in enumerate(pairs.images)]

    def _stack(lst):
        try:
            return np.stack(lst)
        except ValueError:  # different image sizes: keep an object array of per-view maps
            out = np.empty(len(lst), dtype=object)
            for k, a in enumerate(lst):
                out[k] = a
            return out

    return AlignedScene(
        pts3d=_stack([p.astype(np.float32) for p in pts_np]),
        conf=_stack([c_.cpu().numpy().astype(np.float32) for c_ in conf_out]),
        poses=poses, K=Ks, rgb=_stack(rgb),
        weights=_stack([w_.cpu().numpy().astype(np.float32) for w_ in w_out]),
        loss=float(final_loss), loss_history=history, metric=n_known >= 2)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _view_weight(v, edges, *Ws):
    """Sum of the weights of every slot of view v (Ws: W1 list and/or W2 list)."""
    tot = None
    for k, Wl in enumerate(Ws):
        slot = k if len(Ws) == 2 else 1
        for e, ij in enumerate(edges):
            if ij[slot] == v:
                tot = Wl[e] if tot is None else tot + Wl[e]
    return tot


def _align_poses(R_est, c_est, T_known):
    """World similarity taking estimated cameras onto known ones: fit on the camera centres and
    two points along each camera's x and z axes (at the scale of the camera spread)."""
    c_k = T_known[:, :3, 3]
    R_k = T_known[:, :3, :3]
    L_e = float((c_est - c_est.mean(0)).norm(dim=-1).mean()) or 1.0
    L_k = float((c_k - c_k.mean(0)).norm(dim=-1).mean()) or 1.0
    src = torch.cat([c_est, c_est + L_e * R_est[:, :, 0], c_est + L_e * R_est[:, :, 2]])
    dst = torch.cat([c_k, c_k + L_k * R_k[:, :, 0], c_k + L_k * R_k[:, :, 2]])
    s, R, t = batched_umeyama(src[None].double(), dst[None].double(), torch.ones(1, len(src), dtype=torch.float64, device=src.device))
    return s[0], R[0], t[0]


def _pnp(pts_world, focal, pp, valid):
    """Camera-to-world pose of a view from its world pointmap (H,W,3) by PnP (OpenCV)."""
    import cv2

    h, w = pts_world.shape[:2]
    P = pts_world.reshape(-1, 3).cpu().numpy().astype(np.float64)
    uv = pixel_grid(h, w).numpy().astype(np.float64)
    ok = valid.reshape(-1).cpu().numpy() & np.isfinite(P).all(1)
    sel = np.flatnonzero(ok)
    if len(sel) > 4000:
        sel = sel[np.linspace(0, len(sel) - 1, 4000).astype(int)]
    if len(sel) < 6:
        raise AlignmentError("cannot place a view seen only as the second image of its pairs (too few valid points)")
    K = np.array([[focal, 0, pp[0]], [0, focal, pp[1]], [0, 0, 1]], np.float64)
    okp, rvec, tvec, _ = cv2.solvePnPRansac(P[sel], uv[sel], K, None, iterationsCount=100,
                                           reprojectionError=5.0, flags=cv2.SOLVEPNP_SQPNP)
    if not okp:
        raise AlignmentError("PnP failed for a view seen only as the second image of its pairs")
    Rw2c, _ = cv2.Rodrigues(rvec)
    R = Rw2c.T
    c = -R @ tvec.reshape(3)
    return (torch.as_tensor(R, dtype=torch.float64, device=pts_world.device),
            torch.as_tensor(c, dtype=torch.float64, device=pts_world.device))
