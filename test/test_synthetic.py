"""Tests for the embedded synthetic tabletop scene (wildseg3d_ros.sim.tabletop)."""
import time

import numpy as np
import pytest

from wildseg3d_ros.sim import tabletop as S

W, H = 640, 480


@pytest.fixture(scope="module")
def seq():
    return S.render_sequence(n_views=5, width=W, height=H, seed=0)


def _backproject(depth, K, T):
    h, w = depth.shape
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(K).T
    pc = rays * depth[..., None].astype(np.float64)
    return pc @ T[:3, :3].T + T[:3, 3]


def test_determinism_and_seed_dependence():
    a = S.render_sequence(n_views=2, width=160, height=120, seed=3)
    b = S.render_sequence(n_views=2, width=160, height=120, seed=3)
    c = S.render_sequence(n_views=2, width=160, height=120, seed=4)
    assert np.array_equal(a.rgb, b.rgb)
    assert np.array_equal(a.depth, b.depth)
    assert np.array_equal(a.instance, b.instance)
    assert np.array_equal(a.odom_poses, b.odom_poses)
    assert not np.array_equal(a.rgb, c.rgb)
    assert not np.array_equal(a.instance, c.instance)
    sa, sc = S.make_tabletop_scene(3), S.make_tabletop_scene(4)
    ca = np.array([p.center for p in sa.primitives if p.instance_id in sa.object_ids])
    cc = np.array([p.center for p in sc.primitives if p.instance_id in sc.object_ids])
    assert np.abs(ca - cc).max() > 0.01


def test_scene_layout():
    for seed in range(6):
        sc = S.make_tabletop_scene(seed, num_objects=5)
        assert sc.object_ids == [4, 5, 6, 7, 8]
        assert set(sc.names) == {1, 2, 3, 4, 5, 6, 7, 8}
        assert sc.names[1] == "floor" and sc.names[2] == "wall" and sc.names[3] == "table"
        assert len(set(sc.names.values())) == len(sc.names)
        objs = [p for p in sc.primitives if p.instance_id in sc.object_ids]
        assert len(objs) == 5 and {p.kind for p in objs} == {"box", "sphere", "cylinder"}
        for p in objs:
            assert sc.names[p.instance_id] == p.name
            # resting on the table top, inside the table, sizes 6-20 cm
            bottom = p.center[2] - (p.top_z() - p.center[2])
            assert bottom == pytest.approx(S.TABLE_HEIGHT, abs=1e-9)
            assert 0.06 - 1e-9 <= p.top_z() - bottom <= 0.20 + 1e-9
            assert abs(p.center[0]) + p.footprint_radius() < 0.6
            assert abs(p.center[1]) + p.footprint_radius() < 0.4
        # no overlaps (footprints disjoint)
        for i in range(5):
            for j in range(i + 1, 5):
                dist = np.hypot(*(objs[i].center[:2] - objs[j].center[:2]))
                assert dist > objs[i].footprint_radius() + objs[j].footprint_radius()
        # distinct saturated colours
        cols = np.array([p.color for p in objs])
        sat = (cols.max(1) - cols.min(1)) / cols.max(1)
        assert sat.min() > 0.6
        assert min(np.abs(cols[i] - cols[j]).max() for i in range(5) for j in range(i + 1, 5)) > 0.15
    assert len(S.make_tabletop_scene(1, num_objects=8).object_ids) == 8


def test_every_pixel_hits_and_ids_valid(seq):
    assert seq.rgb.shape == (5, H, W, 3) and seq.rgb.dtype == np.uint8
    assert seq.depth.dtype == np.float32 and seq.instance.dtype == np.int32
    assert (seq.depth > 0).all() and np.isfinite(seq.depth).all()
    assert (seq.depth < 8.0).all()
    assert set(np.unique(seq.instance)) <= set(seq.scene.names)
    assert set(np.unique(seq.instance)) >= {1, 2, 3}
    assert seq.stamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_every_object_seen_in_most_views(seq):
    for q in (seq, S.render_sequence(n_views=5, width=W, height=H, seed=1),
              S.render_sequence(n_views=5, width=W, height=H, seed=2, num_objects=8)):
        assert len(q.scene.object_ids) in (5, 8)
        for oid in q.scene.object_ids:
            seen = [(q.instance[v] == oid).sum() for v in range(5)]
            assert sum(s >= 200 for s in seen) >= 3, (oid, seen)


def test_empty_table():
    q = S.render_sequence(n_views=2, width=80, height=60, seed=0, num_objects=0)
    assert q.scene.object_ids == [] and set(np.unique(q.instance)) <= {1, 2, 3}


