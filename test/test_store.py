"""Atomic scene / session persistence (wildseg3d_ros.core.output.store)."""
import json
import os
import zipfile

import numpy as np
import pytest

from wildseg3d_ros.core.output import store
from wildseg3d_ros.core.types import AlignedScene, Keyframe, MaskCache
from wildseg3d_ros.core.output.store import (StoreError, latest_path, load_latest, load_scene, load_session, save_scene, save_session)


def _scene(seed=0, V=3, H=6, W=8):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(V, H, W, 3)).astype(np.float32)
    pts[0, 0, 0] = np.nan
    labels = rng.integers(0, 4, size=(V, H, W)).astype(np.int32)
    objects = {1: {"views": [0, 2], "area": [12, 7], "name": "mug", "score": 0.87},
               3: {"views": [1], "area": [5], "score": float("nan")}}
    mc = MaskCache(labels=labels, soft=rng.uniform(size=(V, H, W)).astype(np.float32),
                   objects=objects)
    poses = np.tile(np.eye(4), (V, 1, 1)) + rng.normal(scale=1e-3, size=(V, 4, 4))
    K = np.tile(np.array([[500.0, 0, 4.1], [0, 501.0, 3.2], [0, 0, 1]]), (V, 1, 1))
    return AlignedScene(pts3d=pts, conf=rng.uniform(size=(V, H, W)).astype(np.float32),
                        poses=poses, K=K,
                        rgb=rng.integers(0, 256, size=(V, H, W, 3), dtype=np.uint8),
                        weights=rng.uniform(size=(V, H, W)).astype(np.float32),
                        loss=0.123456789, loss_history=[1.0, 0.5, 0.123456789],
                        mask_cache=mc, frame_id="odom", metric=False,
                        stamps=np.array([1.5, 2.25, 3.125]))


