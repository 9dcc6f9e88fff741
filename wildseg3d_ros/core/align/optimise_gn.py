"""The default optimiser: Levenberg-Marquardt (Gauss-Newton) on the reduced problem.

Same objective as the Adam reference (``optimise_adam.py``) on the same kind of pixel subsample:

    L = sum_{v, s, n} W_{v,s,n} || c_v + d_{v,n} a_{v,n} - (sigma_e R_e X_{v,s,n} + t_e) || / (E n)
        (+ w sum_known (||R_v - R_v^k||_F + ||c_v - c_v^k||) for soft pose priors)

with s the slots (pair e, side) of view v. The non-squared norm is handled by IRLS: each
outer iteration fixes omega = W / max(||r||, eps) and takes one damped Gauss-Newton step on
``1/2 sum omega ||r||^2`` - a majoriser of L that touches it at the current residuals, so a step
that lowers the surrogate lowers L. (Clamped at eps = RES_EPS, 1e-4 of the median depth, the
weights majorise L with the norm floored there: ``(||r||^2 + eps^2) / (2 eps)`` below eps. That
is the L this optimiser evaluates, tests its steps on and reports in its history. With the plain
norm, near-exact data (simulated depth: most residuals below eps) had its good steps rejected.)
The step is over the few unknowns that remain once the depths are eliminated (per view
axis-angle, centre, log-focal; per pair axis-angle, translation, log-scale: 7 (V + E) numbers):
every pixel's depth couples only to its view's camera and the view's slots, so the depths leave
the normal equations by a per-pixel Schur complement (batched matrix products over the view's
pixels), and after the step they are solved again in closed form (variable projection) with one
more Weiszfeld step. The damped system is solved by Cholesky; a step is accepted when it lowers
L, else the damping grows (Levenberg-Marquardt).

Gauge: without known poses view 0's pose is held (the objective is invariant to the world frame)
and the pair scales keep prod sigma_e = 1 (log-scales projected onto a fixed sum; with soft pose
priors the sum the known poses gave at initialisation); known poses with an infinite weight are
held; known focals are held.
Everything is float64 torch on the inputs' device (CPU or CUDA), deterministic (no scatter-add:
per-view sums are reductions over the slot axis; the global system is assembled view by view).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..errors import Cancelled
from .optimise_adam import MIN_DEPTH, RES_EPS, OptimResult, Problem

__all__ = ["optimise_gauss_newton"]


def _skew(v):
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    z = torch.zeros_like(v[..., 0])
    return torch.stack([z, -v[..., 2], v[..., 1], v[..., 2], z, -v[..., 0], -v[..., 1], v[..., 0], z],
                       -1).reshape(v.shape[:-1] + (3, 3))


def _exp(w):
    return torch.linalg.matrix_exp(_skew(w))


def _cross(a, b):
    """Cross product of planar 3-vectors (3, ...) x (3, ...) -> (3, ...)."""
    return torch.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _axial(M):
    """(..., 3, 3) moment matrices sum x y^T -> (..., 3) sum x cross y (their axial vector)."""
    return torch.stack([M[..., 1, 2] - M[..., 2, 1], M[..., 2, 0] - M[..., 0, 2], M[..., 0, 1] - M[..., 1, 0]], -1)


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _huber(rn):
    """The norm the IRLS weights W / max(||r||, RES_EPS) majorise: ||r|| above RES_EPS and
    (||r||^2 + RES_EPS^2) / (2 RES_EPS) below it (continuous, with a continuous slope)."""
    return torch.where(rn >= RES_EPS, rn, (rn * rn + RES_EPS * RES_EPS) / (2 * RES_EPS))


def _view_blocks(a, d, z, r, om, e3):
    """Per-view normal equations after the per-pixel Schur elimination of the depths.

    Planar layout (x, y, z components first): a (3,Vc,N) rays, d (Vc,N) depths, z (3,Vc,S,N) =
    sigma R_e X, r (3,Vc,S,N) residuals, om (Vc,S,N) IRLS weights, e3 (Vc,3) the cameras'
    optical axes. Local parameters per view: [camera (axis-angle, centre, log-focal), slot 0
    (axis-angle, translation, log-scale), ...]. Returns H (Vc, 7(S+1), 7(S+1)) and the gradient
    g (Vc, 7(S+1)) of 1/2 sum om ||r||^2.

    The Jacobians of r = c + d a - (z + t) are written out block by block (camera:
    [-d [a]x, I, d (e3 - a)]; slot: [[z]x, -I, -z]; depth: a) and their weighted products reduced
    over the pixels analytically (3-vectors and 3x3 moments as batched matmuls): no (N, 3, 7)
    Jacobian is ever formed; the Schur term is one batched B diag(1/h) B^T."""
    _, Vc, S, N = z.shape
    dt, dev = a.dtype, a.device
    eye = torch.eye(3, dtype=dt, device=dev)
    P = 7 * (S + 1)
    H = torch.zeros(Vc, S + 1, 7, S + 1, 7, dtype=dt, device=dev)
    g = torch.zeros(Vc, S + 1, 7, dtype=dt, device=dev)
    Om = om.sum(1)                                                   # (Vc, N)
    wd = om * d[:, None]                                             # (Vc, S, N)
    aT = a.permute(1, 0, 2)                                          # (Vc, 3, N)
    e3p = e3.T[:, :, None]                                           # (3, Vc, 1)
    qv = e3p - a                                                     # (3, Vc, N): focal direction / d
    # camera - camera
    Od2 = Om * d * d
    AA = torch.bmm(aT * Od2[:, None], aT.transpose(1, 2))
    tr = AA.diagonal(dim1=-2, dim2=-1).sum(-1)
    Oda = torch.bmm(aT, (Om * d)[..., None])[..., 0]                 # (Vc, 3)
    Od = (Om * d).sum(1)
    Od2a = torch.bmm(aT, Od2[..., None])[..., 0]
    Hcc = H[:, 0, :, 0, :]
    Hcc[:, :3, :3] = tr[:, None, None] * eye - AA
    Hcc[:, :3, 3:6] = _skew(Oda)
    Hcc[:, :3, 6] = torch.cross(Od2a, e3, dim=-1)
    Hcc[:, 3:6, 3:6] = Om.sum(1)[:, None, None] * eye
    Hcc[:, 3:6, 6] = e3 * Od[:, None] - Oda
    Hcc[:, 6, 6] = (_dot(qv, qv) * Od2).sum(1)
    Hcc[:, 3:6, :3] = Hcc[:, :3, 3:6].transpose(1, 2)
    Hcc[:, 6, :6] = Hcc[:, :6, 6]
    # camera - slot
    zT = z.permute(1, 2, 0, 3)                                       # (Vc, S, 3, N)
    wz = (zT * wd[:, :, None]).reshape(Vc, S * 3, N)
    M1 = torch.bmm(wz, aT.transpose(1, 2)).reshape(Vc, S, 3, 3)     # sum wd z a^T
    trM = M1.diagonal(dim1=-2, dim2=-1).sum(-1)                      # sum wd a.z
    C1 = torch.stack([M1[..., 2, 1] - M1[..., 1, 2], M1[..., 0, 2] - M1[..., 2, 0],
                      M1[..., 1, 0] - M1[..., 0, 1]], -1)           # sum wd a x z
    A1 = torch.bmm(wd, aT.transpose(1, 2))                           # sum wd a (Vc, S, 3)
    Zd = wz.sum(-1).reshape(Vc, S, 3)                                # sum wd z
    Odw = wd.sum(2)
    oz = zT * om[:, :, None]                                         # (Vc, S, 3, N)
    Z1 = oz.sum(-1)                                                  # sum om z
    O1 = om.sum(2)
    e3s = e3[:, None].expand_as(Zd)
    Hcs = torch.zeros(Vc, S, 7, 7, dtype=dt, device=dev)
    Hcs[..., :3, :3] = M1 - trM[..., None, None] * eye
    Hcs[..., :3, 3:6] = -_skew(A1)
    Hcs[..., :3, 6] = -C1
    Hcs[..., 3:6, :3] = _skew(Z1)
    Hcs[..., 3:6, 3:6] = -O1[..., None, None] * eye
    Hcs[..., 3:6, 6] = -Z1
    Hcs[..., 6, :3] = torch.cross(e3s, Zd, dim=-1) - C1
    Hcs[..., 6, 3:6] = -(e3s * Odw[..., None] - A1)
    Hcs[..., 6, 6] = -((e3s * Zd).sum(-1) - trM)
    H[:, 0, :, 1:, :] = Hcs.permute(0, 2, 1, 3)
    H[:, 1:, :, 0, :] = Hcs.transpose(-1, -2)
    # slot - slot (block diagonal)
    ZZ = torch.bmm(oz.reshape(Vc * S, 3, N), zT.reshape(Vc * S, 3, N).transpose(1, 2)).reshape(Vc, S, 3, 3)
    trZ = ZZ.diagonal(dim1=-2, dim2=-1).sum(-1)
    Hss = torch.zeros(Vc, S, 7, 7, dtype=dt, device=dev)
    Hss[..., :3, :3] = trZ[..., None, None] * eye - ZZ
    Hss[..., :3, 3:6] = _skew(Z1)
    Hss[..., 3:6, :3] = _skew(Z1).transpose(-1, -2)
    Hss[..., 3:6, 3:6] = O1[..., None, None] * eye
    Hss[..., 3:6, 6] = Z1
    Hss[..., 6, 3:6] = Z1
    Hss[..., 6, 6] = trZ
    ks = torch.arange(1, S + 1, device=dev)
    H[:, ks, :, ks, :] = Hss.transpose(0, 1)
    # gradient
    omr = r * om                                                     # (3, Vc, S, N)
    rho = omr.sum(2)                                                 # (3, Vc, N)
    g[:, 0, :3] = _axial(torch.bmm(aT * d[:, None], rho.permute(1, 2, 0)))     # sum d a x rho
    g[:, 0, 3:6] = rho.sum(-1).T
    g[:, 0, 6] = (d * _dot(qv, rho)).sum(-1)
    omrT = omr.permute(1, 2, 0, 3).reshape(Vc * S, 3, N)
    g[:, 1:, :3] = _axial(torch.bmm(omrT, zT.reshape(Vc * S, 3, N).transpose(1, 2))).reshape(Vc, S, 3)  # sum om r x z
    g[:, 1:, 3:6] = -omr.sum(-1).permute(1, 2, 0)
    g[:, 1:, 6] = -_dot(omr, z).sum(-1)
    H = H.reshape(Vc, P, P)
    g = g.reshape(Vc, P)
    # Schur complement of the depths: b = J^T om a per pixel, h = sum om |a|^2
    h = Om * _dot(a, a)
    gd = _dot(a, rho)
    B = torch.empty(Vc, S + 1, 7, N, dtype=dt, device=dev)
    B[:, 0, :3] = 0.0
    B[:, 0, 3:6] = aT * Om[:, None]
    B[:, 0, 6] = Om * d * _dot(qv, a)
    az = _cross(a[:, :, None], z) * om                               # (3, Vc, S, N)
    B[:, 1:, :3] = az.permute(1, 2, 0, 3)
    nom = -om
    B[:, 1:, 3:6] = aT[:, None] * nom[:, :, None]
    B[:, 1:, 6] = _dot(a[:, :, None], z) * nom
    B = B.reshape(Vc, P, N)
    hinv = torch.where(h > 0, 1.0 / h.clamp_min(1e-300), torch.zeros_like(h))
    Bh = B * hinv[:, None]
    H = H - torch.bmm(Bh, B.transpose(1, 2))
    g = g - torch.bmm(Bh, gd[..., None])[..., 0]
    return H, g


def _pcg(A, b, tol: float, max_iter: int):
    """Solve A x = b (A symmetric positive definite) by conjugate gradients with a 7x7
    block-Jacobi preconditioner (blocks of consecutive unknowns; the last one may be smaller).
    None when a preconditioner block is not positive definite."""
    n = A.shape[0]
    nb = (n + 6) // 7
    pad = nb * 7 - n
    Ap = torch.nn.functional.pad(A, (0, pad, 0, pad))
    idx = torch.arange(nb * 7, device=A.device)
    if pad:
        Ap[idx[n:], idx[n:]] = 1.0
    blocks = Ap.reshape(nb, 7, nb, 7).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # (nb, 7, 7)
    Lb, info = torch.linalg.cholesky_ex(blocks)
    if int(info.abs().sum()) != 0:
        return None
    Minv = torch.cholesky_inverse(Lb)

    def prec(r):
        rp = torch.nn.functional.pad(r, (0, pad)).reshape(nb, 7, 1)
        return torch.bmm(Minv, rp).reshape(-1)[:n]

    x = torch.zeros_like(b)
    r = b.clone()
    z = prec(r)
    p = z.clone()
    rz = torch.dot(r, z)
    bn = float(b.norm()) or 1.0
    for _ in range(max_iter):
        Apv = A @ p
        den = torch.dot(p, Apv)
        if float(den) <= 0:
            return None
        alpha = rz / den
        x += alpha * p
        r -= alpha * Apv
        if float(r.norm()) <= tol * bn:
            break
        z = prec(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


class _State:
    __slots__ = ("R", "c", "f", "eR", "et", "el")

    def __init__(self, R, c, f, eR, et, el):
        self.R, self.c, self.f, self.eR, self.et, self.el = R, c, f, eR, et, el


def optimise_gauss_newton(init, vm, uv, prob: Problem, iterations: int = 30, tol: float = 1e-5,
                          lm_lambda: float = 1e-4, max_view_chunk_residuals: int = 1 << 19,
                          solver: str = "auto", pcg_above: int = 4000, pcg_tol: float = 1e-6,
                          pcg_iters: int = 400, progress: Optional[Callable] = None,
                          cancel: Optional[Callable[[], bool]] = None) -> OptimResult:
    """LM / IRLS on the view-major subsample ``vm`` (subsample.ViewMajor), pixels ``uv`` (V,n,2).

    iterations: at most this many outer iterations (one progress call each, with the objective
    at the start of the iteration, like the reference); stops earlier once the relative decrease
    of L stayed below ``tol`` twice or no damped step lowers it. solver: 'cholesky' (dense),
    'pcg' (conjugate gradients preconditioned by the 7x7 diagonal blocks, to ``pcg_tol``
    relative residual: an inexact step the LM test still checks) or 'auto' (pcg above
    ``pcg_above`` unknowns: a 30-view complete graph has 6300, whose dense Cholesky costs more
    than the rest of the iteration; at 2800 (20 views) both take ~0.5 s here)."""
    X, W, slot_e, slot_ok = vm.X, vm.W, vm.slot_e, vm.slot_ok
    dev, dt = X.device, X.dtype
    V, S, N = W.shape
    E = int(init.e_s.shape[0])
    norm_s = float(E * N)
    pp = prob.pp.to(device=dev, dtype=dt)
    rho_xy = (uv.to(dt) - pp[:, None]).permute(2, 0, 1)              # (2, V, N)
    kpm = prob.known_pose_mask.to(dev)
    kfm = prob.known_focal_mask.to(dev)
    n_known = int(kpm.sum())
    hard = prob.hard_poses and n_known > 0
    kp = prob.known_poses.to(device=dev, dtype=dt) if n_known else None
    wp = float(prob.pose_prior_weight)
    soft = n_known > 0 and not hard

    R = init.cam_R.to(dt).clone()
    c = init.cam_c.to(dt).clone()
    if hard:
        R[kpm] = kp[kpm][:, :3, :3]
        c[kpm] = kp[kpm][:, :3, 3]
    st = _State(R, c, torch.as_tensor(init.focal, dtype=dt, device=dev).clone(), init.e_R.to(dt).clone(),
                init.e_t.to(dt).clone(), torch.log(init.e_s.to(dt)).clone())

    # free parameters of the full vector [cams 7V | edges 7E]
    free = torch.ones(7 * V + 7 * E, dtype=torch.bool, device=dev)
    cam_free = free[:7 * V].view(V, 7)
    if hard:
        cam_free[kpm, :6] = False
    if n_known == 0:
        cam_free[0, :6] = False   # gauge: view 0's pose
    cam_free[kfm, 6] = False
    L_idx = 7 * V + 7 * torch.arange(E, device=dev) + 6

    # per-view local -> global 7-blocks: [camera v, edge of slot 0, ...]; padding slots go to a
    # dummy block (index V + E) that is cut away
    nblk = V + E
    blk = torch.cat([torch.arange(V, device=dev)[:, None],
                     torch.where(slot_ok, V + slot_e, torch.full_like(slot_e, nblk))], 1)   # (V, S+1)

    def log_scales(el):
        return el - el.mean() + prob.log_scale_mean if prob.norm_scale else el

    def forward(s: _State):
        """Planar rays a (3,V,N), z = sigma R_e X and targets y = z + t_e (3,V,S,N)."""
        rx, ry = rho_xy[0] / s.f[:, None], rho_xy[1] / s.f[:, None]
        Rv = s.R[:, :, :, None]
        a = torch.stack([Rv[:, i, 0] * rx + Rv[:, i, 1] * ry + Rv[:, i, 2] for i in range(3)])
        sig = torch.exp(log_scales(s.el))
        M = (sig[:, None, None] * s.eR)[slot_e][..., None]             # (V, S, 3, 3, 1)
        z = torch.stack([M[:, :, i, 0] * X[0] + M[:, :, i, 1] * X[1] + M[:, :, i, 2] * X[2] for i in range(3)])
        y = z + s.et[slot_e].permute(2, 0, 1)[..., None]
        return a, z, y

    def solve_depth(a, c, y, omega):
        ca = _dot(c.T[:, :, None], a)                                 # (V, N)
        p = _dot(y, a[:, :, None]) - ca[:, None]                      # (V, S, N)
        den = omega.sum(1) * _dot(a, a)
        return ((omega * p).sum(1) / den.clamp_min(1e-300)).clamp_min(MIN_DEPTH)

    def residuals(a, c, d, y):
        chi = c.T[:, :, None] + d * a                                  # (3, V, N)
        r = chi[:, :, None] - y
        return r, _dot(r, r).sqrt()

    def prior_terms(s: _State):
        if not soft:
            return 0.0
        n = torch.cat([(s.R[kpm] - kp[kpm][:, :3, :3]).flatten(1).norm(dim=-1),
                       (s.c[kpm] - kp[kpm][:, :3, 3]).norm(dim=-1)])
        return wp * float(_huber(n).sum())

    def evaluate(s: _State, omega):
        """L (norm floored at RES_EPS, see the module docstring) at s with the depths solved for
        omega then one Weiszfeld step."""
        a, z, y = forward(s)
        d = solve_depth(a, s.c, y, omega)
        _, rn = residuals(a, s.c, d, y)
        d = solve_depth(a, s.c, y, W / rn.clamp_min(RES_EPS))
        r, rn = residuals(a, s.c, d, y)
        L = float((W * _huber(rn)).sum()) / norm_s + prior_terms(s)
        return L, (a, z, y, d, r, rn)

    def normal_equations(s: _State, cache):
        a, z, y, d, r, rn = cache
        P = 7 * V + 7 * E
        Hb = torch.zeros(nblk + 1, nblk + 1, 7, 7, dtype=dt, device=dev)   # block layout
        gb = torch.zeros(nblk + 1, 7, dtype=dt, device=dev)
        om = W / rn.clamp_min(RES_EPS) / norm_s                       # (V, S, N)
        chunk = max(1, max_view_chunk_residuals // max(S * N, 1))
        for v0 in range(0, V, chunk):
            vs = slice(v0, min(V, v0 + chunk))
            Hv, gv = _view_blocks(a[:, vs], d[vs], z[:, vs], r[:, vs], om[vs], s.R[vs][:, :, 2])
            Vc = Hv.shape[0]
            bi = blk[vs]                                                   # (Vc, S+1)
            # one accumulating scatter of all (S+1)^2 blocks of the chunk's views (sequential on
            # the CPU: deterministic)
            Hb.index_put_((bi[:, :, None].expand(Vc, S + 1, S + 1), bi[:, None, :].expand(Vc, S + 1, S + 1)),
                          Hv.reshape(Vc, S + 1, 7, S + 1, 7).permute(0, 1, 3, 2, 4), accumulate=True)
            gb.index_put_((bi,), gv.reshape(Vc, S + 1, 7), accumulate=True)
        H = Hb[:nblk, :nblk].permute(0, 2, 1, 3).reshape(P, P)
        g = gb[:nblk].reshape(P)
        if soft:
            eye3 = torch.eye(3, dtype=dt, device=dev)
            for v in torch.nonzero(kpm).reshape(-1).tolist():
                rr = (s.R[v] - kp[v, :3, :3]).reshape(9)
                Jr = torch.stack([(_skew(eye3[m]) @ s.R[v]).reshape(9) for m in range(3)], 1)  # (9, 3)
                wr = wp / max(float(rr.norm()), RES_EPS)
                H[7 * v:7 * v + 3, 7 * v:7 * v + 3] += wr * Jr.T @ Jr
                g[7 * v:7 * v + 3] += wr * Jr.T @ rr
                rc = s.c[v] - kp[v, :3, 3]
                wc = wp / max(float(rc.norm()), RES_EPS)
                H[7 * v + 3:7 * v + 6, 7 * v + 3:7 * v + 6] += wc * eye3
                g[7 * v + 3:7 * v + 6] += wc * rc
        if prob.norm_scale:  # raw log-scales, effective l - mean(l): project their block
            H[:, L_idx] -= H[:, L_idx].mean(1, keepdim=True)
            H[L_idx, :] -= H[L_idx, :].mean(0, keepdim=True)
            g[L_idx] -= g[L_idx].mean()
        # fixed unknowns (gauge, known poses / focals): identity rows and columns, zero gradient
        fixed = torch.nonzero(~free).reshape(-1)
        if fixed.numel():
            H[fixed, :] = 0.0
            H[:, fixed] = 0.0
            H[fixed, fixed] = 1.0
            g[fixed] = 0.0
        return H, g

    def apply(s: _State, delta):
        full = torch.where(free, delta, torch.zeros_like(delta))
        dc = full[:7 * V].view(V, 7)
        de = full[7 * V:].view(E, 7)
        return _State(_exp(dc[:, :3]) @ s.R, s.c + dc[:, 3:6], s.f * torch.exp(dc[:, 6]),
                      _exp(de[:, :3]) @ s.eR, s.et + de[:, 3:6], s.el + de[:, 6])

    L, cache = evaluate(st, W)
    history: List[float] = []
    rejected = 0  # damped steps that did not lower L (each one costs an evaluation)
    lam = float(lm_lambda)
    n_it = int(iterations)
    small = 0
    for it in range(n_it):
        if cancel is not None and cancel():
            raise Cancelled(f"alignment cancelled at iteration {it}/{n_it}")
        history.append(L * prob.scale)
        if progress is not None:
            progress(it, n_it, L * prob.scale)
        H, g = normal_equations(st, cache)
        omega = W / cache[5].clamp_min(RES_EPS)
        diag = H.diagonal().clamp_min(1e-12 * float(H.diagonal().abs().max().clamp_min(1e-300)))
        accepted = False
        use_pcg = solver == "pcg" or (solver == "auto" and H.shape[0] > pcg_above)
        for _ in range(12):
            A = H.clone()
            A.diagonal().add_(diag, alpha=lam)
            if use_pcg:
                delta = _pcg(A, -g, pcg_tol, pcg_iters)
                if delta is None:
                    lam *= 10.0
                    continue
            else:
                Lc, info = torch.linalg.cholesky_ex(A)
                if int(info) != 0:
                    lam *= 10.0
                    continue
                delta = torch.cholesky_solve(-g[:, None], Lc)[:, 0]
            cand = apply(st, delta)
            L_new, cache_new = evaluate(cand, omega)
            if L_new <= L:
                accepted = True
                break
            rejected += 1
            lam *= 10.0
        if not accepted:
            break
        lam = max(lam / 10.0, 1e-12)
        rel = (L - L_new) / max(L, 1e-300)
        st, L, cache = cand, L_new, cache_new
        small = small + 1 if rel < tol else 0
        if small >= 2:
            break
    sig = torch.exp(log_scales(st.el))
    return OptimResult(st.R, st.c, st.f, sig, st.eR, st.et, history, rejected)
