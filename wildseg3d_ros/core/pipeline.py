"""The reconstruction pipeline: keyframes -> pairwise pointmaps -> per-view masks -> DGA ->
mask cache, as one cancellable call shared by the ROS node, the demo and the offline CLI.

Order of the steps follows the paper: the soft object masks S must exist before alignment
(they enter DGA's weights), so every keyframe is pre-segmented on its own first; after
alignment the per-view masks are associated across views (tracking for SAM2, 3D overlap for
the classical segmenter) into the mask cache with global object ids.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Callable, List, Optional, Sequence

import numpy as np

from .config import PipelineConfig, resolve_segmenter
from .errors import AlignmentError, PipelineError, check_cancel
from .align.world_frame import express_in_world
from .types import Keyframe

_log = logging.getLogger(__name__)


class ReconstructionPipeline:
    """Builds the backend and segmenter once (model loading is slow) and runs reconstructions."""

    def __init__(self, cfg: PipelineConfig):
        from .pointmaps import BACKENDS
        from .presegment.base import SEGMENTERS

        if cfg.segmenter == "auto":
            cfg = replace(cfg, segmenter=resolve_segmenter("auto", BACKENDS.entry(cfg.backend).metric))
        self.cfg = cfg
        self._presegment_geometry = BACKENDS.entry(cfg.backend).presegment_geometry
        self.backend = BACKENDS.create(cfg.backend, **_with_device(BACKENDS, cfg.backend, cfg.backend_kwargs, cfg.device))
        self.segmenter = SEGMENTERS.create(cfg.segmenter, **_with_device(SEGMENTERS, cfg.segmenter,
                                                                          cfg.segmenter_kwargs, cfg.device))
        # prepare() and run() share the backend and segmenter: one at a time; pair preparation
        # only needs the backend's (thread-safe) caches, so it runs beside them
        self._lock = threading.RLock()
        self._masks: "OrderedDict[str, np.ndarray]" = OrderedDict()  # keyframe content -> local masks
        self.mask_cache_size = 16
        # the keyframes prepared last, in order: the partners of the next one's pairs
        self._accepted: List[Keyframe] = []
        self.accepted_window = 8
        self._run_waiting = threading.Event()
        self._pending_pairs: "deque" = deque(maxlen=64)  # (earlier keyframe, keyframe) to register
        #: called (no arguments) when prepare() has queued pairs: a node wakes its pair thread
        self.on_pairs_queued: Optional[Callable[[], None]] = None

    def prepare(self, kf: Keyframe) -> bool:
        """Per-keyframe work ahead of :meth:`run`, e.g. when the keyframe is accepted: the
        backend's per-keyframe features and, when the keyframe's pointmap is known before pairing
        (depth cameras: ``backend.pointmaps_per_keyframe``), its pre-segmentation; its pairs with the
        keyframes prepared before it (the partners the scene graph gives over the last
        ``accepted_window`` prepared keyframes) are queued for :meth:`prepare_pending_pairs`.
        Cached by content, so the reconstruction that includes this keyframe skips that work. Returns True when the
        keyframe's masks are now prepared. Waits while a reconstruction runs.  The pairs are
        queued as soon as the backend's part is done, so :meth:`prepare_pending_pairs` on another
        thread can register them while this keyframe is pre-segmented."""
        with self._lock:
            key = kf.content_key()
            if key in self._masks:
                return True
            cam = self.backend.prepare(kf)
            if cam is None or not self.backend.pointmaps_per_keyframe:
                return False  # the geometry comes from pairing (networks, stereo): segmented in run()
            queued = self._accept(kf)
            self._pending_pairs.extend((p, kf) for p in queued)
            if queued and self.on_pairs_queued is not None:
                self.on_pairs_queued()
            pts, valid = cam if self._presegment_geometry else (None, None)
            self._remember_masks(key, self.segmenter.automatic_masks(kf.rgb, pts, valid))
            return True

    def prepare_pending_pairs(self, max_pairs: Optional[int] = None) -> int:
        """Register up to ``max_pairs`` (None: all) of the pairs the prepared keyframes queued
        (:meth:`prepare`), one at a time, without the lock of :meth:`prepare` and :meth:`run` (a
        node calls this on a thread of its own, beside the keyframes' own work; the backend's
        caches are thread-safe): while a reconstruction runs no pair is handed out, it registers
        the pairs left itself (waiting for one being registered here). Returns the number of
        pairs still queued."""
        n = 0
        while self._pending_pairs and (max_pairs is None or n < max_pairs) and not self._run_waiting.is_set():
            try:
                partner, kf = self._pending_pairs.popleft()  # atomic: one taker per pair
            except IndexError:
                break
            n += self.backend.prepare_pairs(kf, [partner])
        return len(self._pending_pairs)

    def reconstructing(self) -> bool:
        """True while :meth:`run` runs: :meth:`prepare_pending_pairs` hands out no pair then."""
        return self._run_waiting.is_set()

    def pending_pair_count(self) -> int:
        """How many queued pairs :meth:`prepare_pending_pairs` has not registered yet."""
        return len(self._pending_pairs)

    def _accept(self, kf: Keyframe) -> List[Keyframe]:
        """Append ``kf`` to the last ``accepted_window`` prepared keyframes and return the earlier
        ones the scene graph pairs it with (all of them for ``complete``, the last k for ``swin-k``)."""
        from .pointmaps.scene_graph import partners_of_next

        prev = [k for k in self._accepted if k.content_key() != kf.content_key()]
        self._accepted = (prev + [kf])[-self.accepted_window:]
        return [prev[i] for i in partners_of_next(len(prev), self.cfg.scene_graph)]

    def _remember_masks(self, key: str, labels: np.ndarray) -> None:
        self._masks[key] = labels
        self._masks.move_to_end(key)
        while len(self._masks) > self.mask_cache_size:
            self._masks.popitem(last=False)

    def run(self, keyframes: Sequence[Keyframe], cancel: Optional[Callable[[], bool]] = None,
            progress: Optional[Callable[[str, float], None]] = None, frame_id: str = "map"):
        """Returns (AlignedScene, timings dict in seconds). Raises PipelineError / errors.Cancelled."""
        with self._lock:  # after the keyframe being prepared (pairs keep being registered meanwhile)
            # prepare_pending_pairs() hands out no more pairs; one being registered is finished
            # on its thread, and the backend waits for it if this run needs it
            self._run_waiting.set()
            try:
                return self._run(keyframes, cancel, progress, frame_id)
            finally:
                self._run_waiting.clear()

    def _run(self, keyframes, cancel, progress, frame_id):
        from .align import align_global
        from .mask_cache import build_soft_masks

        cfg = self.cfg
        kfs = list(keyframes)
        if len(kfs) < 2:
            raise PipelineError("reconstruction needs at least 2 keyframes, "
                                f"the buffer holds {len(kfs)}")
        shapes = {kf.rgb.shape for kf in kfs}
        if len(shapes) != 1:
            raise PipelineError(f"keyframes have different image sizes {sorted(shapes)}; "
                                "the camera resolution changed mid-buffer: reset and start again")
        say = progress or (lambda stage, frac: None)
        # without use_pose_priors, known poses only place the result in the world frame
        inner = kfs if cfg.use_pose_priors else [replace(kf, pose_prior=None) for kf in kfs]
        t = {}
        t0 = time.perf_counter()
        pairs = self.backend.make_pairs(len(kfs), cfg.scene_graph)
        say("pointmaps", 0.0)
        finish_side = self._presegment_beside_pairs(kfs, cancel)
        try:
            preds = self.backend.predict_pairs(inner, pairs, cancel=cancel)
        finally:
            side_keys = finish_side()  # its masks go into the cache the segmentation step reads
        t["pointmaps_s"] = time.perf_counter() - t0
        check_cancel(cancel, "reconstruction")
        kept, dropped = self._covered_views(len(kfs), preds)
        kfs, inner = [kfs[v] for v in kept], [inner[v] for v in kept]

        # per-view pre-segmentation (camera-frame pointmaps help the classical segmenter)
        t1 = time.perf_counter()
        say("segmentation", 0.25)
        cam_pts = preds.camera_pointmaps()
        rgb = self._images_at_pointmap_size(kfs, preds, cam_pts)
        local = []
        if not self._presegment_geometry:  # e.g. stereo pointmaps: masks by colour (fused in 3D below)
            cam_pts = [(None, None)] * len(kfs)
        # a view's masks are a function of the keyframe alone when its pointmap is (depth cameras)
        # or when they ignore geometry; network pointmaps change with the other keyframes
        reuse = (not self._presegment_geometry) or self.backend.pointmaps_per_keyframe
        n_prepared = 0
        for v in range(len(kfs)):  # one cancel check per view (a view can take seconds at 640x480)
            check_cancel(cancel, "reconstruction")
            # masks prepared when the keyframe was accepted (same image, same geometry) are reused
            key = (kfs[v].content_key() if reuse and kfs[v].rgb.shape == rgb[v].shape
                   and np.array_equal(kfs[v].rgb, rgb[v]) else None)
            lab = self._masks.get(key) if key is not None else None
            if lab is None:
                lab = self.segmenter.automatic_masks(rgb[v], cam_pts[v][0], cam_pts[v][1])
                if key is not None:
                    self._remember_masks(key, lab)
            elif key not in side_keys:
                n_prepared += 1
            local.append(lab)
        local = np.stack(local)
        soft = build_soft_masks(local)
        t["presegment_s"] = time.perf_counter() - t1
        check_cancel(cancel, "reconstruction")

        # DGA
        t2 = time.perf_counter()
        say("alignment", 0.5)
        priors, prior_w = None, cfg.pose_prior_weight
        if preds.known_poses is not None:
            # the backend estimated the poses itself (e.g. SfM bundle adjustment): the aligner
            # keeps them with the intrinsics they were estimated with; odometry / TF only place
            # the result in the world frame afterwards
            priors, prior_w = np.asarray(preds.known_poses, np.float64), float(preds.known_poses_weight)
        elif cfg.pose_prior_weight > 0 and all(kf.pose_prior is not None for kf in inner):
            priors = np.stack([kf.pose_prior for kf in inner])
        try:
            # known intrinsics stay fixed: metric pointmaps were made with them, and a network's
            # pointmaps are best read with the camera's real focal and principal point
            scene = align_global(preds, num_views=len(kfs), soft_masks=soft, known_poses=priors,
                                 known_focals=preds.intrinsics,
                                 pose_prior_weight=prior_w if priors is not None else 0.0,
                                 weighting=cfg.weighting, alpha_p=cfg.alpha_p, alpha_n=cfg.alpha_n,
                                 iterations=cfg.iterations, match_threshold=cfg.match_threshold,
                                 optimizer=cfg.optimizer, device=cfg.device, cancel=cancel)
        except AlignmentError as e:
            raise PipelineError(f"alignment failed: {e}") from e
        t["alignment_s"] = time.perf_counter() - t2
        check_cancel(cancel, "reconstruction")

        scene.rgb = rgb
        scene.frame_id = frame_id
        scene.stamps = np.array([kf.stamp for kf in kfs], dtype=np.float64)
        # metric depth: only a rigid transform to the pose priors, never a rescale to drifting
        # odometry; poses from the backend carry its own (arbitrary) scale
        scene.metric = preds.metric if preds.known_poses is not None else (scene.metric or preds.metric)
        scene.info["kept_views"] = kept
        if scene.info.get("released_poses"):  # known poses the aligner found inconsistent (keyframe indices)
            scene.info["released_poses"] = [kept[v] for v in scene.info["released_poses"]]
        scene.info["views_presegmented_ahead"] = n_prepared
        scene.info["dropped_views"] = dropped
        fit = express_in_world(scene, [kf.pose_prior for kf in kfs])
        scene.info["world_fit"] = {"mode": fit.mode, "used": fit.used, "outliers": fit.outliers,
                                   "scale": fit.s, "scaled": fit.scaled, "rot_err_deg": fit.rot_err_deg,
                                   "centre_err_m": fit.centre_err_m}

        # mask cache with global ids
        t3 = time.perf_counter()
        say("mask cache", 0.8)
        valid = scene.valid_mask()
        scene.mask_cache = self.segmenter.build_mask_cache(rgb, scene.pts3d, valid, cancel=cancel, local=local)
        t["mask_cache_s"] = time.perf_counter() - t3
        t["total_s"] = time.perf_counter() - t0
        say("done", 1.0)
        return scene, t

    def _presegment_beside_pairs(self, kfs, cancel) -> Callable[[], set]:
        """When each keyframe's pointmap is known before pairing (depth cameras), the keyframes
        not pre-segmented yet (typically the one whose arrival started this reconstruction) are
        pre-segmented on a helper thread while the backend registers the pairs: the two share
        the CPU instead of running one after the other. Their masks go into the mask cache that
        the segmentation step reads; a keyframe this thread did not finish is segmented there.
        Returns the function that waits for the thread, stores its masks and returns their keys
        (the caller calls it once the pairs are done or failed, still holding the pipeline's
        lock)."""
        if not self.backend.pointmaps_per_keyframe:
            return set  # nothing to wait for: no keys
        todo = [kf for kf in kfs if kf.content_key() not in self._masks]
        if not todo:
            return set
        cams = []
        for kf in todo:  # the backend's per-keyframe part first: the pairs need it too
            check_cancel(cancel, "reconstruction")
            try:
                cam = self.backend.prepare(kf)
            except Exception:  # bad input: predict_pairs checks it and says what is wrong
                return set
            if cam is None:
                return set
            cams.append(cam if self._presegment_geometry else (None, None))
        results = []

        def work():
            try:
                for kf, (pts, valid) in zip(todo, cams):
                    if cancel is not None and cancel():
                        return
                    results.append((kf.content_key(), self.segmenter.automatic_masks(kf.rgb, pts, valid)))
            except Exception as e:  # the segmentation step does it again and reports it
                _log.debug("pre-segmentation beside the pairs failed: %s", e)

        th = threading.Thread(target=work, name="presegment-beside-pairs", daemon=True)
        th.start()

        def finish():
            th.join()
            for key, labels in results:
                self._remember_masks(key, labels)
            return {key for key, _ in results}

        return finish

    def _covered_views(self, n: int, preds):
        """(positions of the keyframes the predictions cover, {left-out position: reason}). A
        backend that cannot use some keyframes predicts the others only (``preds.views``); the
        reconstruction continues with those when at least 2 remain."""
        if preds.views is None:
            return list(range(n)), {}
        views = [int(v) for v in preds.views]
        if len(views) < 2 or len(set(views)) != len(views) or not all(0 <= v < n for v in views):
            raise PipelineError(f"backend '{self.cfg.backend}' kept keyframes {views} of {n}: "
                                "a reconstruction needs at least 2 distinct ones")
        dropped = {int(k): str(m) for k, m in preds.dropped_views.items()}
        dropped.update({v: "left out by the backend" for v in range(n) if v not in views and v not in dropped})
        if dropped:
            _log.warning("reconstructing %d of %d keyframes; left out: %s", len(views), n,
                         "; ".join(f"keyframe {v}: {m}" for v, m in sorted(dropped.items())))
        return views, dropped

    @staticmethod
    def _images_at_pointmap_size(kfs, preds, cam_pts) -> np.ndarray:
        """Keyframe images at the pointmaps' resolution: the backend's own (network backends such
        as DUSt3R predict at their input size, e.g. 512 x 384 after resize + crop), else the
        keyframes resized."""
        import cv2

        shape = next(p.shape[:2] for p, _ in cam_pts if p is not None)
        if preds.images is not None and len(preds.images) == len(kfs) and preds.images.shape[1:3] == shape:
            return np.asarray(preds.images, np.uint8)
        if all(kf.rgb.shape[:2] == shape for kf in kfs):
            return np.stack([kf.rgb for kf in kfs])
        return np.stack([cv2.resize(kf.rgb, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) for kf in kfs])


def _with_device(registry, name: str, kwargs: dict, device: str) -> dict:
    """Constructor keywords with the configured device added for models that take one."""
    kw = dict(kwargs)
    if registry.entry(name).uses_device:
        kw.setdefault("device", device)
    return kw
