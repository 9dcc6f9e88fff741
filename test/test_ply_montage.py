"""PLY writer/reader and the demo montage (wildseg3d_ros.core.output.ply / .montage)."""
import cv2
import numpy as np
import pytest

from wildseg3d_ros.core.output.montage import (CONTOUR, LABEL_H, TINT, default_render_camera, make_montage, render_points)
from wildseg3d_ros.core.output.ply import PlyError, read_ply, write_ply


# ------------------------------------------------------------------------------------ PLY
@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip(tmp_path, binary):
    rng = np.random.default_rng(0)
    pts = rng.normal(scale=3, size=(257, 3)).astype(np.float32)
    col = rng.integers(0, 256, size=(257, 3), dtype=np.uint8)
    lab = rng.integers(0, 9, size=257).astype(np.int32)
    p = write_ply(tmp_path / "a.ply", pts, col, lab, binary=binary)
    r = read_ply(p)
    assert r["format"] == ("binary_little_endian" if binary else "ascii")
    np.testing.assert_array_equal(r["points"], pts)  # %.9g is float32-exact
    np.testing.assert_array_equal(r["colors"], col)
    np.testing.assert_array_equal(r["labels"], lab)
    head = p.read_bytes()[:300]
    assert b"element vertex 257\n" in head and b"property uchar red\n" in head
    if binary:  # header + 3*4 + 3 + 4 bytes per vertex
        assert len(p.read_bytes()) == head.index(b"end_header\n") + 11 + 257 * 19
    assert not list(tmp_path.glob(".*tmp*"))


def test_ply_points_only_and_empty(tmp_path):
    pts = np.array([[0, 1, 2], [3, 4, 5]], np.float32)
    r = read_ply(write_ply(tmp_path / "p.ply", pts))
    assert r["colors"] is None and r["labels"] is None
    np.testing.assert_array_equal(r["points"], pts)
    for binary in (True, False):
        r = read_ply(write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3), np.uint8),
                               binary=binary))
        assert r["points"].shape == (0, 3)


def test_ply_big_endian_and_errors(tmp_path):
    pts = np.array([[1.5, -2, 3]], ">f4")
    hdr = (b"ply\nformat binary_big_endian 1.0\nelement vertex 1\nproperty float x\n"
           b"property float y\nproperty float z\nelement face 0\n"
           b"property list uchar int vertex_indices\nend_header\n")
    (tmp_path / "be.ply").write_bytes(hdr + pts.tobytes())
    np.testing.assert_array_equal(read_ply(tmp_path / "be.ply")["points"], [[1.5, -2, 3]])
    (tmp_path / "trunc.ply").write_bytes(hdr + pts.tobytes()[:7])
    with pytest.raises(PlyError, match="truncated"):
        read_ply(tmp_path / "trunc.ply")
    (tmp_path / "x.ply").write_bytes(b"not a ply")
    with pytest.raises(PlyError):
        read_ply(tmp_path / "x.ply")
    with pytest.raises(PlyError):
        write_ply(tmp_path / "bad.ply", np.zeros((3, 2)))


# ------------------------------------------------------------------------------------ montage
def _cube_points(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-0.1, 0.1, size=(n, 3)) + np.array([0.2, -0.1, 1.5])
    col = np.zeros((n, 3), np.uint8)
    col[:, 0] = 255
    return pts, col


def test_render_points_zbuffer_and_projection():
    K = np.array([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    pose = np.eye(4)
    # two points on the optical axis: the nearer (green) must win; one behind the camera
    pts = np.array([[0, 0, 2.0], [0, 0, 1.0], [0, 0, -1.0], [0.1, 0.05, 1.0], [0.5, 0, 1.0]])
    col = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [7, 7, 7]], np.uint8)
    img, depth = render_points(pts, col, K, pose, 48, 64, splat=0)
    assert tuple(img[24, 32]) == (0, 255, 0) and depth[24, 32] == 1.0
    assert tuple(img[29, 42]) == (9, 9, 9)   # u = 32 + 100*0.1, v = 24 + 100*0.05
    assert np.isfinite(depth).sum() == 2      # the point at u = 82 falls off the 64-px image
    assert not (img == (0, 0, 255)).all(-1).any()
    img3, _ = render_points(pts, col, K, pose, 48, 64, splat=1)
    assert (img3[23:26, 31:34] == (0, 255, 0)).all()


def test_default_camera_sees_segment():
    pts, col = _cube_points()
    K, pose = default_render_camera(pts, 120, 160)
    img, depth = render_points(pts, col, K, pose, 120, 160)
    hit = np.isfinite(depth)
    assert 0.05 < hit.mean() < 0.9      # fills a good part of the view, not cropped away
    ys, xs = np.nonzero(hit)
    assert abs(xs.mean() - 80) < 15 and abs(ys.mean() - 60) < 15  # centred
    assert (img[hit] == (255, 0, 0)).all()


def test_montage_png(tmp_path):
    V, H, W = 5, 48, 64
    rng = np.random.default_rng(3)
    rgb = np.full((V, H, W, 3), 100, np.uint8)
    masks = np.zeros((V, H, W), bool)
    masks[:, 10:30, 20:40] = True
    gt = np.zeros_like(masks)
    gt[:, 12:32, 20:40] = True
    pts, col = _cube_points()
    out = tmp_path / "m.png"
    img = make_montage(rgb, masks, pts, col, None, None, out, gt_masks=gt,
                       titles=[f"kf{i}" for i in range(V)])
    png = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    th = LABEL_H + H
    assert png.shape == (2 * th, 3 * W, 3) and img.shape == png.shape  # 6 tiles in 3x2
    np.testing.assert_array_equal(png[..., ::-1], img)                  # RGB saved as BGR
    tile1 = img[LABEL_H:th, W:2 * W]                                    # keyframe 1
    inner = tile1[15:25, 25:35]
    expect = np.round(0.5 * 100 + 0.5 * TINT).astype(np.uint8)
    assert (inner == expect).all()                                      # tinted
    assert (tile1[40:, :10] == 100).all()                               # outside untouched
    assert tuple(tile1[10, 30]) == CONTOUR                               # contour on the border
    assert img[:LABEL_H, :W].max() == 255                                # label text drawn
    render = img[th + LABEL_H:, 2 * W:]                                  # last tile (row 1, col 2)
    assert ((render == (255, 0, 0)).all(-1)).sum() > 0.05 * H * W        # segment rendered
    # an empty segment still gives a montage, with the render tile marked
    img2 = make_montage(rgb, masks, np.zeros((0, 3)), np.zeros((0, 3)), out_path=None)
    assert img2.shape == img.shape
    with pytest.raises(ValueError):
        make_montage(rgb, masks[:2], pts, col)


def test_view_from_keyframe_pose():
    pts, col = _cube_points()
    K, pose = default_render_camera(pts, 120, 160, view_from=np.eye(4))
    c = pts.mean(0)
    fwd = c / np.linalg.norm(c)
    np.testing.assert_allclose(pose[:3, 2], fwd, atol=1e-9)        # looks from origin at centroid
    assert np.dot(pose[:3, 1], [0, 1, 0]) > 0.9                      # keeps the view's "down"
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.det(pose[:3, :3]) > 0.999                       # proper rotation
    _, depth = render_points(pts, col, K, pose, 120, 160)
    assert np.isfinite(depth).mean() > 0.05
