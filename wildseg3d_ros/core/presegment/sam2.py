"""SAM2 segmentation backend (the paper's segmenter), built on the ``sam2`` package API.

* :meth:`Sam2Segmenter.automatic_masks` -- ``SAM2AutomaticMaskGenerator`` on one view, painted
  into a non-overlapping (H, W) int32 label map (large masks first, smaller ones on top).
* :meth:`Sam2Segmenter.build_mask_cache` -- the paper's mask cache: automatic masks on a
  reference keyframe, each mask seeds an object id that ``SAM2VideoPredictor`` tracks through all
  keyframes (the keyframes form a pseudo-video, forward and backward from the reference).  Beyond
  the paper, objects not visible in the reference view are picked up from automatic masks of the
  other keyframes: masks not covered by tracked objects are associated across views through the
  aligned pointmaps (:func:`~wildseg3d_ros.core.mask_cache.associate_masks_3d` when
  present) and then tracked too (seeded on the view where they are largest).  Soft masks S are the
  sigmoid of the winning object's mask logit.
* :meth:`Sam2Segmenter.refine` -- ``SAM2ImagePredictor.predict`` with all clicks (labels 1/0) and
  the previous mask as ``mask_input`` (the low-resolution logits of the previous prediction when
  the prior is the mask we returned last, else the prior mask converted to logits),
  ``multimask_output=False``.

One model (built with ``build_sam2_video_predictor``) serves the image predictor, the automatic
mask generator and the video predictor.  ``checkpoint`` is a local ``.pt`` or a Hugging Face
hub id (``facebook/sam2.1-hiera-tiny``) resolved through the local hub cache
(:mod:`wildseg3d_ros.core.checkpoints`; downloaded into it only when online and
``HF_HUB_OFFLINE`` is not set); a missing package or checkpoint raises one
:class:`~wildseg3d_ros.core.errors.SegmenterError` saying what to install or where to put
the file.  ``random_init=True`` (CI/tests only) builds the real
architecture from the package's config with seeded random weights instead of loading a
checkpoint.  ``image_size`` overrides the model's input resolution (multiple of 32; default: the
config's 1024) which makes CPU runs on small images cheap.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..mask_cache import object_table
from ..types import MaskCache
from ..errors import CancelFn, ProgressFn, SegmenterError, check_cancel, report
from .base import Segmenter, as_uv
from ..geometry import finite_points

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
CHECKPOINT_NAMES = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
    "sam2_hiera_t": "sam2_hiera_tiny.pt",
    "sam2_hiera_s": "sam2_hiera_small.pt",
    "sam2_hiera_b+": "sam2_hiera_base_plus.pt",
    "sam2_hiera_l": "sam2_hiera_large.pt",
}
INSTALL_HINT = ("install it with `SAM2_BUILD_CUDA=0 pip install sam2` (CPU; drop SAM2_BUILD_CUDA=0 "
                "to build the CUDA extension) together with a torchvision matching your torch "
                "(`pip install torchvision`), or use segmenter 'classical'")
_PRIOR_LOGIT = 8.0  # logit magnitude used when a boolean prior mask is fed to SAM2 as mask_input


def _checkpoint_hint(config: str) -> str:
    stem = os.path.splitext(os.path.basename(config))[0]
    fname = CHECKPOINT_NAMES.get(stem, "<model>.pt")
    return (f"download {fname} from https://github.com/facebookresearch/sam2#download-checkpoints "
            f"(or the Hugging Face repo facebook/{stem.replace('_hiera_', '-hiera-')}) and pass its "
            "path as checkpoint (ROS parameter sam2_checkpoint); it is read, never written or "
            "downloaded")


def _import_sam2():
    """Import the sam2 pieces; any failure becomes one SegmenterError with the install hint."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency of sam2
        raise SegmenterError(f"the 'sam2' segmenter needs torch ({exc}); {INSTALL_HINT}") from exc
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        raise SegmenterError(
            f"the 'sam2' segmenter needs torchvision, which cannot be imported ({exc}); "
            f"{INSTALL_HINT}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
            from sam2.build_sam import build_sam2_video_predictor
            from sam2.sam2_image_predictor import SAM2ImagePredictor
    except Exception as exc:
        raise SegmenterError(
            f"the 'sam2' Python package is not importable ({exc}); {INSTALL_HINT}") from exc
    return build_sam2_video_predictor, SAM2ImagePredictor, SAM2AutomaticMaskGenerator


def _has_sam2_cuda_ext() -> bool:
    try:
        importlib.import_module("sam2._C")
        return True
    except Exception:
        return False


def _config_exists(config: str) -> bool:
    import sam2
    return os.path.isfile(os.path.join(sam2.__path__[0], config))


def _available_configs() -> List[str]:
    import sam2
    root = sam2.__path__[0]
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, "configs")):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith(".yaml")]
    return sorted(out)


