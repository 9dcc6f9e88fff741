"""PointCloud2 packing/unpacking (wildseg3d_ros.core.output.cloud)."""
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from wildseg3d_ros.core.output.cloud import (CloudError, FieldSpec, FLOAT32, FLOAT64, UINT8, UINT32, INT32, UINT16, cloud_from_bytes, cloud_layout, cloud_to_bytes, dtype_from_fields, fields_from_dtype, labelled_cloud_dtype, object_cloud_dtype, pack_object_cloud, pack_points, pack_rgb, pack_scene_cloud, scene_cloud_dtype, unpack_rgb, unpack_scene_cloud)
from wildseg3d_ros.core.types import AlignedScene, MaskCache


def _scene(V=3, H=4, W=5, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(V, H, W, 3)).astype(np.float32)
    conf = rng.uniform(0.5, 3, size=(V, H, W)).astype(np.float32)
    conf[0, 0, 0] = 0.0            # zero confidence -> invalid
    pts[1, min(2, H - 1), min(3, W - 1), 1] = np.nan  # non-finite -> invalid
    rgb = rng.integers(0, 256, size=(V, H, W, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=(V, H, W)).astype(np.int32)
    mc = MaskCache(labels=labels, soft=np.ones((V, H, W), np.float32))
    poses = np.tile(np.eye(4), (V, 1, 1))
    K = np.tile(np.array([[100.0, 0, W / 2], [0, 100.0, H / 2], [0, 0, 1]]), (V, 1, 1))
    return AlignedScene(pts3d=pts, conf=conf, poses=poses, K=K, rgb=rgb, mask_cache=mc)


# ------------------------------------------------------------------------------ layouts
def test_object_cloud_layout_matches_rviz_foxglove():
    fields = fields_from_dtype(object_cloud_dtype())
    assert [(f.name, f.offset, f.datatype, f.count) for f in fields] == [
        ("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1), ("rgb", 12, FLOAT32, 1)]
    assert object_cloud_dtype().itemsize == 16
    lab = fields_from_dtype(labelled_cloud_dtype())
    assert (lab[-1].name, lab[-1].offset, lab[-1].datatype) == ("label", 16, UINT32)
    assert labelled_cloud_dtype().itemsize == 20
    sc = fields_from_dtype(scene_cloud_dtype())
    assert [(f.name, f.offset, f.datatype) for f in sc] == [
        ("x", 0, FLOAT32), ("y", 4, FLOAT32), ("z", 8, FLOAT32), ("rgb", 12, FLOAT32),
        ("confidence", 16, FLOAT32), ("keyframe", 20, UINT32), ("label", 24, INT32)]
    assert scene_cloud_dtype().itemsize == 28


def test_rgb_packing_matches_reference_formula():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(200, 3), dtype=np.uint8)
    rgb[0] = (255, 255, 255)
    rgb[1] = (0, 0, 0)
    f = pack_rgb(rgb)
    assert f.dtype == np.float32 and f.shape == (200,)
    for i in range(0, 200, 7):
        r, g, b = (int(v) for v in rgb[i])
        ref = struct.unpack("<f", struct.pack("<I", (r << 16) | (g << 8) | b))[0]
        assert f[i].tobytes() == struct.pack("<f", ref)
    assert f[0].view(np.uint32) == 0x00FFFFFF
    assert np.isfinite(f).all()
    np.testing.assert_array_equal(unpack_rgb(f), rgb)
    # image-shaped input keeps its leading shape
    img = rgb[:120].reshape(4, 30, 3)
    np.testing.assert_array_equal(unpack_rgb(pack_rgb(img)), img)


def test_object_cloud_round_trip_bytes_and_ros_message():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    col = rng.integers(0, 256, size=(50, 3), dtype=np.uint8)
    arr = pack_object_cloud(pts, col)
    lay = cloud_layout(arr)
    assert (lay.point_step, lay.row_step, lay.height, lay.width, lay.is_dense) == (16, 800, 1, 50, True)
    data = cloud_to_bytes(arr)
    assert len(data) == 800
    # byte-level check of one point
    x, y, z, c = struct.unpack_from("<fffI", data, 16 * 3)
    assert (x, y, z) == tuple(float(v) for v in pts[3])
    assert c == (int(col[3, 0]) << 16) | (int(col[3, 1]) << 8) | int(col[3, 2])
    back = cloud_from_bytes(data, lay.fields, lay.point_step, lay.height, lay.width)
    assert back.shape == (1, 50)
    np.testing.assert_array_equal(np.stack([back["x"][0], back["y"][0], back["z"][0]], 1), pts)
    np.testing.assert_array_equal(unpack_rgb(back["rgb"][0]), col)
    back["x"][0, 0] = 7.0  # writable copy, not a view on the message bytes
    # through a real sensor_msgs/PointCloud2 when the message package is importable
    try:
        from sensor_msgs.msg import PointCloud2, PointField
    except ImportError:
        return
    msg = PointCloud2(height=lay.height, width=lay.width, point_step=lay.point_step,
                      row_step=lay.row_step, is_dense=lay.is_dense, is_bigendian=False,
                      fields=[PointField(name=f.name, offset=f.offset, datatype=f.datatype,
                                         count=f.count) for f in lay.fields], data=data)
    assert [f.datatype for f in msg.fields] == [PointField.FLOAT32] * 4
    back2 = cloud_from_bytes(msg.data, msg.fields, msg.point_step, msg.height, msg.width,
                             msg.is_bigendian, row_step=msg.row_step)
    np.testing.assert_array_equal(back2.reshape(-1), arr)


def test_labelled_cloud_and_pack_points():
    pts = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = np.array([[1, 2, 3]] * 4, np.uint8)
    arr = pack_object_cloud(pts, col, labels=np.array([0, 1, 2, 7]))
    assert arr.dtype.itemsize == 20
    np.testing.assert_array_equal(arr["label"], [0, 1, 2, 7])
    with pytest.raises(CloudError):
        pack_object_cloud(pts, col, labels=np.array([0, -1, 2, 7]))
    with pytest.raises(CloudError):
        pack_object_cloud(pts, col[:3])
    p = pack_points(x=pts[:, 0], y=pts[:, 1], z=pts[:, 2], normal=np.ones((4, 3), np.float32),
                    intensity=np.array([1, 2, 3, 4], np.uint16))
    f = {s.name: s for s in fields_from_dtype(p.dtype)}
    assert (f["normal"].offset, f["normal"].count) == (12, 3)
    assert (f["intensity"].offset, f["intensity"].datatype) == (24, UINT16)
    assert p.dtype.itemsize == 26
    np.testing.assert_array_equal(p["intensity"], [1, 2, 3, 4])
    q = pack_points(object_cloud_dtype(), x=pts[:, 0])
    np.testing.assert_array_equal(q["x"], pts[:, 0])
    assert (q["y"] == 0).all()
    back = cloud_from_bytes(cloud_to_bytes(p), fields_from_dtype(p.dtype), 26, 1, 4)
    np.testing.assert_array_equal(back["normal"][0], np.ones((4, 3)))


# ------------------------------------------------------------------------------ scene cloud
def test_scene_cloud_organised_round_trip_with_nan():
    scene = _scene()
    V, H, W = 3, 4, 5
    arr, h, w = pack_scene_cloud(scene)
    assert (h, w) == (V * H, W) and arr.shape == (V * H, W)
    # keyframe v occupies rows v*H .. v*H+H-1
    np.testing.assert_array_equal(arr["keyframe"][:, 0], np.repeat(np.arange(V), H))
    assert np.isnan(arr["x"][0, 0]) and np.isnan(arr["z"][H + 2, 3])
    lay = cloud_layout(arr)
    assert lay.is_dense is False and lay.point_step == 28 and lay.row_step == 28 * W
    back = cloud_from_bytes(cloud_to_bytes(arr), lay.fields, 28, h, w)
    out = unpack_scene_cloud(back, h, w, V)
    valid = scene.valid_mask()
    assert valid.sum() == V * H * W - 2
    np.testing.assert_array_equal(out["pts3d"][valid], scene.pts3d[valid])
    assert np.isnan(out["pts3d"][~valid]).all()
    np.testing.assert_array_equal(out["rgb"], scene.rgb)
    np.testing.assert_array_equal(out["conf"], scene.conf)
    np.testing.assert_array_equal(out["label"], scene.mask_cache.labels)
    np.testing.assert_array_equal(out["keyframe"][:, 0, 0], np.arange(V))
    with pytest.raises(CloudError):
        unpack_scene_cloud(back, h, w, 5)  # 12 rows is not a multiple of 5 views


def test_scene_cloud_without_mask_cache_and_minimal_fields():
    scene = _scene(V=2, H=3, W=2)
    scene.mask_cache = None
    arr, h, w = pack_scene_cloud(scene)
    assert (arr["label"] == 0).all()
    xyz = pack_points(x=arr["x"].ravel(), y=arr["y"].ravel(), z=arr["z"].ravel())
    out = unpack_scene_cloud(xyz, h, w, 2)
    assert out["conf"][0, 0, 0] == 0 and out["conf"][0, 0, 1] == 1
    assert (out["rgb"] == 0).all()
    np.testing.assert_array_equal(out["keyframe"][:, 0, 0], [0, 1])


# ------------------------------------------------------------------------------ foreign layouts
def _pcl_like_cloud(n=6, bigendian=False):
    """x y z, 4 padding bytes, rgb at 16, intensity f8 at 20, ring u1 at 28, point_step 32."""
    o = ">" if bigendian else "<"
    dt = np.dtype({"names": ["x", "y", "z", "rgb", "intensity", "ring"],
                   "formats": [o + "f4", o + "f4", o + "f4", o + "u4", o + "f8", "u1"],
                   "offsets": [0, 4, 8, 16, 20, 28], "itemsize": 32})
    a = np.zeros(n, dt)
    a["x"] = np.arange(n) * 0.5
    a["y"] = -np.arange(n)
    a["z"] = 2.0
    a["rgb"] = (np.arange(n) * 40) << 16 | 0x00A0B0
    a["intensity"] = np.arange(n) * 1.25
    a["ring"] = np.arange(n)
    fields = [FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32),
              FieldSpec("_", 12, UINT8, 4), FieldSpec("rgb", 16, UINT32),
              FieldSpec("intensity", 20, FLOAT64), FieldSpec("ring", 28, UINT8)]
    return a, fields


def test_padding_and_extra_fields_are_skipped():
    a, fields = _pcl_like_cloud()
    arr = cloud_from_bytes(a.tobytes(), fields, 32, 1, 6)
    assert "_" not in arr.dtype.names
    np.testing.assert_array_equal(arr["intensity"][0], np.arange(6) * 1.25)
    np.testing.assert_array_equal(arr["ring"][0], np.arange(6))
    out = unpack_scene_cloud(arr, 1, 6, 1)
    np.testing.assert_array_equal(out["pts3d"][0, 0, :, 0], np.arange(6) * 0.5)
    np.testing.assert_array_equal(out["rgb"][0, 0, :, 1:], [[0xA0, 0xB0]] * 6)
    np.testing.assert_array_equal(out["rgb"][0, 0, :, 0], np.arange(6) * 40)
    # a field with an unknown datatype is an error unless explicitly skipped
    bad = fields + [FieldSpec("weird", 29, 42)]
    with pytest.raises(CloudError, match="unknown PointField datatype 42"):
        cloud_from_bytes(a.tobytes(), bad, 32, 1, 6)
    arr2 = cloud_from_bytes(a.tobytes(), bad, 32, 1, 6, skip_unknown=True)
    assert "weird" not in arr2.dtype.names
    # ROS PointField-like objects are accepted as is
    ros_fields = [SimpleNamespace(name=f.name, offset=f.offset, datatype=f.datatype,
                                  count=f.count) for f in fields]
    np.testing.assert_array_equal(cloud_from_bytes(a.tobytes(), ros_fields, 32, 1, 6), arr)


def test_big_endian_is_byteswapped():
    a, fields = _pcl_like_cloud(bigendian=True)
    arr = cloud_from_bytes(a.tobytes(), fields, 32, 2, 3, is_bigendian=True)
    assert arr.shape == (2, 3)
    assert arr.dtype["x"].byteorder in ("<", "=")
    np.testing.assert_array_equal(arr["x"].ravel(), np.arange(6) * 0.5)
    np.testing.assert_array_equal(arr["intensity"].ravel(), np.arange(6) * 1.25)
    # the same bytes read as little-endian are garbage: the flag matters
    wrong = cloud_from_bytes(a.tobytes(), fields, 32, 2, 3, is_bigendian=False)
    assert not np.array_equal(wrong["intensity"].ravel(), np.arange(6) * 1.25)
    # output is always little-endian
    le = cloud_to_bytes(arr)
    assert struct.unpack_from("<f", le, 32)[0] == 0.5


def test_row_step_padding_skipped():
    arr = pack_object_cloud(np.arange(18, dtype=np.float32).reshape(6, 3), None)
    rows = arr.reshape(2, 3)
    data = b"".join(r.tobytes() + b"\xee" * 8 for r in rows)  # row_step 56
    back = cloud_from_bytes(data, fields_from_dtype(arr.dtype), 16, 2, 3, row_step=56)
    np.testing.assert_array_equal(back, rows)
    with pytest.raises(CloudError, match="row_step"):
        cloud_from_bytes(data, fields_from_dtype(arr.dtype), 16, 2, 3, row_step=40)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(data=b"\0" * 31), "expected row_step"),
    (dict(point_step=8), "does not fit"),
    (dict(point_step=0), "point_step"),
    (dict(fields=[FieldSpec("x", 0, FLOAT32), FieldSpec("x", 4, FLOAT32)]), "duplicate"),
    (dict(fields=[FieldSpec("x", -4, FLOAT32)]), "does not fit"),
    (dict(fields=[FieldSpec("x", 0, FLOAT32, 0)]), "count"),
    (dict(fields=[]), "no usable fields"),
    (dict(fields=[FieldSpec(3, 0, FLOAT32)]), "name"),
    (dict(height=-1), "negative"),
    (dict(data=12345), "byte buffer"),
])
def test_inconsistent_clouds_are_refused(kwargs, msg):
    base = dict(data=b"\0" * 32, fields=fields_from_dtype(object_cloud_dtype()),
                point_step=16, height=1, width=2)
    base.update(kwargs)
    with pytest.raises(CloudError, match=msg):
        cloud_from_bytes(base["data"], base["fields"], base["point_step"], base["height"],
                         base["width"])


