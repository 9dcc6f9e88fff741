"""Global alignment of pairwise pointmaps: Dynamic Global Aligning (DGA) and the DUSt3R
confidence-weighted baseline. Entry point: :func:`align_global`."""
from .dga import align_global
from ..errors import AlignmentError, Cancelled
from .matching import pair_matches
from .weights import adaptive_weight, dga_weights, transform_confidence

__all__ = ["align_global", "AlignmentError", "Cancelled", "adaptive_weight",
           "dga_weights", "pair_matches", "transform_confidence"]
