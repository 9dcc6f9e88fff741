"""core.frame_pairing: colour / depth / pose pairing on synthetic event sequences (no ROS).

A camera stream is a list of arrival events (arrival time, kind, stamp, payload). ``run`` feeds
them to a FramePairer in arrival order and polls it at every event and every 5 ms (the node's
keyframe thread does the same), so expiries are exercised with a simulated clock. Payloads carry
the frame index, so every test checks *which* depth and pose each frame got, not only counts.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from wildseg3d_ros.core.camera.pairing import (EXACT_S, POSE_EXACT, POSE_INTERPOLATED, POSE_NEAREST, POSE_NONE, FramePairer, PairingConfig, effective_tolerance, estimate_period, interpolate_pose, interpolate_poses, match_stamps)
from wildseg3d_ros.core.geometry import rotation_angle_deg


def pose_at(t: float) -> np.ndarray:
    """A camera moving at 0.3 m/s along x, turning at 20 deg/s about z (analytic: interpolation
    between samples of it must give it back exactly for SLERP + linear)."""
    a = np.deg2rad(20.0 * t)
    T = np.eye(4)
    T[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    T[:3, 3] = [0.3 * t, 0.0, 1.0]
    return T


def stream(n=20, hz=30.0, t0=100.0, depth_lag=0.004, info=True, poses=None, pose_lag=0.0):
    """Events of a camera publishing per frame: CameraInfo, depth, colour (depth ``depth_lag``
    s before the colour when positive, after when negative); poses: None or (rate_hz, lag_s)."""
    ev = []
    period = 1.0 / hz
    for k in range(n):
        t = t0 + k * period
        arr = 1000.0 + k * period
        if info:
            ev.append((arr - 0.006, "info", t, "K"))
        ev.append((arr - depth_lag, "depth", t, ("depth", k)))
        ev.append((arr, "image", t, ("image", k)))
    if poses is not None:
        rate, lag = poses
        m = int(n * period * rate) + 2
        for j in range(m):
            ts = t0 + j / rate
            ev.append((1000.0 + j / rate + lag, "pose", ts, pose_at(ts)))
    return ev


def run(pairer: FramePairer, events, tail_s=2.0, tick=0.005):
    events = sorted(events, key=lambda e: e[0])
    out = []
    t_end = events[-1][0] + tail_s
    now = events[0][0]
    i = 0
    while now <= t_end:
        while i < len(events) and events[i][0] <= now:
            arr, kind, stamp, payload = events[i]
            if kind == "image":
                pairer.add_image(stamp, payload, arr, frame_id="cam")
            elif kind == "depth":
                pairer.add_depth(stamp, payload, arr)
            elif kind == "pose":
                pairer.add_pose(stamp, payload, arr)
            elif kind == "info":
                pairer.add_info(payload, arr)
            i += 1
            out += pairer.poll(arr)
        out += pairer.poll(now)
        now += tick
    return out


def paired(out):
    return [f for f in out if f.dropped is None]


def check_consistent(out, n):
    """Every colour frame handed out exactly once; a paired frame's depth is its own."""
    idx = sorted(f.image[1] for f in out)
    assert idx == list(range(n)), idx
    for f in paired(out):
        if f.depth is not None:
            assert f.depth[1] == f.image[1], f"frame {f.image[1]} got depth {f.depth[1]}"
    stamps = [f.stamp for f in out]
    assert stamps == sorted(stamps), "frames must come out in stamp order"


# ------------------------------------------------------------------------------- stamp matching