def test_empty_cloud():
    arr = cloud_from_bytes(b"", fields_from_dtype(object_cloud_dtype()), 16, 0, 0)
    assert arr.shape == (0, 0)
    e = pack_object_cloud(np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    assert cloud_to_bytes(e) == b"" and cloud_layout(e).width == 0


# ------------------------------------------------------------------------------ property test
_field = st.builds(
    FieldSpec,
    name=st.one_of(st.sampled_from(["x", "y", "z", "rgb", "_", "", "label"]), st.text(max_size=4)),
    offset=st.integers(-8, 80),
    datatype=st.integers(-2, 11),
    count=st.integers(-1, 5))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=256), fields=st.lists(_field, max_size=6),
       point_step=st.integers(-4, 80), height=st.integers(-1, 6), width=st.integers(-1, 12),
       bigendian=st.booleans(), row_step=st.one_of(st.none(), st.integers(-4, 200)),
       num_views=st.integers(1, 3))
def test_random_bytes_give_result_or_cloud_error(data, fields, point_step, height, width,
                                                 bigendian, row_step, num_views):
    try:
        arr = cloud_from_bytes(data, fields, point_step, height, width, bigendian,
                               row_step=row_step)
    except CloudError:
        return
    assert arr.shape == (height, width)
    assert arr.dtype.itemsize == point_step
    assert len(data) == (row_step if row_step is not None else point_step * width) * height
    try:
        out = unpack_scene_cloud(arr, height, width, num_views)
    except CloudError:
        return
    assert out["pts3d"].shape == (num_views, height // num_views, width, 3)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_object_cloud_round_trip_property(n, seed):
    rng = np.random.default_rng(seed)
    pts = rng.normal(scale=100, size=(n, 3)).astype(np.float32)
    if n:
        pts[rng.integers(0, n)] = np.nan
    col = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    arr = pack_object_cloud(pts, col)
    lay = cloud_layout(arr)
    back = cloud_from_bytes(cloud_to_bytes(arr), lay.fields, 16, lay.height, lay.width)
    assert cloud_to_bytes(back) == cloud_to_bytes(arr)
    np.testing.assert_array_equal(unpack_rgb(back["rgb"].ravel()), col)


def test_unpack_fast_paths_match_the_per_field_reference():
    """x, y, z adjacent float32 and a little-endian packed colour are read with one strided copy
    each; other layouts (reordered xyz, big-endian arrays) take the per-field path: same values."""
    a, _ = _pcl_like_cloud(12)
    ref = {"pts3d": np.stack([a[c].astype(np.float32) for c in "xyz"], -1).reshape(2, 2, 3, 3),
           "rgb": unpack_rgb(a["rgb"].view(np.float32)).reshape(2, 2, 3, 3)}
    for arr in (a, a.astype(a.dtype.newbyteorder(">"))):
        out = unpack_scene_cloud(arr.reshape(4, 3), 4, 3, 2, keyframe=False)
        assert "keyframe" not in out
        np.testing.assert_array_equal(out["pts3d"], ref["pts3d"])
        np.testing.assert_array_equal(out["rgb"], ref["rgb"])
    # z, y, x stored in that order: not one strided block
    dt = np.dtype({"names": ["z", "y", "x", "rgb"], "formats": ["<f4", "<f4", "<f4", "<u4"],
                   "offsets": [0, 4, 8, 12], "itemsize": 16})
    b = np.zeros(12, dt)
    for c in "xyz":
        b[c] = a[c]
    b["rgb"] = a["rgb"]
    out = unpack_scene_cloud(b.reshape(4, 3), 4, 3, 2)
    np.testing.assert_array_equal(out["pts3d"], ref["pts3d"])
    np.testing.assert_array_equal(out["rgb"], ref["rgb"])
