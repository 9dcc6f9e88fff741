"""Behaviour both wildseg3d nodes share: refusing an input (count it, remember it as the last
error, log it rate-limited) and re-creating the diagnostics timer when its period changes."""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from . import convert
from .throttled_log import throttle_key


class NodeCommonMixin:
    """Expects ``self.stats`` (Counter), ``self.log`` (ThrottledLogger), ``self.last_error``,
    ``self.params`` (with ``device``), ``self.diag_pub``, ``diagnostics_values()`` and
    ``_diagnostic_state()``; ``REFUSE_LEVEL`` is the default log level of a refusal and
    ``DIAG_NAME`` the node's name in its /diagnostics status."""

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

    def _publish_diagnostics(self):
        try:
            level, message = self._diagnostic_state()
            st = DiagnosticStatus(name=f"wildseg3d: {self.DIAG_NAME}", hardware_id=self.params["device"],
                                  level=level, message=message[:200])
            st.values = [KeyValue(key=k, value=v) for k, v in self.diagnostics_values().items()]
            self.diag_pub.publish(DiagnosticArray(header=convert.make_header("", self.get_clock().now().to_msg()),
                                                  status=[st]))
        except Exception as e:  # diagnostics must never take the node down
            self.log.error("diagnostics", f"diagnostics failed: {e}")
