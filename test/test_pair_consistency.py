"""Loop-consistency check of the rgbd backend's pair graph (wrong wide-baseline registrations
must not reach the aligner)."""
import numpy as np

from wildseg3d_ros.sim import tabletop as synthetic
from wildseg3d_ros.core.pointmaps.rgbd import PairRegistration, RgbdBackend, _connected
from wildseg3d_ros.core.geometry import invert_pose, pose_from_xyz_quat, rotation_angle_deg
from wildseg3d_ros.core.types import Keyframe


def _regs(poses, pairs, rmse=1e-3):
    return {(i, j): PairRegistration(i, j, invert_pose(poses[i]) @ poses[j], "registered", "features",
                                     100, 50, 0.5, rmse) for i, j in pairs}


def _ring_poses(n=5):
    return np.stack([pose_from_xyz_quat([np.cos(a), np.sin(a), 0.0], [0, 0, np.sin(a / 2), np.cos(a / 2)])
                     for a in np.linspace(0, 1.5, n)])


def test_wrong_pair_is_dropped_and_good_pairs_kept():
    poses = _ring_poses()
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    b = RgbdBackend()
    b.registrations = _regs(poses, pairs)
    bad = b.registrations[(1, 3)]
    bad.T = bad.T @ pose_from_xyz_quat([0.15, 0.0, 0.05], [0, 0.03, 0, 1])  # ~3.4 deg, 16 cm off
    b._drop_inconsistent_pairs(5)
    assert set(b.failed_pairs) == {(1, 3)}
    assert set(b.registrations) == set(pairs) - {(1, 3)}


def test_two_mutually_consistent_wrong_pairs_are_both_dropped():
    """View 1 wrongly placed the same way against views 3 and 4: loop votes alone are a 2-2 tie
    for view 1 (its wrong pairs close their common loop), so the decision rests on ICP having
    refused to confirm those feature registrations (what the backend records as rmse = NaN)."""
    poses = _ring_poses()
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    b = RgbdBackend()
    b.registrations = _regs(poses, pairs)
    off = pose_from_xyz_quat([0.18, 0.0, 0.0], [0, 0, 0.025, 1])
    for e in ((1, 3), (1, 4)):
        b.registrations[e].T = off @ b.registrations[e].T
        b.registrations[e].icp_rmse = float("nan")
    b._drop_inconsistent_pairs(5)
    assert {(1, 3), (1, 4)} <= set(b.failed_pairs)
    assert {(0, 1), (1, 2), (0, 3), (2, 3), (3, 4)} <= set(b.registrations)


def test_unverified_pair_dropped_only_while_graph_stays_connected():
    poses = _ring_poses(3)
    b = RgbdBackend()
    b.registrations = _regs(poses, [(0, 1), (1, 2)])
    b.registrations[(1, 2)].icp_rmse = float("nan")  # ICP refused to confirm it, but it is a bridge
    b._drop_inconsistent_pairs(3)
    assert set(b.registrations) == {(0, 1), (1, 2)}
    b.registrations = _regs(poses, [(0, 1), (1, 2), (0, 2)])
    b.registrations[(0, 2)].icp_rmse = float("nan")
    b.failed_pairs = {}
    b._drop_inconsistent_pairs(3)
    assert set(b.registrations) == {(0, 1), (1, 2)} and (0, 2) in b.failed_pairs
    assert _connected([(0, 1)], {0, 1, 2}) is False


def test_synthetic_low_resolution_without_priors_keeps_only_correct_pairs():
    """At 256x192 without odometry, feature registration of wide-baseline pairs fails or finds a
    wrong local solution; whatever survives the checks is correct (< 0.5 deg, < 1 cm)."""
    seq = synthetic.render_sequence(5, 256, 192, seed=0)
    kfs = [Keyframe(index=i, stamp=float(seq.stamps[i]), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i])
           for i in range(5)]
    b = RgbdBackend()
    preds = b.predict_pairs(kfs)
    assert len(b.registrations) >= 4
    assert _connected(list(b.registrations), set(range(5)))
    for (i, j), r in b.registrations.items():
        d = invert_pose(invert_pose(seq.poses[i]) @ seq.poses[j]) @ r.T
        assert rotation_angle_deg(d[:3, :3]) < 0.5 and np.linalg.norm(d[:3, 3]) < 0.01, (i, j)
    kept = {(min(a, c), max(a, c)) for a, c in zip(preds.idx1, preds.idx2)}
    assert kept == set(b.registrations)
