"""Demo montage: keyframes with the object mask overlaid + a rendered view of the 3D segment.

Layout: ``V + 1`` tiles of ``(LABEL_H + H) x W`` pixels (a text strip above each image), in a
grid of ``ncols`` columns (default ``ceil(sqrt(V + 1))``), row-major; the last tile is the
render. Empty grid cells are dark grey. So the PNG is
``rows * (LABEL_H + H)`` by ``ncols * W`` pixels, ``rows = ceil((V + 1) / ncols)``.

Keyframe tiles: pixels of ``masks[v]`` are tinted (``0.5 * rgb + 0.5 * TINT``) and the mask
contour is drawn in yellow; when ``gt_masks`` is given its contour is drawn in magenta and the
label shows the per-view IoU. Render tile: the segment's points splatted (``splat`` pixel radius,
z-buffered with ``np.lexsort``) from a virtual pinhole camera ``K_render`` / ``pose_render``
(camera-to-world, OpenCV axes). Defaults: a 50 degree horizontal FOV camera, looking at the
centroid along the points' least-spread principal axis, backed off until the segment fits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

LABEL_H = 18
TINT = np.array([0, 220, 80], np.float32)       # RGB tint of the predicted mask
CONTOUR = (255, 230, 0)                          # RGB predicted mask contour
GT_CONTOUR = (255, 0, 255)                       # RGB ground-truth contour
BACKGROUND = (40, 40, 40)
RENDER_BG = (20, 20, 30)


def default_render_camera(points: np.ndarray, H: int, W: int, K: Optional[np.ndarray] = None,
                          fov_deg: float = 50.0, margin: float = 1.25,
                          view_from: Optional[np.ndarray] = None
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """(K, camera-to-world pose) looking at the points' centroid so that they fill the view.

    Viewing direction: from ``view_from``'s position (a camera-to-world pose, e.g. a keyframe's;
    its image "down" axis is kept as down) when given, else along the least-spread principal
    axis of the points."""
    if K is None:
        f = 0.5 * W / math.tan(math.radians(fov_deg) / 2)
        K = np.array([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1]], np.float64)
    K = np.asarray(K, np.float64)
    pts = np.asarray(points, np.float64)
    pts = pts[np.isfinite(pts).all(1)]
    if len(pts) == 0:
        return K, np.eye(4)
    c = pts.mean(0)
    d = pts - c
    if view_from is not None:
        vf = np.asarray(view_from, np.float64)
        fwd = c - vf[:3, 3]
        if np.linalg.norm(fwd) < 1e-9:
            fwd = vf[:3, 2]
        fwd = fwd / np.linalg.norm(fwd)
        right = np.cross(vf[:3, 1], fwd)           # keep the view's "down" (y) as down
        if np.linalg.norm(right) < 1e-9:
            right = vf[:3, 0]
        right = right / np.linalg.norm(right)
    elif len(pts) >= 3:
        _, _, vt = np.linalg.svd(d[:: max(1, len(d) // 5000)], full_matrices=False)
        fwd, right = vt[2], vt[0]
        if np.dot(fwd, np.array([0, 0, 1.0])) < 0:  # prefer looking along world +z
            fwd = -fwd
    else:
        fwd, right = np.array([0, 0, 1.0]), np.array([1.0, 0, 0])
    down = np.cross(fwd, right)
    right = np.cross(down, fwd)
    R = np.stack([right / np.linalg.norm(right), down / np.linalg.norm(down),
                  fwd / np.linalg.norm(fwd)], 1)  # columns = camera axes in world
    radius = float(np.linalg.norm(d, axis=1).max()) or 1e-3
    half_fov = math.atan(min(W / (2 * K[0, 0]), H / (2 * K[1, 1])))
    dist = margin * radius / math.sin(half_fov)
    pose = np.eye(4)
    pose[:3, :3] = R
    pose[:3, 3] = c - dist * R[:, 2]
    return K, pose


def render_points(points: np.ndarray, colors: np.ndarray, K: np.ndarray, pose: np.ndarray,
                  H: int, W: int, splat: int = 1, background=RENDER_BG
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Z-buffered splatting -> (H, W, 3) uint8 image and (H, W) float32 depth (inf = empty)."""
    img = np.empty((H, W, 3), np.uint8)
    img[:] = background
    depth = np.full((H, W), np.inf, np.float32)
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    col = np.asarray(colors).reshape(-1, 3)
    ok = np.isfinite(pts).all(1)
    pts, col = pts[ok], col[ok]
    if len(pts) == 0:
        return img, depth
    pose = np.asarray(pose, np.float64)
    pc = (pts - pose[:3, 3]) @ pose[:3, :3]          # world -> camera (R^T (p - t))
    z = pc[:, 2]
    front = z > 1e-6
    pc, z, col = pc[front], z[front], col[front]
    u = np.round(K[0, 0] * pc[:, 0] / z + K[0, 2]).astype(np.int64)
    v = np.round(K[1, 1] * pc[:, 1] / z + K[1, 2]).astype(np.int64)
    r = int(max(0, splat))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    uu = (u[:, None] + ox.ravel()[None]).ravel()
    vv = (v[:, None] + oy.ravel()[None]).ravel()
    zz = np.repeat(z, ox.size)
    src = np.repeat(np.arange(len(z)), ox.size)
    inside = (uu >= 0) & (uu < W) & (vv >= 0) & (vv < H)
    idx, zz, src = (vv * W + uu)[inside], zz[inside], src[inside]
    if idx.size == 0:
        return img, depth
    order = np.lexsort((zz, idx))                   # by pixel, then nearest first
    idx_s = idx[order]
    first = np.ones(idx_s.size, bool)
    first[1:] = idx_s[1:] != idx_s[:-1]
    win = order[first]
    img.reshape(-1, 3)[idx[win]] = col[src[win]]
    depth.reshape(-1)[idx[win]] = zz[win]
    return img, depth


