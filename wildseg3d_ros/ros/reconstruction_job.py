"""The reconstruction worker of reconstruction_node: one thread per reconstruction, cancellable
by ~/reset (its result is then discarded), never more than one running; a cancelled job still
winding down is waited for by the next one (the pipeline objects are not shared).

Accepted keyframes are prepared ahead on a second thread (``keyframes.prepare_ahead``:
``ReconstructionPipeline.prepare``: the backend's per-keyframe features, the pre-segmentation
when the keyframe's geometry is known) and their pairs with the earlier keyframes on a third
(``prepare_pending_pairs``: queued as soon as a keyframe's features are, registered while it is
pre-segmented), so a reconstruction starts with that work done.

A mixin of ReconstructionNode: expects ``_lock``, ``_buffer``, ``params``, ``stats``, ``log``,
``_stop``, ``_pipeline``, ``_ensure_pipeline()``, ``_publish_scene()`` and ``_save_scene()`` on
the node."""
from __future__ import annotations

import collections
import threading
import time
import traceback
from typing import Optional

from ..core.errors import Cancelled
from .memory import release_free_heap


class ReconstructionJobMixin:
    def _init_jobs(self):
        self._job: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._generation = 0
        self._new_since_reconstruction = 0
        self._scene = None
        self.last_reconstruction = {}
        self._cancel_t: Optional[float] = None
        self.last_cancel_latency_s: Optional[float] = None
        # keyframes waiting for their per-keyframe work (features, pre-segmentation), newest last
        self._prep_queue: "collections.deque" = collections.deque(maxlen=4)
        self._prep_wake = threading.Event()
        self._pairs_wake = threading.Event()
        self._prep_thread = threading.Thread(target=self._prepare_loop, name="keyframe-prepare", daemon=True)
        self._prep_thread.start()
        self._pair_thread = threading.Thread(target=self._pair_loop, name="pair-prepare", daemon=True)
        self._pair_thread.start()

    def _pair_loop(self):
        """Pair preparation thread: the pairs the prepared keyframes queued, one at a time,
        beside the keyframe preparation (a keyframe's pairs are queued as soon as its features
        are, so they are registered while it is pre-segmented); none is handed out while a
        reconstruction runs: it registers the pairs left itself (and waits for the one in flight
        here only if it needs it)."""
        while not self._stop.is_set():
            pipe = self._pipeline
            left = 0
            if pipe is not None and self.params["keyframes.prepare_ahead"]:
                try:
                    if pipe.reconstructing():
                        self._stop.wait(0.05)  # it registers the pairs left itself
                        continue
                    left = pipe.prepare_pending_pairs(1)
                except Exception as e:  # the reconstruction registers the pair itself then
                    left = 0
                    self.stats["keyframe_prepare_errors"] += 1
                    self.internal_error("keyframe pair preparation", e)
            if not left:
                self._pairs_wake.clear()  # then look again: a wake-up set meanwhile is kept
                if not (pipe is not None and self.params["keyframes.prepare_ahead"] and pipe.pending_pair_count()):
                    self._pairs_wake.wait(0.5)

    def _prepare_loop(self):
        """Keyframe preparation thread: what each keyframe needs on its own is done while the
        camera keeps streaming, so the reconstruction starts with it done (it waits while a
        reconstruction runs; the reconstruction does whatever is not prepared yet)."""
        while not self._stop.is_set():
            self._prep_wake.wait(0.5)
            self._prep_wake.clear()
            while self._prep_queue and not self._stop.is_set():
                try:
                    kf = self._prep_queue.popleft()
                except IndexError:
                    break
                pipe = self._pipeline  # never built here: the init thread or a job builds it
                if pipe is None or not self.params["keyframes.prepare_ahead"]:
                    continue
                try:
                    if pipe.prepare(kf):
                        self.stats["keyframes_prepared"] += 1
                except Exception as e:  # the reconstruction does the work itself then
                    self.stats["keyframe_prepare_errors"] += 1
                    self.internal_error("keyframe preparation", e)

    def reconstruction_running(self) -> bool:
        """True while a reconstruction that has not been cancelled is running."""
        job = self._job
        return job is not None and job.is_alive() and not self._cancel.is_set()

    def job_winding_down(self) -> bool:
        """True while a cancelled reconstruction thread has not reached its next cancel check yet
        (its result will be discarded; a new reconstruction may already have been requested)."""
        job = self._job
        return job is not None and job.is_alive() and self._cancel.is_set()

    def _keyframe_accepted(self):
        """After each accepted keyframe: start the automatic reconstruction when due, else queue
        the keyframe for its preparation. The keyframe that starts a reconstruction is not
        queued: the reconstruction would wait for its preparation, then register its pairs,
        while on its own it registers them and pre-segments the keyframe at the same time."""
        self._new_since_reconstruction += 1
        n_at = self.params["keyframes.reconstruct_at"]
        started = False
        if n_at > 0 and len(self._buffer) >= n_at and self._new_since_reconstruction >= n_at:
            started, _ = self._start_job("auto")
        if self.params["keyframes.prepare_ahead"] and not started:
            kfs = self._buffer.keyframes()
            if kfs:
                self._prep_queue.append(kfs[-1])
                self._prep_wake.set()

    def _start_job(self, why: str):
        with self._lock:
            if self.reconstruction_running():
                return False, "a reconstruction is already running"
            kfs = self._buffer.keyframes()
            if len(kfs) < 2:
                return False, f"too few keyframes: {len(kfs)} buffered, at least 2 needed"
            previous = self._job if self._job is not None and self._job.is_alive() else None
            self._cancel = threading.Event()
            self._generation += 1
            gen = self._generation
            self._new_since_reconstruction = 0
            self._job = threading.Thread(target=self._run_job, args=(kfs, gen, self._cancel, why, previous),
                                         name="reconstruction", daemon=True)
            self._job.start()
        extra = " (after the cancelled one stops)" if previous is not None else ""
        return True, f"reconstruction of {len(kfs)} keyframes started{extra}"

    def _cancel_jobs(self) -> bool:
        """Cancel the running reconstruction and forget the buffer and scene (~/reset). Returns
        whether a job was running."""
        with self._lock:
            if not self._cancel.is_set():
                self._cancel_t = time.monotonic()
            self._cancel.set()
            self._generation += 1
            self._buffer.clear()
            self._prep_queue.clear()
            self._scene = None
            self._new_since_reconstruction = 0
            return self._job is not None and self._job.is_alive()

    def _job_cancelled(self, cancel: threading.Event, gen: int, where: str):
        t_set = self._cancel_t
        if t_set is not None and cancel.is_set():
            self.last_cancel_latency_s = time.monotonic() - t_set
        self.stats["reconstructions_cancelled"] += 1
        lat = f" {self.last_cancel_latency_s * 1e3:.0f} ms after the request" \
            if self.last_cancel_latency_s is not None and cancel.is_set() else ""
        self.get_logger().info(f"reconstruction cancelled ({where}){lat}; its result is discarded")

    def _run_job(self, kfs, gen, cancel: threading.Event, why: str, previous: Optional[threading.Thread] = None):
        try:
            self._run_job_inner(kfs, gen, cancel, why, previous)
        except Exception as e:  # publishing / saving / bookkeeping: the node keeps running
            self.stats["reconstructions_failed"] += 1
            self.internal_error("reconstruction job", e)
        finally:
            release_free_heap()  # a reconstruction allocates GBs in worker threads: give them back

    def _run_job_inner(self, kfs, gen, cancel: threading.Event, why: str,
                       previous: Optional[threading.Thread] = None):
        if previous is not None:  # a cancelled job still running: the pipeline objects are not shared
            while previous.is_alive() and not cancel.is_set() and not self._stop.is_set():
                previous.join(0.1)
        t0 = time.perf_counter()
        self.get_logger().info(f"reconstructing {len(kfs)} keyframes ({why})")
        pipe = self._ensure_pipeline()
        if pipe is None:
            self.stats["reconstructions_failed"] += 1
            return
        if cancel.is_set():
            self._job_cancelled(cancel, gen, "before it started")
            return
        posed = sum(kf.pose_prior is not None for kf in kfs)
        frame = self.params["world_frame"] if posed == len(kfs) else self.params["reconstruction_frame"]
        if 0 < posed < len(kfs):
            self.log.warning("mixed_poses", f"{len(kfs) - posed} of {len(kfs)} keyframes have no camera pose: the "
                             f"scene is published in '{frame}' instead of world_frame")
        try:
            scene, timings = pipe.run(kfs, cancel=cancel.is_set, frame_id=frame)
        except Exception as e:
            if isinstance(e, Cancelled) or cancel.is_set():
                self._job_cancelled(cancel, gen, type(e).__name__)
                return
            self.stats["reconstructions_failed"] += 1
            self.last_error = f"reconstruction failed: {e}"
            self.log.error("reconstruction_failed", f"{self.last_error} (buffer and previous scene kept)\n"
                           f"{traceback.format_exc(limit=4)}")
            return
        with self._lock:
            if cancel.is_set() or gen != self._generation:
                self._job_cancelled(cancel, gen, "finished after a reset")
                return
            self._scene = scene
        self.stats["reconstructions_done"] += 1
        self.last_reconstruction = dict(timings, loss=float(scene.loss), views=scene.num_views,
                                        objects=int(len(scene.mask_cache.object_ids())) if scene.mask_cache else 0,
                                        wall_s=time.perf_counter() - t0)
        self._publish_scene(scene)
        self.get_logger().info(
            f"scene published: {scene.num_views} keyframes, "
            f"{self.last_reconstruction['objects']} objects, frame '{scene.frame_id}', "
            f"{self.last_reconstruction['wall_s']:.2f} s")
        self._save_scene(scene, kfs, dict(why=why, timings={k: float(v) for k, v in timings.items()}))