def _paint_masks(masks: List[np.ndarray], shape, min_area: int) -> Tuple[np.ndarray, List[int]]:
    """Paint boolean masks (largest first, smaller on top) into a compact int32 label map.

    Returns (labels, kept) where ``kept[k-1]`` is the index in ``masks`` of label k."""
    H, W = shape
    lab = np.zeros((H, W), np.int32)
    if not masks:
        return lab, []
    areas = np.array([int(m.sum()) for m in masks])
    order = np.argsort(-areas, kind="stable")
    for rank, i in enumerate(order):
        lab[masks[i]] = rank + 1
    # drop masks mostly overwritten, relabel compactly
    counts = np.bincount(lab.ravel(), minlength=len(masks) + 1)
    keep_rank = np.nonzero(counts[1:] >= max(1, min_area))[0] + 1
    remap = np.zeros(len(masks) + 1, np.int32)
    remap[keep_rank] = np.arange(1, len(keep_rank) + 1, dtype=np.int32)
    return remap[lab], [int(order[r - 1]) for r in keep_rank]


class Sam2Segmenter(Segmenter):
    """SAM2 backend (see module docstring).

    Parameters
    ----------
    config: the sam2 package's config name, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``.
    checkpoint: path to the matching ``.pt`` file (read only, ``torch.load(weights_only=True)``).
    device: ``'cpu'``, ``'cuda'``, ``'cuda:0'`` ... or ``'auto'`` (cuda when available).
    points_per_side / points_per_batch / pred_iou_thresh / stability_score_thresh /
    box_nms_thresh: ``SAM2AutomaticMaskGenerator`` options.
    image_size: model input resolution override (multiple of 32) or None for the config's.
    min_mask_area: masks (and tracked objects per view) smaller than this many pixels are dropped.
    ref_view: reference keyframe of the mask cache (None: the middle keyframe).
    discover_new: pick up objects not visible in the reference view from the other keyframes.
    new_coverage: an automatic mask of another view is "new" when at most this fraction of it is
        covered by already tracked objects.
    track_new: track the newly discovered objects with the video predictor (else keep the 3D
        association of their automatic masks only).
    random_init / seed: build with seeded random weights (tests / CI only, masks are garbage).
    num_threads: torch CPU threads to use during calls (None: leave torch's setting).
    """

    name = "sam2"

    def __init__(self, config: str = DEFAULT_CONFIG, checkpoint: Optional[str] = None,
                 device: str = "auto", points_per_side: int = 16, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.7, stability_score_thresh: float = 0.9,
                 box_nms_thresh: float = 0.7, image_size: Optional[int] = None,
                 min_mask_area: int = 50, ref_view: Optional[int] = None,
                 discover_new: bool = True, new_coverage: float = 0.3, track_new: bool = True,
                 verify_tracking: bool = True, verify_min_agree: float = 0.3,
                 random_init: bool = False, seed: int = 0, num_threads: Optional[int] = None,
                 jpeg_quality: int = 95, unlabelled_soft: float = 0.1):
        build_video, ImagePredictor, MaskGenerator = _import_sam2()
        import torch

        self.config = str(config)
        self.checkpoint = None if checkpoint in (None, "") else os.path.expanduser(str(checkpoint))
        self.random_init = bool(random_init)
        self.min_mask_area = int(min_mask_area)
        self.ref_view = ref_view
        self.discover_new = bool(discover_new)
        self.new_coverage = float(new_coverage)
        self.track_new = bool(track_new)
        self.verify_tracking = bool(verify_tracking)
        self.verify_min_agree = float(verify_min_agree)
        self.num_threads = num_threads
        self.jpeg_quality = int(jpeg_quality)
        self.unlabelled_soft = float(unlabelled_soft)
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SegmenterError(f"sam2 device {device!r} requested but CUDA is not available; "
                                 "use device 'cpu' or 'auto'")

        if not _config_exists(self.config):
            raise SegmenterError(
                f"unknown SAM2 config {self.config!r}; the installed sam2 package provides: "
                f"{', '.join(_available_configs())}")
        if not self.random_init and self.checkpoint is not None and not os.path.exists(self.checkpoint):
            from ..checkpoints import SAM2_HUB_CONFIGS, parse_hub_id, resolve_checkpoint

            hub = parse_hub_id(str(checkpoint))
            if hub is not None:  # a Hugging Face hub id: the .pt from the local hub cache (or downloaded)
                want = SAM2_HUB_CONFIGS.get(hub[0])
                if want is not None and want != self.config:
                    raise SegmenterError(f"SAM2 checkpoint {hub[0]} needs config {want} (sam2.config / "
                                         f"--sam2-config), not {self.config}")
                self.checkpoint = resolve_checkpoint(str(checkpoint), "sam2", error=SegmenterError)
        if not self.random_init:
            if self.checkpoint is None:
                raise SegmenterError(f"no SAM2 checkpoint given for config {self.config}: "
                                     + _checkpoint_hint(self.config))
            if not os.path.isfile(self.checkpoint):
                raise SegmenterError(f"SAM2 checkpoint not found at {self.checkpoint}: "
                                     + _checkpoint_hint(self.config))
        overrides = []
        if image_size is not None:
            image_size = int(image_size)
            if image_size < 64 or image_size % 32:
                raise SegmenterError(f"sam2 image_size must be a multiple of 32 >= 64, got {image_size}")
            overrides.append(f"++model.image_size={image_size}")

        with self._threads(), self._quiet():
            rng_state = torch.random.get_rng_state()
            try:
                if self.random_init:
                    torch.manual_seed(int(seed))
                ckpt = None if self.random_init else self.checkpoint
                try:
                    model = build_video(self.config, ckpt, device=self.device,
                                        hydra_overrides_extra=overrides)
                except FileNotFoundError as exc:
                    raise SegmenterError(f"SAM2 checkpoint not readable at {ckpt}: {exc}") from exc
                except (RuntimeError, KeyError, Exception) as exc:
                    if isinstance(exc, SegmenterError):
                        raise
                    raise SegmenterError(
                        f"cannot build SAM2 from config {self.config} and checkpoint {ckpt} "
                        f"({type(exc).__name__}: {exc}); check that the checkpoint matches the "
                        f"config (sam2 vs sam2.1, tiny/small/base+/large)") from exc
            finally:
                if self.random_init:
                    torch.random.set_rng_state(rng_state)
        if not _has_sam2_cuda_ext():
            # the hole-filling post-processing needs the optional CUDA extension (sam2._C)
            model.fill_hole_area = 0
        self.model = model
        self.image_size = int(model.image_size)
        s = self.image_size
        feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        with self._quiet():  # SAM2Transforms uses torch.jit.script (FutureWarning)
            self.predictor = ImagePredictor(model)
            self.mask_generator = MaskGenerator(
                model, points_per_side=int(points_per_side),
                points_per_batch=int(points_per_batch), pred_iou_thresh=float(pred_iou_thresh),
                stability_score_thresh=float(stability_score_thresh),
                box_nms_thresh=float(box_nms_thresh), output_mode="binary_mask")
        # the image predictor hard-codes the 1024-input feature sizes
        self.predictor._bb_feat_sizes = feat_sizes
        self.mask_generator.predictor._bb_feat_sizes = feat_sizes
        self._image_key: Optional[str] = None
        self._last_mask: Optional[np.ndarray] = None
        self._last_logits: Optional[np.ndarray] = None
        self.last_timings: Dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _threads(self):
        import torch
        if self.num_threads is None:
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(int(self.num_threads))
        try:
            yield
        finally:
            torch.set_num_threads(old)

    @contextlib.contextmanager
    def _quiet(self):
        """Silence sam2's warnings and tqdm progress bars (they would flood a ROS log)."""
        mods = [importlib.import_module(m) for m in
                ("sam2.sam2_video_predictor", "sam2.utils.misc")]
        saved = [getattr(m, "tqdm", None) for m in mods]
        for m in mods:
            if hasattr(m, "tqdm"):
                m.tqdm = lambda it, *a, **k: it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            for m, t in zip(mods, saved):
                if t is not None:
                    m.tqdm = t

    @staticmethod
    def _rgb(rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise SegmenterError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def _set_image(self, rgb: np.ndarray) -> None:
        key = hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest() + str(rgb.shape)
        if key != self._image_key:
            self.predictor.set_image(rgb)
            self._image_key = key
            self._last_mask = None
            self._last_logits = None

    # ------------------------------------------------------------------ automatic masks
    def _generate(self, rgb: np.ndarray) -> List[dict]:
        import torch
        with self._threads(), self._quiet(), torch.inference_mode():
            return self.mask_generator.generate(self._rgb(rgb))

    def automatic_masks(self, rgb, pts=None, valid=None) -> np.ndarray:
        rgb = self._rgb(rgb)
        recs = self._generate(rgb)
        lab, _ = _paint_masks([np.asarray(r["segmentation"], bool) for r in recs], rgb.shape[:2],
                              self.min_mask_area)
        return lab

    # ------------------------------------------------------------------ refine
    def _prior_logits(self, prior: np.ndarray) -> np.ndarray:
        """Boolean (H, W) prior -> (1, s/4, s/4) float32 logits in SAM2's (squashed) input frame."""
        import torch
        import torch.nn.functional as F
        low = self.image_size // 4
        t = torch.from_numpy(prior.astype(np.float32))[None, None]
        t = F.interpolate(t, size=(low, low), mode="bilinear", align_corners=False, antialias=True)
        return ((t[0].numpy() * 2.0 - 1.0) * _PRIOR_LOGIT).astype(np.float32)

    def refine(self, rgb, pos_uv, neg_uv, prior_mask=None, pts=None, valid=None) -> np.ndarray:
        import torch
        rgb = self._rgb(rgb)
        H, W = rgb.shape[:2]
        pos = as_uv(pos_uv)
        neg = as_uv(neg_uv)
        prior = None if prior_mask is None else np.asarray(prior_mask, bool)
        if prior is not None and prior.shape != (H, W):
            raise SegmenterError(f"prior mask shape {prior.shape} does not match image {(H, W)}")
        if len(pos) == 0 and (prior is None or not prior.any()):
            return np.zeros((H, W), bool)
        with self._threads(), self._quiet(), torch.inference_mode():
            self._set_image(rgb)
            mask_input = None
            if prior is not None and prior.any():
                if self._last_mask is not None and np.array_equal(prior, self._last_mask):
                    mask_input = self._last_logits
                else:
                    mask_input = self._prior_logits(prior)
            coords = np.concatenate([pos, neg], 0).astype(np.float32)
            labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]).astype(np.int32)
            if len(coords) == 0:
                coords, labels = None, None
            masks, _, low = self.predictor.predict(point_coords=coords, point_labels=labels,
                                                   mask_input=mask_input,
                                                   multimask_output=False)
        mask = np.asarray(masks[0] > 0.5, bool)
        self._last_mask = mask.copy()
        self._last_logits = np.asarray(low[:1], np.float32)
        return mask

    # ------------------------------------------------------------------ mask cache
    def _write_frames(self, rgb: np.ndarray) -> str:
        from PIL import Image
        d = tempfile.mkdtemp(prefix="wildseg3d_sam2_")
        for v in range(rgb.shape[0]):
            Image.fromarray(self._rgb(rgb[v])).save(os.path.join(d, f"{v:05d}.jpg"),
                                                    quality=self.jpeg_quality)
        return d

    def _track(self, state, seeds: Dict[int, Tuple[int, np.ndarray]], V: int, H: int, W: int,
               cancel: Optional[CancelFn]) -> Dict[int, np.ndarray]:
        """Track seeds {obj_id: (frame, bool mask)} through all frames, both directions.

        Returns {obj_id: (V, H, W) float32 logits} (-inf-like where never predicted)."""
        vp = self.model
        vp.reset_state(state)
        logits = {oid: np.full((V, H, W), -20.0, np.float32) for oid in seeds}
        for oid, (frame, mask) in seeds.items():
            vp.add_new_mask(state, frame_idx=int(frame), obj_id=int(oid), mask=mask)
        start = min(f for f, _ in seeds.values())
        end = max(f for f, _ in seeds.values())

        def collect(gen):
            for fidx, obj_ids, vmasks in gen:
                check_cancel(cancel)
                arr = vmasks[:, 0].float().cpu().numpy()
                for k, oid in enumerate(obj_ids):
                    logits[int(oid)][fidx] = arr[k]

        # forward from the earliest seed frame, then backward from the latest one
        collect(vp.propagate_in_video(state, start_frame_idx=start))
        if end > 0:
            collect(vp.propagate_in_video(state, start_frame_idx=end, reverse=True))
        return logits

    def build_mask_cache(self, rgb, pts3d, valid, progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelFn] = None, local=None) -> MaskCache:
        # SAM2 tracks its own masks through the keyframes: the per-view pre-segmentation
        # (``local``) only served DGA's soft masks
        import time
        import torch
        rgb = np.asarray(rgb)
        V, H, W = rgb.shape[:3]
        valid = np.asarray(valid, bool) if valid is not None else np.ones((V, H, W), bool)
        ref = (V // 2) if self.ref_view is None else int(self.ref_view)
        if not 0 <= ref < V:
            raise SegmenterError(f"ref_view {ref} out of range for {V} keyframes")
        timings: Dict[str, float] = {}
        objects: Dict[int, dict] = {}
        report(progress, 0.0, f"sam2: automatic masks on reference keyframe {ref}")
        t0 = time.perf_counter()
        recs = self._generate(rgb[ref])
        ref_masks = [np.asarray(r["segmentation"], bool) for r in recs]
        ref_lab, kept = _paint_masks(ref_masks, (H, W), self.min_mask_area)
        timings["automatic_ref_s"] = time.perf_counter() - t0
        check_cancel(cancel)

        seeds: Dict[int, Tuple[int, np.ndarray]] = {}
        for k, i in enumerate(kept):
            oid = k + 1
            seeds[oid] = (ref, ref_lab == oid)
            objects[oid] = {"source": "sam2_track", "seed_view": ref,
                            "score": float(recs[i].get("predicted_iou", float("nan")))}

        logits_all: Dict[int, np.ndarray] = {}
        frame_dir = None
        state = None
        try:
            if seeds or self.discover_new:
                with self._threads(), self._quiet(), torch.inference_mode():
                    t0 = time.perf_counter()
                    frame_dir = self._write_frames(rgb)
                    state = self.model.init_state(frame_dir, offload_video_to_cpu=True)
                    timings["init_state_s"] = time.perf_counter() - t0
            if seeds:
                report(progress, 0.15, f"sam2: tracking {len(seeds)} objects through {V} keyframes")
                t0 = time.perf_counter()
                with self._threads(), self._quiet(), torch.inference_mode():
                    logits_all.update(self._track(state, seeds, V, H, W, cancel))
                if self.verify_tracking:
                    self._verify(logits_all, seeds, pts3d, valid, objects)
                timings["track_ref_s"] = time.perf_counter() - t0
            labels, best = self._compose(logits_all, V, H, W)

            if self.discover_new and V > 1:
                t0 = time.perf_counter()
                new_local = np.zeros((V, H, W), np.int32)
                new_scores: Dict[Tuple[int, int], float] = {}
                for v in range(V):
                    if v == ref:
                        continue
                    check_cancel(cancel)
                    report(progress, 0.4 + 0.3 * v / V, f"sam2: automatic masks on keyframe {v}")
                    recs_v = self._generate(rgb[v])
                    masks_v = [np.asarray(r["segmentation"], bool) for r in recs_v]
                    lab_v, kept_v = _paint_masks(masks_v, (H, W), self.min_mask_area)
                    n = int(lab_v.max())
                    if n == 0:
                        continue
                    area = np.bincount(lab_v.ravel(), minlength=n + 1)
                    covered = np.bincount(lab_v[labels[v] > 0], minlength=n + 1)
                    frac = covered[1:] / np.maximum(area[1:], 1)
                    is_new = np.concatenate([[False], frac <= self.new_coverage])
                    remap = np.zeros(n + 1, np.int32)
                    new_ids = np.nonzero(is_new)[0]
                    remap[new_ids] = np.arange(1, len(new_ids) + 1, dtype=np.int32)
                    new_local[v] = remap[lab_v]
                    for j, lid in enumerate(new_ids):
                        new_scores[(v, j + 1)] = float(recs_v[kept_v[lid - 1]].get("predicted_iou", np.nan))
                timings["automatic_other_s"] = time.perf_counter() - t0
                if new_local.any():
                    new_global = self._associate(new_local, pts3d, valid)
                    next_id = (max(objects) if objects else 0) + 1
                    new_seeds: Dict[int, Tuple[int, np.ndarray]] = {}
                    assoc_masks: Dict[int, np.ndarray] = {}
                    for gid in np.unique(new_global[new_global > 0]):
                        m = new_global == gid
                        per_view = m.reshape(V, -1).sum(1)
                        sv = int(np.argmax(per_view))
                        if per_view[sv] < self.min_mask_area:
                            continue
                        oid = next_id
                        next_id += 1
                        new_seeds[oid] = (sv, m[sv])
                        assoc_masks[oid] = m
                        objects[oid] = {"source": "sam2_new_track" if self.track_new else "sam2_new_assoc",
                                        "seed_view": sv}
                    if new_seeds and self.track_new:
                        report(progress, 0.75, f"sam2: tracking {len(new_seeds)} newly found objects")
                        t0 = time.perf_counter()
                        with self._threads(), self._quiet(), torch.inference_mode():
                            new_logits = self._track(state, new_seeds, V, H, W, cancel)
                        timings["track_new_s"] = time.perf_counter() - t0
                        if self.verify_tracking:
                            self._verify(new_logits, new_seeds, pts3d, valid, objects)
                    else:
                        new_logits = {oid: np.where(m, 10.0, -10.0).astype(np.float32)
                                      for oid, m in assoc_masks.items()}
                    # newly found objects only fill pixels that no reference object claims
                    lab_new, best_new = self._compose(new_logits, V, H, W)
                    unlabelled = labels == 0
                    fill = unlabelled & (lab_new > 0)
                    best = np.where(unlabelled, np.maximum(best, best_new), best)
                    labels[fill] = lab_new[fill]
        finally:
            if state is not None:
                with contextlib.suppress(Exception):
                    self.model.reset_state(state)
            if frame_dir is not None:
                shutil.rmtree(frame_dir, ignore_errors=True)

        labels[~valid] = 0
        # drop tiny per-view fragments
        n = int(labels.max()) + 1
        area = np.stack([np.bincount(labels[v].ravel(), minlength=n) for v in range(V)])  # (V, n)
        small = (area > 0) & (area < self.min_mask_area)
        if small.any():
            small[:, 0] = False
            labels[small[np.arange(V)[:, None, None], labels]] = 0
        table = object_table(labels, pts3d, valid)
        for oid, meta in table.items():
            meta.update(objects.get(oid, {}))
        objects = table
        soft = 1.0 / (1.0 + np.exp(-np.clip(best, -30.0, 30.0)))
        soft = np.where(labels > 0, np.maximum(soft, 0.5),
                        np.clip(soft, self.unlabelled_soft, 0.5)).astype(np.float32)
        self.last_timings = timings
        report(progress, 1.0, f"sam2: mask cache with {len(objects)} objects")
        return MaskCache(labels=labels.astype(np.int32), soft=soft, objects=objects)

    @staticmethod
    def _compose(logits: Dict[int, np.ndarray], V: int, H: int, W: int):
        """{id: (V,H,W) logits} -> labels (argmax id where its logit > 0) and the best logit."""
        if not logits:
            return np.zeros((V, H, W), np.int32), np.full((V, H, W), -20.0, np.float32)
        ids = np.array(sorted(logits), np.int32)
        stack = np.stack([logits[i] for i in ids], 0)
        arg = np.argmax(stack, 0)
        best = np.take_along_axis(stack, arg[None], 0)[0]
        labels = np.where(best > 0, ids[arg], 0).astype(np.int32)
        return labels, best.astype(np.float32)

    def _verify(self, logits: Dict[int, np.ndarray], seeds: Dict[int, Tuple[int, np.ndarray]],
                pts3d, valid: np.ndarray, objects: Dict[int, dict]) -> None:
        """Geometric check of the tracking (in place): a tracked mask in view v is dropped when,
        among its pixels whose 3D point lies in a voxel the seed view observes, fewer than
        ``verify_min_agree`` lie in a voxel of the seed mask (the tracker jumped to another
        object).  Views whose mask the seed view does not observe are kept (nothing to check)."""
        if pts3d is None or not logits:
            return
        try:
            from ..voxels import auto_voxel_size
            pts3d = np.asarray(pts3d)
            ok = valid & finite_points(pts3d)
            voxel = auto_voxel_size(pts3d, ok)
        except Exception as exc:  # pragma: no cover - helper missing / degenerate scene
            log.debug("sam2: tracking verification skipped (%s)", exc)
            return
        if not np.isfinite(voxel) or voxel <= 0:
            return
        fin = pts3d[ok]
        origin = fin.min(0) if fin.size else np.zeros(3)
        q = np.floor((np.where(ok[..., None], pts3d, 0.0) - origin) / voxel).astype(np.int64)
        q = np.clip(q + (1 << 20), 0, (1 << 21) - 1)
        keys = (q[..., 0] << 42) | (q[..., 1] << 21) | q[..., 2]
        observed = {}
        for oid, (sv, seed_mask) in seeds.items():
            if sv not in observed:
                observed[sv] = np.unique(keys[sv][ok[sv]])
            seed_keys = np.unique(keys[sv][np.asarray(seed_mask, bool) & ok[sv]])
            if seed_keys.size == 0:
                continue
            dropped = []
            for v in range(logits[oid].shape[0]):
                if v == sv:
                    continue
                m = (logits[oid][v] > 0) & ok[v]
                if m.sum() < self.min_mask_area:
                    continue
                k = keys[v][m]
                seen = np.isin(k, observed[sv])
                if seen.sum() < self.min_mask_area:
                    continue
                agree = np.isin(k[seen], seed_keys).mean()
                if agree < self.verify_min_agree:
                    logits[oid][v] = np.minimum(logits[oid][v], -10.0)
                    dropped.append(v)
            if dropped and oid in objects:
                objects[oid]["tracking_rejected_views"] = dropped

    def _associate(self, local: np.ndarray, pts3d, valid) -> np.ndarray:
        """Merge per-view local masks of the same physical object into global ids (3D overlap)."""
        try:
            from ..mask_cache import associate_masks_3d
        except ImportError:
            associate_masks_3d = None
        if associate_masks_3d is not None and pts3d is not None:
            try:
                return np.asarray(associate_masks_3d(local, np.asarray(pts3d), valid), np.int32)
            except Exception as exc:  # keep the cache usable; the views just stay separate
                log.warning("sam2: 3D association of new masks failed (%s); keeping them per view",
                            exc)
        out = np.zeros_like(local)
        offset = 0
        for v in range(local.shape[0]):
            m = local[v] > 0
            out[v][m] = local[v][m] + offset
            offset += int(local[v].max())
        return out

    def close(self) -> None:
        self.predictor.reset_predictor()
        self._image_key = None


__all__ = ["Sam2Segmenter", "DEFAULT_CONFIG"]
