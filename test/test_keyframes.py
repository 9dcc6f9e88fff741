"""Tests for wildseg3d_ros.core.keyframes (selection policy + bounded buffer)."""
import threading

import cv2
import numpy as np
import pytest

from wildseg3d_ros.core.keyframes import (
    KeyframeBuffer,
    KeyframePolicy,
    _small_gray,
    image_flow,
    pose_delta,
    sharpness,
)
from wildseg3d_ros.core.types import Keyframe

H, W = 240, 320
K = np.array([[300.0, 0, W / 2], [0, 300.0, H / 2], [0, 0, 1]])


def _texture(h=H + 240, w=W + 240, seed=3):
    """Procedural natural-ish image: multi-scale noise plus discs (sharp edges, corners)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128.0, np.float32)
    for s in (2, 8, 32):
        n = rng.normal(0, 1, (h // s + 1, w // s + 1, 3)).astype(np.float32)
        img += cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC) * 40
    for _ in range(60):
        c = tuple(float(x) for x in rng.integers(0, 256, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(4, 30)), c, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


BIG = _texture()


def view(dx=0, dy=0):
    """W x H crop of the big texture shifted by (dx, dy) pixels (camera translation proxy)."""
    return np.ascontiguousarray(BIG[120 + dy:120 + dy + H, 120 + dx:120 + dx + W])


def pose(x=0.0, y=0.0, z=0.0, yaw_deg=0.0):
    T = np.eye(4)
    a = np.radians(yaw_deg)
    T[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    T[:3, 3] = [x, y, z]
    return T


def buf(**kw):
    kw.setdefault("min_interval_s", 0.0)
    return KeyframeBuffer(KeyframePolicy(**kw))


# ------------------------------------------------------------------------------ rules

def test_interval_rule():
    b = buf(min_interval_s=0.3, min_flow_px=0.0, min_translation_m=0.0)
    assert b.offer(view(0), 10.0, K) == (True, "accepted")
    assert b.offer(view(40), 10.1, K) == (False, "too_soon")
    assert b.offer(view(40), 10.29, K) == (False, "too_soon")
    assert b.offer(view(40), 10.31, K) == (True, "accepted")
    # measured from the newest *keyframe*, not from the last offered frame
    assert b.offer(view(80), 10.5, K) == (False, "too_soon")
    assert b.offer(view(80), 10.62, K) == (True, "accepted")
    assert b.stamps() == [10.0, 10.31, 10.62]


def test_pose_translation_rule():
    b = buf(min_translation_m=0.05, min_rotation_deg=5.0)
    img = view(0)  # the same image every time: with poses only the pose rule decides
    assert b.offer(img, 0.0, K, pose=pose()) == (True, "accepted")
    assert b.offer(img, 1.0, K, pose=pose(x=0.03)) == (False, "too_little_motion")
    assert b.offer(img, 2.0, K, pose=pose(x=0.03, y=0.03)) == (False, "too_little_motion")  # 4.2 cm
    assert b.offer(img, 3.0, K, pose=pose(x=0.04, y=0.04)) == (True, "accepted")            # 5.7 cm
    # next motion is measured from the new keyframe
    assert b.offer(img, 4.0, K, pose=pose(x=0.04, y=0.04, z=0.049)) == (False, "too_little_motion")
    assert b.offer(img, 5.0, K, pose=pose(x=0.04, y=0.04, z=0.051)) == (True, "accepted")


def test_pose_rotation_rule():
    b = buf(min_translation_m=0.05, min_rotation_deg=5.0)
    img = view(0)
    assert b.offer(img, 0.0, K, pose=pose())[0]
    assert b.offer(img, 1.0, K, pose=pose(yaw_deg=4.9)) == (False, "too_little_motion")
    assert b.offer(img, 2.0, K, pose=pose(yaw_deg=5.1)) == (True, "accepted")
    assert b.offer(img, 3.0, K, pose=pose(yaw_deg=9.0)) == (False, "too_little_motion")  # 3.9 deg
    assert b.offer(img, 4.0, K, pose=pose(yaw_deg=-0.5)) == (True, "accepted")            # 5.6 deg
    t, r = pose_delta(pose(), pose(x=0.3, yaw_deg=30))
    assert t == pytest.approx(0.3) and r == pytest.approx(30.0)


def test_flow_rule_without_poses():
    b = buf(min_flow_px=20.0)
    assert b.offer(view(0), 0.0, K) == (True, "accepted")
    assert b.offer(view(0), 1.0, K) == (False, "too_little_motion")          # identical
    assert b.offer(view(8, 6), 2.0, K) == (False, "too_little_motion")       # 10 px
    assert b.offer(view(24, 0), 3.0, K) == (True, "accepted")                # 24 px
    assert b.offer(view(34, 0), 4.0, K) == (False, "too_little_motion")      # 10 px from newest
    assert b.offer(view(24, 24), 5.0, K) == (True, "accepted")               # 24 px from newest


def test_flow_measure_values():
    g0, sc = _small_gray(view(0), 160)
    assert sc == 2.0
    for dx, dy in [(0, 0), (10, 0), (30, 16), (0, 50)]:
        g1, _ = _small_gray(view(dx, dy), 160)
        assert image_flow(g0, g1) * sc == pytest.approx(np.hypot(dx, dy), abs=1.0)
    # overlap lost -> inf (counts as large motion)
    other = _texture(seed=99)[:H, :W]
    assert image_flow(g0, _small_gray(other, 160)[0]) == float("inf")
    # textureless images use phase correlation (identical -> 0)
    flat = np.full((H, W), 100, np.uint8)
    assert image_flow(flat, flat) == pytest.approx(0.0, abs=1e-6)


def test_blur_rejected_sharp_accepted():
    b = buf(min_flow_px=5.0)
    sharp0, sharp1, sharp2 = view(0), view(30), view(60)
    blurred = cv2.GaussianBlur(sharp1, (0, 0), 2.5)
    g = lambda im: sharpness(_small_gray(im, 320)[0])  # noqa: E731
    assert g(blurred) < 0.3 * g(sharp1)
    assert b.offer(sharp0, 0.0, K) == (True, "accepted")
    assert b.offer(blurred, 1.0, K) == (False, "blurred")
    assert b.offer(sharp1, 2.0, K) == (True, "accepted")
    # the relative rule alone (absolute floor off): sigma 1 blur keeps ~10 % of the sharpness
    mild = cv2.GaussianBlur(sharp2, (0, 0), 1.0)
    assert 50 < g(mild) < 0.5 * g(sharp2)
    b1 = buf(min_flow_px=5.0, min_sharpness=0.0, min_relative_sharpness=0.5)
    assert b1.offer(sharp0, 0.0, K)[0]
    assert b1.offer(mild, 1.0, K) == (False, "blurred")
    assert b1.offer(sharp2, 2.0, K) == (True, "accepted")
    b1b = buf(min_flow_px=5.0, min_sharpness=0.0, min_relative_sharpness=0.0)
    assert b1b.offer(sharp0, 0.0, K)[0] and b1b.offer(mild, 1.0, K) == (True, "accepted")
    # absolute floor: a uniform frame is rejected even as the first one
    b2 = buf()
    assert b2.offer(np.full((H, W, 3), 90, np.uint8), 0.0, K) == (False, "blurred")
    assert b2.offer(sharp2, 1.0, K) == (True, "accepted")
    # with poses the sharpness rule still applies
    b3 = buf()
    assert b3.offer(sharp0, 0.0, K, pose=pose())[0]
    assert b3.offer(blurred, 1.0, K, pose=pose(x=0.2)) == (False, "blurred")


# ------------------------------------------------------------------------------ eviction

def test_eviction_with_poses_keeps_anchor_newest_drops_redundant():
    b = buf(max_keyframes=4, min_translation_m=0.01)
    xs = [0.0, 0.2, 0.4, 0.42]
    for i, x in enumerate(xs):
        assert b.offer(view(i * 10), float(i), K, pose=pose(x=x)) == (True, "accepted")
    # gaps if removed: i=1 -> 0.4, i=2 (0.4) -> 0.22, i=3 (0.42) -> 0.2  => drop 0.42 (position 3)
    assert b.offer(view(50), 4.0, K, pose=pose(x=0.6)) == (True, "accepted_evicted_3")
    kept = [k.pose_prior[0, 3] for k in b.keyframes()]
    np.testing.assert_allclose(kept, [0.0, 0.2, 0.4, 0.6])
    # a long run: anchor and newest always kept, size bounded, spacing stays even
    rng = np.random.default_rng(0)
    x = 0.6
    for t in range(5, 40):
        x += float(rng.uniform(0.02, 0.3))
        ok, reason = b.offer(view(t % 7 * 5), float(t), K, pose=pose(x=x))
        assert ok and reason.startswith("accepted_evicted_")
        assert 1 <= int(reason.rsplit("_", 1)[1]) <= 3
        kfs = b.keyframes()
        assert len(kfs) == 4 == len(b)
        assert kfs[0].stamp == 0.0 and kfs[-1].stamp == float(t)
    pos = np.array([k.pose_prior[0, 3] for k in b.keyframes()])
    gaps = np.diff(pos)
    # informative set: much more even than "keep the newest" would give (all near the end)
    assert gaps.min() > 0.2 * pos[-1] / 3


def test_eviction_by_flow_without_poses():
    b = buf(max_keyframes=4, min_flow_px=3.0)
    for i, dx in enumerate([0, 30, 60, 64]):
        assert b.offer(view(dx), float(i), K) == (True, "accepted")
    # gaps if removed: i=1 -> 60 px, i=2 (60) -> 34 px, i=3 (64) -> 30 px  => drop dx=64
    assert b.offer(view(90), 4.0, K) == (True, "accepted_evicted_3")
    shifts = []
    g0, sc = _small_gray(view(0), 320)
    for k in b.keyframes():
        shifts.append(image_flow(g0, _small_gray(k.rgb, 320)[0]) * sc)
    np.testing.assert_allclose(shifts, [0, 30, 60, 90], atol=1.0)


# ------------------------------------------------------------------------------ timestamps, inputs

def test_timestamps_backwards_and_duplicate():
    b = buf(min_flow_px=0.0)
    assert b.offer(view(0), 5.0, K)[0]
    assert b.offer(view(20), 5.0, K) == (False, "duplicate_timestamp")
    assert b.offer(view(20), 4.0, K) == (False, "timestamp_backwards")
    assert b.offer(view(20), 6.0, K)[0]
    # a rejected-but-newer frame still advances the order check
    b.policy.min_interval_s = 10.0
    assert b.offer(view(40), 7.0, K) == (False, "too_soon")
    assert b.offer(view(40), 6.5, K) == (False, "timestamp_backwards")
    assert b.offer(view(40), float("nan"), K) == (False, "invalid_timestamp")
    st = b.stats()
    assert st["accepted"] == 2 and st["duplicate_timestamp"] == 1 and st["timestamp_backwards"] == 2
    # clear(): a replayed bag may start over
    b.clear()
    assert len(b) == 0 and b.keyframes() == []
    assert b.offer(view(0), 1.0, K) == (True, "accepted")


def test_cheap_reject_is_pure_and_matches_offer():
    b = buf(min_interval_s=0.5)
    assert b.cheap_reject(1.0) is None
    assert b.offer(view(0), 1.0, K, pose=pose()) == (True, "accepted")
    assert b.cheap_reject(1.0) == "duplicate_timestamp"
    assert b.cheap_reject(0.5) == "timestamp_backwards"
    assert b.cheap_reject(1.2) == "too_soon"
    assert b.cheap_reject(2.0, pose(x=0.01)) == "too_little_motion"
    assert b.cheap_reject(2.0, pose(x=0.2)) is None
    assert b.cheap_reject(2.0) is None  # no pose: decided later by image flow
    assert b.cheap_reject("x") == "invalid_timestamp"
    assert len(b) == 1 and b.stats().get("too_soon") is None  # nothing recorded
    before = (b.stats(), b.stamps())
    for i in range(50):  # pure: asking never changes the buffer (its speed: benchmarks/bench_image_callback.py)
        assert b.cheap_reject(3.0 + i, pose(x=0.01)) == "too_little_motion"
    assert (b.stats(), b.stamps()) == before


def test_invalid_inputs_rejected_with_reason():
    b = buf()
    img = view(0)
    assert b.offer(img[..., 0], 1.0, K) == (False, "invalid_image")
    assert b.offer(img.astype(np.float32), 2.0, K) == (False, "invalid_image")
    assert b.offer(img, 3.0, K, depth=np.ones((H // 2, W), np.float32)) == (False, "depth_size_mismatch")
    assert b.offer(img, 4.0, np.zeros((3, 3))) == (False, "invalid_intrinsics")
    bad_pose = pose()
    bad_pose[0, 3] = np.nan
    assert b.offer(img, 5.0, K, pose=bad_pose) == (False, "invalid_pose")
    assert len(b) == 0
    assert b.offer(img, 6.0, K, depth=np.ones((H, W), np.float32)) == (True, "accepted")
    with pytest.raises(ValueError, match="max_keyframes"):
        KeyframeBuffer(KeyframePolicy(max_keyframes=1))
    with pytest.raises(ValueError, match="min_flow_px"):
        KeyframePolicy(min_flow_px=float("nan")).validate()


def test_keyframes_are_scene_keyframes_sorted_reindexed_and_copied():
    b = buf(max_keyframes=3, min_translation_m=0.01)
    imgs = [view(10 * i) for i in range(5)]
    depth = np.full((H, W), 2.0, np.float32)
    for i, im in enumerate(imgs):
        b.offer(im, 100.0 + i, K, depth=depth, pose=pose(x=0.1 * i), frame_id="cam")
    kfs = b.keyframes()
    assert all(isinstance(k, Keyframe) for k in kfs)
    assert [k.index for k in kfs] == [0, 1, 2]
    assert [k.stamp for k in kfs] == sorted(k.stamp for k in kfs) and kfs[0].stamp == 100.0
    assert kfs[-1].stamp == 104.0 and kfs[0].frame_id == "cam"
    np.testing.assert_array_equal(kfs[0].rgb, imgs[0])
    imgs[0][:] = 0  # the caller reuses its buffer: the keyframe keeps its copy
    depth[:] = 0
    assert kfs[0].rgb.any() and (b.keyframes()[0].depth == 2.0).all()
    assert kfs[0].K.shape == (3, 3) and kfs[0].pose_prior.shape == (4, 4)


def test_thread_safety_smoke():
    b = buf(max_keyframes=5, min_translation_m=0.01)
    small = np.ascontiguousarray(BIG[:96, :128])
    Ks = np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])
    errors, results = [], []
    lock = threading.Lock()
    counter = iter(range(10 ** 6))

    def worker():
        try:
            for _ in range(40):
                with lock:
                    t = next(counter)
                r = b.offer(small, float(t), Ks, pose=pose(x=0.05 * t))
                results.append(r)
                b.keyframes()
                b.cheap_reject(float(t) + 0.5)
                len(b)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert len(results) == 160
    kfs = b.keyframes()
    assert 1 <= len(kfs) <= 5 and kfs[0].stamp == 0.0
    stamps = [k.stamp for k in kfs]
    assert stamps == sorted(set(stamps))
    st = b.stats()
    assert sum(v for k, v in st.items() if k != "size") == 160
    # every frame is either accepted or rejected for arriving out of order
    assert set(st) <= {"accepted", "timestamp_backwards", "size"}
    assert st["accepted"] >= 5
