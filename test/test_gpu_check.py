"""`wildseg3d check-gpu` (wildseg3d_ros.apps.gpu_check): missing pieces reported, exit codes, fake or
mismatching checkpoint files flagged, sha256 verification against a recorded hash."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wildseg3d_ros.apps import gpu_check as gc
from wildseg3d_ros.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv):
    args = build_parser().parse_args(["check-gpu", *argv])
    return args.func(args)


def _items(capsys, *argv):
    rc = _run(*argv, "--json")
    data = json.loads(capsys.readouterr().out)
    return rc, {it["name"]: it for it in data["items"]}, data


def _torch_zip(path: Path, pad_bytes: int = 0):
    """A real torch.save archive (zip with data.pkl), optionally padded with a large tensor."""
    import torch
    torch.save({"model": {"w": torch.zeros(max(1, pad_bytes // 4))}}, path)
    return path


def test_gpu_profile_reports_missing_pieces_exit_1(capsys):
    rc, items, data = _items(capsys, "--profile", "dust3r_sam2_gpu")
    assert rc == 1 and data["ok"] is False
    assert items["sam2_checkpoint"]["status"] == "missing" and items["dust3r_checkpoint"]["status"] == "missing"
    assert "sam2.1_hiera_tiny.pt" in items["sam2_checkpoint"]["fix"]
    assert "dl.fbaipublicfiles.com" in items["sam2_checkpoint"]["fix"]
    import torch
    if not torch.cuda.is_available():
        assert items["device"]["status"] == "missing" and items["device"]["required"]
    import importlib.util
    if importlib.util.find_spec("dust3r") is None and importlib.util.find_spec("mini_dust3r") is None:
        assert items["dust3r"]["status"] == "missing" and "git clone --recursive" in items["dust3r"]["fix"]
    elif importlib.util.find_spec("dust3r") is None:  # NAVER's code from PyPI (mini-dust3r) stands in
        assert items["dust3r"]["status"] == "ok" and "mini_dust3r" in items["dust3r"]["detail"]
    assert items["torch"]["status"] == "ok" and items["torch"]["info"]["version"] == torch.__version__


def test_text_report_lists_fixes(capsys):
    assert _run("--profile", "dust3r_sam2_gpu") == 1
    out = capsys.readouterr().out
    assert "[MISSING] sam2_checkpoint" in out and "missing or broken for this profile" in out
    assert "docs/gpu_setup.md" in out


def test_cpu_profile_passes_exit_0(capsys):
    rc, items, _ = _items(capsys, "--profile", "rgbd_cpu", "--device", "cpu")
    assert rc == 0
    assert items["torch"]["status"] == "ok" and items["cv2"]["status"] == "ok"
    assert "sam2_checkpoint" not in items  # not asked for


def test_fake_checkpoint_flagged(tmp_path, capsys):
    fake = tmp_path / "sam2.1_hiera_tiny.pt"
    fake.write_bytes(b"<html>403 Forbidden</html>" * 40)
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(fake),
                          "--sam2-sha256", "0" * 64)
    it = items["sam2_checkpoint"]
    assert rc == 1 and it["status"] == "bad"
    assert "far too small" in it["detail"] and "not a PyTorch zip archive" in it["detail"]
    assert f"!= expected {'0' * 64}" in it["detail"]
    assert it["info"]["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
    assert "re-download https://dl.fbaipublicfiles.com" in it["fix"]


def test_checkpoint_hash_sidecar_and_size(tmp_path, capsys, monkeypatch):
    ck = _torch_zip(tmp_path / "sam2.1_hiera_tiny.pt")
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    # a genuine torch archive, but tiny: flagged by the size floor only
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck))
    d = items["sam2_checkpoint"]["detail"]
    assert rc == 1 and "far too small" in d and "zip" not in d
    monkeypatch.setattr(gc, "MIN_CHECKPOINT_BYTES", 0)
    # no recorded hash: accepted with a warning saying the hash is unverified
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck))
    assert items["sam2_checkpoint"]["status"] == "warn" and "sha256 not verified" in items["sam2_checkpoint"]["detail"]
    assert rc == 0  # device cpu requested, checkpoint present: nothing required is missing
    # recorded hash beside the file: verified
    (tmp_path / "sam2.1_hiera_tiny.pt.sha256").write_text(f"{digest}  sam2.1_hiera_tiny.pt\n")
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck))
    assert rc == 0 and items["sam2_checkpoint"]["status"] == "ok"
    assert items["sam2_checkpoint"]["info"]["sha256_verified"] is True
    # the file changes (corrupted / replaced): the recorded hash catches it
    _torch_zip(ck, pad_bytes=4096)
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck))
    assert rc == 1 and f"!= expected {digest}" in items["sam2_checkpoint"]["detail"]


def test_sam2_config_must_match_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gc, "MIN_CHECKPOINT_BYTES", 0)
    ck = _torch_zip(tmp_path / "sam2.1_hiera_large.pt")
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck),
                          "--no-hash")
    assert rc == 1 and "sam2.1_hiera_l.yaml" in items["sam2_checkpoint"]["detail"]
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck),
                          "--sam2-config", "configs/sam2.1/sam2.1_hiera_l.yaml", "--no-hash")
    assert items["sam2_checkpoint"]["status"] == "ok" and rc == 0
    rc, items, _ = _items(capsys, "--profile", "sam2_gpu", "--device", "cpu", "--sam2-checkpoint", str(ck),
                          "--sam2-config", "configs/nope.yaml", "--no-hash")
    assert rc == 1 and items["sam2_config"]["status"] == "bad"


def test_dust3r_checkpoint_of_wrong_kind(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gc, "MIN_CHECKPOINT_BYTES", 0)
    ck = _torch_zip(tmp_path / "sam2.1_hiera_tiny.pt")
    rc, items, _ = _items(capsys, "--profile", "dust3r_sam2_gpu", "--dust3r-checkpoint", str(ck), "--no-hash")
    assert rc == 1 and "is a sam2 checkpoint, not dust3r" in items["dust3r_checkpoint"]["detail"]


def test_complete_gpu_setup_exits_0(tmp_path, capsys, monkeypatch):
    """Everything present (packages and device stubbed as found): exit code 0."""
    monkeypatch.setattr(gc, "MIN_CHECKPOINT_BYTES", 0)
    monkeypatch.setattr(gc, "check_package", lambda name, required: gc.Item(name, "ok", "stub", "", required))
    monkeypatch.setattr(gc, "check_device", lambda device, required: gc.Item("device", "ok", "stub GPU", "", required))
    s = _torch_zip(tmp_path / "sam2.1_hiera_tiny.pt")
    d = _torch_zip(tmp_path / "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth")
    for f in (s, d):
        f.with_name(f.name + ".sha256").write_text(hashlib.sha256(f.read_bytes()).hexdigest() + "\n")
    assert _run("--sam2-checkpoint", str(s), "--dust3r-checkpoint", str(d)) == 0
    assert "all required pieces are present" in capsys.readouterr().out


def test_params_file_supplies_checkpoints(tmp_path, capsys):
    """--params reads the checkpoint paths from a ROS parameter YAML (a layered profile file)."""
    yml = tmp_path / "p.yaml"
    yml.write_text("reconstruction_node:\n  ros__parameters:\n"
                   f"    dust3r.checkpoint: {tmp_path / 'nope.pth'}\n"
                   f"    sam2.checkpoint: {tmp_path / 'sam2.1_hiera_tiny.pt'}\n"
                   "    sam2.config: configs/sam2.1/sam2.1_hiera_t.yaml\n    device: cpu\n")
    rc, items, _ = _items(capsys, "--params", str(yml))
    assert rc == 1
    assert "nope.pth does not exist" in items["dust3r_checkpoint"]["detail"]
    assert "sam2.1_hiera_tiny.pt does not exist" in items["sam2_checkpoint"]["detail"]
    assert items["device"]["required"] is False  # device: cpu from the file


def test_no_invented_hashes():
    """The table carries official names + URLs only: no hash or size was verifiable."""
    for name, v in gc.KNOWN_CHECKPOINTS.items():
        assert v["sha256"] is None and v["size"] is None, name
        assert v["url"].startswith("https://") and v["url"].endswith(name)


def test_cli_subprocess_exit_code():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "wildseg3d_ros.apps.cli", "check-gpu", "--profile", "rgbd_cpu",
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "wildseg3d_ros.apps.cli", "check-gpu", "--sam2-checkpoint",
                        "/nonexistent/sam2.1_hiera_tiny.pt"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and "does not exist" in p.stdout
