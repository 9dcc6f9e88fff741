"""Checkpoints by path or by Hugging Face hub id (wildseg3d_ros.core.checkpoints), for DUSt3R and
SAM2, with hub caches built here in huggingface_hub's layout (no network anywhere: every test
sets HF_HUB_OFFLINE=1 and its own HF_HUB_CACHE)."""
from __future__ import annotations

import pytest
import torch

from wildseg3d_ros.core.checkpoints import (CheckpointError, cached_checkpoint, parse_hub_id,
                                            resolve_checkpoint)

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_file(cache, repo, filename, data: bytes = b"x"):
    d = cache / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (d / "refs").mkdir(exist_ok=True)
    (d / "refs" / "main").write_text(COMMIT)
    (snap / filename).write_bytes(data)
    return snap / filename


def test_parse_hub_id():
    assert parse_hub_id("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt") == ("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt",
                                                                       None, None)
    assert parse_hub_id("facebook/sam2.1-hiera-tiny/sam2.1_hiera_tiny.pt@main") == (
        "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", "main")
    for not_hub in ("", "model.pth", "/abs/x/y.pth", "./rel/x", "~/ckpt/x.pth", "a\\b/c", "a//b"):
        assert parse_hub_id(not_hub) is None, not_hub


def test_local_paths_pass_through_and_bad_specs_are_explained(tmp_path, hub):
    f = tmp_path / "model.pth"
    f.write_bytes(b"0")
    assert resolve_checkpoint(str(f)) == str(f)
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)  # a save_pretrained folder
    with pytest.raises(CheckpointError, match="not an existing file or folder"):
        resolve_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="no dust3r checkpoint given"):
        resolve_checkpoint("  ")
    with pytest.raises(ValueError):  # the caller's error class
        resolve_checkpoint("", error=ValueError)


def test_offline_cached_and_not_cached(hub):
    p = _cache_file(hub, "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")
    assert resolve_checkpoint("facebook/sam2.1-hiera-tiny", "sam2") == str(p)  # file name from sam2's table
    assert resolve_checkpoint("facebook/sam2.1-hiera-tiny/sam2.1_hiera_tiny.pt", "sam2") == str(p)
    assert cached_checkpoint("facebook/sam2.1-hiera-tiny", "sam2") == str(p)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("facebook/sam2.1-hiera-large", "sam2")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download facebook/sam2.1-hiera-large sam2.1_hiera_large.pt" in msg
    assert str(hub) in msg and "models--facebook--sam2.1-hiera-large" in msg
    assert cached_checkpoint("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt") is None
    with pytest.raises(CheckpointError, match="unknown repository"):
        resolve_checkpoint("someone/some-sam2", "sam2")


def test_sam2_segmenter_from_a_hub_id(hub, tmp_path):
    """A real SAM2 checkpoint (random hiera-tiny weights, saved as the official files are:
    {'model': state_dict}) in the cache under facebook/sam2.1-hiera-tiny: the segmenter builds from
    the hub id; a config that does not match the repository is refused by name; not cached -> the
    offline error."""
    pytest.importorskip("sam2")
    from wildseg3d_ros.core.presegment.base import SegmenterError
    from wildseg3d_ros.core.presegment.sam2 import Sam2Segmenter

    kw = dict(device="cpu", image_size=128, num_threads=1)
    ref = Sam2Segmenter(random_init=True, **kw)
    data = tmp_path / "w.pt"
    torch.save({"model": ref.model.state_dict()}, data)
    _cache_file(hub, "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", data.read_bytes())
    seg = Sam2Segmenter(checkpoint="facebook/sam2.1-hiera-tiny", **kw)
    assert seg.checkpoint.endswith("sam2.1_hiera_tiny.pt") and str(hub) in seg.checkpoint
    a, b = ref.model.state_dict(), seg.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in list(a)[:50])
    with pytest.raises(SegmenterError, match="needs config configs/sam2.1/sam2.1_hiera_l.yaml"):
        Sam2Segmenter(checkpoint="facebook/sam2.1-hiera-large", **kw)
    with pytest.raises(SegmenterError, match="HF_HUB_OFFLINE=1"):
        Sam2Segmenter(config="configs/sam2.1/sam2.1_hiera_s.yaml", checkpoint="facebook/sam2.1-hiera-small", **kw)


def test_check_gpu_reports_hub_ids_from_the_cache(hub, tmp_path):
    from wildseg3d_ros.apps.gpu_check import check_checkpoint

    it = check_checkpoint("sam2_checkpoint", "facebook/sam2.1-hiera-base-plus", "sam2", True, hash_file=False)
    assert it.status == "missing" and "hf download facebook/sam2.1-hiera-base-plus" in it.fix
    data = tmp_path / "zip.pt"
    torch.save({"model": {"w": torch.zeros(4)}}, data)
    _cache_file(hub, "facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt", data.read_bytes())
    it = check_checkpoint("sam2_checkpoint", "facebook/sam2.1-hiera-base-plus", "sam2", True, hash_file=False,
                          sam2_config="configs/sam2.1/sam2.1_hiera_b+.yaml")
    assert "sam2.1_hiera_base_plus.pt" in it.detail and str(hub) in it.detail
    assert it.status != "missing"  # found in the cache (then judged like a file: here too small)