def test_match_stamps_exact_first_then_nearest_within_the_capped_tolerance():
    colour = np.array([0.0, 1 / 30, 2 / 30, 3 / 30])
    depth = np.array([2 / 30, 0.0005, 3 / 30 + 0.01])  # unsorted; frame 1's depth is missing
    idx, naive = match_stamps(colour, depth, tolerance=0.05, return_naive=True)
    # frame 0: approximate within 0.45 * 33 ms; frame 1: nothing (its nearest depth is frame 2's);
    # frame 2: exact; frame 3: 10 ms off, within 15 ms
    assert idx.tolist() == [1, -1, 0, 2]
    assert naive[1] >= 0, "a plain nearest-within-0.05 s matcher would have given frame 1 a wrong depth"
    assert effective_tolerance(0.05, 1 / 30) == pytest.approx(0.45 / 30)
    assert estimate_period(colour) == pytest.approx(1 / 30)
    # with a period long enough the configured tolerance applies unchanged
    assert match_stamps([10.0], [10.04], 0.05, period=1.0).tolist() == [0]
    assert match_stamps([10.0], [10.06], 0.05, period=1.0).tolist() == [-1]
    assert match_stamps([], [1.0], 0.05).tolist() == [] and match_stamps([1.0], [], 0.05).tolist() == [-1]


def test_match_stamps_one_depth_never_serves_two_frames():
    colour = np.array([0.0, 0.2, 0.4])
    depth = np.array([0.19])
    assert match_stamps(colour, depth, 0.05, period=0.2).tolist() == [-1, 0, -1]
    # exact always wins, even when another colour frame is as near
    assert match_stamps([1.0, 1.0 + 2 * EXACT_S], [1.0], 0.05, period=0.2).tolist()[0] == 0


def test_interpolate_poses_slerp_exact_nearest_none():
    ts = np.array([0.0, 0.1, 0.2, 1.5])
    P = np.stack([pose_at(t) for t in ts])
    q = np.array([0.1, 0.05, 0.17, 0.9, 1.45, 3.0, -0.05])
    T, how = interpolate_poses(q, ts[::-1], P[::-1], tolerance=0.1)  # order of the input is free
    assert how.tolist() == [POSE_EXACT, POSE_INTERPOLATED, POSE_INTERPOLATED, POSE_NONE, POSE_NEAREST,
                            POSE_NONE, POSE_NEAREST]
    for k in (0, 1, 2):  # SLERP + linear reproduces the constant-rate motion exactly
        assert np.allclose(T[k], pose_at(q[k]), atol=1e-9), k
    assert np.allclose(T[4], P[3]) and np.allclose(T[6], P[0])
    assert np.isnan(T[3]).all() and np.isnan(T[5]).all()


