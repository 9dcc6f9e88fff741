"""Rebuild an AlignedScene from the published organised scene cloud.

The scene cloud (core.cloud scene layout) carries, per keyframe pixel, the aligned world point,
colour, confidence, keyframe index and mask-cache label (negative, -l: a pixel of object l that
Multi-view Group Mapping's precomputed filter removes; decoded into ``MaskCache.kept``). Every
aligned pointmap is an exact pinhole pointmap (each pixel's point lies on its camera ray), so
each keyframe's intrinsics and camera-to-world pose are recovered by a linear resection (DLT)
over its own pixels; the message is therefore self-contained and cannot disagree with a
separately published pose message."""
from __future__ import annotations

import numpy as np

from . import cloud as corecloud
from ..geometry import ResectionError, finite_points, resect_pinhole_views
from ..mask_cache import object_table
from ..types import AlignedScene, MaskCache


class SceneDecodeError(ValueError):
    """A scene cloud whose fields are inconsistent (keyframe index, sizes, cameras)."""


def scene_from_cloud_array(arr: np.ndarray, frame_id: str) -> AlignedScene:
    """arr: structured array of shape (V*H, W) in the scene layout. Raises SceneDecodeError."""
    if arr.ndim != 2 or arr.size == 0:
        raise SceneDecodeError(f"scene cloud must be organised (height x width) and non-empty, got {arr.shape}")
    if "keyframe" not in (arr.dtype.names or ()):
        raise SceneDecodeError("scene cloud has no 'keyframe' field")
    rows_kf = arr["keyframe"][:, 0].astype(np.int64)
    V = int(rows_kf.max()) + 1
    height, width = arr.shape
    if height % V:
        raise SceneDecodeError(f"scene cloud height {height} is not a multiple of the {V} keyframes it names")
    H = height // V
    expect = np.repeat(np.arange(V), H)
    # the row blocks are what is read; the first and last column say whether the field follows
    # them (the other points' keyframe values are not used)
    if not np.array_equal(rows_kf, expect) or not (arr["keyframe"][:, -1] == rows_kf).all():
        raise SceneDecodeError("scene cloud 'keyframe' field is inconsistent with its row blocks "
                               "(keyframe v must fill rows v*H .. v*H+H-1)")
    d = corecloud.unpack_scene_cloud(arr, height, width, V, keyframe=False)
    pts, conf = d["pts3d"], d["conf"]
    valid = finite_points(pts) & (conf > 0)
    try:
        Ks, poses = resect_pinhole_views(pts, valid)
    except ResectionError as e:
        raise SceneDecodeError(f"keyframe {e.view}: cannot recover its camera from the cloud ({e})") from None
    labels, kept = d["label"], None
    if labels.size and int(labels.min()) < 0:  # the precomputed MGM filter (pack_scene_cloud)
        kept = labels > 0
        labels = np.abs(np.maximum(labels, -np.iinfo(np.int32).max))
    objects = object_table(labels)
    mc = MaskCache(labels=labels, soft=(labels > 0).astype(np.float32), objects=objects, kept=kept)
    return AlignedScene(pts3d=pts, conf=conf, poses=poses, K=Ks, rgb=d["rgb"],
                        mask_cache=mc, frame_id=frame_id, decoded_valid=valid)
