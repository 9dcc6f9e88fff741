"""Dust3rBackend: safe checkpoint loading (without dust3r), load_images-equivalent preprocessing,
and, when the ``dust3r`` package is importable, a random tiny network through inference."""
import argparse
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from wildseg3d_ros.core.pointmaps import BackendError
from wildseg3d_ros.core.pointmaps.dust3r import load_checkpoint, parse_model_spec, preprocess_image
from wildseg3d_ros.core.types import Keyframe

HAVE_DUST3R = importlib.util.find_spec("dust3r") is not None
NEEDS_DUST3R = pytest.mark.skipif(not HAVE_DUST3R,
                                  reason="dust3r not importable (clone naver/dust3r and add it to PYTHONPATH)")

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


@pytest.mark.skipif(HAVE_DUST3R, reason="dust3r is importable here")
def test_missing_package_message():
    from wildseg3d_ros.core.pointmaps import make_backend

    with pytest.raises(BackendError, match="git clone --recursive https://github.com/naver/dust3r"):
        make_backend("dust3r", model=torch.nn.Linear(1, 1))


def _tiny_model():
    from dust3r.model import AsymmetricCroCo3DStereo

    torch.manual_seed(0)
    return AsymmetricCroCo3DStereo(img_size=(224, 224), patch_size=16, enc_embed_dim=32, enc_depth=1,
                                   enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2,
                                   head_type="linear", output_mode="pts3d", depth_mode=("exp", -math.inf, math.inf),
                                   conf_mode=("exp", 1, math.inf), pos_embed="RoPE100",
                                   landscape_only=False).eval()


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
    ck = tmp_path / "tiny.pth"
    spec = ("AsymmetricCroCo3DStereo(img_size=(224, 224), patch_size=16, enc_embed_dim=32, enc_depth=1, "
            "enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2, head_type='linear', "
            "output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), pos_embed='RoPE100')")
    torch.save({"args": argparse.Namespace(model=spec), "model": _tiny_model().state_dict()}, ck)
    be2 = make_backend("dust3r", model=str(ck), image_size=224, device="cpu")
    out2 = be2.predict_pairs(kfs, pairs=[(0, 1), (1, 0)]).to_dust3r()
    assert out2["view1"]["idx"] == [0, 1] and out2["view2"]["idx"] == [1, 0]
    ref = out["pred1"]["pts3d"][[k for k, (a, b) in enumerate(zip(out["view1"]["idx"], out["view2"]["idx"]))
                                 if (a, b) == (0, 1)][0]]
    assert torch.allclose(out2["pred1"]["pts3d"][0], ref, atol=1e-5)  # same weights -> same output


def test_refuses_hub_names():
    from wildseg3d_ros.core.pointmaps import make_backend

    with pytest.raises(BackendError, match="never downloads"):
        make_backend("dust3r", model="naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
