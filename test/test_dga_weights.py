"""DGA weight formula, confidence transform and pair matching (fast, no optimisation)."""
import numpy as np
import pytest
import torch

from wildseg3d_ros.core.align import adaptive_weight, dga_weights, pair_matches, transform_confidence
from wildseg3d_ros.sim.pairs import backproject, sphere_scene

F = np.linspace(0.0, 1.0, 201)
INNER = (F > 0) & (F < 1)


def test_alpha_zero_gives_f():
    np.testing.assert_allclose(adaptive_weight(F, 0.0), F, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9, 1.0])
def test_positive_alpha_raises_negative_lowers(alpha):
    A_p = adaptive_weight(F, alpha)
    A_n = adaptive_weight(F, -alpha)
    base = adaptive_weight(F, 0.0)
    assert np.all(A_p[INNER] > base[INNER])
    assert np.all(A_n[INNER] < base[INNER])
    # monotone in alpha
    assert np.all(adaptive_weight(F, alpha / 2)[INNER] < A_p[INNER])


@pytest.mark.parametrize("alpha", [-1.0, -0.9, -0.5, 0.0, 0.5, 0.9, 1.0])
def test_range(alpha):
    A = adaptive_weight(F, alpha)
    assert np.all(A >= 0) and np.all(A < 1)


def test_formula_values_and_torch_numpy_agree():
    # hand-computed: F = 0.5, a = 0.5 -> (0.5 + 0.125) / (1.125)
    assert adaptive_weight(np.array(0.5), 0.5) == pytest.approx(0.625 / 1.125, rel=1e-5)
    assert adaptive_weight(np.array(0.5), -0.9) == pytest.approx(0.275 / 1.225, rel=1e-5)
    t = adaptive_weight(torch.tensor(F, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    np.testing.assert_allclose(t.numpy(), adaptive_weight(F, 0.7), rtol=1e-12)


def test_dga_weights_matching_vs_not_and_soft_mask():
    C = np.full((4, 5), 1.5, np.float32)
    m = np.zeros((4, 5), bool)
    m[:2] = True
    W = dga_weights(C, None, m, 0.5, 0.9)
    F = 1 / (1 + np.exp(-1.5))
    assert W[0, 0] == pytest.approx(float(adaptive_weight(F, 0.5)), rel=1e-5)
    assert W[3, 0] == pytest.approx(float(adaptive_weight(F, -0.9)), rel=1e-5)
    assert W[0, 0] > F > W[3, 0]
    # S = None is S = 1
    np.testing.assert_allclose(W, dga_weights(C, np.ones_like(C), m, 0.5, 0.9), rtol=1e-6)
    # S = 0: F = 0.5 regardless of C
    W0 = dga_weights(C, np.zeros_like(C), m, 0.0, 0.0)
    np.testing.assert_allclose(W0, 0.5, rtol=1e-5)
    # invalid (C <= 0) -> 0
    C[0, 0] = 0
    assert dga_weights(C, None, m)[0, 0] == 0


def test_transform_confidence_modes():
    c = np.array([1.0, np.e, np.e ** 2], np.float32)
    np.testing.assert_allclose(transform_confidence(c, "auto"), [0, 1, 2], atol=1e-6)
    np.testing.assert_allclose(transform_confidence(np.array([0.2, 0.9]), "auto"), [0.2, 0.9], atol=1e-6)
    assert transform_confidence(np.array([np.nan, 2.0]), "raw")[0] == 0
    with pytest.raises(ValueError):
        transform_confidence(c, "bogus")


def _visible_in(sv, i, j):
    """GT co-visibility of view i's pixels in view j (projection + depth test)."""
    X = backproject(sv.depth[i], sv.K) @ sv.poses[i][:3, :3].T + sv.poses[i][:3, 3]
    T = np.linalg.inv(sv.poses[j])
    Y = X @ T[:3, :3].T + T[:3, 3]
    u = sv.K[0, 0] * Y[..., 0] / Y[..., 2] + sv.K[0, 2]
    v = sv.K[1, 1] * Y[..., 1] / Y[..., 2] + sv.K[1, 2]
    H, W = sv.depth.shape[1:]
    inside = (Y[..., 2] > 0) & (u > -0.5) & (u < W - 0.5) & (v > -0.5) & (v < H - 0.5)
    ui = np.clip(np.round(u).astype(int), 0, W - 1)
    vi = np.clip(np.round(v).astype(int), 0, H - 1)
    dj = sv.depth[j][vi, ui]
    return inside & (np.abs(dj - Y[..., 2]) < 0.02 * Y[..., 2])


def test_matching_is_covisibility():
    sv = sphere_scene(2, 96, 72, seed=3, arc_deg=90)
    vis = _visible_in(sv, 0, 1)
    assert 0.1 < vis.mean() < 0.95  # the test needs both kinds of pixels
    T01 = np.linalg.inv(sv.poses[0]) @ sv.poses[1]
    a = backproject(sv.depth[0], sv.K)
    b = backproject(sv.depth[1], sv.K) @ T01[:3, :3].T + T01[:3, 3]
    ma, mb = pair_matches(a, b, threshold=0.03)
    assert ma[vis].mean() > 0.9        # co-visible pixels match
    assert ma[~vis].mean() < 0.1       # pixels not seen by the other view do not
    # strict mutual NN finds fewer matches (density differences), never more
    ma_m, _ = pair_matches(a, b, threshold=0.03, mutual=True)
    assert ma_m.sum() <= ma.sum()
    # strided matching (tau must exceed the footprint of stride pixels: 2 x 1.2 % here)
    ma_s, _ = pair_matches(a, b, threshold=0.06, stride=2)
    assert ma_s[vis].mean() > 0.85 and ma_s[~vis].mean() < 0.25  # block edges blur the boundary
