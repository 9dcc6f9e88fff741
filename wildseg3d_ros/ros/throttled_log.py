"""Rate-limited logging per message kind: a bad input repeated at 30 Hz logs once per period
with a count of what was suppressed, instead of flooding the console."""
from __future__ import annotations

import re
import threading
import time
from typing import Dict

_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def throttle_key(kind: str, msg: str) -> str:
    """Rate-limiting key of a message: its kind plus the text with numbers blanked, so that the
    same problem repeated with other stamps / sizes is limited together while a different problem
    of the same kind is still logged at once."""
    return f"{kind}:{_NUM.sub('#', msg)[:120]}"


class ThrottledLogger:
    def __init__(self, logger, period_s: float = 2.0):
        self._logger = logger
        self._period = period_s
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _emit(self, level: str, key: str, msg: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
        if n:
            msg = f"{msg} (same message suppressed {n} times in the last {self._period:g} s)"
        getattr(self._logger, level)(msg)
        return True

    def info(self, key: str, msg: str) -> bool:
        return self._emit("info", key, msg)

    def warning(self, key: str, msg: str) -> bool:
        return self._emit("warning", key, msg)

    def error(self, key: str, msg: str) -> bool:
        return self._emit("error", key, msg)
