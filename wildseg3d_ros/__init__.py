"""wildseg3d_ros: online 3D segmentation of any object from a few camera views (WildSeg3D)."""
import os as _os

# OpenMP (torch's CPU threads) waits passively unless the user chose otherwise. Must be set before
# torch loads libgomp, i.e. before the first torch import: every entry point imports this package
# first. With the default active spin-wait, torch's idle worker threads compete with the nodes'
# executor threads and each other: the demo's alignment took 40.7 s instead of 3.3 s (the whole
# demo 69 s instead of 31 s), and small torch operations on a loaded 2-core machine ran 3-9x
# slower (measured, see docs/dga.md).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
