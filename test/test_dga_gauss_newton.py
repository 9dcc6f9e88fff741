"""The Gauss-Newton aligner: its normal equations, convergence to a known answer, the options
object, the device code path (CPU here; CUDA where a GPU exists) and the projective matcher."""
import numpy as np
import pytest
import torch

from wildseg3d_ros.core.align import align_global
from wildseg3d_ros.core.align.dga import AlignOptions
from wildseg3d_ros.core.align.matching import pair_matches, projective_matches
from wildseg3d_ros.core.align.optimise_gn import _skew, _view_blocks
from wildseg3d_ros.sim.pairs import backproject, sphere_scene, synthetic_predictions
from wildseg3d_ros.core.geometry import pose_errors


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scene():
    return sphere_scene(4, 64, 48, seed=0)


def test_normal_equations_match_brute_force_jacobians():
    """The analytic per-view blocks (moments, cross products, Schur term) equal J^T om J and
    J^T om r built from explicit per-residual Jacobians, with the depth eliminated."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    Vc, S, N = 2, 3, 40
    a = torch.randn(Vc, N, 3, dtype=dt, generator=g)
    d = torch.rand(Vc, N, dtype=dt, generator=g) + 0.5
    z = torch.randn(Vc, S, N, 3, dtype=dt, generator=g)
    r = 0.1 * torch.randn(Vc, S, N, 3, dtype=dt, generator=g)
    om = torch.rand(Vc, S, N, dtype=dt, generator=g)
    e3 = torch.nn.functional.normalize(torch.randn(Vc, 3, dtype=dt, generator=g), dim=-1)
    H, gv = _view_blocks(a.permute(2, 0, 1), d, z.permute(3, 0, 1, 2), r.permute(3, 0, 1, 2), om, e3)
    eye = torch.eye(3, dtype=dt)
    Jc = torch.cat([-d[..., None, None] * _skew(a), eye.expand(Vc, N, 3, 3),
                    (d[..., None] * (e3[:, None] - a))[..., None]], -1)
    Je = torch.cat([_skew(z), -eye.expand(Vc, S, N, 3, 3), -z[..., None]], -1)
    P = 7 * (S + 1)
    J = torch.zeros(Vc, S, N, 3, P, dtype=dt)
    for s in range(S):
        J[:, s, :, :, :7] = Jc
        J[:, s, :, :, 7 * (s + 1):7 * (s + 2)] = Je[:, s]
    Hx = torch.einsum("vsn,vsnki,vsnkj->vij", om, J, J)
    gx = torch.einsum("vsn,vsnki,vsnk->vi", om, J, r)
    b = torch.einsum("vsn,vsnki,vnk->vni", om, J, a)
    h = om.sum(1) * a.square().sum(-1)
    gd = torch.einsum("vsn,vnk,vsnk->vn", om, a, r)
    H_ref = Hx - torch.einsum("vni,vnj->vij", b / h[..., None], b)
    g_ref = gx - torch.einsum("vni,vn->vi", b / h[..., None], gd)
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gv, g_ref, rtol=1e-10, atol=1e-10)


def test_converges_to_the_known_answer_in_tens_of_iterations(scene):
    """Noise-free predictions under per-pair similarities: the exact answer is known (GT poses,
    focal); Gauss-Newton reaches it from the spanning-tree start within its iteration cap, far
    closer than the start, and stops by itself before the cap."""
    pairs, _ = synthetic_predictions(scene.depth, scene.K, scene.poses, seed=3, noise=0.0, rot_deg=2.0)
    tm = {}
    sc = align_global(pairs, iterations=500, gn_iterations=40, timings=tm)
    sc0 = align_global(pairs, iterations=0)
    err, err0 = pose_errors(sc.poses, scene.poses), pose_errors(sc0.poses, scene.poses)
    assert err0["rot_deg_max"] > 1.0
    assert err["rot_deg_max"] < 1e-3 and err["center_max"] < 1e-4, err
    np.testing.assert_allclose(sc.K[:, 0, 0], scene.K[0, 0], rtol=1e-4)
    assert 2 <= tm["iterations"] < 40
    assert all(b <= a * (1 + 1e-9) for a, b in zip(sc.loss_history, sc.loss_history[1:]))  # monotone


def test_near_exact_depth_steps_are_accepted_and_it_converges():
    """Simulated depth-camera pointmaps: after the closed-form start most residuals lie below the
    IRLS floor RES_EPS. The steps are tested on the objective the clamped weights majorise, so
    the damped steps are accepted and it stops by convergence, well before its cap (tested on
    the plain norm, every step was rejected several times over and it ran into the cap)."""
    from wildseg3d_ros.core.pointmaps.rgbd import RgbdBackend
    from wildseg3d_ros.core.types import Keyframe
    from wildseg3d_ros.sim import tabletop

    seq = tabletop.render_sequence(n_views=4, width=160, height=120, seed=2)
    kfs = [Keyframe(index=i, stamp=float(seq.stamps[i]), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i],
                    pose_prior=seq.poses[i]) for i in range(4)]
    preds = RgbdBackend().predict_pairs(kfs)
    tm = {}
    sc = align_global(preds, known_focals=preds.intrinsics, timings=tm)
    assert tm["rejected_steps"] <= 1 and tm["iterations"] < 30, tm
    assert all(b <= a for a, b in zip(sc.loss_history, sc.loss_history[1:]))
    err = pose_errors(sc.poses, seq.poses)  # up to a similarity (the world frame is camera 0's)
    assert err["rot_deg_max"] < 0.1 and err["center_max"] < 5e-3, err


def test_gauss_newton_not_worse_than_the_adam_reference(scene):
    pairs, _ = synthetic_predictions(scene.depth, scene.K, scene.poses, seed=1, noise=0.003, outlier_frac=0.05)
    gn = align_global(pairs, iterations=500)
    ad = align_global(pairs, iterations=500, optimizer="adam")
    e_gn, e_ad = pose_errors(gn.poses, scene.poses), pose_errors(ad.poses, scene.poses)
    assert e_gn["rot_deg_mean"] <= 1.2 * e_ad["rot_deg_mean"] + 1e-3, (e_gn, e_ad)
    assert e_gn["center_mean"] <= 1.2 * e_ad["center_mean"] + 1e-4, (e_gn, e_ad)
    assert gn.loss <= ad.loss * 1.01  # the same objective, at least as low
    assert len(gn.loss_history) <= 30 < len(ad.loss_history)


def test_options_object_and_unknown_keywords(scene):
    pairs, _ = synthetic_predictions(scene.depth, scene.K, scene.poses, seed=1, noise=0.003)
    opts = AlignOptions(iterations=8, optimizer="adam")
    a = align_global(pairs, options=opts)
    b = align_global(pairs, iterations=8, optimizer="adam")
    np.testing.assert_array_equal(a.poses, b.poses)
    c = align_global(pairs, options=opts, optimizer="gauss_newton")  # keywords override options
    assert len(c.loss_history) <= 8 and c.loss_history != a.loss_history
    with pytest.raises(TypeError, match="unexpected keyword"):
        align_global(pairs, iteratons=5)
    with pytest.raises(ValueError, match="optimizer"):
        align_global(pairs, optimizer="lbfgs")
    with pytest.raises(ValueError, match="matcher"):
        align_global(pairs, matcher="flann")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (CUDA path runs the same torch code)"))])
def test_device_path(scene, device):
    """Everything runs on the requested device (the CPU here; on CUDA the same code, its
    result equal to the CPU one up to float round-off)."""
    pairs, _ = synthetic_predictions(scene.depth, scene.K, scene.poses, seed=1, noise=0.003, outlier_frac=0.05)
    ref = align_global(pairs, iterations=100)
    sc = align_global(pairs, iterations=100, device=device)
    np.testing.assert_allclose(sc.poses, ref.poses, atol=1e-4)
    err = pose_errors(sc.poses, scene.poses)
    assert err["rot_deg_max"] < 0.2 and err["center_max"] < 0.01, err


def test_projective_matches_agree_with_the_kdtree_reference():
    """On a pair under a DUSt3R-like similarity bias (the pair frame is camera i's only up to
    its own scale, rotation and shift), the projective matcher flags the same pixels as the
    KD-tree definition almost everywhere, and as well as it against GT co-visibility."""
    sv = sphere_scene(2, 96, 72, seed=3, arc_deg=90)
    p, _ = synthetic_predictions(sv.depth, sv.K, sv.poses, edges=[(0, 1)], seed=5, noise=0.002,
                                 rot_deg=2.0, trans_frac=0.02)
    a, b = p.pts1[0], p.pts2[0]
    ka, kb = pair_matches(a.numpy(), b.numpy(), threshold=0.03)
    pa, pb = projective_matches(a, b, threshold=0.03, radius=2)
    assert pa.dtype == torch.bool and pa.shape == (72, 96) and pb.shape == (72, 96)
    assert (pa.numpy() == ka).mean() > 0.93 and (pb.numpy() == kb).mean() > 0.93
    # invalid points never match; strict mutual NN never finds more
    va = torch.ones(72, 96, dtype=torch.bool)
    va[:10] = False
    pa2, _ = projective_matches(a, b, va, None, threshold=0.03)
    assert not pa2[:10].any()
    pm, _ = projective_matches(a, b, threshold=0.03, mutual=True)
    assert int(pm.sum()) <= int(pa.sum())
    # degenerate input: nothing valid -> no match, no error
    none_a, none_b = projective_matches(a, b, torch.zeros(72, 96, dtype=torch.bool), None)
    assert not none_a.any() and not none_b.any()


def test_projective_matching_is_covisibility():
    """Same ground-truth check as the KD-tree definition (test_dga_weights)."""
    sv = sphere_scene(2, 96, 72, seed=3, arc_deg=90)
    from test_dga_weights import _visible_in

    vis = _visible_in(sv, 0, 1)
    T01 = np.linalg.inv(sv.poses[0]) @ sv.poses[1]
    a = backproject(sv.depth[0], sv.K)
    b = backproject(sv.depth[1], sv.K) @ T01[:3, :3].T + T01[:3, 3]
    ma, _ = projective_matches(a, b, threshold=0.03)
    ma = ma.numpy()
    assert ma[vis].mean() > 0.9 and ma[~vis].mean() < 0.1
    ma_s, _ = projective_matches(a, b, threshold=0.06, stride=2)
    ma_s = ma_s.numpy()
    assert ma_s[vis].mean() > 0.85 and ma_s[~vis].mean() < 0.25


def test_pcg_solver_matches_cholesky(scene, monkeypatch):
    """The conjugate-gradient step (used for large systems) reaches the same alignment as the
    dense Cholesky step."""
    import functools

    import wildseg3d_ros.core.align.dga as dga
    from wildseg3d_ros.core.align import optimise_gn

    pairs, _ = synthetic_predictions(scene.depth, scene.K, scene.poses, seed=1, noise=0.003, outlier_frac=0.05)
    out = {}
    for solver in ("cholesky", "pcg"):
        monkeypatch.setattr(dga, "optimise_gauss_newton",
                            functools.partial(optimise_gn.optimise_gauss_newton, solver=solver))
        out[solver] = align_global(pairs, iterations=100)
    np.testing.assert_allclose(out["pcg"].poses, out["cholesky"].poses, atol=2e-4)
    assert out["pcg"].loss == pytest.approx(out["cholesky"].loss, rel=1e-3)
