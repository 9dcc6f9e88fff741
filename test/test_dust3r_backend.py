"""Dust3rBackend: safe checkpoint loading, load_images-equivalent preprocessing, and NAVER's
DUSt3R code run for real (the ``dust3r`` clone, else ``mini_dust3r`` from PyPI, installed by
scripts/run.sh) on a tiny randomly initialised network: through the backend, from an
official-style ``.pth`` checkpoint read with ``weights_only=True``, from a Hugging Face hub id
resolved offline through a hub cache built here, through the offline CLI and through the
reconstruction node over real ROS 2."""
import argparse
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from dust3r_tiny import HAVE_DUST3R, tiny_model, write_tiny_checkpoint, write_tiny_hub_cache
from wildseg3d_ros.core.pointmaps import BackendError
from wildseg3d_ros.core.pointmaps.dust3r import load_checkpoint, parse_model_spec, preprocess_image
from wildseg3d_ros.core.types import Keyframe

NEEDS_DUST3R = pytest.mark.skipif(not HAVE_DUST3R, reason="neither dust3r (clone naver/dust3r, add it to "
                                  "PYTHONPATH) nor mini_dust3r (pip install --no-deps mini-dust3r) is importable")

SPEC = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
        "img_size=(512, 512), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
        "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
        "dec_embed_dim=768, dec_depth=12, dec_num_heads=12)")


class Evil:  # a custom class: must never be unpickled
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_parse_model_spec_whitelist():
    name, kw = parse_model_spec(SPEC)
    assert name == "AsymmetricCroCo3DStereo"
    assert kw["depth_mode"] == ("exp", -math.inf, math.inf) and kw["conf_mode"] == ("exp", 1, math.inf)
    assert kw["img_size"] == (512, 512) and kw["enc_depth"] == 24
    assert kw["patch_embed_cls"] == "PatchEmbedDust3R" and kw["landscape_only"] is False  # upstream rewrites
    for bad in ["__import__('os').system('x')", "AsymmetricCroCo3DStereo(x=__import__('os'))",
                "AsymmetricCroCo3DStereo(1, 2)", "AsymmetricCroCo3DStereo(**d)",
                "AsymmetricCroCo3DStereo(a=open('f'))", "Other(a=1)", "AsymmetricCroCo3DStereo(a=b)",
                "AsymmetricCroCo3DStereo(a=1); x", ""]:
        with pytest.raises(BackendError):
            parse_model_spec(bad)


