"""Keyframe preparation ahead of the reconstruction (ReconstructionPipeline.prepare): the work
each keyframe needs on its own is reused by the reconstruction, and the result is identical."""
import numpy as np
import pytest

from wildseg3d_ros.core.config import PipelineConfig
from wildseg3d_ros.core.pipeline import ReconstructionPipeline
from wildseg3d_ros.core.types import Keyframe
from wildseg3d_ros.sim import tabletop


@pytest.fixture(scope="module")
def kfs():
    seq = tabletop.render_sequence(n_views=4, width=160, height=120, seed=2)
    return [Keyframe(index=i, stamp=float(seq.stamps[i]), rgb=seq.rgb[i], K=seq.K, depth=seq.depth[i],
                     pose_prior=seq.poses[i]) for i in range(4)]


@pytest.mark.parametrize("segmenter", ["geometric", "classical"])
def test_prepared_keyframes_give_the_same_scene(kfs, segmenter):
    cold = ReconstructionPipeline(PipelineConfig(segmenter=segmenter, iterations=30))
    s_cold, _ = cold.run(kfs)
    assert s_cold.info["views_presegmented_ahead"] == 0
    warm = ReconstructionPipeline(PipelineConfig(segmenter=segmenter, iterations=30))
    assert all(warm.prepare(kf) for kf in kfs)
    assert warm.prepare(kfs[0])  # a second time: already prepared
    assert warm.prepare_pending_pairs() == 0
    prepared_frames = len(warm.backend._frames)
    # every pair of the complete graph was registered as its second keyframe was prepared: the
    # reconstruction registers none
    assert len(warm.backend._pairs) == len(kfs) * (len(kfs) - 1) // 2
    real = warm.backend.register_pair
    warm.backend.register_pair = lambda *a, **k: pytest.fail("a prepared pair was registered again")
    s_warm, _ = warm.run(kfs)
    warm.backend.register_pair = real
    assert s_warm.info["views_presegmented_ahead"] == len(kfs)
    assert len(warm.backend._frames) == prepared_frames  # the backend reused its prepared frames
    np.testing.assert_array_equal(s_warm.mask_cache.labels, s_cold.mask_cache.labels)
    np.testing.assert_allclose(s_warm.poses, s_cold.poses, atol=1e-6)
    # a changed keyframe (same index and stamp, other image) is not mistaken for a prepared one
    other = Keyframe(index=kfs[0].index, stamp=kfs[0].stamp, rgb=kfs[0].rgb[:, ::-1].copy(), K=kfs[0].K,
                     depth=kfs[0].depth[:, ::-1].copy(), pose_prior=kfs[0].pose_prior)
    assert other.content_key() != kfs[0].content_key()
    s2, _ = warm.run([other] + kfs[1:])
    assert s2.info["views_presegmented_ahead"] == len(kfs) - 1


def test_pairs_prepared_ahead_follow_the_scene_graph():
    from wildseg3d_ros.core.pointmaps.scene_graph import make_pairs, partners_of_next
    assert partners_of_next(0) == [] and partners_of_next(3) == [0, 1, 2]
    assert partners_of_next(5, "swin-2-noncyclic") == [3, 4]
    assert partners_of_next(4, "oneref-0") == [0]
    n = 6
    for sg in ("complete", "swin-3-noncyclic", "logwin-2-noncyclic", "oneref-1"):
        # the pairs prepared one arrival at a time are exactly the graph's pairs over the 6 views
        ahead = {(i, m) for m in range(1, n) for i in partners_of_next(m, sg)}
        assert ahead == {(min(i, j), max(i, j)) for i, j in make_pairs(n, sg, symmetrize=False)}, sg


def test_network_pointmaps_are_not_presegmented_ahead():
    from wildseg3d_ros.core.pointmaps.base import PointmapBackend
    from wildseg3d_ros.core.pointmaps.rgbd import RgbdBackend
    assert PointmapBackend.pointmaps_per_keyframe is False  # dust3r, sfm: pointmaps depend on the pairs
    assert RgbdBackend.pointmaps_per_keyframe is True
