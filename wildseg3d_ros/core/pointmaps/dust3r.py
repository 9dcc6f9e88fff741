"""DUSt3R / MASt3R reconstruction backend (pairwise pointmaps from a pretrained network).

Uses NAVER's code when it is importable, licensed CC BY-NC-SA 4.0 (non-commercial): the
``dust3r`` package of the cloned repository first, else ``mini_dust3r`` (PyPI ``mini-dust3r``, a
packaging of the same DUSt3R code with the same module layout)::

    git clone --recursive https://github.com/naver/dust3r      # (and/or naver/mast3r)
    pip install -r dust3r/requirements.txt
    export PYTHONPATH=$PWD/dust3r:$PYTHONPATH                  # mast3r: $PWD/mast3r too
    # or, DUSt3R only, without its UI dependencies (gradio, rerun):
    pip install --no-deps mini-dust3r==0.1.2 && pip install einops jaxtyping beartype huggingface_hub safetensors

Nothing of their code is vendored here; this module calls their public API:
``dust3r.model.AsymmetricCroCo3DStereo`` (or ``mast3r.model.AsymmetricMASt3R``),
``dust3r.image_pairs.make_pairs``, ``dust3r.inference.inference`` and
``dust3r.utils.device.collate_with_cat`` (``mini_dust3r.*`` mirror them).

Checkpoints: a ``.pth`` file as released by NAVER, a ``save_pretrained`` folder, or a Hugging
Face hub id (``naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt``) resolved through the local hub
cache by :func:`wildseg3d_ros.core.checkpoints.resolve_checkpoint` (downloaded into it when
online; ``HF_HUB_OFFLINE=1`` honoured).  ``.pth`` files store an ``argparse.Namespace`` (``ckpt['args']``)
whose ``model`` string is a constructor call such as ``AsymmetricCroCo3DStereo(enc_depth=24, ...)``.
Upstream ``load_model`` ``eval()``s that string after an unrestricted unpickling; here the file is
read with ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed, and
the string is parsed with :mod:`ast`: a single call of an allow-listed class with literal keyword
arguments (``inf`` allowed), nothing else.

Images are pre-processed like ``dust3r.utils.image.load_images`` (re-implemented for in-memory
arrays): ``size=512`` resizes the long side to 512 and centre-crops both sides to multiples of 16
(4:3 for square inputs unless ``square_ok``); ``size=224`` resizes the short side to 224 and
centre-crops a square.  The intrinsics of every keyframe are carried through the resize/crop
(``last_K``, and ``PairwisePredictions.intrinsics``), and the network-resolution RGB images are
kept (``last_rgb``, and ``PairwisePredictions.images``).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..types import Keyframe, PairwisePredictions
from ..errors import BackendError, CancelFn, ProgressFn, check_cancel, report
from .base import Pair, PointmapBackend

INSTALL_HINT = ("clone it and put it on PYTHONPATH: git clone --recursive https://github.com/naver/dust3r; "
                "pip install -r dust3r/requirements.txt; export PYTHONPATH=/path/to/dust3r:$PYTHONPATH "
                "(MASt3R: the same with https://github.com/naver/mast3r), or for DUSt3R: pip install --no-deps "
                "mini-dust3r==0.1.2 && pip install einops jaxtyping beartype huggingface_hub safetensors. "
                "Licence: CC BY-NC-SA 4.0 (non-commercial use only)")

#: packages providing DUSt3R's modules, in the order they are tried
DUST3R_PACKAGES = ("dust3r", "mini_dust3r")

#: classes a checkpoint's ``args.model`` string may construct -> (module, class); ``dust3r.*``
#: modules are looked up in :data:`DUST3R_PACKAGES` order
ALLOWED_MODEL_CLASSES = {
    "AsymmetricCroCo3DStereo": ("dust3r.model", "AsymmetricCroCo3DStereo"),
    "AsymmetricMASt3R": ("mast3r.model", "AsymmetricMASt3R"),
}


def dust3r_module(sub: str):
    """``dust3r.<sub>`` from the first importable package of :data:`DUST3R_PACKAGES`."""
    import contextlib
    import importlib
    import sys

    errors = []
    for pkg in DUST3R_PACKAGES:
        try:
            # their croco module prints a RoPE notice on stdout at import: keep stdout for results
            with contextlib.redirect_stdout(sys.stderr):
                return importlib.import_module(f"{pkg}.{sub}")
        except ImportError as exc:
            if getattr(exc, "name", None) not in (pkg, f"{pkg}.{sub}"):
                errors.append(f"{pkg}: {exc}")  # the package is there but one of its imports fails
                continue
            errors.append(f"{pkg}: not installed")
    raise BackendError(f"no DUSt3R implementation is importable ({'; '.join(errors)}); {INSTALL_HINT}")
_LITERAL_NAMES = {"inf": math.inf, "nan": math.nan, "true": True, "false": False, "none": None}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def parse_model_spec(spec: str) -> Tuple[str, dict]:
    """Parse a checkpoint ``args.model`` string into (class name, keyword arguments) safely.

    Accepts exactly one call ``Name(kw=literal, ...)`` with ``Name`` in
    :data:`ALLOWED_MODEL_CLASSES`; literals are Python literals plus ``inf``.  Applies the same
    rewrites as upstream ``load_model``: ``ManyAR_PatchEmbed`` -> ``PatchEmbedDust3R`` and
    ``landscape_only=False``.  Raises :class:`BackendError` on anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise BackendError(f"checkpoint model description is not a non-empty string: {spec!r}")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as exc:
        raise BackendError(f"cannot parse checkpoint model description {spec!r}: {exc}") from exc
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise BackendError(f"checkpoint model description must be a constructor call, got {spec!r}")
    name = call.func.id
    if name not in ALLOWED_MODEL_CLASSES:
        raise BackendError(f"checkpoint wants to build {name!r}; only {sorted(ALLOWED_MODEL_CLASSES)} "
                           "are allowed")
    if call.args:
        raise BackendError(f"checkpoint model description has positional arguments: {spec!r}")

    class _Names(ast.NodeTransformer):
        def visit_Name(self, node):
            if node.id.lower() in _LITERAL_NAMES:
                return ast.copy_location(ast.Constant(_LITERAL_NAMES[node.id.lower()]), node)
            raise BackendError(f"checkpoint model description uses the name {node.id!r}; only literals "
                               "(and inf) are allowed")

    kwargs = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise BackendError(f"checkpoint model description uses **kwargs: {spec!r}")
        node = _Names().visit(kw.value)
        try:
            kwargs[kw.arg] = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError) as exc:
            raise BackendError(f"checkpoint model argument {kw.arg}= is not a literal: "
                               f"{ast.unparse(kw.value)}") from exc
    if kwargs.get("patch_embed_cls") == "ManyAR_PatchEmbed":
        kwargs["patch_embed_cls"] = "PatchEmbedDust3R"
    kwargs["landscape_only"] = False
    return name, kwargs


