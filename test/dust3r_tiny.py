"""A tiny randomly initialised DUSt3R network for the tests (NAVER's code from ``dust3r`` or
``mini_dust3r``, never vendored here): as a module, as an official-style ``.pth`` training
checkpoint (``{'args': Namespace(model=...), 'model': state_dict}``, read back with
``weights_only=True``) and as a Hugging Face hub cache entry (``save_pretrained`` snapshot in
the cache layout huggingface_hub reads offline)."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

import torch

HAVE_DUST3R = any(importlib.util.find_spec(p) is not None for p in ("dust3r", "mini_dust3r"))

#: the constructor call stored in the checkpoint (a single literal-kwargs call: parse_model_spec)
TINY_SPEC = ("AsymmetricCroCo3DStereo(img_size=(224, 224), patch_size=16, enc_embed_dim=32, enc_depth=1, "
             "enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2, head_type='linear', "
             "output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), pos_embed='RoPE100')")


def tiny_model(seed: int = 0):
    from wildseg3d_ros.core.pointmaps.dust3r import dust3r_module

    cls = dust3r_module("model").AsymmetricCroCo3DStereo
    torch.manual_seed(seed)
    return cls(img_size=(224, 224), patch_size=16, enc_embed_dim=32, enc_depth=1, enc_num_heads=2,
               dec_embed_dim=32, dec_depth=1, dec_num_heads=2, head_type="linear", output_mode="pts3d",
               depth_mode=("exp", -math.inf, math.inf), conf_mode=("exp", 1, math.inf), pos_embed="RoPE100",
               landscape_only=False).eval()


def write_tiny_checkpoint(path, seed: int = 0) -> Path:
    path = Path(path)
    torch.save({"args": argparse.Namespace(model=TINY_SPEC), "model": tiny_model(seed).state_dict()}, path)
    return path


def write_tiny_hub_cache(cache_dir, repo_id: str = "wildseg3d-test/tiny-dust3r", seed: int = 0,
                         commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``<cache>/models--owner--name/{refs/main, snapshots/<commit>/...}``: what
    ``huggingface_hub.snapshot_download(local_files_only=True)`` resolves without a network."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    tiny_model(seed).save_pretrained(str(snap))  # config.json + model.safetensors (PyTorchModelHubMixin)
    assert (snap / "config.json").is_file(), os.listdir(snap)
    return snap
