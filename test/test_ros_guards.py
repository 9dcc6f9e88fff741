"""Error paths that cannot fail: the throttled logger over a real rclpy logger, and the guards
that keep callbacks, services and worker threads alive (real rclpy, no fakes)."""
from __future__ import annotations

import collections

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")

from std_srvs.srv import Trigger  # noqa: E402

from wildseg3d_ros.ros.harness import RecordingLogger  # noqa: E402
from wildseg3d_ros.ros.throttled_log import ThrottledLogger  # noqa: E402


def _one_call_site(logger, level, msg):
    getattr(logger, level)(msg)  # one call site, two severities: what the old ThrottledLogger did


def test_rclpy_refuses_two_severities_at_one_call_site_and_the_throttled_logger_never_does(ros):
    node = rclpy.create_node("guards_logger_test")
    try:
        lg = node.get_logger()
        _one_call_site(lg, "info", "first")
        with pytest.raises(ValueError, match="severity cannot be changed"):
            _one_call_site(lg, "error", "second")  # the failure the old logger hit in its error path
        log = ThrottledLogger(lg, period_s=0.0)
        for level in ("info", "warning", "error", "warning", "info", "error"):
            assert log.at(level, f"k-{level}", f"a {level} line")
        assert log.info("a", "x") and log.warning("a", "y") and log.error("a", "z")
    finally:
        node.destroy_node()


def test_a_failing_logger_is_answered_on_stderr_not_by_an_exception(capsys):
    class Broken:
        def error(self, msg):
            raise ValueError("Logger severity cannot be changed between calls.")

        info = warning = error

    log = ThrottledLogger(Broken())
    assert log.error("k", "the refusal") is True
    assert "the refusal" in capsys.readouterr().err


def test_guards_keep_callbacks_and_services_alive(ros):
    from wildseg3d_ros.ros.node_common import NodeCommonMixin
    from rclpy.node import Node

    class Probe(NodeCommonMixin, Node):
        def __init__(self):
            super().__init__("guards_probe")
            self.stats = collections.Counter()
            self.last_error = ""
            self.rec = RecordingLogger()
            self.log = ThrottledLogger(self.rec)

    node = Probe()
    try:
        def boom(*_):
            raise KeyError("no such field")

        cb = node.guarded_callback("scene", boom)
        assert cb(object()) is None  # no exception reaches the executor
        assert node.stats["internal_errors"] == 1 and "scene callback failed" in node.last_error
        assert any("KeyError" in m and "node keeps running" in m for _, m in node.rec.lines)
        srv = node.guarded_service("reconstruct", boom)
        resp = srv(Trigger.Request(), Trigger.Response())
        assert resp.success is False and "internal error in reconstruct" in resp.message
        node.log = None  # even a node whose logger is gone survives an error report
        node.internal_error("worker", RuntimeError("x"))
    finally:
        node.destroy_node()
