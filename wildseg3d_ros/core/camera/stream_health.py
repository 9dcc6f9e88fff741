"""Gaps in a camera stream that look like transport loss (ROS-free).

A camera stamps its frames at a steady period. When the stamps that reach a subscriber skip
(a gap of k periods means k - 1 frames that were sent but never arrived), the frames were lost
on the way — typically a DDS transport dropping large best-effort messages (Fast DDS's default
512 KiB shared-memory segment per participant cannot hold a 1-2 MB frame set). ``StampGapMonitor``
counts those missing frames over a window of recent stamps and says in words when the loss is
worth acting on; the reconstruction node shows it in /diagnostics.
"""
from __future__ import annotations

import collections
import threading
from typing import Optional

import numpy as np


class StampGapMonitor:
    """Missing-frame estimate of one stamped stream.

    ``observe(stamp)`` per received message (any order; duplicates ignored). The period is the
    median spacing of the recent stamps; a gap longer than ``gap_factor`` periods counts
    ``round(gap / period) - 1`` missing frames."""

    def __init__(self, window: int = 300, gap_factor: float = 1.5):
        self._stamps = collections.deque(maxlen=int(window))
        self._gap_factor = float(gap_factor)
        self._lock = threading.Lock()
        self.total_received = 0

    def observe(self, stamp: float) -> None:
        with self._lock:
            self._stamps.append(float(stamp))
            self.total_received += 1

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()

    def summary(self) -> dict:
        """received / missing / period over the window (missing = frames the stamps skip)."""
        with self._lock:
            s = np.unique(np.asarray(self._stamps, dtype=np.float64))
        out = {"received": int(len(s)), "missing": 0, "period_s": 0.0}
        if len(s) < 4:
            return out
        d = np.diff(s)
        period = float(np.median(d))
        if period <= 0:
            return out
        gaps = d[d > self._gap_factor * period]
        out["missing"] = int(np.maximum(np.rint(gaps / period) - 1, 0).sum())
        out["period_s"] = period
        return out

    def warning(self, name: str, min_missing: int = 3, min_fraction: float = 0.05) -> Optional[str]:
        """A sentence when at least ``min_missing`` frames and ``min_fraction`` of the stream are
        missing over the window, else None."""
        s = self.summary()
        sent = s["received"] + s["missing"]
        if s["missing"] < min_missing or sent == 0 or s["missing"] / sent < min_fraction:
            return None
        return (f"{name}: {s['missing']} of the last {sent} frames never arrived (their stamps skip at "
                f"{1.0 / s['period_s']:.1f} Hz): looks like transport loss; give the camera driver's "
                "process and this node the large-data Fast DDS profile (config/fastdds_large_data.xml via "
                "FASTDDS_DEFAULT_PROFILES_FILE, or FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA) or set "
                "input.reliable:=true")