def test_checkpoint_loader_weights_only_with_namespace(tmp_path):
    p = tmp_path / "ok.pth"
    torch.save({"args": argparse.Namespace(model=SPEC, lr=1e-4), "model": {"w": torch.ones(2)}, "epoch": 3}, p)
    # plain weights-only loading (torch >= 2.6 default) refuses the Namespace ...
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    # ... our loader allow-lists exactly that class
    name, kw, state = load_checkpoint(str(p))
    assert name == "AsymmetricCroCo3DStereo" and kw["dec_depth"] == 12
    assert torch.equal(state["w"], torch.ones(2))

    evil = tmp_path / "evil.pth"
    torch.save({"args": argparse.Namespace(model=SPEC), "model": {}, "x": Evil()}, evil)
    with pytest.raises(BackendError, match="refusing to load"):
        load_checkpoint(str(evil))

    notckpt = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, notckpt)
    with pytest.raises(BackendError, match="not a DUSt3R/MASt3R training checkpoint"):
        load_checkpoint(str(notckpt))
    with pytest.raises(BackendError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_preprocess_matches_load_images_geometry():
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    p = preprocess_image(rgb, K, size=512)
    assert p.rgb.shape == (384, 512, 3) and tuple(p.img.shape) == (1, 3, 384, 512)
    assert p.K[0, 0] == pytest.approx(400.0) and p.K[0, 2] == pytest.approx(255.5)
    assert p.K[1, 2] == pytest.approx(191.5)
    assert -1 <= float(p.img.min()) and float(p.img.max()) <= 1
    # 224: short side to 224 then square centre crop
    p2 = preprocess_image(np.zeros((480, 640, 3), np.uint8), K, size=224)
    assert p2.rgb.shape == (224, 224, 3)
    assert p2.K[0, 0] == pytest.approx(500 * 299 / 640) and p2.crop == (37, 0, 261, 224)
    # a non-multiple-of-16 size is cropped to multiples of 16, K follows the crop
    K3 = np.array([[500.0, 0, 349.5], [0, 500.0, 249.5], [0, 0, 1]])
    p3 = preprocess_image(np.zeros((500, 700, 3), np.uint8), K3, size=512)
    h, w = p3.rgb.shape[:2]
    assert h % 16 == 0 and w % 16 == 0 and w == 512
    # a principal point at the image centre stays at the crop centre
    assert p3.K[0, 2] == pytest.approx((w - 1) / 2, abs=0.6) and p3.K[1, 2] == pytest.approx((h - 1) / 2, abs=0.6)


def test_missing_package_message(monkeypatch):
    """Neither dust3r nor mini_dust3r importable (hidden here): one error naming both installs."""
    from wildseg3d_ros.core.pointmaps import make_backend

    for name in list(sys.modules):
        if name.split(".")[0] in ("dust3r", "mini_dust3r"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dust3r", None)  # import dust3r -> ImportError
    monkeypatch.setitem(sys.modules, "mini_dust3r", None)
    with pytest.raises(BackendError, match="git clone --recursive https://github.com/naver/dust3r") as e:
        make_backend("dust3r", model=torch.nn.Linear(1, 1))
    assert "mini-dust3r" in str(e.value) and "CC BY-NC-SA" in str(e.value)


def _tiny_model():
    return tiny_model(0)


@NEEDS_DUST3R
def test_tiny_random_model_inference_structure(tmp_path):
    from wildseg3d_ros.core.pointmaps import make_backend

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
    kfs = [Keyframe(i, float(i), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), K) for i in range(3)]
    be = make_backend("dust3r", model=_tiny_model(), image_size=224, device="cpu", batch_size=2)
    preds = be.predict_pairs(kfs)  # scene graph 'complete' via dust3r.image_pairs.make_pairs
    assert not preds.metric and preds.images.shape == (3, 224, 224, 3)
    out = preds.to_dust3r()  # the dict layout of dust3r.inference.inference()
    E = 6
    assert sorted(zip(out["view1"]["idx"], out["view2"]["idx"])) == sorted(
        [(i, j) for i in range(3) for j in range(3) if i != j])
    assert tuple(out["pred1"]["pts3d"].shape) == (E, 224, 224, 3)
    assert tuple(out["pred2"]["pts3d_in_other_view"].shape) == (E, 224, 224, 3)
    assert tuple(out["pred1"]["conf"].shape) == (E, 224, 224)
    assert float(out["pred1"]["conf"].min()) >= 1.0  # conf_mode ('exp', 1, inf)
    assert tuple(out["view1"]["img"].shape) == (E, 3, 224, 224)
    assert torch.isfinite(out["pred1"]["pts3d"]).all()
    # the image of each edge is the preprocessed keyframe it names
    for e, i in enumerate(out["view1"]["idx"]):
        assert torch.allclose(out["view1"]["img"][e], be.last_preprocessed[i].img[0])
    assert be.last_K[0][0, 0] == pytest.approx(300 * 299 / 320)
    # explicit pairs and a checkpoint written like the official ones round-trip through the loader
    ck = write_tiny_checkpoint(tmp_path / "tiny.pth")
    with pytest.raises(Exception):  # a real training checkpoint: plain weights-only loading refuses it
        torch.load(ck, weights_only=True)
    be2 = make_backend("dust3r", model=str(ck), image_size=224, device="cpu")
    out2 = be2.predict_pairs(kfs, pairs=[(0, 1), (1, 0)]).to_dust3r()
    assert out2["view1"]["idx"] == [0, 1] and out2["view2"]["idx"] == [1, 0]
    ref = out["pred1"]["pts3d"][[k for k, (a, b) in enumerate(zip(out["view1"]["idx"], out["view2"]["idx"]))
                                 if (a, b) == (0, 1)][0]]
    assert torch.allclose(out2["pred1"]["pts3d"][0], ref, atol=1e-5)  # same weights -> same output


def test_hub_id_offline_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    """A hub id that is not in the hub cache with HF_HUB_OFFLINE=1: one error saying what to
    download and where (was: hub names refused outright; now they resolve through the cache)."""
    from wildseg3d_ros.core.pointmaps import make_backend

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackendError) as e:
        make_backend("dust3r", model="naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt" in msg
    assert str(tmp_path / "hub") in msg and "models--naver--DUSt3R_ViTLarge_BaseDecoder_512_dpt" in msg
    with pytest.raises(BackendError, match="not an existing file or folder"):
        make_backend("dust3r", model=str(tmp_path / "missing.pth"))


@NEEDS_DUST3R
def test_hub_id_resolved_offline_from_the_local_cache(tmp_path, monkeypatch):
    """A save_pretrained snapshot in the hub cache layout (built here, no network): the hub id
    loads the same weights as the module they came from."""
    from wildseg3d_ros.core.pointmaps import make_backend

    snap = write_tiny_hub_cache(tmp_path / "hub", "wildseg3d-test/tiny-dust3r")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    K = np.array([[250.0, 0, 159.5], [0, 250.0, 119.5], [0, 0, 1]])
    kfs = [Keyframe(i, float(i), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), K) for i in range(2)]
    be = make_backend("dust3r", model="wildseg3d-test/tiny-dust3r", image_size=224, device="cpu")
    assert be._model_src == str(snap)
    a = be.predict_pairs(kfs, pairs=[(0, 1)])
    b = make_backend("dust3r", model=_tiny_model(), image_size=224, device="cpu").predict_pairs(kfs, pairs=[(0, 1)])
    assert torch.allclose(torch.as_tensor(a.pts1), torch.as_tensor(b.pts1), atol=1e-5)


