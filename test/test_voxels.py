import numpy as np

from wildseg3d_ros.core.voxels import isin_sorted, pack, unpack, voxel_keys


def test_voxel_keys_are_the_packed_floored_coordinates():
    rng = np.random.default_rng(0)
    pts = (rng.random((3, 120, 160, 3)) * 4 - 2).astype(np.float32)  # float32 in, float64 arithmetic
    origin = np.array([-0.5, -0.2, 0.1])
    for voxel in (0.004, 0.05, 1.0):
        want = pack(np.floor((pts.astype(np.float64) - origin) / voxel).astype(np.int64))
        got = voxel_keys(pts, voxel, origin)
        assert got.shape == pts.shape[:-1] and got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(unpack(got), np.floor((pts.astype(np.float64) - origin) / voxel))
    np.testing.assert_array_equal(voxel_keys(pts, 0.1), pack(np.floor(pts.astype(np.float64) / 0.1).astype(np.int64)))
    # far points saturate (21 bits per axis), a NaN coordinate is the lowest stored value
    k = voxel_keys(np.array([[1e12, -1e12, np.nan]]), 1.0)
    np.testing.assert_array_equal(unpack(k), [[(1 << 20) - 1, -(1 << 20), -(1 << 20)]])
    assert voxel_keys(np.zeros((0, 3)), 0.1).shape == (0,)
    # sorted keys are a set
    table = np.unique(voxel_keys(pts, 0.05, origin))
    assert isin_sorted(voxel_keys(pts, 0.05, origin), table).all()
