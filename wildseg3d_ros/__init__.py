"""wildseg3d_ros: online 3D segmentation of any object from a few camera views (WildSeg3D)."""
__version__ = "0.1.0"