def _frames_folder(tmp_path, n=3, w=256, h=192):
    import cv2

    from wildseg3d_ros.sim.tabletop import render_sequence

    seq = render_sequence(n, w, h, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(n):
        cv2.imwrite(str(folder / f"{k:03d}.png"), seq.rgb[k][..., ::-1])
    return folder, seq


@NEEDS_DUST3R
def test_offline_cli_with_a_real_checkpoint_file(tmp_path):
    """`wildseg3d segment --backend dust3r --checkpoint tiny.pth` on an RGB folder: the whole path
    runs (network resolution 224x224, clicks mapped to it), outputs are written."""
    from wildseg3d_ros.apps.cli import build_parser
    from wildseg3d_ros.apps.offline import run_segment

    folder, seq = _frames_folder(tmp_path)
    ck = write_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    K = seq.K
    args = build_parser().parse_args(["segment", "--input", str(folder), "--backend", "dust3r", "--checkpoint",
                                      str(ck), "--image-size", "224", "--intrinsics",
                                      f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}", "--select", "uniform",
                                      "--max-frames", "3", "--iterations", "10", "--click", "0:128,96",
                                      "--out", str(out), "--quiet", "--threads", "1"])
    res = run_segment(args)
    r = json.loads((out / "result.json").read_text())
    assert r["scene_image_size"] == [224, 224] and r["metric"] is False and len(r["keyframes"]) == 3
    # load_images geometry: 256x192 -> 299x224 (short side 224), centre crop 224 from column 37
    assert r["prompts"][0]["u_scene"] == pytest.approx((128 + 0.5) * 299 / 256 - 0.5 - 37, abs=0.01)
    assert r["prompts"][0]["v_scene"] == pytest.approx((96 + 0.5) * 224 / 192 - 0.5, abs=0.01)
    assert all((out / f).is_file() for f in ("object.ply", "scene.ply", "montage.png"))
    assert res["_scene"].num_views == 3 and res["_scene"].image_shape == (224, 224)


@NEEDS_DUST3R
def test_reconstruction_node_with_a_real_checkpoint(tmp_path):
    """The reconstruction node with backend dust3r and the tiny .pth: an RGB stream in, a scene
    out (frame: reconstruction frame, network resolution), diagnostics naming the checkpoint."""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from wildseg3d_ros.ros.harness import Collector, spinning, wait_for
    from wildseg3d_ros.ros import convert
    from wildseg3d_ros.ros.camera_sim_node import CameraSimNode
    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

    ck = write_tiny_checkpoint(tmp_path / "tiny.pth")
    rclpy.init()
    try:
        cam = CameraSimNode(parameter_overrides=[
            Parameter("width", value=256), Parameter("height", value=192), Parameter("num_frames", value=3),
            Parameter("rate_hz", value=5.0), Parameter("start_delay_s", value=1.0),
            Parameter("publish_odom", value=False)])
        rec = ReconstructionNode(parameter_overrides=[
            Parameter("backend", value="dust3r"), Parameter("dust3r.checkpoint", value=str(ck)),
            Parameter("dust3r.image_size", value=224), Parameter("keyframes.reconstruct_at", value=3),
            Parameter("keyframes.min_interval_s", value=0.1), Parameter("dga.iterations", value=10),
            Parameter("scene_dir", value=str(tmp_path / "scenes")), Parameter("use_tf", value=False)])
        client = rclpy.create_node("dust3r_test_client")
        scenes = Collector(client, PointCloud2, "wildseg3d/scene", convert.LATCHED_QOS)
        with spinning([cam, rec, client]):
            assert wait_for(lambda: scenes.nonempty(), 180), (rec.last_error, dict(rec.stats))
            msg = scenes.nonempty()[-1]
            assert msg.header.frame_id == "wildseg3d_reconstruction"
            assert (msg.height, msg.width) == (3 * 224, 224)
            assert str(ck) in rec.diagnostics_values()["model"]
        for n in (cam, rec, client):
            n.destroy_node()
    finally:
        rclpy.shutdown()
