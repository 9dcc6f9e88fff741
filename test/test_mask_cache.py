"""Mask cache: 3D association of per-view masks, soft masks, classical cache vs GT instances."""
import numpy as np
import pytest

from wildseg3d_ros.core.mask_cache import associate_masks_3d, build_soft_masks, make_mask_cache, mask_iou_table

synthetic = pytest.importorskip("wildseg3d_ros.sim.tabletop")
geometry = pytest.importorskip("wildseg3d_ros.core.geometry")

V, W, H = 5, 512, 384


@pytest.fixture(scope="module")
def seq():
    s = synthetic.render_sequence(n_views=V, width=W, height=H, seed=0)
    pts = np.stack([geometry.depth_to_world(s.depth[v], s.K, s.poses[v]) for v in range(V)])
    valid = np.isfinite(pts).all(-1) & (s.depth > 0)
    return s, pts, valid


@pytest.fixture(scope="module")
def classical_cache(seq):
    from wildseg3d_ros.core.presegment.classical import ClassicalSegmenter
    s, pts, valid = seq
    return ClassicalSegmenter().build_mask_cache(s.rgb, pts, valid)


def _matched_ids(glob, inst, gid):
    return [set(np.unique(glob[v][inst[v] == gid]).tolist()) for v in range(inst.shape[0])
            if (inst[v] == gid).any()]


def test_association_recovers_permuted_ground_truth(seq):
    s, pts, valid = seq
    rng = np.random.default_rng(0)
    local = np.zeros_like(s.instance)
    for v in range(V):  # every view numbers its masks differently
        local[v] = (rng.permutation(60) + 1)[s.instance[v]]
    glob, info = associate_masks_3d(local, pts, valid, return_info=True)
    assert info["n_global"] == len(np.unique(s.instance))
    for gid in np.unique(s.instance):
        ids = _matched_ids(glob, s.instance, gid)
        assert all(len(x) == 1 for x in ids)
        assert len(set.union(*ids)) == 1, f"object {gid} got ids {ids}"
    # bijection: distinct GT objects have distinct global ids
    firsts = [next(iter(_matched_ids(glob, s.instance, g)[0])) for g in np.unique(s.instance)]
    assert len(set(firsts)) == len(firsts)


def test_association_does_not_chain_objects_through_an_undersegmented_view(seq):
    s, pts, valid = seq
    a, b = s.scene.object_ids[:2]
    local = s.instance.copy()
    local[0][local[0] == b] = a  # view 0 merges a and b into one mask
    glob = associate_masks_3d(local, pts, valid)
    ga = set.union(*_matched_ids(glob[1:], s.instance[1:], a))
    gb = set.union(*_matched_ids(glob[1:], s.instance[1:], b))
    assert len(ga) == 1 and len(gb) == 1 and ga != gb


def test_association_joins_a_fragment_of_an_oversegmented_view(seq):
    s, pts, valid = seq
    a = s.scene.object_ids[0]
    local = s.instance.copy()
    m = local[2] == a
    rows = np.nonzero(m)[0]
    cut = np.median(rows)
    frag = m & (np.arange(H)[:, None] > cut)
    local[2][frag] = 99  # view 2 splits object a in two
    glob = associate_masks_3d(local, pts, valid)
    ids = set(np.unique(glob[2][m]).tolist())
    ref = set(np.unique(glob[0][s.instance[0] == a]).tolist())
    assert ids == ref, (ids, ref)


def test_soft_masks_values():
    lab = np.zeros((1, 40, 40), np.int32)
    lab[0, 5:35, 5:35] = 3
    S = build_soft_masks(lab, border_px=6.0, edge_value=0.5, unlabelled=0.1)
    assert S.dtype == np.float32 and S.shape == lab.shape
    assert S[0, 0, 0] == pytest.approx(0.1)
    assert S[0, 20, 20] == pytest.approx(1.0)
    assert S[0, 5, 20] == pytest.approx(0.5)       # on the border
    assert 0.5 < S[0, 8, 20] < 1.0                 # ramping inside
    assert np.all(S[0][lab[0] > 0] >= 0.5)


def test_object_table(seq):
    s, pts, valid = seq
    mc = make_mask_cache(s.instance, pts, valid)
    g = s.scene.object_ids[0]
    t = mc.objects[g]
    assert t["views"] == [v for v in range(V) if (s.instance[v] == g).any()]
    assert t["area"][0] == int((s.instance[0] == g).sum())
    cen = pts[(s.instance == g) & valid].mean(0)
    assert np.allclose(t["centroid"], cen, atol=1e-3)


def test_object_ids_counts_without_sorting_and_handles_odd_labels():
    from wildseg3d_ros.core.types import MaskCache
    rng = np.random.default_rng(0)
    for lab in (rng.integers(0, 7, (3, 20, 30)).astype(np.int32),
                np.array([[[0, 5, -3], [2, 2, 1 << 30]]], np.int32),    # negative, huge ids: unique()
                np.zeros((2, 4, 4), np.int32), np.zeros((0, 4, 4), np.int32),
                rng.integers(0, 40, (2, 8, 8)).astype(np.uint16)):
        ids = MaskCache(labels=lab, soft=np.zeros(lab.shape, np.float32)).object_ids()
        ref = np.unique(lab)
        np.testing.assert_array_equal(ids, ref[ref > 0])
        assert ids.dtype == lab.dtype


def test_classical_cache_iou_per_object_per_view(seq, classical_cache):
    """Threshold 0.85 per object per view: objects cover 450-3300 px here, so a one-pixel error
    along the whole outline already costs ~8-10 % IoU on the smallest; measured values are
    0.93-1.00 (printed)."""
    s, pts, valid = seq
    mc = classical_cache
    tab = mask_iou_table(mc.labels, s.instance, s.scene.object_ids)
    print("\nGT id | IoU/matched id per view")
    for g, row in tab.items():
        print(g, " ".join(f"{i:.3f}/{p}" for i, p in row))
    ious = np.array([[i for i, _ in row] for row in tab.values()])
    assert np.nanmin(ious) >= 0.85
    assert np.nanmean(ious) >= 0.95
    # global ids consistent across views, and distinct per object
    ids = []
    for g, row in tab.items():
        matched = {p for i, p in row if np.isfinite(i)}
        assert len(matched) == 1, f"object {g} has ids {matched} across views"
        ids.append(matched.pop())
    assert len(set(ids)) == len(ids)
    # soft masks / table consistent with labels
    assert mc.soft.shape == mc.labels.shape
    assert np.all(mc.soft[mc.labels == 0] < 0.2) and np.all(mc.soft[mc.labels > 0] >= 0.5)
    assert set(mc.objects) == set(mc.object_ids().tolist())
