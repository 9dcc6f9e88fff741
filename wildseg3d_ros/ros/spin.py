"""Console-script entry shared by the nodes: init, spin, clean shutdown on Ctrl-C / SIGINT."""
from __future__ import annotations

import rclpy
from rclpy.executors import ExternalShutdownException


def spin_node(node_cls, args=None) -> None:
    rclpy.init(args=args)
    node = node_cls()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
