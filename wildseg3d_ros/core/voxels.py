"""Voxel keys: integer voxel coordinates packed into one int64 per voxel (21 bits per axis).

Used wherever points are compared by the voxel they fall in: the 3D association of the mask
cache, Multi-view Group Mapping's connected components and negative subtraction, and the
propagation of a refined mask between views.  Keys sort and ``searchsorted`` like the voxels'
lexicographic order, so a sorted unique key array is a set with vectorised membership.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["KEY_BITS", "pack", "unpack", "voxel_keys", "isin_sorted", "dilate_keys",
           "NEIGHBOURS_HALF", "auto_voxel_size"]

KEY_BITS = 21
_OFF = 1 << (KEY_BITS - 1)        # signed voxel coordinate 0 <-> stored value 2^20
_MASK = (1 << KEY_BITS) - 1

# the 13 offsets of the 26-neighbourhood with (i, j, k) > 0 lexicographically (each undirected
# neighbour pair once); use ``np.concatenate([NEIGHBOURS_HALF, -NEIGHBOURS_HALF])`` for all 26
NEIGHBOURS_HALF = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                            if (i, j, k) > (0, 0, 0)], np.int64)


def pack(q: np.ndarray) -> np.ndarray:
    """Signed integer voxel coordinates (..., 3) -> int64 keys (...); clipped to +-2^20."""
    q = np.clip(np.asarray(q, np.int64) + _OFF, 0, _MASK)
    return (q[..., 0] << (2 * KEY_BITS)) | (q[..., 1] << KEY_BITS) | q[..., 2]


def unpack(keys: np.ndarray) -> np.ndarray:
    """int64 keys (...) -> signed integer voxel coordinates (..., 3)."""
    keys = np.asarray(keys, np.int64)
    return np.stack([(keys >> (2 * KEY_BITS)) & _MASK, (keys >> KEY_BITS) & _MASK,
                     keys & _MASK], -1) - _OFF


def voxel_keys(points: np.ndarray, voxel: float, origin: Optional[np.ndarray] = None) -> np.ndarray:
    """Keys of the voxels (edge ``voxel``, grid corner ``origin``, default 0) holding the points
    (..., 3)."""
    # one axis at a time, in place in one float64 buffer (a 1M-point scene: 21 ms and 24 MB;
    # the chain of (N, 3) temporaries took 46-83 ms and 80 MB, 240 ms in fresh memory): the keys
    # of pack(floor((p - origin) / voxel)) for finite points; a NaN coordinate is stored as 0
    # and an infinite one saturates
    p = np.asarray(points)
    o = np.zeros(3) if origin is None else np.asarray(origin, np.float64).reshape(3)
    out = np.zeros(p.shape[:-1], np.int64)
    q = np.empty(p.shape[:-1], np.float64)
    for c in range(3):
        np.subtract(p[..., c], o[c], out=q, dtype=np.float64)
        q /= voxel
        np.floor(q, out=q)
        np.nan_to_num(q, copy=False, nan=-_OFF)
        np.clip(q, -_OFF, _MASK - _OFF, out=q)
        k = q.astype(np.int64)
        k += _OFF
        k <<= (2 - c) * KEY_BITS
        out |= k
    return out


def isin_sorted(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` (any shape) in the sorted unique ``table`` (bool, same shape)."""
    keys = np.asarray(keys)
    if table.size == 0:
        return np.zeros(keys.shape, bool)
    idx = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return table[idx] == keys


def dilate_keys(keys: np.ndarray) -> np.ndarray:
    """Sorted unique keys of the 27-neighbourhoods of ``keys``."""
    keys = np.asarray(keys, np.int64)
    if keys.size == 0:
        return keys
    off = np.concatenate([np.zeros((1, 3), np.int64), NEIGHBOURS_HALF, -NEIGHBOURS_HALF])
    return np.unique(pack(unpack(keys)[:, None, :] + off[None]))


def auto_voxel_size(pts3d: np.ndarray, valid: np.ndarray, factor: float = 6.0) -> float:
    """A voxel edge derived from the pointmaps: ``factor`` x the median 3D distance between
    horizontally adjacent valid pixels (scale-free: works for metric and up-to-scale scenes)."""
    pts3d = np.asarray(pts3d)
    valid = np.asarray(valid, bool)
    if pts3d.ndim == 3:
        pts3d, valid = pts3d[None], valid[None]
    step = max(1, pts3d.shape[2] // 128)
    rows = pts3d[:, ::4]
    dd = rows[:, :, :-step:step] - rows[:, :, step::step]
    ok = valid[:, ::4, :-step:step] & valid[:, ::4, step::step]
    d = np.sqrt(np.einsum("...k,...k->...", dd, dd))[ok] / step  # 3x faster than norm of the masked copy
    d = d[np.isfinite(d) & (d > 0)]
    if d.size == 0:
        return 0.01
    return float(factor * np.median(d))