def load_checkpoint(path: str) -> Tuple[str, dict, dict]:
    """Read a DUSt3R/MASt3R ``.pth`` with ``torch.load(weights_only=True)`` allowing only
    ``argparse.Namespace``; returns (class name, constructor kwargs, state dict)."""
    import torch

    if not os.path.isfile(path):
        raise BackendError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BackendError(f"refusing to load {path}: it contains Python objects other than tensors, "
                           f"containers and argparse.Namespace (weights-only loading failed: "
                           f"{str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise BackendError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise BackendError(f"{path} is not a DUSt3R/MASt3R training checkpoint (expects keys 'args' and "
                           "'model'); for a save_pretrained folder pass the folder")
    args = ckpt["args"]
    spec = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    name, kwargs = parse_model_spec(spec)
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise BackendError(f"{path}: 'model' is not a state dict")
    return name, kwargs, state


def _import_model_class(name: str):
    mod_name, cls_name = ALLOWED_MODEL_CLASSES[name]
    if mod_name.startswith("dust3r."):
        return getattr(dust3r_module(mod_name.split(".", 1)[1]), cls_name)
    try:
        mod = __import__(mod_name, fromlist=[cls_name])
    except ImportError as exc:
        pkg = mod_name.split(".")[0]
        raise BackendError(f"the '{pkg}' package is not importable ({exc}); {INSTALL_HINT}") from exc
    return getattr(mod, cls_name)


def _require_dust3r():
    for sub in ("image_pairs", "inference", "utils.device"):
        dust3r_module(sub)


def load_model(path: str, model_class: str = "auto"):
    """Build a model from a ``.pth`` checkpoint, a ``save_pretrained`` folder or a Hugging Face hub
    id (resolved through the local hub cache, see :mod:`wildseg3d_ros.core.checkpoints`)."""
    from ..checkpoints import resolve_checkpoint

    path = resolve_checkpoint(path, "dust3r", error=BackendError)
    if os.path.isfile(path):
        name, kwargs, state = load_checkpoint(path)
        cls = _import_model_class(name)
        net = cls(**kwargs)
        res = net.load_state_dict(state, strict=False)
        missing = list(getattr(res, "missing_keys", []))
        if missing:
            warnings.warn(f"{path}: {len(missing)} model weights missing from the checkpoint "
                          f"(e.g. {missing[:3]})")
        return net
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise BackendError(f"{path} is a folder without config.json (not a save_pretrained folder)")
    if model_class == "auto":
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        model_class = "mast3r" if ("desc_mode" in cfg or "mast3r" in os.path.basename(path.rstrip("/")).lower()) \
            else "dust3r"
    name = "AsymmetricMASt3R" if model_class == "mast3r" else "AsymmetricCroCo3DStereo"
    cls = _import_model_class(name)
    return cls.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Pre-processing (dust3r.utils.image.load_images on in-memory arrays)
# ----------------------------------------------------------------------------------------------
@dataclass
class Preprocessed:
    img: "object"  # (1, 3, h, w) float tensor in [-1, 1]
    rgb: np.ndarray  # (h, w, 3) uint8 at network resolution
    K: np.ndarray  # intrinsics adjusted to the resize + crop
    scale: Tuple[float, float]  # (sx, sy) of the resize
    crop: Tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image


def preprocess_image(rgb: np.ndarray, K: Optional[np.ndarray], size: int = 512, square_ok: bool = False,
                     patch_size: int = 16) -> Preprocessed:
    """Resize / centre-crop one RGB array exactly as ``load_images`` does and adjust ``K``."""
    import PIL.Image
    import torch

    if size not in (224, 512):
        warnings.warn(f"DUSt3R models are trained at 224 or 512, got size={size}")
    img = PIL.Image.fromarray(np.ascontiguousarray(np.asarray(rgb)[..., :3]).astype(np.uint8))
    W1, H1 = img.size
    long_edge = round(size * max(W1 / H1, H1 / W1)) if size == 224 else size
    S = max(W1, H1)
    interp = PIL.Image.LANCZOS if S > long_edge else PIL.Image.BICUBIC
    new_size = tuple(int(round(x * long_edge / S)) for x in (W1, H1))
    img = img.resize(new_size, interp)
    W, H = img.size
    cx, cy = W // 2, H // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw = ((2 * cx) // patch_size) * patch_size / 2
        halfh = ((2 * cy) // patch_size) * patch_size / 2
        if not square_ok and W == H:
            halfh = 3 * halfw / 4
        box = (cx - halfw, cy - halfh, cx + halfw, cy + halfh)
    ibox = tuple(int(round(b)) for b in box)  # what PIL's crop uses
    img = img.crop(ibox)
    sx, sy = W / W1, H / H1
    Kn = None
    if K is not None:
        Kn = np.array(K, dtype=np.float64).copy()
        Kn[0, 0] *= sx
        Kn[1, 1] *= sy
        Kn[0, 1] *= sx
        # pixel centres at integers: x' = (x + 0.5) * s - 0.5, then shift by the crop origin
        Kn[0, 2] = (Kn[0, 2] + 0.5) * sx - 0.5 - ibox[0]
        Kn[1, 2] = (Kn[1, 2] + 0.5) * sy - 0.5 - ibox[1]
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return Preprocessed(img=t[None], rgb=arr, K=Kn, scale=(sx, sy), crop=ibox)


def preprocess_keyframes(keyframes: Sequence[Keyframe], size: int = 512, square_ok: bool = False,
                         patch_size: int = 16) -> Tuple[List[dict], List[Preprocessed]]:
    """``load_images``-format view dicts (img, true_shape, idx, instance) + preprocessing info."""
    views, infos = [], []
    for n, kf in enumerate(keyframes):
        p = preprocess_image(kf.rgb, kf.K, size=size, square_ok=square_ok, patch_size=patch_size)
        h, w = p.rgb.shape[:2]
        views.append(dict(img=p.img, true_shape=np.int32([[h, w]]), idx=n, instance=str(n)))
        infos.append(p)
    return views, infos


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return (oom_cls is not None and isinstance(exc, oom_cls)) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------------
class Dust3rBackend(PointmapBackend):
    """Pairwise pointmaps from a DUSt3R / MASt3R network.

    ``model``: a local checkpoint path (``.pth`` or ``save_pretrained`` folder) or an already
    built ``AsymmetricCroCo3DStereo`` module.  ``model_class``: 'auto' | 'dust3r' | 'mast3r' (for
    folders).  ``image_size``: 512 or 224.  ``device``: 'auto' | 'cuda' | 'cpu' | ...
    ``batch_size``: pairs per forward pass (halved automatically on CUDA out-of-memory).
    ``scene_graph``: dust3r scene graph used when ``predict_pairs`` gets no pairs.
    """

    name = "dust3r"

    def __init__(self, model=None, model_class: str = "auto", image_size: int = 512,
                 device: str = "auto", batch_size: int = 8, scene_graph: str = "complete",
                 square_ok: bool = False, chunk_pairs: int = 32, verbose: bool = False):
        if model is None or (isinstance(model, str) and not model.strip()):
            raise BackendError("dust3r backend needs a model: a local .pth checkpoint, a save_pretrained folder or "
                               "a Hugging Face hub id (e.g. naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt)")
        if isinstance(model, (str, os.PathLike)):
            from ..checkpoints import resolve_checkpoint

            model = resolve_checkpoint(str(model), "dust3r", error=BackendError)  # hub id -> cached path
        _require_dust3r()
        self._model_src = model
        self._model = None if isinstance(model, str) else model
        self.model_class = model_class
        self.image_size = int(image_size)
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.scene_graph = scene_graph
        self.square_ok = bool(square_ok)
        self.chunk_pairs = max(1, int(chunk_pairs))
        self.verbose = bool(verbose)
        #: per-keyframe intrinsics / RGB at network resolution, from the last run
        self.last_K: List[Optional[np.ndarray]] = []
        self.last_rgb: List[np.ndarray] = []
        self.last_preprocessed: List[Preprocessed] = []

    # -- model -------------------------------------------------------------------------------
    def _resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(self.device)

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self._model_src, self.model_class)
        return self._model

    def load(self):
        """Load the model now (otherwise at the first ``predict_pairs``) and move it to the device."""
        m = self.model
        m.to(self._resolve_device()).eval()
        return m

    # -- inference ---------------------------------------------------------------------------
    def _run(self, image_pairs, model, device, cancel, progress):
        inference = dust3r_module("inference").inference
        collate_with_cat = dust3r_module("utils.device").collate_with_cat

        chunk = max(self.chunk_pairs, self.batch_size)
        results = []
        for start in range(0, len(image_pairs), chunk):
            check_cancel(cancel)
            part = image_pairs[start:start + chunk]
            bs = self.batch_size
            while True:
                try:
                    results.append(inference(part, model, device, batch_size=bs, verbose=self.verbose))
                    break
                except Exception as exc:  # noqa: BLE001 - CUDA OOM types differ across torch versions
                    if not _is_oom(exc):
                        raise
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if bs == 1:
                        raise BackendError(f"dust3r backend: out of GPU memory even with batch_size=1 at "
                                           f"image size {self.image_size}; use image_size=224, fewer "
                                           "keyframes, a sparser scene_graph (swin-k) or a larger GPU") from exc
                    bs = max(1, bs // 2)
                    warnings.warn(f"dust3r backend: CUDA out of memory, retrying with batch_size={bs}")
            self.batch_size = min(self.batch_size, bs)
            report(progress, 0.1 + 0.9 * min(start + chunk, len(image_pairs)) / len(image_pairs),
                   f"dust3r: {min(start + chunk, len(image_pairs))}/{len(image_pairs)} pairs")
        if len(results) == 1:
            return results[0]
        same = all(r["view1"]["img"].shape[-2:] == results[0]["view1"]["img"].shape[-2:] for r in results)
        return collate_with_cat(results, lists=not same)

    def predict_pairs(self, keyframes: Sequence[Keyframe], pairs: Optional[Sequence[Pair]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelFn] = None) -> PairwisePredictions:
        d3_make_pairs = dust3r_module("image_pairs").make_pairs

        kfs = list(keyframes)
        n = len(kfs)
        if n < 2:
            raise BackendError(f"dust3r backend: need at least 2 keyframes, got {n}")
        check_cancel(cancel)
        views, infos = preprocess_keyframes(kfs, self.image_size, self.square_ok,
                                            patch_size=int(getattr(self.model, "patch_size", 16) or 16))
        self.last_preprocessed = infos
        self.last_K = [p.K for p in infos]
        self.last_rgb = [p.rgb for p in infos]
        if pairs is None:
            image_pairs = d3_make_pairs(views, scene_graph=self.scene_graph, prefilter=None, symmetrize=True)
        else:
            image_pairs = [(views[i], views[j]) for i, j in self._check_pairs(n, pairs)]
        if not image_pairs:
            raise BackendError(f"dust3r backend: scene graph {self.scene_graph!r} gave no pairs for {n} views")
        report(progress, 0.1, f"dust3r: {len(image_pairs)} pairs at {self.image_size}")
        device = self._resolve_device()
        model = self.load()
        out = self._run(image_pairs, model, device, cancel, progress)
        known = all(K is not None for K in self.last_K) and all(kf.K_known for kf in kfs)
        Ks = np.stack(self.last_K) if known else None
        return PairwisePredictions.from_dust3r(out, images=np.stack(self.last_rgb), intrinsics=Ks, metric=False)
