"""core.stream_health: missing frames estimated from the stamps a subscriber receives."""
import numpy as np

from wildseg3d_ros.core.camera.stream_health import StampGapMonitor


def test_gaps_count_the_frames_that_never_arrived_and_warn_past_the_threshold():
    m = StampGapMonitor(window=300)
    stamps = 100.0 + np.arange(120) / 30.0
    lost = {5, 6, 7, 40, 41, 80, 99}
    for k, t in enumerate(stamps):
        if k not in lost:
            m.observe(t)
    s = m.summary()
    assert s["missing"] == len(lost) and s["received"] == 120 - len(lost)
    assert abs(s["period_s"] - 1 / 30) < 1e-9
    w = m.warning("colour images")
    assert w and "7 of the last 120 frames never arrived" in w and "fastdds_large_data.xml" in w


def test_a_complete_or_jittered_stream_gives_no_warning_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    m = StampGapMonitor()
    stamps = 5.0 + np.arange(90) / 15.0 + rng.normal(0, 0.003, 90)
    for t in rng.permutation(stamps):
        m.observe(t)
        m.observe(t)  # duplicates are ignored
    assert m.summary()["missing"] == 0 and m.warning("depth images") is None
    few = StampGapMonitor()
    for t in [0.0, 0.1, 0.3, 0.4, 0.5, 0.6]:  # one frame missing: below the 3-frame threshold
        few.observe(t)
    assert few.summary()["missing"] == 1 and few.warning("x") is None
    m.clear()
    assert m.summary() == {"received": 0, "missing": 0, "period_s": 0.0}
