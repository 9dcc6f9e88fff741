"""scene_codec: the published scene cloud decodes back into cameras and a mask-cache table."""
import numpy as np
import pytest

from wildseg3d_ros.core.output import cloud
from wildseg3d_ros.sim.pairs import backproject, sphere_scene
from wildseg3d_ros.core.types import AlignedScene, MaskCache
from wildseg3d_ros.core.output.scene_codec import scene_from_cloud_array


def _scene(labels):
    sv = sphere_scene(3, 64, 48, seed=1)
    pts = np.stack([backproject(sv.depth[v], sv.K) @ sv.poses[v][:3, :3].T + sv.poses[v][:3, 3]
                    for v in range(3)]).astype(np.float32)
    conf = (sv.depth > 0).astype(np.float32)
    pts[conf == 0] = np.nan
    rgb = np.zeros(pts.shape, np.uint8)
    sc = AlignedScene(pts3d=pts, conf=conf, poses=sv.poses, K=np.stack([sv.K] * 3), rgb=rgb,
                      mask_cache=MaskCache(labels=labels, soft=(labels > 0).astype(np.float32)))
    return sc, sv


@pytest.mark.parametrize("big_id", [7, 5_000_000])  # counting path and the sorting fallback
def test_round_trip_cameras_and_object_table(big_id):
    sv = sphere_scene(3, 64, 48, seed=1)
    labels = np.where(sv.instance >= 2, sv.instance, 0).astype(np.int32)
    labels[labels == 2] = big_id
    sc, sv = _scene(labels)
    arr, h, w = cloud.pack_scene_cloud(sc)
    out = scene_from_cloud_array(arr.reshape(h, w), "map")
    np.testing.assert_allclose(out.K, sc.K, atol=1e-3)
    np.testing.assert_allclose(out.poses, sv.poses, atol=1e-5)
    ids = sorted(int(i) for i in np.unique(labels) if i > 0)
    assert sorted(out.mask_cache.objects) == ids
    for i in ids:
        area = [int((labels[v] == i).sum()) for v in range(3)]
        assert out.mask_cache.objects[i]["area"] == {v: a for v, a in enumerate(area) if a > 0}
        assert out.mask_cache.objects[i]["views"] == [v for v in range(3) if area[v] > 0]


def test_decoded_validity_is_reused_only_for_the_decoded_arrays():
    """The decoder's validity serves valid_mask() (no second pass over the points) until the
    scene's points or confidences are replaced."""
    labels = np.zeros((3, 48, 64), np.int32)
    sc, _ = _scene(labels)
    arr, h, w = cloud.pack_scene_cloud(sc)
    out = scene_from_cloud_array(arr, "map")
    assert out.valid_mask() is out.decoded_valid
    np.testing.assert_array_equal(out.valid_mask(), sc.valid_mask())
    out.conf = np.zeros_like(out.conf)   # a new array: computed again
    assert not out.valid_mask().any()


def test_precomputed_mgm_filter_travels_in_the_label_sign_and_gives_the_same_segments():
    """reconstruction_node sends Multi-view Group Mapping's filter with the scene (a pixel of
    object l that the filter removes is sent as -l); the decoded mask cache has the positive ids
    and ``kept``, and a mapper that cuts its objects from it gives the segments it would compute."""
    from wildseg3d_ros.core.group_mapping import GroupMapper, precompute_kept

    sv = sphere_scene(3, 64, 48, seed=1)
    labels = np.where(sv.instance >= 2, sv.instance, 0).astype(np.int32)
    # a wrong label on some pixels of view 0: the other views outvote it (filtered out)
    labels[0, 10:20, 10:20] = np.where(labels[0, 10:20, 10:20] > 0, 9, 0)
    sc, sv = _scene(labels)
    kept = precompute_kept(sc)
    assert kept is sc.mask_cache.kept and ((labels > 0) & ~kept).any() and (kept & (labels > 0)).any()
    arr, h, w = cloud.pack_scene_cloud(sc)
    sent = arr["label"].reshape(labels.shape)
    np.testing.assert_array_equal(np.abs(sent), labels)
    assert ((sent < 0) == ((labels > 0) & ~kept)).all()
    out = scene_from_cloud_array(arr.reshape(h, w), "map")
    np.testing.assert_array_equal(out.mask_cache.labels, labels)
    np.testing.assert_array_equal(out.mask_cache.kept, kept & (labels > 0))
    cut, computed = GroupMapper(out, use_kept=True), GroupMapper(out)
    assert cut.uses_kept and not computed.uses_kept
    # other vote / filter settings than the ones the filter was computed with: computed here
    assert not GroupMapper(out, use_kept=True, min_agree_frac=0.3).uses_kept
    assert not GroupMapper(out, use_kept=True, voxel=cut.voxel).uses_kept
    for i in cut.object_ids():
        np.testing.assert_array_equal(cut.segment([i]).pixel_masks, computed.segment([i]).pixel_masks)
    # without the filter (another producer) nothing is negative and the mapper computes it
    sc.mask_cache.kept = None
    arr, h, w = cloud.pack_scene_cloud(sc)
    assert (arr["label"] >= 0).all()
    plain = scene_from_cloud_array(arr.reshape(h, w), "map")
    assert plain.mask_cache.kept is None and not GroupMapper(plain, use_kept=True).uses_kept
