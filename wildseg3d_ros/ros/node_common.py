"""Behaviour both wildseg3d nodes share: refusing an input (count it, remember it as the last
error, log it rate-limited) and re-creating the diagnostics timer when its period changes."""
from __future__ import annotations

from .throttled_log import throttle_key


class NodeCommonMixin:
    """Expects ``self.stats`` (Counter), ``self.log`` (ThrottledLogger), ``self.last_error`` and
    ``self._publish_diagnostics``; ``REFUSE_LEVEL`` is the default log level of a refusal."""

    REFUSE_LEVEL = "error"

    def _refuse(self, key: str, counter: str, msg: str, level: str = None):
        """One refused input: count it, remember it as the last error, log it rate-limited."""
        self.stats[counter] += 1
        self.last_error = msg
        getattr(self.log, level or self.REFUSE_LEVEL)(throttle_key(key, msg), msg)

    def _start_diagnostics_timer(self, period_s: float):
        old = getattr(self, "_diag_timer", None)
        if old is not None:
            old.cancel()
            self.destroy_timer(old)
        self._diag_timer = self.create_timer(period_s, self._publish_diagnostics)
