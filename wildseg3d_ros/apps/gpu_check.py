"""`wildseg3d check-gpu`: is this machine set up for the GPU (DUSt3R/MASt3R + SAM2) profile?

Checks, and prints what is missing with the command that fixes it:

* packages: torch, torchvision, sam2 (PyPI), dust3r / mast3r (git clones on PYTHONPATH) --
  importable, with versions;
* the torch device: CUDA built in, a device visible (name, memory), or explicitly ``--device cpu``;
* checkpoint files: present, readable, a PyTorch zip archive (what ``torch.save`` writes; checked
  with :mod:`zipfile` without unpickling anything), not implausibly small, matching the SAM2
  config chosen, and their sha256 (printed; compared with ``--sam2-sha256`` / ``--dust3r-sha256``
  or a ``<file>.sha256`` file beside the checkpoint when given).

Official checkpoint hashes: the SAM2 and DUSt3R/MASt3R releases publish download URLs but this
project could not verify published sha256 values or byte sizes for them, so none are built in
(:data:`KNOWN_CHECKPOINTS` lists names and official URLs only). Record the hash of the file you
downloaded (``sha256sum``) in ``<file>.sha256`` and this command verifies it from then on.

Exit code 0 when everything the profile needs is there, 1 otherwise.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
DUST3R_BASE = "https://download.europe.naverlabs.com/ComputerVision/DUSt3R/"
MAST3R_BASE = "https://download.europe.naverlabs.com/ComputerVision/MASt3R/"

#: official checkpoint file names -> kind, download URL, matching SAM2 config. ``sha256`` / ``size``
#: stay None: no published value could be verified (never fill them from memory).
KNOWN_CHECKPOINTS: Dict[str, dict] = {
    "sam2.1_hiera_tiny.pt": dict(kind="sam2", url=SAM2_BASE + "sam2.1_hiera_tiny.pt",
                                 config="configs/sam2.1/sam2.1_hiera_t.yaml"),
    "sam2.1_hiera_small.pt": dict(kind="sam2", url=SAM2_BASE + "sam2.1_hiera_small.pt",
                                  config="configs/sam2.1/sam2.1_hiera_s.yaml"),
    "sam2.1_hiera_base_plus.pt": dict(kind="sam2", url=SAM2_BASE + "sam2.1_hiera_base_plus.pt",
                                      config="configs/sam2.1/sam2.1_hiera_b+.yaml"),
    "sam2.1_hiera_large.pt": dict(kind="sam2", url=SAM2_BASE + "sam2.1_hiera_large.pt",
                                  config="configs/sam2.1/sam2.1_hiera_l.yaml"),
    "DUSt3R_ViTLarge_BaseDecoder_224_linear.pth": dict(kind="dust3r", image_size=224,
                                                       url=DUST3R_BASE + "DUSt3R_ViTLarge_BaseDecoder_224_linear.pth"),
    "DUSt3R_ViTLarge_BaseDecoder_512_linear.pth": dict(kind="dust3r", image_size=512,
                                                       url=DUST3R_BASE + "DUSt3R_ViTLarge_BaseDecoder_512_linear.pth"),
    "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth": dict(kind="dust3r", image_size=512,
                                                    url=DUST3R_BASE + "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"),
    "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth": dict(
        kind="mast3r", image_size=512, url=MAST3R_BASE + "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth"),
}
for _v in KNOWN_CHECKPOINTS.values():
    _v.setdefault("sha256", None)
    _v.setdefault("size", None)

#: sanity floor, not an official size: the smallest model here (SAM2.1 hiera-tiny, 38.9 M
#: parameters in float32) is over 100 MB, so a checkpoint under 10 MB is a failed/partial download
#: or an HTML error page.
MIN_CHECKPOINT_BYTES = 10 * 1024 * 1024

PROFILES = {
    "rgbd_cpu": dict(packages=("torch", "numpy", "cv2"), cuda=False, sam2_ckpt=False, dust3r_ckpt=False),
    "rgb_cpu": dict(packages=("torch", "numpy", "cv2", "pycolmap"), cuda=False, sam2_ckpt=False, dust3r_ckpt=False),
    "dust3r_sam2_gpu": dict(packages=("torch", "torchvision", "sam2", "dust3r"), cuda=True, sam2_ckpt=True,
                            dust3r_ckpt=True),
    "jetson": dict(packages=("torch", "torchvision", "sam2", "dust3r"), cuda=True, sam2_ckpt=True,
                   dust3r_ckpt=True),
    "sam2_gpu": dict(packages=("torch", "torchvision", "sam2"), cuda=True, sam2_ckpt=True, dust3r_ckpt=False),
}

FIX = {
    "torch": "pip install torch torchvision  (a CUDA build: see https://pytorch.org/get-started/locally/ and "
             "docs/gpu_setup.md; Jetson: NVIDIA's JetPack wheels)",
    "torchvision": "pip install torchvision  (same release line as torch)",
    "sam2": "SAM2_BUILD_CUDA=0 pip install sam2   (or with the CUDA extension: pip install sam2 on a machine "
            "with nvcc; see docs/gpu_setup.md)",
    "dust3r": "git clone --recursive https://github.com/naver/dust3r && pip install -r dust3r/requirements.txt "
              "&& export PYTHONPATH=$PWD/dust3r:$PYTHONPATH, or pip install --no-deps mini-dust3r==0.1.2 && "
              "pip install einops jaxtyping beartype huggingface_hub safetensors   (licence CC BY-NC-SA 4.0, "
              "non-commercial)",
    "mast3r": "git clone --recursive https://github.com/naver/mast3r && pip install -r mast3r/requirements.txt "
              "&& export PYTHONPATH=$PWD/mast3r:$PWD/mast3r/dust3r:$PYTHONPATH   (CC BY-NC-SA 4.0)",
    "numpy": "pip install numpy",
    "pycolmap": "pip install pycolmap   (COLMAP's Python bindings, CPU wheels; the sfm backend)",
    "cv2": "pip install opencv-python-headless",
}


@dataclass
class Item:
    name: str
    status: str  # ok | missing | bad | warn | skip
    detail: str = ""
    fix: str = ""
    required: bool = True
    info: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.required and self.status in ("missing", "bad")


# ----------------------------------------------------------------------------------------------
def _version(mod, dist: Optional[str]) -> str:
    v = getattr(mod, "__version__", None)
    if v:
        return str(v)
    if dist:
        try:
            from importlib.metadata import version
            return version(dist)
        except Exception:
            pass
    return "unknown version (source checkout)"


def check_package(name: str, required: bool) -> Item:
    dist = {"cv2": "opencv-python-headless"}.get(name, name)
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising something else
        if name == "dust3r":  # the backend falls back to mini_dust3r (PyPI packaging of NAVER's code)
            try:
                import contextlib

                with contextlib.redirect_stdout(sys.stderr):  # it prints a RoPE notice at import
                    mod = importlib.import_module("mini_dust3r.model")
            except Exception:
                mod = None
            if mod is not None:
                return Item(name, "ok", f"mini_dust3r {_version(mod, 'mini-dust3r')} (the dust3r clone is not "
                            f"importable: {e}; NAVER's DUSt3R code from PyPI is used, licence CC BY-NC-SA 4.0)",
                            "", required, {"version": _version(mod, "mini-dust3r"), "package": "mini_dust3r"})
        return Item(name, "missing", f"not importable ({type(e).__name__}: {e})", FIX.get(name, ""), required)
    where = os.path.dirname(getattr(mod, "__file__", "") or "") or "?"
    info = {"version": _version(mod, dist), "path": where}
    detail = f"{info['version']} ({where})"
    if name == "torch":
        info["cuda_build"] = getattr(mod.version, "cuda", None)
        detail += f", CUDA build {info['cuda_build'] or 'none (CPU-only wheel)'}"
    if name == "sam2":
        try:
            from sam2.build_sam import build_sam2  # noqa: F401
        except Exception as e:
            return Item(name, "bad", f"{detail}, but sam2.build_sam does not import ({e})", FIX["sam2"], required, info)
    if name in ("dust3r", "mast3r"):
        try:
            importlib.import_module(f"{name}.model")
        except Exception as e:
            return Item(name, "bad", f"{detail}, but {name}.model does not import ({e}); was the clone made with "
                        "--recursive (croco submodule) and its requirements installed?", FIX[name], required, info)
    return Item(name, "ok", detail, "", required, info)


def check_device(device: str, required: bool) -> Item:
    try:
        import torch
    except Exception as e:
        return Item("device", "missing", f"torch not importable ({e})", FIX["torch"], required)
    dev = str(device or "cuda").lower()
    if dev == "cpu":
        return Item("device", "ok" if not required else "warn",
                    "cpu requested: models run on the CPU (slow: minutes per reconstruction)", "", False)
    if not dev.startswith("cuda"):
        return Item("device", "bad", f"unsupported device {device!r} (use cuda, cuda:N or cpu)", "", required)
    if not getattr(torch.version, "cuda", None):
        return Item("device", "missing", f"torch {torch.__version__} is a CPU-only build",
                    "install a CUDA build of torch (docs/gpu_setup.md)", required)
    if not torch.cuda.is_available():
        return Item("device", "missing", "torch has CUDA but sees no GPU (driver missing, container without "
                    "--gpus all, or CUDA_VISIBLE_DEVICES empty)", "check nvidia-smi and the driver / container "
                    "GPU flags", required)
    idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
    n = torch.cuda.device_count()
    if idx >= n:
        return Item("device", "missing", f"{dev} requested, {n} CUDA device(s) visible", "", required)
    p = torch.cuda.get_device_properties(idx)
    gib = p.total_memory / 2**30
    info = {"name": p.name, "memory_gib": round(gib, 2), "capability": f"{p.major}.{p.minor}", "count": n}
    st = "ok"
    detail = f"{dev}: {p.name}, {gib:.1f} GiB, compute capability {p.major}.{p.minor}"
    if gib < 6:
        st, detail = "warn", detail + " (under 6 GiB: use the jetson profile: dust3r 224, SAM2 tiny, fewer keyframes)"
    return Item("device", st, detail, "", required, info)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def _expected_sha(path: Path, given: Optional[str]) -> Optional[str]:
    if given:
        return given.strip().lower()
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        tok = side.read_text().split()
        if tok:
            return tok[0].strip().lower()
    known = KNOWN_CHECKPOINTS.get(path.name, {})
    return known.get("sha256")


def check_checkpoint(label: str, path: Optional[str], kind: str, required: bool,
                     expect_sha256: Optional[str] = None, sam2_config: Optional[str] = None,
                     hash_file: bool = True) -> Item:
    names = [n for n, v in KNOWN_CHECKPOINTS.items() if v["kind"] == kind or (kind == "dust3r" and v["kind"] == "mast3r")]
    urls = "; ".join(f"{n}: {KNOWN_CHECKPOINTS[n]['url']}" for n in names)
    if not path:
        return Item(label, "missing", "no path given", f"download one of {urls} and pass its path "
                    f"(--{label.replace('_', '-')})", required)
    p = Path(os.path.expanduser(path))
    if not p.exists():
        from ..core.checkpoints import cached_checkpoint, how_to_download, hub_cache_dir, parse_hub_id

        if parse_hub_id(path) is not None:  # a Hugging Face hub id: checked in the local cache only
            cached = cached_checkpoint(path, "sam2" if kind == "sam2" else "dust3r")
            if cached is None:
                return Item(label, "missing", f"{path}: Hugging Face hub id not in the local cache {hub_cache_dir()}",
                            how_to_download(path, "sam2" if kind == "sam2" else "dust3r")
                            + " (or let the node download it on first use when online)", required)
            p = Path(cached)
    if p.is_dir():  # save_pretrained folder (dust3r/mast3r)
        ok = (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))
        return Item(label, "ok" if ok else "bad", f"{p}: save_pretrained folder"
                    + ("" if ok else " without config.json + weights"), "" if ok else f"download one of {urls}",
                    required, {"path": str(p)})
    if not p.is_file():
        return Item(label, "missing", f"{p} does not exist", f"download one of {urls} into {p.parent}", required)
    size = p.stat().st_size
    info = {"path": str(p), "size": size}
    problems, warnings = [], []
    known = KNOWN_CHECKPOINTS.get(p.name)
    if known is None:
        warnings.append(f"not an official file name ({', '.join(names)})")
    elif known["kind"] not in (kind, "mast3r" if kind == "dust3r" else kind):
        problems.append(f"{p.name} is a {known['kind']} checkpoint, not {kind}")
    if known and known.get("size") is not None and size != known["size"]:
        problems.append(f"size {size} B != published {known['size']} B")
    if size < MIN_CHECKPOINT_BYTES:
        problems.append(f"only {size} bytes: far too small for a {kind} model (partial download or error page?)")
    if not zipfile.is_zipfile(p):
        problems.append("not a PyTorch zip archive (torch.save format)")
    else:
        try:
            with zipfile.ZipFile(p) as z:
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    problems.append("zip archive without data.pkl: not a torch checkpoint")
        except zipfile.BadZipFile as e:
            problems.append(f"corrupt zip archive ({e})")
    if kind == "sam2" and sam2_config and known and known.get("config") and known["config"] != sam2_config:
        problems.append(f"config {sam2_config!r} does not match {p.name} (use {known['config']!r})")
    exp = _expected_sha(p, expect_sha256)
    if hash_file:
        digest = sha256_file(p)
        info["sha256"] = digest
        if exp and digest != exp:
            problems.append(f"sha256 {digest} != expected {exp}")
        elif exp:
            info["sha256_verified"] = True
        else:
            warnings.append("sha256 not verified (no official hash could be confirmed; record yours in "
                            f"{p.name}.sha256)")
    detail = f"{p} ({size / 2**20:.1f} MiB" + (f", sha256 {info['sha256'][:16]}..." if "sha256" in info else "") + ")"
    if problems:
        url = known["url"] if known else urls
        return Item(label, "bad", detail + ": " + "; ".join(problems), f"re-download {url}", required, info)
    return Item(label, "warn" if warnings else "ok", detail + ("; " + "; ".join(warnings) if warnings else ""),
                "", required, info)


def check_sam2_config(config: str, required: bool) -> Item:
    try:
        import sam2
    except Exception:
        return Item("sam2_config", "skip", "sam2 not importable", "", False)
    root = Path(sam2.__file__).parent
    f = root / config
    if f.is_file():
        return Item("sam2_config", "ok", f"{config} ({f})", "", required)
    have = sorted(str(x.relative_to(root)) for x in (root / "configs").rglob("*.yaml")) if (root / "configs").is_dir() else []
    return Item("sam2_config", "bad", f"{config!r} is not in the installed sam2 package",
                "use one of: " + ", ".join(h for h in have if "training" not in h), required)


def run_checks(profile: str = "dust3r_sam2_gpu", device: str = "cuda", sam2_checkpoint: Optional[str] = None,
               dust3r_checkpoint: Optional[str] = None, sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml",
               sam2_sha256: Optional[str] = None, dust3r_sha256: Optional[str] = None,
               hash_files: bool = True) -> List[Item]:
    prof = PROFILES[profile]
    items = []
    for pkg in ("torch", "torchvision", "numpy", "cv2", "pycolmap", "sam2", "dust3r", "mast3r"):
        req = pkg in prof["packages"]
        it = check_package(pkg, req)
        if not req and it.status == "missing":
            it.status = "skip"
            it.detail = "(optional for this profile) " + it.detail
        items.append(it)
    items.append(check_device(device, prof["cuda"] and str(device).lower() != "cpu"))
    if prof["sam2_ckpt"] or sam2_checkpoint:
        items.append(check_sam2_config(sam2_config, prof["sam2_ckpt"]))
        items.append(check_checkpoint("sam2_checkpoint", sam2_checkpoint, "sam2", prof["sam2_ckpt"], sam2_sha256,
                                      sam2_config, hash_files))
    if prof["dust3r_ckpt"] or dust3r_checkpoint:
        items.append(check_checkpoint("dust3r_checkpoint", dust3r_checkpoint, "dust3r", prof["dust3r_ckpt"],
                                      dust3r_sha256, None, hash_files))
    return items


def report(items: List[Item], profile: str, out=None) -> int:
    out = out or sys.stdout
    tag = {"ok": "ok     ", "missing": "MISSING", "bad": "BAD    ", "warn": "warn   ", "skip": "-      "}
    print(f"wildseg3d check-gpu (profile {profile})", file=out)
    for it in items:
        req = "" if it.required else " (optional)"
        print(f"  [{tag.get(it.status, it.status)}] {it.name}{req}: {it.detail}", file=out)
    failed = [it for it in items if it.failed]
    if failed:
        print("\nmissing or broken for this profile:", file=out)
        for it in failed:
            print(f"  - {it.name}: {it.fix or it.detail}", file=out)
        print("\nSee docs/gpu_setup.md. Without a GPU, the CPU profile needs none of this: "
              "config/rgbd_cpu.yaml (backend rgbd, segmenter classical).", file=out)
        return 1
    print("\nall required pieces are present.", file=out)
    return 0


def _main(args) -> int:
    sam2_ckpt, d3_ckpt, cfg, device = args.sam2_checkpoint, args.dust3r_checkpoint, args.sam2_config, args.device
    if args.params:  # read checkpoint paths etc. from a (layered) parameter file
        import yaml
        data = yaml.safe_load(Path(args.params).read_text()) or {}
        p = {}
        for node in data.values():
            p.update((node or {}).get("ros__parameters", {}) if isinstance(node, dict) else {})
        sam2_ckpt = sam2_ckpt or p.get("sam2.checkpoint") or None
        d3_ckpt = d3_ckpt or p.get("dust3r.checkpoint") or None
        cfg = p.get("sam2.config", cfg) if args.sam2_config == DEFAULT_CFG else cfg
        device = p.get("device", device) if args.device is None else device
    device = device or "cuda"
    items = run_checks(args.profile, device, sam2_ckpt, d3_ckpt, cfg, args.sam2_sha256, args.dust3r_sha256,
                       not args.no_hash)
    if args.json:
        failed = any(it.failed for it in items)
        print(json.dumps({"profile": args.profile, "ok": not failed, "items": [asdict(it) for it in items]}, indent=2))
        return 1 if failed else 0
    return report(items, args.profile)


DEFAULT_CFG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def add_check_gpu_parser(sub):
    c = sub.add_parser("check-gpu", help="check the GPU set-up: torch/torchvision/sam2/dust3r/mast3r, CUDA device, "
                                         "checkpoint files (exit 0 when complete)",
                       description="Check that the packages, the CUDA device and the checkpoint files the chosen "
                                   "profile needs are present, and print what is missing with the fix. Exit code 0 "
                                   "when complete, 1 otherwise.",
                       epilog="official checkpoints (download URLs; no published sha256 could be verified, so "
                              "record yours with `sha256sum FILE > FILE.sha256` and it is checked from then on):\n"
                              + "\n".join(f"  {n}\n      {v['url']}" for n, v in KNOWN_CHECKPOINTS.items()),
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    c.add_argument("--profile", choices=sorted(PROFILES), default="dust3r_sam2_gpu",
                   help="what must be present (default dust3r_sam2_gpu; rgbd_cpu needs no GPU or checkpoint)")
    c.add_argument("--sam2-checkpoint", help="SAM2 checkpoint file (e.g. ~/ckpt/sam2.1_hiera_tiny.pt)")
    c.add_argument("--sam2-config", default=DEFAULT_CFG, help="SAM2 config name in the sam2 package "
                                                               f"(default {DEFAULT_CFG})")
    c.add_argument("--dust3r-checkpoint", help="DUSt3R/MASt3R checkpoint .pth file or save_pretrained folder")
    c.add_argument("--sam2-sha256", help="expected sha256 of the SAM2 checkpoint")
    c.add_argument("--dust3r-sha256", help="expected sha256 of the DUSt3R/MASt3R checkpoint")
    c.add_argument("--params", help="read sam2.checkpoint / dust3r.checkpoint / sam2.config / device from a ROS "
                                    "parameter YAML (e.g. config/dust3r_sam2_gpu.yaml)")
    c.add_argument("--device", default=None, help="torch device to check (default cuda)")
    c.add_argument("--no-hash", action="store_true", help="skip sha256 (large files take a few seconds)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_main)
    return c


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="wildseg3d")
    sp = ap.add_subparsers(dest="cmd", required=True)
    add_check_gpu_parser(sp)
    a = ap.parse_args(["check-gpu"] + sys.argv[1:])
    sys.exit(a.func(a))
