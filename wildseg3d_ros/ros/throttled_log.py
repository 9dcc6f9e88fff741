"""Rate-limited logging per message kind: a bad input repeated at 30 Hz logs once per period
with a count of what was suppressed, instead of flooding the console.

Error paths must not be able to fail themselves. rclpy remembers the severity of each *call
site* of a logger and raises ``ValueError: Logger severity cannot be changed between calls``
when one site logs at two severities; so every severity here has its own call site (``info``,
``warning``, ``error`` each call the wrapped logger directly, never through one shared
``getattr``), and a logger that raises anyway is answered by a line on stderr, never by an
exception in the caller."""
from __future__ import annotations

import re
import sys
import threading
import time
from typing import Dict, Optional

_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def throttle_key(kind: str, msg: str) -> str:
    """Rate-limiting key of a message: its kind plus the text with numbers blanked, so that the
    same problem repeated with other stamps / sizes is limited together while a different problem
    of the same kind is still logged at once."""
    return f"{kind}:{_NUM.sub('#', msg)[:120]}"


def _fallback(level: str, msg: str, err: BaseException) -> None:
    try:
        sys.stderr.write(f"[{level.upper()}] {msg} (logger failed: {err!r})\n")
    except Exception:  # stderr closed: nothing left to tell
        pass


class ThrottledLogger:
    def __init__(self, logger, period_s: float = 2.0):
        self._logger = logger
        self._period = period_s
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _admit(self, key: str, msg: str) -> Optional[str]:
        """The line to log now (with the suppressed count), or None when rate-limited."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
            if len(self._last) > 4096:  # bounded: forget keys not seen for a while
                for k in [k for k, t in self._last.items() if now - t > 10 * self._period]:
                    self._last.pop(k, None)
                    self._suppressed.pop(k, None)
        if n:
            msg = f"{msg} (same message suppressed {n} times in the last {self._period:g} s)"
        return msg

    # one call site per severity (see the module docstring)
    def info(self, key: str, msg: str) -> bool:
        line = self._admit(key, msg)
        if line is None:
            return False
        try:
            self._logger.info(line)
        except Exception as e:
            _fallback("info", line, e)
        return True

    def warning(self, key: str, msg: str) -> bool:
        line = self._admit(key, msg)
        if line is None:
            return False
        try:
            self._logger.warning(line)
        except Exception as e:
            _fallback("warning", line, e)
        return True

    def error(self, key: str, msg: str) -> bool:
        line = self._admit(key, msg)
        if line is None:
            return False
        try:
            self._logger.error(line)
        except Exception as e:
            _fallback("error", line, e)
        return True

    def at(self, level: str, key: str, msg: str) -> bool:
        """Log at a severity chosen at run time ('info' | 'warning' | 'error'; anything else is
        logged as an error) — still one rclpy call site per severity."""
        if level == "info":
            return self.info(key, msg)
        if level == "warning":
            return self.warning(key, msg)
        return self.error(key, msg)
