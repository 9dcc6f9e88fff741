"""wildseg3d_ros."""