def _label(tile: np.ndarray, text: str) -> None:
    cv2.putText(tile, text[:60], (3, LABEL_H - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                (255, 255, 255), 1, cv2.LINE_AA)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, gt: Optional[np.ndarray] = None
                 ) -> np.ndarray:
    """Tint ``mask`` pixels, draw its contour (and the ground-truth contour when given)."""
    out = rgb.astype(np.float32)
    m = np.asarray(mask, bool)
    out[m] = 0.5 * out[m] + 0.5 * TINT
    out = np.ascontiguousarray(out.round().clip(0, 255).astype(np.uint8))
    if gt is not None:
        cs, _ = cv2.findContours(np.asarray(gt, np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cs, -1, GT_CONTOUR, 1)
    cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, cs, -1, CONTOUR, 1)
    return out


def make_montage(rgb: np.ndarray, masks: np.ndarray, points: np.ndarray, colors: np.ndarray,
                 K_render: Optional[np.ndarray] = None, pose_render: Optional[np.ndarray] = None,
                 out_path=None, gt_masks: Optional[np.ndarray] = None,
                 titles: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
                 splat: int = 1, view_from: Optional[np.ndarray] = None) -> np.ndarray:
    """Build (and write to ``out_path`` as PNG when given) the montage; returns it as RGB uint8.

    ``pose_render`` None: the render camera is :func:`default_render_camera` (``view_from``, e.g.
    a keyframe pose, sets the viewing side)."""
    rgb = np.asarray(rgb)
    masks = np.asarray(masks, bool)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or masks.shape != rgb.shape[:3]:
        raise ValueError(f"rgb must be (V,H,W,3) and masks (V,H,W); got {rgb.shape}, "
                         f"{masks.shape}")
    if gt_masks is not None:
        gt_masks = np.asarray(gt_masks, bool)
        if gt_masks.shape != masks.shape:
            raise ValueError(f"gt_masks {gt_masks.shape} != masks {masks.shape}")
    V, H, W = masks.shape
    n = V + 1
    ncols = int(ncols) if ncols else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / ncols))
    th = LABEL_H + H
    canvas = np.empty((rows * th, ncols * W, 3), np.uint8)
    canvas[:] = BACKGROUND
    tiles = []
    for v in range(V):
        img = overlay_mask(rgb[v], masks[v], None if gt_masks is None else gt_masks[v])
        text = titles[v] if titles is not None and v < len(titles) else f"keyframe {v}"
        if gt_masks is not None:
            inter = np.logical_and(masks[v], gt_masks[v]).sum()
            union = np.logical_or(masks[v], gt_masks[v]).sum()
            text += f"  IoU {inter / union:.2f}" if union else "  IoU n/a"
        tiles.append((img, text))
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    cols = np.asarray(colors).reshape(-1, 3)
    if cols.dtype != np.uint8:
        cols = np.clip(np.nan_to_num(cols.astype(np.float64)).round(), 0, 255).astype(np.uint8)
    K, pose = default_render_camera(pts, H, W, K_render, view_from=view_from)
    if pose_render is not None:
        pose = np.asarray(pose_render, np.float64)
    render, _ = render_points(pts, cols, K, pose, H, W, splat=splat)
    rtext = titles[V] if titles is not None and len(titles) > V else \
        f"3D segment ({len(pts)} pts)"
    if len(pts) == 0:
        cv2.putText(render, "empty segment", (10, H // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (255, 80, 80), 1, cv2.LINE_AA)
    tiles.append((render, rtext))
    for i, (img, text) in enumerate(tiles):
        r, c = divmod(i, ncols)
        tile = np.zeros((th, W, 3), np.uint8)
        tile[LABEL_H:] = img
        _label(tile, text)
        canvas[r * th:(r + 1) * th, c * W:(c + 1) * W] = tile
    if out_path is not None:
        out_path = Path(out_path)
        if not cv2.imwrite(str(out_path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cv2.imwrite failed for {out_path}")
    return canvas