def _assert_same(a: AlignedScene, b: AlignedScene):
    for f in ("pts3d", "conf", "poses", "K", "rgb", "weights", "stamps"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert x.tobytes() == y.tobytes(), f  # bit-identical (NaN payloads included)
    assert a.mask_cache.labels.tobytes() == b.mask_cache.labels.tobytes()
    assert a.mask_cache.labels.dtype == b.mask_cache.labels.dtype
    assert a.mask_cache.soft.tobytes() == b.mask_cache.soft.tobytes()
    assert json.dumps(a.mask_cache.objects) == json.dumps(b.mask_cache.objects)
    assert list(b.mask_cache.objects) == [1, 3]  # int keys restored
    assert (a.loss, a.loss_history, a.frame_id, a.metric) == \
        (b.loss, b.loss_history, b.frame_id, b.metric)


def test_round_trip_bit_identical(tmp_path):
    s = _scene()
    sel = np.zeros((3, 6, 8), bool)
    sel[1, 2:4, 3:5] = True
    extra = {"prompts": [{"kind": "point3d", "xyz": [0.1, 0.2, 0.3], "positive": True}],
             "selection": sel, "frame_ids": ["cam"] * 3, "stamp": np.float64(12.5)}
    kfs = [Keyframe(index=i, stamp=10.0 + i, rgb=s.rgb[i], K=s.K[i],
                    depth=np.full((6, 8), 1.5 + i, np.float32), pose_prior=s.poses[i],
                    frame_id="cam") for i in range(3)]
    p = save_scene(tmp_path, s, extra=extra, keyframes_meta=kfs)
    assert p.parent == tmp_path.resolve()
    assert store.SCENE_RE.match(p.name)
    with zipfile.ZipFile(p) as z:  # plain .npy members only, no pickles
        assert all(n.endswith(".npy") for n in z.namelist())
    b, ex = load_scene(p)
    _assert_same(s, b)
    assert ex["selection"].dtype == bool and (ex["selection"] == sel).all()
    assert ex["prompts"] == extra["prompts"] and ex["stamp"] == 12.5
    assert ex["keyframes_meta"][2]["stamp"] == 12.0
    assert (ex["keyframes_meta"][1]["depth"] == 2.5).all()
    assert ex["keyframes_meta"][1]["pose_prior"].tobytes() == s.poses[1].tobytes()
    assert ex["_store"]["version"] == store.FORMAT_VERSION
    lb, _ = load_latest(tmp_path)
    _assert_same(s, lb)


def test_scene_without_mask_cache_or_weights(tmp_path):
    s = _scene()
    s.mask_cache = None
    s.weights = None
    s.stamps = None
    b, ex = load_scene(save_scene(tmp_path, s))
    assert b.mask_cache is None and b.weights is None and b.stamps is None
    assert b.pts3d.tobytes() == s.pts3d.tobytes()


def test_latest_and_retention(tmp_path):
    paths = [save_scene(tmp_path, _scene(seed=i), keep=3) for i in range(5)]
    names = sorted(p.name for p in tmp_path.glob("scene-*.npz"))
    assert names == sorted(p.name for p in paths[2:])  # the 2 oldest deleted
    counters = [int(store.SCENE_RE.match(p.name).group(2)) for p in paths]
    assert counters == [1, 2, 3, 4, 5]
    assert latest_path(tmp_path) == paths[-1]
    b, _ = load_latest(tmp_path)
    assert b.pts3d.tobytes() == _scene(seed=4).pts3d.tobytes()
    assert not list(tmp_path.glob(".tmp-*"))


def test_empty_dir_gives_none(tmp_path):
    assert load_latest(tmp_path / "new") is None
    assert load_session(tmp_path / "new") is None


def test_crash_before_rename_keeps_last_good_scene(tmp_path, monkeypatch):
    good = _scene(seed=1)
    save_scene(tmp_path, good)

    def boom(src, dst):
        raise OSError("simulated crash before rename")
    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_scene(tmp_path, _scene(seed=2))
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*"))  # temp file removed on failure
    b, _ = load_latest(tmp_path)
    assert b.pts3d.tobytes() == good.pts3d.tobytes()


def test_killed_writer_leaves_previous_scene(tmp_path):
    """A child process is SIGKILLed while writing the temp file: the last good scene survives."""
    good = _scene(seed=1)
    save_scene(tmp_path, good)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: start a save, stop after the temp file has data, wait to be killed
        try:
            os.close(r)
            orig = np.savez

            def slow_savez(f, *a, **k):
                f.write(b"PK\x03\x04partial")
                f.flush()
                os.write(w, b"x")
                import time
                time.sleep(60)
                orig(f, *a, **k)
            store.np.savez = slow_savez
            save_scene(tmp_path, _scene(seed=2))
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(r)
    assert len(list(tmp_path.glob(".tmp-*"))) == 1  # torn temp file left behind...
    b, _ = load_latest(tmp_path)                     # ...but never used
    assert b.pts3d.tobytes() == good.pts3d.tobytes()
    p = save_scene(tmp_path, _scene(seed=3))          # and the next save still works
    assert load_latest(tmp_path)[1]["_store"]["file"] == p.name


def test_corrupt_truncated_foreign_and_version_refused(tmp_path):
    p = save_scene(tmp_path, _scene())
    data = p.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        load_scene(bad / "trunc.npz")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside a member: zip CRC or npy header fails
    (bad / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(StoreError):
        load_scene(bad / "flip.npz")
    (bad / "text.npz").write_text("hello")
    with pytest.raises(StoreError, match="not a scene file"):
        load_scene(bad / "text.npz")
    np.savez(bad / "foreign.npz", pts3d=np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(StoreError, match="foreign npz"):
        load_scene(bad / "foreign.npz")
    np.savez(bad / "magic.npz", __meta__=np.frombuffer(b'{"magic": "other"}', np.uint8))
    with pytest.raises(StoreError, match="foreign file"):
        load_scene(bad / "magic.npz")
    # wrong version: rewrite the metadata block
    arrays, meta = store.scene_arrays_and_meta(_scene())
    meta["version"] = 99
    np.savez(bad / "v99.npz", __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **arrays)
    with pytest.raises(StoreError, match="version 99"):
        load_scene(bad / "v99.npz")
    # an object array (pickle) inside is refused by allow_pickle=False
    np.savez(bad / "pickle.npz", __meta__=np.frombuffer(b"{}", np.uint8),
             x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(StoreError):
        load_scene(bad / "pickle.npz")
    # metadata and arrays disagreeing
    arrays, meta = store.scene_arrays_and_meta(_scene())
    arrays["scene__conf"] = arrays["scene__conf"][:, :3]
    np.savez(bad / "shape.npz", __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **arrays)
    with pytest.raises(StoreError, match="conf"):
        load_scene(bad / "shape.npz")


def test_corrupt_latest_falls_back_to_previous_good(tmp_path):
    first = _scene(seed=1)
    save_scene(tmp_path, first)
    p2 = save_scene(tmp_path, _scene(seed=2))
    p2.write_bytes(p2.read_bytes()[:100])  # newest scene damaged on disk
    b, ex = load_latest(tmp_path)
    assert b.pts3d.tobytes() == first.pts3d.tobytes()
    # every file bad -> clear error, not None
    for p in tmp_path.glob("scene-*.npz"):
        p.write_bytes(b"garbage")
    with pytest.raises(StoreError, match="no loadable scene"):
        load_latest(tmp_path)


def test_path_traversal_impossible(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sd = tmp_path / "scenes"
    save_scene(sd, _scene(seed=1))
    victim = outside / "scene-20000101T000000000000Z-000001.npz"
    save_scene(outside, _scene(seed=9))
    os.replace(next(outside.glob("scene-*.npz")), victim)
    # a tampered pointer naming a path outside scene_dir is ignored
    (sd / "latest").write_text(json.dumps({"magic": store.MAGIC, "version": 1,
                                           "file": "../outside/" + victim.name}))
    b, _ = load_latest(sd)
    assert b.pts3d.tobytes() == _scene(seed=1).pts3d.tobytes()
    # a symlink in scene_dir pointing outside is not a scene file
    (sd / "scene-20990101T000000000000Z-999999.npz").symlink_to(victim)
    assert latest_path(sd).name != "scene-20990101T000000000000Z-999999.npz"
    b, _ = load_latest(sd)
    assert b.pts3d.tobytes() == _scene(seed=1).pts3d.tobytes()
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(StoreError):
            store._inside(sd.resolve(), bad)
    # writes stay inside scene_dir, even when scene_dir is given with '..' components
    before = sorted(x.name for x in outside.iterdir())
    p = save_scene(str(sd / ".." / "scenes"), _scene(seed=2))
    assert p.parent == sd.resolve()
    assert sorted(x.name for x in outside.iterdir()) == before
    assert victim.read_bytes()[:2] == b"PK" and load_scene(victim)[0].pts3d.shape == (3, 6, 8, 3)


def test_session_round_trip_and_refusal(tmp_path):
    sess = {"positive_points": [[0.1, 0.2, 0.3]], "negative_points": [],
            "pixel_prompts": [{"keyframe": 2, "u": 10, "v": 20, "positive": True}],
            "selected_object": 3, "scene_file": "scene-x.npz"}
    save_session(tmp_path, sess)
    assert load_session(tmp_path) == sess
    sess["selected_object"] = 4
    save_session(tmp_path, sess)
    assert load_session(tmp_path)["selected_object"] == 4
    (tmp_path / "session.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        load_session(tmp_path)
    (tmp_path / "session.json").write_text(json.dumps({"magic": "x", "session": {}}))
    with pytest.raises(StoreError, match="not a wildseg3d session"):
        load_session(tmp_path)
    with pytest.raises(StoreError):
        save_session(tmp_path, {"bad": object()})
    with pytest.raises(StoreError):
        save_scene(tmp_path, _scene(), extra={"bad": np.array([object()])})
