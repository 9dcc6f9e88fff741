"""Geometric (weight-free, RGB-D) segmenter: synthetic scenes whose answer is known, and the
real YCB-Video clutter of ``../shared/data/ycbv_train`` (skipped when absent).

The synthetic scene is ray-cast by ``sim.tabletop`` with primitives placed for the hard cases
of tabletop clutter, all in ONE colour so that only geometry can separate them: a box lying on a
block (concave contact), an upright can touching the block's side, a thin "marker" (1.8 cm
square bar) lying on the table, on a textured table in a room.  The depth gets a structured-light
noise model (sigma = 1.5e-3 z^2, quantised to 1 mm) so the noise estimate is exercised.
"""
from pathlib import Path

import numpy as np
import pytest

from wildseg3d_ros.sim import tabletop as synthetic
from wildseg3d_ros.core.geometry import backproject_depth, depth_to_world, look_at
from wildseg3d_ros.core.presegment.base import make_segmenter
from wildseg3d_ros.core.presegment.geometric import (GeometricSegmenter, camera_frame, depth_jumps, inverse_depth_noise, run_mean)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ycbv_train"
needs_ycbv = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data absent ({SHARED})")

W, H = 640, 480
T = synthetic.TABLE_HEIGHT
BLOCK, TOP, CAN, MARKER, CUP = 4, 5, 6, 7, 8
COLOUR = np.array([0.8, 0.45, 0.2])


def _prim(kind, oid, name, **kw):
    return synthetic.Primitive(kind, oid, name, COLOUR.copy(), "noise", texture_scale=0.02,
                               tex_seed=oid, **kw)


def clutter_scene():
    base = synthetic.make_tabletop_scene(seed=3, num_objects=0)
    block = _prim("box", BLOCK, "block", center=np.array([0.0, 0.0, T + 0.0425]),
                  half_extents=np.array([0.10, 0.0425, 0.0425]))
    top = _prim("box", TOP, "box on block", center=np.array([0.01, 0.0, T + 0.085 + 0.02]),
                half_extents=np.array([0.05, 0.025, 0.02]), yaw=0.3)
    can = _prim("cylinder", CAN, "can", center=np.array([0.10 + 0.033, -0.01, T + 0.05]),
                radius=0.033, height=0.10)
    marker = _prim("box", MARKER, "marker", center=np.array([-0.05, -0.13, T + 0.009]),
                   half_extents=np.array([0.06, 0.009, 0.009]), yaw=0.2)
    prims = base.primitives + [block, top, can, marker]
    names = {**base.names, **{p.instance_id: p.name for p in (block, top, can, marker)}}
    return synthetic.SceneDef(primitives=prims, object_ids=[BLOCK, TOP, CAN, MARKER], names=names,
                              table_center=base.table_center)


def noisy(depth, seed=0):
    rng = np.random.default_rng(seed)
    d = depth + rng.normal(0.0, 1.5e-3, depth.shape) * depth ** 2
    return (np.round(d * 1000.0) / 1000.0).astype(np.float32)


@pytest.fixture(scope="module")
def views():
    scene = clutter_scene()
    K = synthetic.intrinsics(W, H, fov_deg=50.0)
    out = []
    for k, eye in enumerate(([0.05, -0.62, T + 0.42], [-0.25, -0.55, T + 0.45])):
        pose = look_at(np.array(eye), np.array([0.0, -0.03, T + 0.03]))
        rgb, depth, inst = synthetic.render_view(scene, K, pose, W, H)
        out.append(dict(rgb=rgb, depth=noisy(depth, k), clean=depth, inst=inst, K=K, pose=pose))
    return out


@pytest.fixture(scope="module")
def seg():
    return GeometricSegmenter()


def _best(labels, gt, valid):
    ids, cnt = np.unique(labels[gt & valid], return_counts=True)
    ok = ids > 0
    if not ok.any():
        return 0, 0.0
    best = int(ids[ok][np.argmax(cnt[ok])])
    m = labels == best
    return best, float((m & gt & valid).sum() / max(((m | gt) & valid).sum(), 1))


