"""ROS-free core: geometry, alignment, segmentation, point-cloud packing. Never imports rclpy."""
