"""Data containers shared by every stage of the pipeline (no ROS, no torch required).

Conventions (used everywhere in the package):

* Poses are **camera-to-world** 4x4 float64 matrices, OpenCV camera axes
  (x right, y down, z forward), metres when the scale is known.
* Images are H x W x 3 uint8 RGB; depth is H x W float32 metres, 0 = invalid.
* Intrinsics ``K`` are 3x3 float64 pinhole matrices in pixels.
* Mask-cache labels are int32 object ids; ``0`` means "no object" (unlabelled).

Pairwise pointmap predictions use the exact dict layout returned by
``dust3r.inference.inference()`` (see :func:`make_pairwise_predictions`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class Keyframe:
    """One buffered camera frame.

    ``pose_prior`` is the camera-to-world pose from odometry/TF when known (else None).
    ``depth`` is metric depth (RGB-D cameras) or None (monocular, DUSt3R backend).
    """

    index: int
    stamp: float
    rgb: np.ndarray
    K: np.ndarray
    depth: Optional[np.ndarray] = None
    pose_prior: Optional[np.ndarray] = None
    frame_id: str = "camera"

    @property
    def shape(self):
        return self.rgb.shape[:2]


@dataclass
class MaskCache:
    """Per-keyframe object masks (the paper's mask cache).

    labels: V x H x W int32, global object ids consistent across views, 0 = none.
    soft:   V x H x W float32 in [0, 1], soft object mask S used by DGA weighting
            (1 inside a confident object mask, lower near mask borders / unlabelled).
    objects: object id -> dict of per-object metadata (``views``: list of view indices,
            ``area``: pixel count per view, ``name``/``score`` when known).
    """

    labels: np.ndarray
    soft: np.ndarray
    objects: Dict[int, dict] = field(default_factory=dict)

    @property
    def num_views(self) -> int:
        return int(self.labels.shape[0])

    def object_ids(self) -> np.ndarray:
        ids = np.unique(self.labels)
        return ids[ids > 0]


@dataclass
class AlignedScene:
    """The fused reconstruction: every keyframe's pointmap in one world frame.

    pts3d:   V x H x W x 3 float32 world points (NaN or conf 0 where invalid)
    conf:    V x H x W float32 confidence (>= 0; 0 = invalid)
    poses:   V x 4 x 4 float64 camera-to-world
    K:       V x 3 x 3 float64 intrinsics (focals / principal points after alignment)
    rgb:     V x H x W x 3 uint8
    weights: V x H x W float32 final per-pixel alignment weights (DGA's W), or None
    loss / loss_history: final objective value and its history
    mask_cache: the per-view object masks, or None before segmentation
    frame_id: the frame the points are expressed in
    metric: True when the scale is metric (depth or known poses)
    """

    pts3d: np.ndarray
    conf: np.ndarray
    poses: np.ndarray
    K: np.ndarray
    rgb: np.ndarray
    weights: Optional[np.ndarray] = None
    loss: float = float("nan")
    loss_history: List[float] = field(default_factory=list)
    mask_cache: Optional[MaskCache] = None
    frame_id: str = "map"
    metric: bool = True
    stamps: Optional[np.ndarray] = None

    @property
    def num_views(self) -> int:
        return int(self.pts3d.shape[0])

    @property
    def image_shape(self):
        return tuple(self.pts3d.shape[1:3])

    def valid_mask(self) -> np.ndarray:
        """V x H x W bool: finite points with positive confidence."""
        return np.isfinite(self.pts3d).all(-1) & (self.conf > 0)


def make_pairwise_predictions(idx1, idx2, pts1, conf1, pts2_in_1, conf2, img1=None, img2=None):
    """Build the dict that ``dust3r.inference.inference()`` returns.

    idx1, idx2: length-E sequences of view indices (edge e = (idx1[e], idx2[e])).
    pts1:       E x H x W x 3 pointmap of view idx1[e] in its own camera frame.
    conf1:      E x H x W confidences of pts1.
    pts2_in_1:  E x H x W x 3 pointmap of view idx2[e] expressed in the frame of idx1[e].
    conf2:      E x H x W confidences of pts2_in_1.
    Arrays may be numpy or torch; they are stored as given (DUSt3R stores torch tensors).
    """
    view1 = {"idx": list(int(i) for i in idx1)}
    view2 = {"idx": list(int(i) for i in idx2)}
    if img1 is not None:
        view1["img"] = img1
    if img2 is not None:
        view2["img"] = img2
    return {
        "view1": view1,
        "view2": view2,
        "pred1": {"pts3d": pts1, "conf": conf1},
        "pred2": {"pts3d_in_other_view": pts2_in_1, "conf": conf2},
    }
