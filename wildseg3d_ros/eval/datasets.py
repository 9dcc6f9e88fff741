"""Loaders of real datasets with known cameras, for tests, benchmarks and evaluation.

Every loader takes the dataset's own folder (``root``; the project keeps them in
``../shared/data/<name>``, see ``shared/README.md``, but nothing here assumes where) and returns
a :class:`RealData`: RGB images, metric depth or None, K, camera-to-world poses in OpenCV axes.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, NamedTuple, Optional

import cv2
import numpy as np

from ..core.geometry import pose_from_xyz_quat

__all__ = ["RealData", "load_llff_fern", "load_middlebury_temple", "load_rgbd_room", "resize_data", "temple_pseudo_gt"]


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
class RealData(NamedTuple):
    """A real capture: ``rgb`` list of H x W x 3 uint8, ``depth`` list of H x W float32 metres
    (0 = invalid) or None, ``K`` 3x3, ``poses`` V x 4 x 4 camera-to-world (OpenCV axes),
    ``names`` the source file names."""

    rgb: List[np.ndarray]
    depth: Optional[List[np.ndarray]]
    K: np.ndarray
    poses: np.ndarray
    names: List[str]


def _root(root) -> Path:
    p = Path(root)
    if not p.is_dir():
        raise FileNotFoundError(f"dataset folder {p} not found")
    return p


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_llff_fern(root) -> RealData:
    """LLFF fern, ``images_8`` (504x378), poses converted from LLFF axes (down, right,
    backwards) to OpenCV (right, down, forward): columns ``[c1, c0, -c2]``; f = 3260.5 * W / 4032,
    principal point at the image centre. Poses come from COLMAP (arbitrary scale)."""
    root = _root(root)
    files = sorted((root / "images_8").glob("*.png"))
    rgb = [_read_rgb(f) for f in files]
    a = np.load(root / "poses_bounds.npy")
    if len(a) != len(files):
        raise ValueError(f"poses_bounds.npy has {len(a)} poses for {len(files)} images")
    p = a[:, :15].reshape(-1, 3, 5)
    h, w = rgb[0].shape[:2]
    H_full, W_full, f_full = p[0, :, 4]
    f = f_full * w / W_full
    K = np.array([[f, 0, w / 2.0], [0, f, h / 2.0], [0, 0, 1.0]])
    poses = np.tile(np.eye(4), (len(a), 1, 1))
    R = p[:, :, :3]
    poses[:, :3, 0] = R[:, :, 1]
    poses[:, :3, 1] = R[:, :, 0]
    poses[:, :3, 2] = -R[:, :, 2]
    poses[:, :3, 3] = p[:, :, 3]
    return RealData(rgb, None, K, poses, [f.name for f in files])


def load_middlebury_temple(root) -> RealData:
    """Middlebury templeSR: ``templeSR_par.txt`` gives K and world->camera R, t per view
    (projection K [R | t], metres); poses are returned camera-to-world."""
    root = _root(root)
    lines = (root / "templeSR_par.txt").read_text().split("\n")
    n = int(lines[0].strip())
    rgb, poses, names, Ks = [], [], [], []
    for line in lines[1:1 + n]:
        parts = line.split()
        vals = np.array([float(x) for x in parts[1:]])
        K, R, t = vals[:9].reshape(3, 3), vals[9:18].reshape(3, 3), vals[18:21]
        T = np.eye(4)
        T[:3, :3] = R.T
        T[:3, 3] = -R.T @ t
        Ks.append(K)
        poses.append(T)
        names.append(parts[0])
        rgb.append(_read_rgb(root / parts[0]))
    if not all(np.allclose(k, Ks[0]) for k in Ks):
        raise ValueError("templeSR_par.txt: views have different intrinsics (not supported)")
    return RealData(rgb, None, Ks[0], np.stack(poses), names)


def temple_pseudo_gt(rgb: np.ndarray) -> np.ndarray:
    """Pseudo ground-truth mask of the Middlebury temple (``shared/README.md``): luminance > 45,
    the largest 4-connected component, holes kept (the temple has see-through gaps)."""
    from scipy import ndimage

    lum = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lab, n = ndimage.label(lum > 45)
    if n == 0:
        return np.zeros(lum.shape, bool)
    return lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)


def load_rgbd_room(root) -> RealData:
    """Kinect RGB-D room: ``color/N.png``, ``depth/N.pgm`` (16-bit mm), fixed intrinsics,
    ``pose.txt`` = tx ty tz qx qy qz qw camera-to-world per frame (SLAM estimate)."""
    root = _root(root)
    rows = np.loadtxt(root / "pose.txt", ndmin=2)
    rgb, depth, poses, names = [], [], [], []
    for n in range(1, len(rows) + 1):
        rgb.append(_read_rgb(root / "color" / f"{n}.png"))
        d = cv2.imread(str(root / "depth" / f"{n}.pgm"), cv2.IMREAD_UNCHANGED)
        if d is None or d.dtype != np.uint16:
            raise ValueError(f"depth/{n}.pgm is not a 16-bit image")
        depth.append(d.astype(np.float32) / 1000.0)
        poses.append(pose_from_xyz_quat(rows[n - 1, :3], rows[n - 1, 3:7]))
        names.append(f"{n}.png")
    K = np.array([[518.0, 0, 325.5], [0, 519.0, 253.5], [0, 0, 1.0]])
    return RealData(rgb, depth, K, np.stack(poses), names)


def resize_data(data: RealData, width: int, height: int) -> RealData:
    """Resize every view (colour INTER_AREA, depth nearest) and scale K accordingly."""
    h0, w0 = data.rgb[0].shape[:2]
    sx, sy = width / float(w0), height / float(h0)
    S = np.diag([sx, sy, 1.0])
    K = S @ data.K
    # pixel centres: u' + 0.5 = sx (u + 0.5)
    K[0, 2] = sx * (data.K[0, 2] + 0.5) - 0.5
    K[1, 2] = sy * (data.K[1, 2] + 0.5) - 0.5
    rgb = [cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA) for im in data.rgb]
    depth = None if data.depth is None else \
        [cv2.resize(d, (width, height), interpolation=cv2.INTER_NEAREST) for d in data.depth]
    return RealData(rgb, depth, K, data.poses.copy(), list(data.names))
