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


def test_a_pair_being_registered_elsewhere_is_waited_for_not_registered_twice(kfs):
    """The node registers queued pairs on a thread of its own; a reconstruction that starts
    meanwhile needs the same pair: the backend waits for that registration and reuses it."""
    import threading
    import time

    pipe = ReconstructionPipeline(PipelineConfig(segmenter="geometric", iterations=30))
    for kf in kfs:
        pipe.backend.prepare(kf)
    be = pipe.backend
    real = be.register_pair
    started, calls = threading.Event(), []

    def slow(*a, **k):
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return real(*a, **k)

    be.register_pair = slow
    fr = [be._frame(kf) for kf in kfs[:2]]
    t = threading.Thread(target=be._cached_registration, args=(kfs[0], kfs[1], fr[0], fr[1], 0, 1),
                         name="pair-prepare")
    t.start()
    assert started.wait(5)
    reg, err, computed = be._cached_registration(kfs[0], kfs[1], fr[0], fr[1], 0, 1)
    t.join()
    assert calls == ["pair-prepare"] and not computed and err is None and reg is not None
    be.register_pair = real


def test_pairs_prepared_on_another_thread_beside_keyframes_and_runs(kfs):
    """prepare() queues a keyframe's pairs as soon as its features are ready (the callback fires)
    and prepare_pending_pairs() registers them without the pipeline's lock, concurrently with
    prepare() and run(); the scene equals a cold reconstruction's."""
    import threading

    cold, _ = ReconstructionPipeline(PipelineConfig(segmenter="geometric", iterations=30)).run(kfs)
    pipe = ReconstructionPipeline(PipelineConfig(segmenter="geometric", iterations=30))
    queued = threading.Event()
    pipe.on_pairs_queued = queued.set
    stop = threading.Event()
    errors = []

    def pair_loop():
        try:
            while not stop.is_set():
                if pipe.pending_pair_count() and not pipe.reconstructing():
                    pipe.prepare_pending_pairs(1)
                else:
                    queued.wait(0.01)
                    queued.clear()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=pair_loop)
    th.start()
    try:
        for kf in kfs:
            pipe.prepare(kf)
        scene, _ = pipe.run(kfs)
    finally:
        stop.set()
        th.join()
    assert not errors
    assert not pipe.reconstructing()
    np.testing.assert_array_equal(scene.mask_cache.labels, cold.mask_cache.labels)
    np.testing.assert_allclose(scene.poses, cold.poses, atol=1e-6)


def test_unprepared_keyframes_are_presegmented_while_the_pairs_are_registered(kfs):
    """A keyframe that reaches run() unprepared (the one that started the reconstruction) is
    pre-segmented on a helper thread while the backend registers the pairs, not after them;
    the masks are the ones a serial run makes, and they do not count as prepared ahead."""
    import threading

    pipe = ReconstructionPipeline(PipelineConfig(segmenter="geometric", iterations=30))
    for kf in kfs[:-1]:
        pipe.prepare(kf)
    pipe.prepare_pending_pairs()
    be, seg = pipe.backend, pipe.segmenter
    real_reg, real_seg = be.register_pair, seg.automatic_masks
    registering, seen = threading.Event(), []

    def reg(*a, **k):
        registering.set()
        return real_reg(*a, **k)

    def masks(rgb, pts=None, valid=None):
        # blocks until a pair registration has started elsewhere: 5 s and False when serial
        seen.append((threading.current_thread().name, registering.wait(5)))
        return real_seg(rgb, pts, valid)

    be.register_pair, seg.automatic_masks = reg, masks
    try:
        scene, _ = pipe.run(kfs)
    finally:
        be.register_pair, seg.automatic_masks = real_reg, real_seg
    assert seen == [("presegment-beside-pairs", True)]
    assert scene.info["views_presegmented_ahead"] == len(kfs) - 1
    cold, _ = ReconstructionPipeline(PipelineConfig(segmenter="geometric", iterations=30)).run(kfs)
    np.testing.assert_array_equal(scene.mask_cache.labels, cold.mask_cache.labels)
