"""Classical (weight-free) segmenter: automatic masks, clicks, factory."""
import numpy as np
import pytest

from wildseg3d_ros.core.presegment.base import Segmenter, SegmenterError, make_segmenter
from wildseg3d_ros.core.presegment.classical import ClassicalSegmenter, geometric_edges, merge_average_linkage

synthetic = pytest.importorskip("wildseg3d_ros.sim.tabletop")
geometry = pytest.importorskip("wildseg3d_ros.core.geometry")

W, H = 512, 384


@pytest.fixture(scope="module")
def view():
    s = synthetic.render_sequence(n_views=2, width=W, height=H, seed=0)
    pts = geometry.depth_to_world(s.depth[0], s.K, s.poses[0])
    valid = np.isfinite(pts).all(-1)
    return s, s.rgb[0], pts, valid, s.instance[0]


@pytest.fixture(scope="module")
def seg():
    return ClassicalSegmenter()


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def _centre_click(mask):
    """A click well inside a mask: the pixel farthest from its border."""
    from scipy import ndimage
    d = ndimage.distance_transform_edt(mask)
    r, c = np.unravel_index(np.argmax(d), d.shape)
    return np.array([[c, r]], float)


def test_factory():
    s = make_segmenter("classical", color_thresh=12.0)
    assert isinstance(s, ClassicalSegmenter) and isinstance(s, Segmenter)
    assert s.name == "classical" and s.color_thresh == 12.0
    with pytest.raises(SegmenterError, match="unknown segmenter"):
        make_segmenter("nope")


def test_geometric_edges_cut_a_depth_step_and_a_concave_crease_not_a_convex_one():
    # a floor (z=0) with a step up (box) on the right half, seen as a synthetic pointmap
    h, w = 20, 40
    x = np.linspace(0, 1, w)[None].repeat(h, 0)
    y = np.linspace(0, 0.5, h)[:, None].repeat(w, 1)
    z = np.where(x > 0.5, 0.3, 0.0)
    pts = np.stack([x, y, z], -1).astype(np.float32)
    eh, ev = geometric_edges(pts, np.ones((h, w), bool))
    j = int(np.searchsorted(x[0], 0.5))
    assert not eh[:, j - 1].any()          # the 0.3 step is cut
    assert eh[:, : j - 3].all() and eh[:, j + 2:].all()
    assert ev.all()
    # a camera at the origin looking along +z at a V-shaped surface z = 2 / (1 - s|x/z|)
    # (s = -1: the middle is farthest, a valley = concave; s = +1: the middle is nearest, a
    # ridge = convex); the normals differ by 90 degrees at x = 0, between columns w/2-1 and w/2
    xn = (np.arange(w) - (w - 1) / 2.0) / w               # no pixel exactly at x = 0
    yn = (np.arange(h) - (h - 1) / 2.0) / w
    for slope, expect_cut in ((-1.0, True), (1.0, False)):
        zc = 2.0 / (1.0 - slope * np.abs(xn))
        pts = np.stack([np.broadcast_to(xn * zc, (h, w)), yn[:, None] * zc[None],
                        np.broadcast_to(zc, (h, w))], -1).astype(np.float32)
        eh, ev = geometric_edges(pts, np.ones((h, w), bool))
        k = w // 2 - 1                                     # the edge between the two halves
        assert (not eh[2:-2, k].any()) == expect_cut, slope
        assert eh[2:-2, : k - 2].all() and eh[2:-2, k + 3:].all()  # at most 2 px either side


def test_automatic_masks_separate_objects(view, seg):
    s, rgb, pts, valid, inst = view
    lab = seg.automatic_masks(rgb, pts, valid)
    assert lab.dtype == np.int32 and lab.shape == (H, W)
    for g in s.scene.object_ids:
        m = inst == g
        ids, cnt = np.unique(lab[m], return_counts=True)
        best = ids[np.argmax(cnt)]
        assert best > 0
        assert _iou(lab == best, m) > 0.85, g
    # large planes (floor, walls, table top) are background
    for g in (synthetic.FLOOR_ID, synthetic.WALL_ID):
        assert (lab[inst == g] == 0).mean() > 0.9


def test_refine_positive_click(view, seg):
    s, rgb, pts, valid, inst = view
    for g in s.scene.object_ids:
        m = inst == g
        mask = seg.refine(rgb, _centre_click(m), np.zeros((0, 2)), pts=pts, valid=valid)
        assert mask.dtype == bool
        assert _iou(mask, m) > 0.85, g


def test_refine_negative_click_removes_wrongly_merged_neighbour(view, seg):
    s, rgb, pts, valid, inst = view
    # the two objects whose masks touch most in this view
    ids = s.scene.object_ids
    best, pair = -1, None
    from scipy import ndimage
    for i in ids:
        di = ndimage.binary_dilation(inst == i, iterations=2)
        for j in ids:
            if j != i:
                t = int((di & (inst == j)).sum())
                if t > best:
                    best, pair = t, (i, j)
    a, b = pair
    prior = (inst == a) | (inst == b)      # a previous round wrongly merged a and b
    pos, neg = _centre_click(inst == a), _centre_click(inst == b)
    before = _iou(prior, inst == a)
    mask = seg.refine(rgb, pos, neg, prior_mask=prior, pts=pts, valid=valid)
    after = _iou(mask, inst == a)
    assert before < 0.8
    assert after > 0.9, (before, after)
    assert (mask & (inst == b)).sum() < 0.05 * (inst == b).sum()
    # no clicks at all: the prior comes back unchanged
    assert np.array_equal(seg.refine(rgb, None, None, prior_mask=prior), prior)


def test_refine_and_masks_without_geometry(view):
    s, rgb, pts, valid, inst = view
    seg = ClassicalSegmenter()
    lab = seg.automatic_masks(rgb)
    assert lab.max() > 3
    ious = []
    for g in s.scene.object_ids:
        m = inst == g
        ious.append(_iou(seg.refine(rgb, _centre_click(m), None), m))
    print("\ncolour-only click IoUs", np.round(ious, 3))
    # measured 0.869-0.995, median 0.984 (single-linkage colour merging before: median 0.863, min 0.637)
    assert np.median(ious) > 0.9 and min(ious) > 0.75


def test_average_linkage_resists_chaining():
    """A chain of atoms 0-5-10-15-20 (each 5 from its neighbour, threshold 6): single linkage
    would join all five; average linkage joins 0+5 (mean 2.5, then 7.5 from 10), 10+15, and
    leaves 20 alone (7.5 from the 12.5 mean)."""
    n = 5
    ea, eb = np.arange(4), np.arange(1, 5)
    feat = np.arange(0, 25, 5, dtype=float)[:, None]
    r = merge_average_linkage(n, ea, eb, np.ones(n), feat, 6.0)
    assert r[0] == r[1] and r[2] == r[3] and len({r[0], r[2], r[4]}) == 3
    # equal colours that are not adjacent stay apart; a big region's mean barely moves when a
    # small similar neighbour joins it
    r = merge_average_linkage(3, np.array([0, 1]), np.array([1, 2]), np.ones(3),
                              np.array([[0.0], [100.0], [0.0]]), 6.0)
    assert len(set(r.tolist())) == 3
    r = merge_average_linkage(3, np.array([0, 1]), np.array([1, 2]), np.array([1000.0, 1.0, 1.0]),
                              np.array([[0.0], [5.0], [10.0]]), 6.0)
    assert r[0] == r[1] and r[2] != r[0]  # 0+5 -> mean 0.005; 10 is then 9.995 away