def test_factory_and_fallback_without_depth(views):
    s = make_segmenter("geometric", concave_deg=25.0)
    assert isinstance(s, GeometricSegmenter) and s.name == "geometric" and s.concave_deg == 25.0
    v = views[0]
    lab = s.automatic_masks(v["rgb"])  # no pointmap: the classical colour segmenter answers
    assert lab.shape == (H, W) and lab.dtype == np.int32 and lab.max() > 0


def test_noise_estimate_and_jumps_follow_the_sensor_model(views):
    v = views[0]
    valid = v["depth"] > 0
    w = np.where(valid, 1.0 / np.maximum(v["depth"], 1e-6), 0.0)
    sig = inverse_depth_noise(w, valid)
    # sigma_w of the model is 1.5e-3 (constant in inverse depth), plus 1 mm quantisation
    assert 1.0e-3 < sig < 4.0e-3, sig
    eh, ev = depth_jumps(w, valid, 4.0 * np.sqrt(6.0) * sig)
    inst = v["inst"]
    # object / background boundaries with a depth step are cut ...
    step = (inst[:, :-1] != inst[:, 1:]) & (np.abs(v["clean"][:, :-1] - v["clean"][:, 1:]) > 0.03)
    assert (~eh[step]).mean() > 0.97
    # ... while smooth surfaces (same instance, both neighbours of the pair too) are not
    same = (inst[:, :-2] == inst[:, 1:-1]) & (inst[:, 1:-1] == inst[:, 2:])
    assert eh[:, :-1][same].mean() > 0.995


def test_run_mean_stays_inside_runs():
    a = np.array([[1.0, 1.0, 1.0, 9.0, 9.0, 9.0]])
    conn = np.array([[True, True, False, True, True]])
    out = run_mean(a, conn, 2)
    assert np.allclose(out, a)
    out = run_mean(np.arange(6.0)[None], np.ones((1, 5), bool), 1)
    assert np.allclose(out, [[0.5, 1, 2, 3, 4, 4.5]])


def test_camera_frame_from_a_world_pointmap_is_exact(views):
    v = views[1]
    valid = v["clean"] > 0
    pw = depth_to_world(v["clean"], v["K"], v["pose"])
    pc, K = camera_frame(np.where(valid[..., None], pw, 0), valid)
    ref = backproject_depth(v["clean"], v["K"])
    assert np.abs(pc[valid] - ref[valid]).max() < 1e-4
    assert np.allclose(K, v["K"], atol=1e-3)


@pytest.mark.parametrize("k", [0, 1])
def test_touching_objects_come_apart_and_thin_objects_survive(views, seg, k):
    v = views[k]
    pts = depth_to_world(v["depth"], v["K"], v["pose"])  # world frame: resected internally
    valid = v["depth"] > 0
    lab = seg.automatic_masks(v["rgb"], np.where(valid[..., None], pts, 0), valid)
    inst = v["inst"]
    got = {}
    for oid in (BLOCK, TOP, CAN, MARKER):
        best, iou = _best(lab, inst == oid, valid)
        got[oid] = best
        assert iou > 0.85, (k, oid, iou)
    # four different segments: the box on the block, the can at its side are cut off
    assert len(set(got.values())) == 4, got
    # support plane, floor and walls never belong to an object's segment
    for oid, s in got.items():
        m = lab == s
        assert (m & (inst <= synthetic.TABLE_ID)).sum() < 0.02 * m.sum(), (oid, m.sum())


def test_camera_and_world_pointmaps_give_the_same_segments(views):
    v = views[0]
    valid = v["depth"] > 0
    s1, s2 = GeometricSegmenter(), GeometricSegmenter()
    a = s1.automatic_masks(v["rgb"], backproject_depth(v["depth"], v["K"]), valid)
    pw = depth_to_world(v["depth"], v["K"], v["pose"])
    b = s2.automatic_masks(v["rgb"], np.where(valid[..., None], pw, 0), valid)
    # the same partition up to label names
    pairs = np.unique(a[valid].astype(np.int64) * 100000 + b[valid])
    assert pairs.size <= max(a.max(), b.max()) + 3