def test_interpolate_pose_shortest_arc_and_halfway_angle():
    T0, T1 = np.eye(4), pose_at(4.5)  # 90 deg about z
    mid = interpolate_pose(T0, T1, 0.5)
    assert rotation_angle_deg(mid[None, :3, :3])[0] == pytest.approx(45.0, abs=1e-9)
    assert np.allclose(mid[:3, 3], (T0[:3, 3] + T1[:3, 3]) / 2)
    # 350 deg one way is 10 deg the other: the interpolation takes the short way
    a = np.deg2rad(350.0)
    T2 = np.eye(4)
    T2[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    assert rotation_angle_deg(interpolate_pose(T0, T2, 0.5)[None, :3, :3])[0] == pytest.approx(5.0, abs=1e-6)
    batch = interpolate_pose(T0, T1, np.array([0.0, 1.0]))
    assert np.allclose(batch[0], T0) and np.allclose(batch[1], T1)


# ------------------------------------------------------------------------------- live pairing

def test_in_order_stream_all_exact_depth_before_or_after_colour():
    for lag in (0.004, -0.010):  # depth 4 ms before the colour, then 10 ms after it
        p = FramePairer(PairingConfig(expiry_s=0.5))
        out = run(p, stream(n=30, hz=30.0, depth_lag=lag))
        check_consistent(out, 30)
        assert len(paired(out)) == 30 and p.stats()["paired_exact"] == 30
        assert all(f.pose is None and f.pose_source == "none" and f.info == "K" for f in out)


def test_out_of_order_arrival_colour_swapped_and_depth_after_the_next_colour():
    ev = stream(n=12, hz=30.0)
    moved = []
    for e in ev:
        arr, kind, stamp, payload = e
        k = payload[1] if isinstance(payload, tuple) else None
        if kind == "depth" and k == 4:
            e = (arr + 0.06, kind, stamp, payload)  # arrives after colour frames 5 and 6
        if kind == "image" and k == 8:
            e = (arr - 1 / 30 - 0.002, kind, stamp, payload)  # colour 8 arrives before colour 7
        moved.append(e)
    p = FramePairer(PairingConfig(expiry_s=0.5))
    out = run(p, moved)
    check_consistent(out, 12)
    assert len(paired(out)) == 12 and p.stats()["paired_exact"] == 12
    # a colour frame older than one already handed out goes out at once as out_of_order
    p.add_depth(100.1, ("depth", "old"))
    p.add_image(100.1, ("image", "old"), 2000.0)
    [f] = p.poll(2000.0)
    assert f.dropped == "out_of_order" and p.stats()["out_of_order"] == 1


def test_reliable_resend_one_period_late_is_paired_not_dropped():
    ev = [(a + (0.040 if kind == "depth" and pl[1] % 3 == 0 else 0.0), kind, s, pl) if kind != "info" else
          (a, kind, s, pl) for a, kind, s, pl in stream(n=30, hz=30.0)]
    p = FramePairer(PairingConfig(expiry_s=0.5))
    out = run(p, ev)
    check_consistent(out, 30)
    assert len(paired(out)) == 30 and p.stats().get("depth_lost", 0) == 0
    assert max(f.waited_s for f in out) < 0.1


def test_lost_depth_at_30hz_with_a_wide_tolerance_is_not_replaced_by_the_neighbour():
    """input.depth_sync_tolerance_s 0.05 s is wider than a 30 Hz period: a lost depth must not be
    replaced by the next frame's depth (the old node paired 13 of 60 frames wrongly so)."""
    lost = {3, 4, 10, 17}
    ev = [e for e in stream(n=24, hz=30.0) if not (e[1] == "depth" and e[3][1] in lost)]
    p = FramePairer(PairingConfig(depth_tolerance_s=0.05, expiry_s=0.3))
    out = run(p, ev)
    check_consistent(out, 24)
    dropped = {f.image[1]: f.dropped for f in out if f.dropped}
    assert dropped == {k: "depth_lost" for k in lost}
    s = p.stats()
    assert s["paired_exact"] == 20 and s.get("paired_approx", 0) == 0
    assert s["wrong_pair_avoided"] >= len(lost)
    assert "depth" in next(f.detail for f in out if f.dropped)


def test_depth_after_the_expiry_counts_as_late_not_lost():
    ev = [(a + (0.8 if kind == "depth" and pl[1] == 5 else 0.0), kind, s, pl) if kind != "info" else
          (a, kind, s, pl) for a, kind, s, pl in stream(n=10, hz=15.0)]
    p = FramePairer(PairingConfig(expiry_s=0.3))
    out = run(p, ev)
    check_consistent(out, 10)
    s = p.stats()
    assert [f.image[1] for f in out if f.dropped] == [5]
    assert s["depth_late"] == 1 and s.get("depth_lost", 0) == 0 and s["paired_exact"] == 9


def test_approximate_stamps_pick_the_right_partner_and_wait_for_the_next_colour():
    """Depth stamped 8 ms after its colour frame (separate sensors), at 15 Hz, plus a stray
    depth 30 ms before each frame: the nearest mutual partner is chosen."""
    ev = []
    for k in range(15):
        t, arr = 100.0 + k / 15.0, 1000.0 + k / 15.0
        ev += [(arr - 0.01, "info", t, "K"), (arr + 0.012, "depth", t + 0.008, ("depth", k)),
               (arr - 0.03, "depth", t - 0.030, ("stray", k)), (arr, "image", t, ("image", k))]
    p = FramePairer(PairingConfig(depth_tolerance_s=0.02, expiry_s=0.5))
    out = run(p, ev)
    assert len(paired(out)) == 15
    assert all(f.depth == ("depth", f.image[1]) for f in out)
    assert p.stats()["paired_approx"] == 15


def test_odometry_after_the_image_is_waited_for_and_interpolated():
    """Odometry at 50 Hz arriving 30 ms after its stamp (later than the image): every frame gets
    the pose of its own instant, never the previous frame's."""
    p = FramePairer(PairingConfig(pose_tolerance_s=0.1, expiry_s=0.5))
    p.expect_pose = True
    out = run(p, stream(n=20, hz=15.0, poses=(50.0, 0.030)))
    check_consistent(out, 20)
    assert len(paired(out)) == 20
    for f in paired(out):
        assert np.allclose(f.pose, pose_at(f.stamp), atol=1e-9), (f.image, f.pose_source)
    s = p.stats()
    assert s.get("pose_interpolated", 0) + s.get("pose_exact", 0) == 20


def test_odometry_before_the_image_and_a_stream_that_stops():
    p = FramePairer(PairingConfig(pose_tolerance_s=0.05, expiry_s=0.3))
    p.expect_pose = True
    ev = stream(n=20, hz=30.0, poses=(100.0, -0.002))
    ev = [e for e in ev if not (e[1] == "pose" and e[2] > 100.0 + 12 / 30.0 - 0.001)]  # odometry stops
    out = run(p, ev)
    check_consistent(out, 20)
    got = {f.image[1]: f for f in out}
    for k in range(12):
        assert got[k].dropped is None and np.allclose(got[k].pose, pose_at(got[k].stamp), atol=1e-9)
    # frame 12 is within 0.05 s of the last pose (nearest at the expiry); the rest are dropped
    late = [k for k, f in got.items() if f.pose_source == "late"]
    assert late and min(late) >= 12 and all(got[k].pose_source == "late" for k in range(14, 20))
    assert all("pose" in got[k].detail and got[k].pose is None and got[k].dropped is None for k in late)
    # without a pose source the same frames go out without a pose, at once
    q = FramePairer(PairingConfig(pose_tolerance_s=0.05, expiry_s=0.3))
    out = run(q, stream(n=5, hz=30.0))
    assert len(paired(out)) == 5 and q.stats()["pose_none"] == 5 and max(f.waited_s for f in out) < 0.05
    # a connected pose source that has sent nothing yet: wait up to the expiry, then go without
    r = FramePairer(PairingConfig(pose_tolerance_s=0.05, expiry_s=0.3))
    r.await_pose = True
    out = run(r, stream(n=3, hz=30.0))
    assert len(paired(out)) == 3 and r.stats()["pose_none"] == 3 and min(f.waited_s for f in out) >= 0.3


def test_sparse_poses_beyond_the_tolerance_are_unmatched_not_pose_less():
    p = FramePairer(PairingConfig(pose_tolerance_s=0.07, expiry_s=0.3))
    p.expect_pose = True
    out = run(p, stream(n=15, hz=15.0, poses=(1.0, 0.0)))  # 1 Hz poses at t=100, 101
    got = {f.image[1]: f for f in out}
    assert got[0].pose_source == "exact" and got[0].dropped is None
    # 67 ms from a pose: the nearer neighbour (the gap of 1 s is too long to interpolate)
    for k in (1, 14):
        assert got[k].pose_source == "nearest", (k, got[k].pose_source)
    # the others wait for the next pose: "late" when it did not come within the expiry (0.3 s),
    # "unmatched" when it came but both neighbours are beyond the tolerance
    assert all(got[k].pose_source == "late" for k in range(2, 11))
    assert all(got[k].pose_source == "unmatched" for k in range(11, 14))
    assert all(got[k].pose is None for k in range(2, 14))
    assert "beyond input.pose_sync_tolerance_s" in got[12].detail and "within 0.3 s" in got[5].detail
    assert all(f.pose is not None for f in out if f.pose_source not in ("late", "unmatched")), \
        "no frame goes out without a pose (or the reason it has none) when poses are expected"


def test_superseded_duplicate_and_camera_info():
    p = FramePairer(PairingConfig(max_pending=4, expiry_s=5.0))
    p.add_info("K", 0.0)
    for k in range(6):  # no depth at all: the pending queue overflows
        p.add_image(10.0 + k, ("image", k), 0.1 * k)
    p.add_image(15.0, ("image", "dup"), 0.7)
    out = p.poll(0.8)
    assert [(f.image[1], f.dropped) for f in out] == [(0, "superseded"), (1, "superseded"),
                                                       ("dup", "duplicate_timestamp")]
    p.add_depth(12.0, ("depth", 2), 0.9)
    out = p.poll(0.9)
    assert [(f.image[1], f.dropped) for f in out] == [(2, None)] and out[0].depth == ("depth", 2)
    # camera info missing: the frame waits, is paired when it comes, dropped at the expiry otherwise
    q = FramePairer(PairingConfig(expiry_s=0.2))
    q.add_depth(1.0, "d1")
    q.add_image(1.0, "c1", now=0.0)
    assert q.poll(0.1) == []
    q.add_info("K", 0.15)
    assert [f.dropped for f in q.poll(0.15)] == [None]
    r = FramePairer(PairingConfig(expiry_s=0.2))
    r.add_depth(1.0, "d1")
    r.add_image(1.0, "c1", now=0.0)
    assert [f.dropped for f in r.poll(0.25)] == ["no_camera_info"]


def test_frames_behind_a_waiting_frame_keep_stamp_order_and_clear_forgets():
    p = FramePairer(PairingConfig(expiry_s=0.5))
    p.add_info("K")
    p.add_image(1.0, "c1", 0.0)
    p.add_image(2.0, "c2", 0.01)
    p.add_depth(2.0, "d2")
    assert p.poll(0.02) == []  # c2 is complete but waits behind c1
    p.add_depth(1.0, "d1")
    assert [f.image for f in p.poll(0.03)] == ["c1", "c2"]
    p.add_image(3.0, "c3", 0.04)
    assert p.sizes()["pending_frames"] == 1
    p.clear()
    assert p.poll(1.0) == [] and p.pending() == 0 and p.sizes() == {"pending_frames": 0, "depths": 0, "poses": 0}


def test_external_pose_lookup_first_and_its_errors_ignored():
    calls = []

    def tf(stamp, frame):
        calls.append(frame)
        if stamp > 1.5:
            raise RuntimeError("extrapolation into the future")
        return pose_at(stamp)

    p = FramePairer(PairingConfig(need_depth=False, need_info=False, expiry_s=0.1), pose_fn=tf)
    p.add_image(1.0, "c1", 0.0, frame_id="cam")
    p.add_image(2.0, "c2", 0.0, frame_id="cam")
    out = p.poll(0.2)
    assert out[0].pose_source == "external" and np.allclose(out[0].pose, pose_at(1.0))
    assert out[1].pose_source == "none" and out[1].dropped is None
    assert calls and set(calls) == {"cam"}


def test_config_validation():
    with pytest.raises(ValueError, match="expiry_s"):
        PairingConfig(expiry_s=float("nan")).validate()
    with pytest.raises(ValueError, match="max_pending"):
        PairingConfig(max_pending=0).validate()


@settings(max_examples=60, deadline=None)
@given(hz=st.sampled_from([5.0, 15.0, 30.0]), n=st.integers(3, 25),
       lost=st.sets(st.integers(0, 24), max_size=6), late=st.sets(st.integers(0, 24), max_size=6),
       delay=st.floats(0.0, 0.25), depth_first=st.booleans(), tol=st.sampled_from([0.01, 0.05, 0.2]))
def test_property_every_frame_once_never_a_wrong_depth(hz, n, lost, late, delay, depth_first, tol):
    """Random loss and delays of exactly stamped depth: every colour frame comes out once, in
    stamp order, and a paired frame always has its own depth (whatever the tolerance)."""
    ev = []
    for a, kind, s, pl in stream(n=n, hz=hz, depth_lag=0.004 if depth_first else -0.004):
        if kind == "depth" and pl[1] in lost:
            continue
        if kind == "depth" and pl[1] in late:
            a += delay
        ev.append((a, kind, s, pl))
    p = FramePairer(PairingConfig(depth_tolerance_s=tol, expiry_s=0.3))
    out = run(p, ev, tail_s=1.0)
    check_consistent(out, n)
    got = {f.image[1]: f for f in out}
    for k in range(n):
        if k not in lost and (k not in late or delay < 0.25):
            assert got[k].dropped is None, (k, got[k].dropped, got[k].detail)
    s = p.stats()
    assert sum(s.get(k, 0) for k in ("paired_exact", "paired_approx", "depth_lost", "depth_late")) == n
