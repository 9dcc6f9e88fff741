"""Data containers shared by every stage of the pipeline (no ROS, no torch required).

Conventions (used everywhere in the package):

* Poses are **camera-to-world** 4x4 float64 matrices, OpenCV camera axes
  (x right, y down, z forward), metres when the scale is known.
* Images are H x W x 3 uint8 RGB; depth is H x W float32 metres, 0 = invalid.
* Intrinsics ``K`` are 3x3 float64 pinhole matrices in pixels.
* Mask-cache labels are int32 object ids; ``0`` means "no object" (unlabelled).

Pairwise pointmap predictions travel as :class:`PairwisePredictions` from the backends to the
aligner; DUSt3R's ``inference()`` dict converts to and from it at the backend's edge.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .geometry import finite_points


@dataclass
class Keyframe:
    """One buffered camera frame.

    ``pose_prior`` is the camera-to-world pose from odometry/TF when known (else None).
    ``depth`` is metric depth (RGB-D cameras) or None (monocular, DUSt3R backend).
    ``K_known`` is False when ``K`` is a guess (no CameraInfo / --intrinsics): the aligner then
    estimates the focal instead of keeping it.
    """

    index: int
    stamp: float
    rgb: np.ndarray
    K: np.ndarray
    depth: Optional[np.ndarray] = None
    pose_prior: Optional[np.ndarray] = None
    frame_id: str = "camera"
    K_known: bool = True
    _content_key: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self):
        return self.rgb.shape[:2]

    def content_key(self) -> str:
        """A digest of what per-keyframe work depends on (image, depth, K): the key of the
        caches that let work done when the keyframe was accepted be reused by a reconstruction.
        Computed once per keyframe (its arrays are not modified once it is buffered)."""
        if self._content_key is None:
            h = hashlib.blake2b(digest_size=16)
            for a in (self.rgb, self.depth, self.K):
                if a is None:
                    h.update(b"none")
                else:
                    a = np.ascontiguousarray(a)
                    h.update(f"{a.dtype}{a.shape}".encode())
                    h.update(a.tobytes())
            self._content_key = h.hexdigest()
        return self._content_key


@dataclass
class MaskCache:
    """Per-keyframe object masks (the paper's mask cache).

    labels: V x H x W int32, global object ids consistent across views, 0 = none.
    soft:   V x H x W float32 in [0, 1], soft object mask S used by DGA weighting
            (1 inside a confident object mask, lower near mask borders / unlabelled).
    objects: object id -> dict of per-object metadata (``views``: list of view indices,
            ``area``: pixel count per view, ``name``/``score`` when known).
    kept:   optional V x H x W bool: the labelled pixels Multi-view Group Mapping keeps with its
            default settings (consistency vote + floater filter, ``GroupMapper.kept``), computed
            where the scene is made, so that a segmentation node cuts its objects from it
            instead of computing them (None: not computed).
    """

    labels: np.ndarray
    soft: np.ndarray
    objects: Dict[int, dict] = field(default_factory=dict)
    kept: Optional[np.ndarray] = None

    @property
    def num_views(self) -> int:
        return int(self.labels.shape[0])

    def object_ids(self) -> np.ndarray:
        """The ids > 0 present in ``labels``, ascending (a count per id: O(pixels), no sort)."""
        lab = np.asarray(self.labels).reshape(-1)
        if lab.size == 0:
            return lab[:0]
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi > max(1 << 20, 4 * lab.size) or lab.dtype.kind not in "iu":
            ids = np.unique(lab)
            return ids[ids > 0]
        ids = np.flatnonzero(np.bincount(lab, minlength=1)).astype(lab.dtype)
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
    stamps: V keyframe time stamps (s) or None
    info: diagnostics of how the scene was made (e.g. ``world_fit``: the fit to known poses)
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
    info: Dict[str, Any] = field(default_factory=dict)
    #: validity computed when the scene was decoded from a message (core.output.scene_codec),
    #: returned by valid_mask() while pts3d / conf are those same array objects
    decoded_valid: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._valid_of = (id(self.pts3d), id(self.conf)) if self.decoded_valid is not None else None

    @property
    def num_views(self) -> int:
        return int(self.pts3d.shape[0])

    @property
    def image_shape(self):
        return tuple(self.pts3d.shape[1:3])

    def valid_mask(self) -> np.ndarray:
        """V x H x W bool: finite points with positive confidence."""
        v = self.decoded_valid
        if v is not None and self._valid_of == (id(self.pts3d), id(self.conf)) and v.shape == self.conf.shape:
            return v
        return finite_points(self.pts3d) & (self.conf > 0)


@dataclass
class PairwisePredictions:
    """Pairwise pointmap predictions: the one hand-over from a pointmap backend to the aligner.

    Edge ``e`` links the views ``idx1[e]`` and ``idx2[e]`` (positions in the keyframe list):

    * ``pts1[e]`` (H, W, 3): pointmap of view ``idx1[e]`` in its own camera frame;
    * ``pts2[e]`` (H, W, 3): pointmap of view ``idx2[e]`` expressed in the frame of ``idx1[e]``;
    * ``conf1[e]``, ``conf2[e]`` (H, W): their confidences (>= 0; 0 = invalid; DUSt3R's
      ``1 + exp(x)`` maps are accepted as they are).

    Arrays are torch tensors or numpy arrays, stacked over edges (E, ...) or lists of per-edge
    arrays when views differ in size. ``images`` (V, H, W, 3) uint8 RGB are the views at the
    pointmaps' resolution (None when unknown); ``intrinsics`` (V, 3, 3) their pinhole K at that
    resolution when known (None: estimated by the aligner); ``metric`` is True when the pointmaps
    are in metres (depth cameras), False when each pair has its own unknown scale (networks,
    two-view stereo). ``info`` carries backend diagnostics (registrations, timings, ...).

    A backend that cannot use every keyframe (e.g. SfM could not register some) predicts the
    others only, numbered 0..V'-1: ``views`` lists their positions in the keyframe list it was
    given and ``dropped_views`` says why each other one was left out. A backend that estimates
    camera poses itself (bundle adjustment) passes them as ``known_poses`` (V', 4, 4)
    camera-to-world in the predictions' frame, with the weight the aligner should give them
    (``inf``: keep them fixed) in ``known_poses_weight``.

    DUSt3R's ``inference()`` dict converts with :meth:`from_dust3r` / :meth:`to_dust3r`.
    """

    idx1: List[int]
    idx2: List[int]
    pts1: Any
    conf1: Any
    pts2: Any
    conf2: Any
    images: Optional[np.ndarray] = None
    intrinsics: Optional[np.ndarray] = None
    metric: bool = False
    info: Dict[str, Any] = field(default_factory=dict)
    views: Optional[List[int]] = None
    dropped_views: Dict[int, str] = field(default_factory=dict)
    known_poses: Optional[np.ndarray] = None
    known_poses_weight: float = float("inf")

    def __post_init__(self):
        self.idx1 = [int(i) for i in _as_flat_list(self.idx1)]
        self.idx2 = [int(i) for i in _as_flat_list(self.idx2)]
        if len(self.idx1) != len(self.idx2):
            raise ValueError(f"idx1 has {len(self.idx1)} entries, idx2 {len(self.idx2)}")

    @property
    def num_edges(self) -> int:
        return len(self.idx1)

    @property
    def num_views(self) -> int:
        if self.images is not None:
            return len(self.images)
        return max(self.idx1 + self.idx2) + 1 if self.idx1 else 0

    @property
    def edges(self) -> List[Tuple[int, int]]:
        return list(zip(self.idx1, self.idx2))

    def camera_pointmaps(self) -> List[Tuple[Optional[np.ndarray], Optional[np.ndarray]]]:
        """Per view: (pointmap in its own camera frame (H, W, 3) float32, valid (H, W) bool), from
        the first edge in which the view is ``idx1``; (None, None) for a view never first."""
        out: List = [(None, None)] * self.num_views
        for e, i in enumerate(self.idx1):
            if out[i][0] is None:
                p, c = _to_numpy(self.pts1[e]), _to_numpy(self.conf1[e])
                out[i] = (p.astype(np.float32), (c > 0) & finite_points(p))
        return out

    @classmethod
    def from_dust3r(cls, out: dict, images=None, intrinsics=None, metric: bool = False,
                    info: Optional[dict] = None) -> "PairwisePredictions":
        """From the dict of ``dust3r.inference.inference()``; ``images`` default to the dict's
        ``view*['img']`` tensors ((E, 3, H, W) in [-1, 1]) when they are present."""
        try:
            v1, v2, p1, p2 = (out[k] for k in ("view1", "view2", "pred1", "pred2"))
            pred = dict(idx1=v1["idx"], idx2=v2["idx"], pts1=p1["pts3d"], conf1=p1["conf"],
                        pts2=p2["pts3d_in_other_view"], conf2=p2["conf"])
        except (KeyError, TypeError) as exc:
            raise ValueError("not a dust3r inference() dict: it needs view1/view2['idx'], "
                             "pred1['pts3d','conf'] and pred2['pts3d_in_other_view','conf']") from exc
        self = cls(**pred, intrinsics=intrinsics, metric=metric, info=dict(info or {}))
        self.images = images if images is not None else _images_from_views(v1, v2, self)
        return self

    def to_dust3r(self) -> dict:
        """The ``dust3r.inference.inference()`` dict (images as (E, 3, H, W) in [-1, 1] when known)."""
        v1, v2 = {"idx": list(self.idx1)}, {"idx": list(self.idx2)}
        if self.images is not None:
            import torch

            imgs = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 127.5 - 1.0
                    for im in self.images]
            v1["img"] = torch.stack([imgs[i] for i in self.idx1]) if _same_shape(imgs) else [imgs[i] for i in self.idx1]
            v2["img"] = torch.stack([imgs[j] for j in self.idx2]) if _same_shape(imgs) else [imgs[j] for j in self.idx2]
        return {"view1": v1, "view2": v2, "pred1": {"pts3d": self.pts1, "conf": self.conf1},
                "pred2": {"pts3d_in_other_view": self.pts2, "conf": self.conf2}}


def _as_flat_list(x) -> list:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return list(np.asarray(x).reshape(-1))


def _to_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _same_shape(arrays) -> bool:
    return len({tuple(a.shape) for a in arrays}) <= 1


def _images_from_views(view1: dict, view2: dict, pred: "PairwisePredictions") -> Optional[np.ndarray]:
    """Per-view uint8 RGB from DUSt3R's ``view*['img']`` ((E, 3, H, W) in [-1, 1], or HWC), or
    None when the dict carries no images (images are decoration: never fail on them)."""
    V = pred.num_views
    rgb: List[Optional[np.ndarray]] = [None] * V
    for view, idx in ((view1, pred.idx1), (view2, pred.idx2)):
        img = view.get("img") if isinstance(view, dict) else None
        if img is None:
            continue
        try:
            items = list(img) if isinstance(img, (list, tuple)) else [img[e] for e in range(len(idx))]
            for e, v in enumerate(idx):
                if rgb[v] is not None:
                    continue
                a = _to_numpy(items[e]).astype(np.float32)
                if a.ndim == 4 and a.shape[0] == 1:
                    a = a[0]
                if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # CHW, DUSt3R: [-1, 1]
                    a = np.transpose(a, (1, 2, 0))
                    a = (a + 1.0) * 127.5 if a.min() < 0 or a.max() <= 1.0 else a
                elif a.max() <= 1.0:
                    a = a * 255.0
                rgb[v] = np.clip(np.round(a), 0, 255).astype(np.uint8)
        except Exception:  # noqa: BLE001 - malformed decoration: leave the images unknown
            return None
    if any(r is None for r in rgb) or not _same_shape(rgb):
        return None
    return np.stack(rgb)