def test_refine_negative_click_splits_a_merged_neighbour_and_positive_adds_a_part(views, seg):
    v = views[0]
    valid = v["depth"] > 0
    pts = backproject_depth(v["depth"], v["K"])
    inst = v["inst"]
    from scipy import ndimage

    def click(oid):
        d = ndimage.distance_transform_edt(inst == oid)
        r, c = np.unravel_index(np.argmax(d), d.shape)
        return np.array([[c, r]], float)

    # prior: the block and the box on it wrongly selected together
    prior = (inst == BLOCK) | (inst == TOP)
    m = seg.refine(v["rgb"], click(BLOCK), click(TOP), prior_mask=prior, pts=pts, valid=valid)
    top = inst == TOP
    assert (m & top).sum() < 0.05 * top.sum()
    blk = (inst == BLOCK) & valid
    assert (m & blk).sum() > 0.9 * blk.sum()
    # a positive click on the missing can adds it, nothing else
    m2 = seg.refine(v["rgb"], np.concatenate([click(BLOCK), click(CAN)]), click(TOP), prior_mask=m,
                    pts=pts, valid=valid)
    can = (inst == CAN) & valid
    assert (m2 & can).sum() > 0.85 * can.sum()
    assert (m2 & (inst == MARKER)).sum() == 0 and (m2 & (inst <= synthetic.TABLE_ID)).sum() < 0.02 * m2.sum()
    # a negative click inside one segment with the positive: the segment is split between them
    both = seg.refine(v["rgb"], click(BLOCK), np.zeros((0, 2)), pts=pts, valid=valid)
    assert (both & blk).sum() > 0.85 * blk.sum()


def cup_scene():
    """A hollow cup (open top, 4 mm walls), a closed can of the same radius touching it and a box
    behind them, all of ONE colour."""
    base = synthetic.make_tabletop_scene(seed=3, num_objects=0)
    cup = _prim("cup", CUP, "cup", center=np.array([0.0, 0.0, T + 0.05]), radius=0.04, height=0.10)
    can = _prim("cylinder", CAN, "can", center=np.array([0.081, 0.0, T + 0.05]), radius=0.04,
                height=0.10)
    box = _prim("box", BLOCK, "box", center=np.array([-0.03, 0.12, T + 0.05]),
                half_extents=np.array([0.05, 0.03, 0.05]), yaw=0.2)
    names = {**base.names, CUP: "cup", CAN: "can", BLOCK: "box"}
    return synthetic.SceneDef(primitives=base.primitives + [cup, can, box],
                              object_ids=[CUP, CAN, BLOCK], names=names,
                              table_center=base.table_center)


