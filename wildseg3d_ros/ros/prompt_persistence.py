"""Prompt-session persistence of segmentation_node: the prompts of the current scene saved
atomically after every change (core.store.save_session, body format core.prompt_session; written
on a thread of its own, so no prompt waits for the disk) and replayed when the same scene is
received again (``load_last_session``).

A mixin of SegmentationNode: expects ``params``, ``stats``, ``scene_id``, ``session``,
``prompt_log`` / ``_prompt_meta``, ``out``, ``_refuse`` and ``_apply_prompt``."""
from __future__ import annotations

import concurrent.futures
import os
import threading

from ..core.output import store
from ..core.prompts.session_file import session_body, session_prompts


class PromptPersistenceMixin:
    def _scene_dir(self) -> str:
        d = str(self.params["scene_dir"]).strip()
        return os.path.expanduser(d) if d else ""

    def _set_prompts(self, prompts, meta):
        self.prompt_log, self._prompt_meta = list(prompts), list(meta)

    def _init_persistence(self):
        # the session file is written on a thread of its own: a save fsyncs twice (1.6 ms p50 on
        # the development VM, and as long as the disk takes when it is busy: meanwhile the worker
        # would answer no click)
        self._session_lock = threading.Lock()
        self._session_pending = None  # (folder, body) not written yet: the newest save only
        self._session_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session_save")

    def _save_session(self):
        """Snapshot the prompts now; the file is written by the session-save thread (saves that
        come while one is written are coalesced: the newest is written)."""
        d = self._scene_dir()
        if not d or self.scene_id is None:
            return
        try:
            body = session_body(self.scene_id, self._frame(), self.prompt_log)
        except Exception as e:
            self._refuse("session_save", "session_save_errors", f"saving the prompt session into {d} failed "
                         f"({e}); the live selection is unaffected", "error")
            return
        with self._session_lock:
            self._session_pending = (d, body)
        try:
            self._session_pool.submit(self._write_pending_session)
        except RuntimeError:  # shutting down: written here
            self._write_pending_session()

    def _write_pending_session(self):
        with self._session_lock:
            job, self._session_pending = self._session_pending, None
        if job is None:  # a later task's body was written already
            return
        d, body = job
        try:
            self.last_saved_session = str(store.save_session(d, body))
            self.stats["sessions_saved"] += 1
        except Exception as e:
            self._refuse("session_save", "session_save_errors", f"saving the prompt session into {d} failed "
                         f"({e}); the live selection is unaffected", "error")

    def _flush_session(self, timeout: float = 10.0):
        """Wait until the last save is written (destroy_node: nothing lost on a restart)."""
        try:
            self._session_pool.submit(lambda: None).result(timeout=timeout)
        except Exception:  # already shut down / the disk hangs: give up waiting
            pass
        self._session_pool.shutdown(wait=False)

    def _restore_session(self) -> bool:
        """Replay the saved prompts when they belong to the current scene. True if replayed."""
        d = self._scene_dir()
        if not d or not self.params["load_last_session"]:
            return False
        try:
            body = store.load_session(d)
        except Exception as e:  # StoreError: corrupt / foreign / wrong version
            self._refuse("session_load", "session_load_errors", f"saved session refused ({e}); starting "
                         "with no prompts", "error")
            return False
        try:
            prompts = session_prompts(body, self.scene_id)
        except (KeyError, TypeError, ValueError) as e:
            self._refuse("session_load", "session_load_errors", f"saved session is malformed ({e}); "
                         "starting with no prompts", "error")
            return False
        if prompts is None:
            return False
        for kind, data, positive, new_object in prompts:
            self._apply_prompt(kind, data, positive, new_object, None, None)
        self.restored_prompts = len(self.prompt_log)
        self.stats["sessions_restored"] += 1
        self.out.publish(self.session.results(), self._frame())
        self.get_logger().info(f"session restored: {len(self.prompt_log)} of {len(prompts)} saved prompt(s) "
                               "replayed on the same scene")
        return True

