"""Shared test set-up: import path, ROS 2 isolation, paths to ../shared data."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

# Keep every ROS 2 participant of this test session on loopback and on a domain of its own, so
# parallel sessions (or a developer's running nodes) never cross-talk. Set before rclpy loads;
# subprocesses inherit it.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
if "WILDSEG3D_TEST_KEEP_DOMAIN" not in os.environ:
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
os.environ.setdefault("PYTHONUNBUFFERED", "1")

# Nodes save scenes under ~/.ros/wildseg3d by default and ROS logs go to ~/.ros/log: give the
# test session (and the node processes it starts) a home of its own instead of the user's.
if "WILDSEG3D_TEST_KEEP_HOME" not in os.environ:
    import tempfile

    os.environ["HOME"] = tempfile.mkdtemp(prefix="wildseg3d-test-home-")


# ----------------------------------------------------------------------------- shared ROS fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ros():
    """rclpy initialised for the tests of one module (shut down after them). Every test that
    uses it carries the ``ros`` marker (see pytest_collection_modifyitems): ``-m ros`` selects
    the tests that need real ROS 2, the ones CI runs a second time against Jazzy."""
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 rclpy wheels are not installed")
    if not rclpy.ok():
        rclpy.init()
    yield rclpy
    if rclpy.ok():
        rclpy.shutdown()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ros" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ros)
