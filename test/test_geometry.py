import numpy as np
import pytest

from wildseg3d_ros.core import geometry as g


def _random_pose(rng):
    q = rng.normal(size=4)
    T = g.pose_from_xyz_quat(rng.normal(size=3), q)
    return T


def test_invert_and_transform_roundtrip():
    rng = np.random.default_rng(0)
    T = _random_pose(rng)
    p = rng.normal(size=(50, 3))
    back = g.transform_points(g.invert_pose(T), g.transform_points(T, p))
    assert np.allclose(back, p, atol=1e-12)
    assert np.allclose(g.invert_pose(T) @ T, np.eye(4), atol=1e-12)


def test_umeyama_recovers_similarity_and_ignores_zero_weights():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(100, 3))
    R = g.quat_xyzw_to_rot(rng.normal(size=4))
    dst = 2.5 * src @ R.T + np.array([1.0, -2.0, 0.5])
    w = np.ones(100)
    dst[:10] += 50.0  # outliers with zero weight
    w[:10] = 0.0
    s, R2, t = g.umeyama(src, dst, w)
    assert s == pytest.approx(2.5, rel=1e-9)
    assert np.allclose(R2, R, atol=1e-9)
    assert np.allclose(t, [1.0, -2.0, 0.5], atol=1e-9)
    with pytest.raises(ValueError):
        g.umeyama(src[:2], dst[:2])


def test_backproject_project_roundtrip():
    K = np.array([[300.0, 0, 160], [0, 310.0, 120], [0, 0, 1]])
    depth = np.full((240, 320), 2.0, np.float32)
    depth[0, 0] = 0.0
    depth[1, 1] = np.nan
    pts = g.backproject_depth(depth, K)
    assert np.all(pts[0, 0] == 0) and np.all(pts[1, 1] == 0)
    T = g.look_at([0.3, -1.0, 1.0], [0, 0, 0])
    world = g.depth_to_world(depth, K, T)
    assert np.isnan(world[0, 0]).all()
    uv, z = g.project_points(world[5:, 5:], K, T)
    vv, uu = np.mgrid[5:240, 5:320]
    assert np.allclose(uv[..., 0], uu, atol=1e-3) and np.allclose(uv[..., 1], vv, atol=1e-3)
    assert np.allclose(z, 2.0, atol=1e-5)


def test_quaternion_roundtrip_and_look_at_axes():
    rng = np.random.default_rng(2)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q = q if q[3] >= 0 else -q
        assert np.allclose(g.rot_to_quat_xyzw(g.quat_xyzw_to_rot(q)), q, atol=1e-9)
    T = g.look_at([1.0, 0, 0], [0, 0, 0])
    assert np.allclose(T[:3, 2], [-1, 0, 0])          # optical axis towards target
    assert np.allclose(T[:3, 1], [0, 0, -1])          # image y (down) is world -z
    assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0)


def test_pose_errors_invariant_to_similarity():
    rng = np.random.default_rng(3)
    gt = np.stack([_random_pose(rng) for _ in range(5)])
    R = g.quat_xyzw_to_rot(rng.normal(size=4))
    est = g.apply_sim3_to_poses(0.3, R, np.array([1.0, 2.0, 3.0]), gt)
    e = g.pose_errors(est, gt)
    assert e["rot_deg_max"] < 1e-4 and e["center_max"] < 1e-9
    assert e["scale"] == pytest.approx(1 / 0.3)
    est[2, :3, 3] += 0.5
    assert g.pose_errors(est, gt)["center_max"] > 0.01


def test_resect_pinhole_recovers_camera():
    K = np.array([[420.0, 0, 250], [0, 415.0, 190], [0, 0, 1]])
    T = g.look_at([1.2, -0.8, 1.1], [0, 0, 0.7])
    rng = np.random.default_rng(4)
    depth = (1.0 + rng.random((96, 128)) * 2).astype(np.float32)
    K_small = K.copy()
    K_small[:2] *= 0.25
    world = g.depth_to_world(depth, K_small, T)
    K2, T2 = g.resect_pinhole(world)
    assert np.allclose(K2, K_small, atol=1e-2 * K_small[0, 0])
    assert np.allclose(T2, T, atol=1e-3)
    with pytest.raises(ValueError):
        g.resect_pinhole(np.full((4, 4, 3), np.nan))


def test_resect_pinhole_views_batches_and_names_the_failing_view():
    """One batched DLT for every keyframe of a scene cloud: each view's camera recovered (with
    different intrinsics, poses and invalid pixels per view); a view without enough valid pixels
    is named in the error."""
    rng = np.random.default_rng(7)
    Ks, Ts, pts, valid = [], [], [], []
    for i in range(4):
        K = np.array([[300.0 + 40 * i, 0, 90 + i], [0, 310.0 + 30 * i, 70 - i], [0, 0, 1]])
        T = g.look_at([1.0 + 0.3 * i, -0.8, 1.1], [0, 0, 0.5 + 0.1 * i])
        depth = (1.0 + rng.random((120, 160)) * 2).astype(np.float32)
        w = g.depth_to_world(depth, K, T).astype(np.float32)
        ok = rng.random((120, 160)) > 0.3 * i
        w[~ok] = np.nan
        Ks.append(K), Ts.append(T), pts.append(w), valid.append(ok)
    K2, T2 = g.resect_pinhole_views(np.stack(pts), np.stack(valid))
    for i in range(4):
        assert np.allclose(K2[i], Ks[i], atol=2e-3 * Ks[i][0, 0]), i
        assert np.allclose(T2[i], Ts[i], atol=1e-3), i
        K1, T1 = g.resect_pinhole(pts[i], valid[i])
        assert np.allclose(K1, K2[i], atol=2e-3 * Ks[i][0, 0]) and np.allclose(T1, T2[i], atol=1e-3)
    pts[2][:] = np.nan
    with pytest.raises(g.ResectionError, match="at least 12 valid pixels") as e:
        g.resect_pinhole_views(np.stack(pts))
    assert e.value.view == 2
