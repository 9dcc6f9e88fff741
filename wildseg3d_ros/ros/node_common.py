"""Behaviour both wildseg3d nodes share: refusing an input (count it, remember it as the last
error, log it rate-limited), guards that keep every callback, service and worker thread alive
whatever an exception says, and re-creating the diagnostics timer when its period changes."""
from __future__ import annotations

import traceback

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
        self.log.at(level or self.REFUSE_LEVEL, throttle_key(key, msg), msg)

    def internal_error(self, what: str, e: BaseException) -> None:
        """An unexpected exception in ``what``: counted, kept as the last error, logged with its
        traceback (rate-limited); never raises itself."""
        try:
            self.stats["internal_errors"] += 1
            self.last_error = f"{what} failed: {type(e).__name__}: {e}"
            self.log.error(f"internal:{what}", f"{self.last_error} (input dropped, node keeps running)\n"
                           f"{traceback.format_exc(limit=6)}")
        except Exception:  # the error path itself must not fail
            pass

    def guarded_callback(self, what: str, fn):
        """A subscription / timer callback that never lets an exception reach the executor
        (an exception there would end ``rclpy.spin`` and the node)."""
        def cb(*args):
            try:
                return fn(*args)
            except Exception as e:
                self.internal_error(f"{what} callback", e)
        return cb

    def guarded_service(self, what: str, fn):
        """A service callback that always answers: on an exception the response says so."""
        def srv(req, resp):
            try:
                return fn(req, resp)
            except Exception as e:
                self.internal_error(f"{what} service", e)
                try:
                    resp.success, resp.message = False, f"internal error in {what}: {type(e).__name__}: {e}"
                except Exception:
                    pass
                return resp
        return srv

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
