"""Dynamic Global Aligning (WildSeg3D, ICCV 2025) on DUSt3R-style pairwise pointmaps.

Objective (DUSt3R's global alignment, the paper's weights):

    min_{chi, P, sigma}  sum_e sum_{v in e} sum_i  W_i^{v,e} || chi_i^v - sigma_e P_e X_i^{v,e} ||
    with  chi_i^v = T_v (d_i^v K_v^{-1} [u_i, 1]),   prod_e sigma_e = 1

(T_v camera-to-world pose, K_v focal + principal point, d per-pixel depth, P_e rigid, sigma_e
scale). :func:`align_global` runs the stages, each in its own module (docs/dga.md):

1. ``inputs.py``      predictions -> per-edge tensors, confidences, validity, scene scale;
2. ``weights.py``     DGA (or confidence) weights, with ``matching.py`` for the co-visibility;
3. ``init.py``        spanning tree, closed-form similarities, focals, PnP; ``gauge.py`` the
                      known-pose gauge;
4. ``subsample.py``   the pixel subsample; ``optimise_gn.py`` (default, Levenberg-Marquardt /
                      IRLS on the reduced problem) or ``optimise_adam.py`` (the reference);
5. ``depths.py``      the final full-resolution depth solve; ``gauge.py`` the output frame.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..types import AlignedScene
from .depths import solve_full_resolution, stack_views
from .world_frame import inconsistent_poses
from .gauge import apply_known_pose_gauge, output_gauge, to_first_camera
from .init import initialise
from .inputs import as_tensor_list, parse_known, prepare_inputs
from .inputs import principal_points as _principal_points
from .optimise_adam import Problem, optimise_adam
from .optimise_gn import optimise_gauss_newton
from .subsample import draw_samples, edge_major, view_major
from .weights import edge_weights
from ..errors import AlignmentError

__all__ = ["align_global", "AlignOptions", "OPTIMIZERS"]

OPTIMIZERS = ("gauss_newton", "adam")


@dataclass
class AlignOptions:
    """Every tuning knob of :func:`align_global` (defaults: the paper's / the project's).

    weighting: 'dga' (paper) or 'confidence' (DUSt3R baseline, W = C).
    alpha_p / alpha_n: DGA alpha for matching / non-matching pixels (paper 0.5 / 0.9).
    pose_prior_weight: inf fixes known poses; a finite w adds
        ``w * sum_v (||R_v - R_v^known||_F + ||c_v - c_v^known||)`` (normalised scene units).
    optimizer: 'gauss_newton' (default: Levenberg-Marquardt / IRLS, converges in tens of
        iterations) or 'adam' (the reference: ``iterations`` Adam steps, cosine lr schedule).
    iterations: Adam steps (paper: 500); for Gauss-Newton the cap is
        ``min(iterations, gn_iterations)`` (0: initialisation only, for both).
    lr, lr_min_ratio: Adam's initial learning rate and its cosine floor (lr * lr_min_ratio).
    gn_iterations, gn_tolerance: Gauss-Newton's most outer iterations and its stopping
        tolerance (relative decrease of the objective, twice in a row).
    gn_schur_budget: Gauss-Newton's subsample is ``num_samples`` pixels per view, fewer when the
        per-iteration Schur term, V * n * (7 (S + 1))^2 multiply-adds with S slots per view, would
        exceed this (large complete graphs), never fewer than 1024.
    match_threshold: tau of the co-visibility test (relative to point distance), see matching.py.
    matcher: 'projective' (default, torch on the device) or 'kdtree' (scipy, the reference);
        match_stride (None: automatic), match_radius (projective window), match_points (points
        per map the automatic projective stride keeps), mutual (strict mutual NN).
    device: 'cpu' or 'cuda' (any torch device). seed: pixel-subsample seed (deterministic).
    num_samples: pixels per view used while optimising poses / focals / pairwise similarities.
    conf_mode: 'auto' | 'log' | 'raw' (see weights.transform_confidence).
    final_irls: Weiszfeld steps of the final full-resolution depth solve (3: the objective
        within 1e-5 of 10 steps, the pointmap error unchanged, see docs/dga.md).
    """

    weighting: str = "dga"
    alpha_p: float = 0.5
    alpha_n: float = 0.9
    pose_prior_weight: float = float("inf")
    optimizer: str = "gauss_newton"
    iterations: int = 500
    lr: float = 0.01
    lr_min_ratio: float = 0.01
    gn_iterations: int = 30
    gn_tolerance: float = 1e-5
    gn_schur_budget: int = 3 << 29
    match_threshold: float = 0.03
    matcher: str = "projective"
    match_stride: Optional[int] = None
    match_radius: int = 2
    match_points: int = 16_384
    mutual: bool = False
    device: str = "cpu"
    seed: int = 0
    num_samples: int = 8192
    conf_mode: str = "auto"
    final_irls: int = 3

    def validate(self) -> "AlignOptions":
        if self.weighting not in ("dga", "confidence"):
            raise ValueError(f"weighting must be 'dga' or 'confidence', got {self.weighting!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.matcher not in ("projective", "kdtree"):
            raise ValueError(f"matcher must be 'projective' or 'kdtree', got {self.matcher!r}")
        if self.conf_mode not in ("auto", "log", "raw"):
            raise ValueError(f"unknown conf mode {self.conf_mode!r} (use 'auto', 'log' or 'raw')")
        for name in ("iterations", "gn_iterations", "final_irls"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if int(self.num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        return self

    @classmethod
    def from_kwargs(cls, base: Optional["AlignOptions"] = None, **kw) -> "AlignOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"align_global() got unexpected keyword argument(s) {bad}; "
                            f"options are {sorted(names)}")
        return dataclasses.replace(base or cls(), **kw)


class _Clock:
    """Stage timer: each call stores the seconds since the previous one (synchronising CUDA)."""

    def __init__(self, out: dict, device):
        import time

        self.out, self.time = out, time.perf_counter
        self.cuda = torch.device(device).type == "cuda"
        self.t = self.time()

    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t = self.time()
        self.out[name] = self.out.get(name, 0.0) + t - self.t
        self.t = t


def align_global(pairs, num_views: Optional[int] = None, soft_masks=None, known_poses=None,
                 known_focals=None, *, options: Optional[AlignOptions] = None,
                 progress: Optional[Callable] = None, cancel: Optional[Callable[[], bool]] = None,
                 principal_points=None, timings: Optional[dict] = None, **overrides) -> AlignedScene:
    """Globally align DUSt3R-style pairwise pointmaps with Dynamic Global Aligning.

    pairs: :class:`~wildseg3d_ros.core.types.PairwisePredictions`, or the dict of
        ``dust3r.inference.inference()`` (converted with ``PairwisePredictions.from_dust3r``);
        torch or numpy, stacked over pairs (E,H,W,3) or lists of per-pair arrays when image
        sizes differ.
    soft_masks: per-view soft object masks S (V,H,W) in [0,1] (or a list); None -> S = 1.
    known_poses: (V,4,4) camera-to-world with NaN for unknown views, or {view: 4x4}.
    known_focals: (V,) pixels (NaN = unknown) or (V,3,3) intrinsics (their fx); fixed when given.
    options: an :class:`AlignOptions`; any of its fields may also be given as a keyword
        (``iterations=100, optimizer='adam', device='cuda'``), overriding ``options``.
    progress(i, n, loss): called every iteration. cancel(): return True to abort
        (raises errors.Cancelled).
    principal_points: (V,2) or None -> known_focals' K (when given as matrices) or ((W-1)/2, (H-1)/2).
    timings: a dict that receives the seconds of each stage (inputs_s, weights_s, init_s,
        optimise_s, final_s), the optimiser's iteration count (iterations) and how many of
        Gauss-Newton's damped steps it rejected (rejected_steps: each one costs an evaluation).

    Returns an AlignedScene (world pointmaps, conf = per-view max input confidence (0 = invalid),
    poses, K, rgb, weights = per-view mean of W over the pairs containing the view, loss = the
    full-resolution objective in input units, loss_history = the per-iteration subsample estimate
    of the same normalised objective).
    Raises AlignmentError on degenerate input (fewer than two views, a disconnected pair graph,
    all-zero confidence, inconsistent shapes), ValueError / TypeError on bad options."""
    opts = AlignOptions.from_kwargs(options, **overrides).validate()
    tm = timings if timings is not None else {}
    clock = _Clock(tm, opts.device)
    inp = prepare_inputs(pairs, num_views, opts.conf_mode, opts.device)
    clock("inputs_s")
    V, dev = inp.num_views, inp.device

    S = None
    if soft_masks is not None:
        S = as_tensor_list(soft_masks, V, "soft_masks", dev, 0)
        for v in range(V):
            if tuple(S[v].shape) != inp.shapes[v]:
                raise AlignmentError(f"soft_masks[{v}] shape {tuple(S[v].shape)} != image shape {inp.shapes[v]}")
    W1, W2 = edge_weights(inp, S, opts.weighting, opts.alpha_p, opts.alpha_n, opts.match_threshold,
                          opts.matcher, opts.match_stride, opts.match_radius, opts.match_points,
                          opts.mutual, cancel)
    clock("weights_s")

    # priors
    kp = parse_known(known_poses, V, "pose")
    kf = parse_known(known_focals, V, "focal")
    known_pose_mask = np.zeros(V, bool) if kp is None else np.isfinite(kp).all((1, 2))
    known_focal_mask = np.zeros(V, bool) if kf is None else (np.isfinite(kf) & (kf > 0))
    n_known = int(known_pose_mask.sum())
    if kp is not None:
        kp = kp.copy()
        kp[known_pose_mask, :3, 3] /= inp.scale
    pp = _principal_points(inp.shapes, principal_points, known_focals)

    # initialisation in the gauge of the known poses
    gen = torch.Generator(device="cpu").manual_seed(int(opts.seed))
    init = initialise(inp, W1, W2, pp, known_focal_mask, kf, gen, cancel)
    # metric pointmaps (depth cameras) keep their scale: the known poses only place them
    metric_input = bool(getattr(pairs, "metric", False))
    released = []
    if n_known >= 3 and opts.pose_prior_weight > 0:
        # poses the aligner is tied to must agree with the pairwise geometry: a known pose the
        # world-frame consensus rejects against the initial cameras (a TF glitch, a wrong line in
        # a pose file) is released (solved freely) instead of dragging its view out of place
        est = np.tile(np.eye(4), (V, 1, 1))
        est[:, :3, :3] = init.cam_R.double().cpu().numpy()
        est[:, :3, 3] = init.cam_c.double().cpu().numpy()
        released = inconsistent_poses(est, [kp[v] if known_pose_mask[v] else None for v in range(V)],
                                      metric=metric_input, scene_depth=1.0)  # normalised units: median depth 1
        if released:
            known_pose_mask[released] = False
            kp[released] = np.nan
            n_known = int(known_pose_mask.sum())
    init, norm_scale = apply_known_pose_gauge(init, kp, known_pose_mask, metric=metric_input)
    hard = n_known > 0 and not math.isfinite(opts.pose_prior_weight)
    log_scale_mean = 0.0
    if n_known >= 2 and not hard:
        # soft priors: the objective would shrink the world towards zero (every residual scales
        # with it) against a finite penalty; the scale the known poses gave stays fixed
        norm_scale, log_scale_mean = True, float(torch.log(init.e_s).mean())
    prob = Problem(pp=torch.as_tensor(pp, device=dev), known_pose_mask=torch.as_tensor(known_pose_mask, device=dev),
                   known_focal_mask=torch.as_tensor(known_focal_mask, device=dev),
                   known_poses=torch.as_tensor(np.nan_to_num(kp), device=dev) if n_known else None,
                   hard_poses=hard, pose_prior_weight=float(opts.pose_prior_weight), norm_scale=norm_scale,
                   scale=inp.scale, log_scale_mean=log_scale_mean)
    clock("init_s")

    # optimisation on a pixel subsample
    if opts.optimizer == "adam":
        smp = draw_samples(inp, W1, W2, opts.num_samples, gen)
        Xs, Ws = edge_major(inp, W1, W2, smp)
        res = optimise_adam(init, inp.edges, smp.uv, Xs, Ws, prob, opts.iterations, opts.lr,
                            opts.lr_min_ratio, progress, cancel)
    else:
        S_max = max(len(sl) for sl in inp.slots)
        n = max(1024, int(opts.gn_schur_budget) // (V * (7 * (S_max + 1)) ** 2))
        smp = draw_samples(inp, W1, W2, min(n, int(opts.num_samples)), gen)
        res = optimise_gauss_newton(init, view_major(inp, W1, W2, smp), smp.uv, prob,
                                    min(int(opts.iterations), int(opts.gn_iterations)), opts.gn_tolerance,
                                    progress=progress, cancel=cancel)
    clock("optimise_s")
    tm["iterations"] = len(res.history)
    tm["rejected_steps"] = int(res.rejected)

    # final: the output frame (world = camera 0 when no pose is known: the objective is invariant
    # to it), then full-resolution closed-form depths directly in that frame
    if n_known == 0:
        res = to_first_camera(res)
    with torch.no_grad():
        pts_out, conf_out, w_out, final_loss = solve_full_resolution(inp, W1, W2, res, pp, opts.final_irls)
    clock("final_s")
    poses = np.tile(np.eye(4), (V, 1, 1))
    poses[:, :3, :3] = res.R.double().cpu().numpy()
    poses[:, :3, 3] = res.c.double().cpu().numpy() * inp.scale
    pts_np = [p.cpu().numpy() * inp.scale for p in pts_out]
    poses = output_gauge(poses)
    if n_known == 0:
        poses[0] = np.eye(4)  # exactly (float32 round-off of R0^T R0 otherwise)
    Ks = np.tile(np.eye(3), (V, 1, 1))
    fv = res.f.double().cpu().numpy()
    Ks[:, 0, 0] = Ks[:, 1, 1] = fv
    Ks[:, :2, 2] = pp

    rgb = [np.zeros(inp.shapes[v] + (3,), np.uint8) for v in range(V)]
    if inp.images is not None and len(inp.images) == V:
        rgb = [im if tuple(np.shape(im)[:2]) == inp.shapes[v] else rgb[v] for v, im in enumerate(inp.images)]
    return AlignedScene(
        pts3d=stack_views([p.astype(np.float32) for p in pts_np]),
        conf=stack_views([c_.cpu().numpy().astype(np.float32) for c_ in conf_out]),
        poses=poses, K=Ks, rgb=stack_views(rgb),
        weights=stack_views([w_.cpu().numpy().astype(np.float32) for w_ in w_out]),
        loss=float(final_loss), loss_history=res.history, metric=n_known >= 2,
        info={"released_poses": released} if released else {})