def test_depth_backprojects_onto_surfaces(seq):
    sc = seq.scene
    for v in (0, 3):
        X = _backproject(seq.depth[v], seq.K, seq.poses[v])
        inst = seq.instance[v]
        for iid in sc.names:
            m = inst == iid
            if m.sum() == 0:
                continue
            dist = np.abs(sc.sdf(iid, X[m]))
            assert np.percentile(dist, 99.9) < 1e-3, (iid, dist.max())
        # spheres: at distance r from the centre
        for p in sc.primitives:
            if p.kind == "sphere" and (inst == p.instance_id).any():
                r = np.linalg.norm(X[inst == p.instance_id] - p.center, axis=1)
                assert np.abs(r - p.radius).max() < 1e-3
        # table top pixels (facing up) sit at the table height
        top = ((inst == S.TABLE_ID) & (np.abs(X[..., 0]) < 0.59) & (np.abs(X[..., 1]) < 0.39)
               & (X[..., 2] > S.TABLE_HEIGHT - 0.03))  # excludes legs and edge faces
        assert top.sum() > 10000
        assert np.abs(X[top][:, 2] - S.TABLE_HEIGHT).max() < 1e-4
        floor = inst == S.FLOOR_ID
        assert np.abs(X[floor][:, 2]).max() < 1e-3


def test_zdepth_not_ray_length(seq):
    # a fronto-parallel check: the centre pixel's camera-frame z equals depth
    K, T = seq.K, seq.poses[0]
    X = _backproject(seq.depth[0], K, T)
    Xc = (X - T[:3, 3]) @ T[:3, :3]
    assert np.allclose(Xc[..., 2], seq.depth[0], atol=1e-5)


def test_images_are_textured_and_shaded(seq):
    import cv2
    gray = cv2.cvtColor(seq.rgb[0], cv2.COLOR_RGB2GRAY)
    kps = cv2.ORB_create(2000).detect(gray, None)
    assert len(kps) > 800
    # each object: saturated mean colour, visible intra-object variation (texture + shading)
    hsv = cv2.cvtColor(seq.rgb[0], cv2.COLOR_RGB2HSV)
    for oid in seq.scene.object_ids:
        m = seq.instance[0] == oid
        if m.sum() < 200:
            continue
        assert np.median(hsv[..., 1][m]) > 120
        assert seq.rgb[0][m].astype(float).std(0).max() > 8
    # background (floor/walls/table) much less saturated than the objects
    bg = seq.instance[0] <= 3
    assert np.median(hsv[..., 1][bg]) < 110


def test_render_time():
    sc = S.make_tabletop_scene(0)
    K = S.intrinsics(W, H)
    P = S.camera_trajectory(3, sc)
    S.render_view(sc, K, P[0], W, H)
    t0 = time.perf_counter()
    for T in P:
        S.render_view(sc, K, T, W, H)
    dt = (time.perf_counter() - t0) / len(P)
    print(f"render_view 640x480: {dt * 1000:.1f} ms/frame")
    assert dt < 3.0  # loose: shared 2-core machine


def test_intrinsics():
    K = S.intrinsics(640, 480, 60.0)
    assert K[0, 0] == pytest.approx(320 / np.tan(np.deg2rad(30)))
    assert K[0, 0] == K[1, 1]
    assert K[0, 2] == pytest.approx(319.5) and K[1, 2] == pytest.approx(239.5)


def test_poses_proper_and_looking_at_table(seq):
    sc = seq.scene
    for P in (seq.poses, seq.odom_poses):
        R = P[:, :3, :3]
        assert np.allclose(np.linalg.det(R), 1.0, atol=1e-9)
        assert np.allclose(R.transpose(0, 2, 1) @ R, np.eye(3), atol=1e-9)
        assert np.allclose(P[:, 3], [0, 0, 0, 1])
    for T in seq.poses:
        to_table = sc.table_center - T[:3, 3]
        to_table /= np.linalg.norm(to_table)
        assert T[:3, 2] @ to_table > 0.999  # z axis within ~2.5 deg of the table centre
        assert T[:3, 1] @ np.array([0, 0, 1.0]) < -0.9  # image y points down in the world
        assert T[2, 3] == pytest.approx(1.1)
        assert np.hypot(*(T[:2, 3] - sc.table_center[:2])) == pytest.approx(1.6)
    # arc spans arc_deg around the table
    az = np.degrees(np.arctan2(seq.poses[:, 1, 3], seq.poses[:, 0, 3]))
    assert az.max() - az.min() == pytest.approx(100.0)


def test_odometry_drift_grows():
    sc = S.make_tabletop_scene(0)
    poses = S.camera_trajectory(12, sc)
    errs = []
    for s in range(30):
        od = S.add_odometry_drift(poses, seed=s)
        assert np.array_equal(od[0], poses[0])
        errs.append(np.linalg.norm(od[:, :3, 3] - poses[:, :3, 3], axis=1))
    errs = np.array(errs)
    assert errs[:, 0].max() == 0.0
    mean = errs.mean(0)
    assert mean[1] > 0.003
    assert mean[11] > 2.0 * mean[2]
    assert np.all(np.diff(mean[1:]) > -0.01)
    # zero noise reproduces the poses
    od0 = S.add_odometry_drift(poses, seed=0, trans_sigma=0.0, rot_sigma_deg=0.0)
    assert np.allclose(od0, poses, atol=1e-9)
    # different seeds differ
    assert not np.allclose(S.add_odometry_drift(poses, seed=1), S.add_odometry_drift(poses, seed=2))