@pytest.mark.parametrize("k", [0, 1])
def test_a_cup_seen_through_its_opening_is_one_object(k):
    """The cup's outer wall and its inside (seen through the opening) share no pixel border: the
    sensor loses depth on the thin rim (a 5 px band, as the Xtion does on the real mug of
    ycbv_train) and the inside lies behind a depth jump.  They are one surface of revolution
    about the support's normal with one rim height, so they join; the can beside it (same
    radius, touching) and the box stay apart.  Without the join the cup is split."""
    import cv2

    scene = cup_scene()
    K = synthetic.intrinsics(W, H, fov_deg=50.0)
    eye = ([0.05, -0.55, T + 0.40], [-0.3, -0.45, T + 0.45])[k]
    pose = look_at(np.array(eye), np.array([0.0, 0.0, T + 0.04]))
    rgb, depth, inst = synthetic.render_view(scene, K, pose, W, H)
    d = noisy(depth, k)
    Xw = backproject_depth(depth, K) @ pose[:3, :3].T + pose[:3, 3]
    rim = (inst == CUP) & (np.abs(Xw[..., 2] - (T + 0.10)) < 1.5e-3)
    assert rim.sum() > 200  # the rim is in view, so is the inside
    rim = cv2.dilate(rim.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & (inst == CUP)
    d[rim] = 0
    valid = d > 0
    pts = backproject_depth(d, K)
    lab = GeometricSegmenter().automatic_masks(rgb, pts, valid)
    got = {o: _best(lab, inst == o, valid) for o in (CUP, CAN, BLOCK)}
    assert len({b for b, _ in got.values()}) == 3, got
    assert all(iou > 0.9 for _, iou in got.values()), got
    split = GeometricSegmenter(join_revolution=False).automatic_masks(rgb, pts, valid)
    assert _best(split, inst == CUP, valid)[1] < 0.85


def test_revolution_joins_only_the_two_sides_of_one_vessel():
    """Given segments from the true instances, with the cup split into its outer wall and its
    inside: only that pair joins -- not the can touching it (same radius and height, axis 8 cm
    away), not a second can standing on the first (same axis and radius, its top 5 cm higher),
    not the box."""
    from wildseg3d_ros.core.presegment.geometric import revolution_joins

    STACK = 9
    scene = cup_scene()
    can = scene.primitives_of(CAN)[0]
    top = _prim("cylinder", STACK, "stacked can", center=can.center + np.array([0.0, 0.0, 0.075]),
                radius=can.radius, height=0.05)
    scene = synthetic.SceneDef(primitives=scene.primitives + [top], object_ids=scene.object_ids + [STACK],
                               names={**scene.names, STACK: "stacked can"}, table_center=scene.table_center)
    K = synthetic.intrinsics(W, H, fov_deg=50.0)
    pose = look_at(np.array([0.05, -0.55, T + 0.40]), np.array([0.0, 0.0, T + 0.04]))
    rgb, depth, inst = synthetic.render_view(scene, K, pose, W, H)
    d = noisy(depth, 0)
    valid = d > 0
    pts = backproject_depth(d, K)
    info = GeometricSegmenter().analyse(rgb, pts, valid)
    Xw = backproject_depth(depth, K) @ pose[:3, :3].T + pose[:3, 3]
    cup = scene.primitives_of(CUP)[0]
    inside = (inst == CUP) & (np.hypot(*(Xw[..., :2] - cup.center[:2]).T).T < cup.radius - 0.5 * cup.wall)
    labels = np.zeros((H, W), np.int32)
    ids = {"outer": 1, "inside": 2, "can": 3, "stacked": 4, "box": 5}
    labels[(inst == CUP) & ~inside] = ids["outer"]
    labels[inside] = ids["inside"]
    labels[inst == CAN] = ids["can"]
    labels[inst == STACK] = ids["stacked"]
    labels[inst == BLOCK] = ids["box"]
    assert all((labels == v).sum() > 1000 for v in ids.values())
    joins = revolution_joins(labels, pts, valid, info["planes"],  # pts: already camera frame
                             info["K"], info["sigma_w"])
    assert sorted(map(sorted, joins.tolist())) == [[ids["outer"], ids["inside"]]], joins


# ---------------------------------------------------------------------------------------------
# real clutter (YCB-Video), per view: every labelled object is one segment of its own
@needs_ycbv
@pytest.mark.parametrize("video", ["0000", "0001"])
def test_ycbv_objects_are_single_segments(video):
    from wildseg3d_ros.eval import ycbv

    vid = ycbv.load_video(SHARED / video, max_frames=11)
    seg = GeometricSegmenter()
    for f in (0, 10):
        valid = vid.depth[f] > 0
        lab = seg.automatic_masks(vid.rgb[f], backproject_depth(vid.depth[f], vid.K[f]), valid)
        used = set()
        for oid, name in vid.objects.items():
            best, iou = _best(lab, vid.labels[f] == oid, valid)
            # measured 0.89-0.98; the mug's inside (seen through its opening, behind a rim
            # without depth) joins its outer wall as one surface of revolution
            assert iou > 0.85, (video, f, name, iou)
            assert best not in used, (video, f, name)
            used.add(best)
            m = lab == best
            assert (m & (vid.labels[f] == 0) & valid).sum() < 0.1 * m.sum(), (video, f, name)


@needs_ycbv
def test_ycbv_refinement_positive_adds_a_missed_part_negative_removes_a_neighbour():
    """Through :class:`InteractiveSession` (what the CLI and the nodes call) on the 5 keyframes of
    video 0000 (GT geometry): one click on the mug gives all of it (its inside, seen through the
    opening, is joined to the outer wall).  With that join off, the inside is a segment of its
    own, so one click there gives only it (IoU ~0.47 over the 20 frames); a positive click on
    the missed outside adds it (~0.89).  Then, with a mask cache that wrongly gives the mug's
    outside the foam brick's id, a negative click on the mug removes it from the brick."""
    from wildseg3d_ros.eval import ycbv
    from wildseg3d_ros.core.group_mapping import GroupMapper
    from wildseg3d_ros.core.prompts.session import InteractiveSession

    vid = ycbv.load_video(SHARED / "0000")
    kf = ycbv.uniform_indices(vid.num_frames, 5)
    scene = ycbv.gt_geometry_scene(vid, kf)
    ids = {v: k for k, v in vid.objects.items()}
    mug, brick = ids["025_mug"], ids["061_foam_brick"]
    valid = scene.valid_mask()

    def on(label, view, exclude=None):  # most interior pixel of the object (with depth) in a view
        m = (vid.labels[kf[view]] == label) & valid[view]
        if exclude is not None:
            m &= ~exclude
        return ycbv.interior_click(m)

    whole = GeometricSegmenter()
    scene.mask_cache = whole.build_mask_cache(scene.rgb, scene.pts3d, valid)
    r0 = InteractiveSession(scene, GroupMapper(scene), whole).add_pixel_prompt(0, *on(mug, 0), True)
    assert ycbv.frame_ious(r0.points, vid, mug).mean() > 0.85

    seg = GeometricSegmenter(join_revolution=False)
    scene.mask_cache = seg.build_mask_cache(scene.rgb, scene.pts3d, valid)
    mapper = GroupMapper(scene)
    s = InteractiveSession(scene, mapper, seg)
    r1 = s.add_pixel_prompt(0, *on(mug, 0), True)
    iou1 = ycbv.frame_ious(r1.points, vid, mug).mean()
    assert iou1 < 0.7  # only the inside (documented limitation of one click)
    miss = ~s.selections[0].view_masks[2]
    r2 = s.add_pixel_prompt(2, *on(mug, 2, exclude=~miss), True)
    iou2 = ycbv.frame_ious(r2.points, vid, mug).mean()
    assert iou2 > 0.8 and iou2 > iou1 + 0.2, (iou1, iou2)

    # an under-segmented mask cache (what association errors or a weaker segmenter give): the
    # mug's outside carries the foam brick's id in every view; one click on the brick then
    # returns both, and a negative click on the mug removes it again
    lab = scene.mask_cache.labels
    bid = np.bincount(lab[0][(vid.labels[kf[0]] == brick) & valid[0]]).argmax()
    out0 = (vid.labels[kf[0]] == mug) & valid[0]
    mid = np.bincount(lab[0][out0 & (lab[0] > 0)]).argmax()
    merged = np.where(lab == mid, bid, lab)
    from wildseg3d_ros.core.mask_cache import make_mask_cache
    scene.mask_cache = make_mask_cache(merged, scene.pts3d, valid)
    s = InteractiveSession(scene, GroupMapper(scene), seg)
    wrong = s.add_pixel_prompt(0, *on(brick, 0), True)
    b2 = ycbv.frame_ious(wrong.points, vid, brick).mean()
    fixed = s.add_pixel_prompt(3, *on(mug, 3, exclude=~s.selections[0].view_masks[3]), False)
    b3 = ycbv.frame_ious(fixed.points, vid, brick).mean()
    m3 = ycbv.frame_ious(fixed.points, vid, mug).mean()
    assert b2 < 0.8 and b3 > 0.9 and m3 < 0.02, (b2, b3, m3)
