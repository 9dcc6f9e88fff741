"""segmentation_node: prompts -> segmented object clouds, answered from the mask cache.

Subscriptions:
  wildseg3d/scene (sensor_msgs/PointCloud2, reliable + transient local; from reconstruction_node)
  clicked_point (geometry_msgs/PointStamped): positive 3D click (rviz2 "Publish Point")
  wildseg3d/negative_point (PointStamped): negative 3D click
  wildseg3d/new_object_point (PointStamped): positive 3D click that starts a new object
  wildseg3d/pixel_prompt, wildseg3d/pixel_prompt_negative (PointStamped): pixel clicks on a
    keyframe: header.frame_id = 'keyframe_<i>', point.x = column u, point.y = row v (pixels)
Publications (reliable + transient local):
  wildseg3d/object_cloud (PointCloud2 x y z rgb, point_step 16): all selected objects
  wildseg3d/object_cloud_labelled (PointCloud2 x y z rgb label, point_step 20)
  wildseg3d/object_markers (visualization_msgs/MarkerArray): bounding box + text per object
  /diagnostics
Services: ~/reset (clear prompts and selection), ~/resegment (rebuild the mapper for the
current scene and parameters, replay the prompts, republish) — std_srvs/Trigger.

All work runs in one worker thread fed by a queue (scene preparation, prompts in arrival
order); callbacks only enqueue, so services and parameters always answer. No exception ends a
callback, a service (it always replies) or the worker. Three helper threads: one writes the
saved session (fsync: the worker never waits for the disk); one hashes a new scene's identity
while the worker decodes it; one, at a lower CPU priority, computes the new
scene's object segments (largest first; unless they were cut from the filter sent with the scene:
then it waits for the first click to be answered) and then its KD-tree, so the worker is free
when the first click comes (it waits at most for the object being computed; until the tree exists an
exact window search in the keyframes answers, with the same results).

Matching answers to prompts (ros/object_output.py): an object cloud's header.stamp is the stamp
of the prompt it answers; wildseg3d/prompt_status says for every prompt if it was answered or
refused and why. Clicks that arrive while a scene is prepared are answered on it (queue order),
clicks with no scene loaded wait up to prompt.scene_wait_s for one, and 3D clicks stamped after
a new scene's stamp but received before it are replayed on it (a click sent as the scene
appeared can reach this node before the large scene message). A new scene publishes no empty cloud when none was shown.

Bad prompts (no scene yet, no TF to the scene frame, farther than prompt.max_distance_m from
every scene point, outside the image, unknown keyframe, negative before positive) and bad scene
messages (missing / mistyped / truncated fields: ros/scene_input.py) are refused with a
rate-limited log line; ``stats`` counts them and ``last_error`` holds the latest.

Persistence: with ``scene_dir`` set, the prompts of the current scene (3D points already in the
scene frame, pixel prompts as keyframe/u/v; positive / negative / new object) are saved
atomically after every change via core.store.save_session (format: core.prompt_session), keyed by the scene identity (a
SHA-1 hash of the scene cloud's data bytes, its size and frame). With ``load_last_session``,
when a scene with that identity arrives (e.g. the reconstruction node restarted with
load_last_scene), the prompts are replayed and the same segmented cloud is republished.
A scene message identical to the current one (a republish) keeps the current selection.
"""
from __future__ import annotations

import collections
import concurrent.futures
import gc
import os
import queue
import threading
import time
from typing import List, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PointStamped
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger

from ..core.config import segmenter_choices
from . import convert
from .frame_input import percentile
from .memory import HeapReserve, release_free_heap, set_heap_thresholds
from .node_common import NodeCommonMixin
from .object_output import ObjectOutput
from .params import ParamSpec, ParameterTable, check_device, check_dir_param, check_file_param
from .prompt_handler import PromptHandlerMixin
from .prompt_persistence import PromptPersistenceMixin
from .scene_input import SceneMessageError, decode_scene, scene_identity
from .throttled_log import ThrottledLogger

PARAMS = [
    ParamSpec("segmenter", "auto", "Segmenter used to refine with extra clicks (use the reconstruction "
              "node's): geometric, classical, sam2, or auto: geometric for metric scenes, classical otherwise.",
              choices=segmenter_choices()),
    ParamSpec("sam2.config", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM2 config name in the sam2 package."),
    ParamSpec("sam2.checkpoint", "", "SAM2 checkpoint path (read only).", check=check_file_param),
    ParamSpec("device", "cpu", "torch device for SAM2 refinement (cpu, cuda, cuda:N, mps).", check=check_device),
    ParamSpec("prompt.max_distance_m", 0.05, "A 3D click farther than this from every scene point "
              "selects nothing.", 1e-4, 10.0),
    ParamSpec("prompt.scene_wait_s", 2.0, "A prompt that arrives while no scene is loaded waits this long "
              "for one before it is refused; a 3D prompt stamped after a new scene's stamp that arrived "
              "up to this long before that scene is replayed on it (s).", 0.0, 60.0),
    ParamSpec("mgm.voxel_size_m", 0.0, "Voxel size of the floater filter (m); 0 = automatic "
              "(3x the median point spacing).", 0.0, 1.0),
    ParamSpec("mgm.min_consistency", 0.5, "Minimum share of the other views that see a point and "
              "agree with its object for the point to be kept.", 0.0, 1.0),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics messages (s).", 0.1, 60.0),
    ParamSpec("scene_dir", "~/.ros/wildseg3d/scenes", "Folder of the saved session (session.json: the "
              "prompts of the current scene, saved after every change; ~ expanded; empty disables).",
              check=check_dir_param),
    ParamSpec("load_last_session", False, "Replay the saved prompts when the scene they were made on "
              "is received again (same scene identity), e.g. after a restart."),
    ParamSpec("memory.keep_scene_heap", True, "Keep the heap memory a scene's preparation uses for the "
              "next scene (glibc: buffers up to 32 MiB from the heap, freed memory kept up to 6x the scene "
              "message) and fault in memory ahead (memory.first_scene_reserve_mb at start-up, then 2.5x "
              "the last scene message after the first scene and after an idle release), so that a new "
              "scene is not prepared in fresh pages. The allocator settings are process-wide: turn it off "
              "where this node shares its process with the reconstruction node (the demo does), whose "
              "freed buffers they would keep too. False: glibc's defaults, nothing faulted in ahead.",
              read_only=True),
    ParamSpec("memory.first_scene_reserve_mb", 72, "Heap faulted in at start-up for the first scene "
              "(with memory.keep_scene_heap): about 2.5x its message, 70 MB for 5 keyframes 512x384.",
              0, 4096, read_only=True),
]


def _lower_thread_priority(niceness: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is a task with its own nice
    value); nothing where that is not possible."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class SegmentationNode(PromptHandlerMixin, PromptPersistenceMixin, NodeCommonMixin, Node):
    REFUSE_LEVEL = "warning"  # a bad prompt is the operator's, not the node's, fault
    DIAG_NAME = "segmentation_node"
    TRIM_IDLE_S = 20.0  # freed heap memory is returned to the OS after this long without a new scene
    # ... unless the heap holds no more than this many bytes per byte of the last scene message
    # free: about what decoding and indexing a scene of that size allocates (2-4x the message)
    TRIM_KEEP_PER_SCENE_BYTE = 6
    # memory.keep_scene_heap: heap faulted in ahead for the next scene, per byte of the last scene
    # message (a 5 x 512x384 scene keeps ~1.4x its message in arrays and allocates ~0.8x more
    # while it is prepared), in steps of RESERVE_STEP_BYTES between two queue items
    RESERVE_PER_SCENE_BYTE = 2.5
    RESERVE_STEP_BYTES = 256 << 10
    IDLE_WORK_AFTER_S = 0.02
    WARM_DELAY_S = 0.25  # the longest a scene's warm-up waits for the first click (_warm_mapper)

    def __init__(self, **kwargs):
        super().__init__("segmentation_node", **kwargs)
        self.log = ThrottledLogger(self.get_logger())
        self.params = ParameterTable(self, PARAMS, on_change=self._on_params_changed)
        self._q: "queue.Queue" = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self.scene = None
        self.scene_stamp = None
        self.session = None
        self._segmenter = None
        self._segmenter_error = ""
        # prompts of the current scene, replayed by ~/resegment and saved in the session:
        # (kind, data, positive, new_object) with data = xyz (np.float64[3], scene frame) for
        # kind 'point' and (keyframe, u, v) for kind 'pixel'; _prompt_meta: (t_recv, header stamp)
        self.prompt_log: List[tuple] = []
        self._prompt_meta: List[tuple] = []
        self._resegment_queued = threading.Event()
        self._held: List[tuple] = []  # prompt items waiting for a scene
        self._recent_far = collections.deque(maxlen=16)  # refused far 3D clicks (maybe for the next scene)
        self.scene_id: Optional[str] = None
        self._trim_at: Optional[float] = None  # when to give freed heap memory back (monotonic s)
        self._retired: list = []  # the scene a new one replaced: freed when the worker is idle
        self._scene_bytes = 0  # size of the last scene message (what the heap keeps and reserves scale with)
        self._reserve: Optional[HeapReserve] = None  # memory faulted in ahead (memory.keep_scene_heap)
        self._reserve_due = True  # a reserve is made after the next scene (none was made yet)
        self._scene_at = 0.0  # when the current scene was loaded (monotonic s)
        self._init_persistence()
        self._id_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scene_identity")
        # the current scene's object segments and KD-tree (GroupMapper.warm), off the worker thread
        self._warm_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scene_warm")
        self._warm_gen = 0
        # set once the worker has answered a prompt: the scene's warm-up may start (see _warm_mapper)
        self._warm_go = threading.Event()
        self.latencies_ms = collections.deque(maxlen=1000)
        self.stats = collections.Counter()
        self.last_error = ""
        self.last_saved_session = ""
        self.restored_prompts = 0

        g = self.guarded_callback
        self.create_subscription(PointCloud2, "wildseg3d/scene", g("scene", self._on_scene), convert.LATCHED_QOS)
        for topic, kind, pos, new in (("clicked_point", "point", True, False),
                                      ("wildseg3d/negative_point", "point", False, False),
                                      ("wildseg3d/new_object_point", "point", True, True),
                                      ("wildseg3d/pixel_prompt", "pixel", True, False),
                                      ("wildseg3d/pixel_prompt_negative", "pixel", False, False)):
            self.create_subscription(PointStamped, topic, g(topic, lambda m, k=kind, p=pos, n=new:
                                                            self._enqueue(k, m, p, n)), convert.PROMPT_QOS)
        self.out = ObjectOutput(self)
        self.cloud_pub = self.out.cloud_pub
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Trigger, "~/reset", self.guarded_service("reset", self._srv_reset),
                            qos_profile=convert.SERVICE_QOS)
        self.create_service(Trigger, "~/resegment", self.guarded_service("resegment", self._srv_resegment),
                            qos_profile=convert.SERVICE_QOS)
        self._start_diagnostics_timer(self.params["diagnostics_period_s"])
        self._tf_buffer = None
        try:
            import tf2_ros
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        except ImportError:
            pass
        self._keep_heap = bool(self.params["memory.keep_scene_heap"]) and set_heap_thresholds(trim_threshold=256 << 20)
        if self._keep_heap:  # faulted in by the worker (in its arena), once it has warmed up
            self._reserve = HeapReserve(int(self.params["memory.first_scene_reserve_mb"]) << 20,
                                        step_bytes=self.RESERVE_STEP_BYTES)
        self._worker = threading.Thread(target=self._work_loop, name="segmentation", daemon=True)
        self._worker.start()
        self.get_logger().info("segmentation_node ready: waiting for a scene on wildseg3d/scene")

    def _on_params_changed(self, changed):
        if "diagnostics_period_s" in changed:
            self._start_diagnostics_timer(changed["diagnostics_period_s"])

    # ------------------------------------------------------------------ callbacks (enqueue only)
    def _on_scene(self, msg: PointCloud2):
        self._put(("scene", time.perf_counter(), msg))

    def _enqueue(self, kind: str, msg: PointStamped, positive: bool, new_object: bool):
        self._put((kind, time.perf_counter(), msg, positive, new_object))

    def _put(self, item):
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._refuse("queue", "dropped_queue_full", "segmentation queue full (256 pending items): "
                         f"{item[0]} input dropped", "error")

    # ------------------------------------------------------------------ worker
    def _warm_up(self):
        """Pay the first-use costs (OpenCV and scipy imports, numpy code paths) on a tiny scene at
        start-up, so that the first real scene is prepared as fast as the next ones."""
        from ..core.geometry import depth_to_world
        from ..core.group_mapping import GroupMapper
        from ..core.mask_cache import object_table
        from ..core.output import cloud as corecloud
        from ..core.output.scene_codec import scene_from_cloud_array
        from ..core.types import AlignedScene, MaskCache
        K = np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
        poses = np.tile(np.eye(4), (2, 1, 1))
        poses[1, 0, 3] = 0.05
        depth = 1.0 + 0.5 * np.random.default_rng(0).random((12, 16))  # not a plane: a camera can be resected
        pts = np.stack([depth_to_world(depth, K, T) for T in poses]).astype(np.float32)
        lab = np.zeros((2, 12, 16), np.int32)
        lab[:, 4:8, 5:10] = 1
        sc = AlignedScene(pts3d=pts, conf=np.ones((2, 12, 16), np.float32), poses=poses, K=np.stack([K, K]),
                          rgb=np.zeros((2, 12, 16, 3), np.uint8),
                          mask_cache=MaskCache(labels=lab, soft=(lab > 0).astype(np.float32), objects=object_table(lab)))
        arr, h, w = corecloud.pack_scene_cloud(sc)
        lay = corecloud.cloud_layout(arr, h, w)
        data = corecloud.cloud_to_bytes(arr)
        dec = scene_from_cloud_array(corecloud.cloud_from_bytes(bytearray(data), lay.fields, lay.point_step, h, w), "warm")
        mapper = GroupMapper(dec)
        mapper.warm()
        mapper.object_at_point(dec.pts3d[0, 6, 7])
        self._id_pool.submit(len, data).result()  # the identity thread is started
        seg = self._get_segmenter(True)  # the refinement segmenter of metric scenes (auto: geometric)
        if seg is not None:  # a click on no cached object: the segmenter's first run (its imports,
            from ..core.prompts.session import InteractiveSession  # OpenCV's Lab tables: 110 ms)
            InteractiveSession(dec, mapper, seg).add_point_prompt(dec.pts3d[0, 1, 1].astype(np.float64), True)

    def _work_loop(self):
        try:
            self._warm_up()
        except Exception as e:  # never fatal: the first scene then pays for it
            self.get_logger().warning(f"warm-up skipped ({type(e).__name__}: {e})")
        # the ~65k objects of the imports, start-up and warm-up are never collected: a full
        # collection took 37 ms (a pause at any click or scene); after this one it takes < 1 ms
        gc.collect()
        gc.freeze()
        while not self._stop.is_set():
            try:
                # idle work (the replaced scene's release, the heap reserve) starts 20 ms after
                # the last item (_after_first_click), also between the clicks of a busy operator
                item = self._q.get(timeout=self.IDLE_WORK_AFTER_S if self._retired or self._reserve is not None
                                   else 0.05 if self._held else 0.2)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._dispatch(item)
                elif self._retired and self._after_first_click():
                    self._retired.clear()
                elif self._reserve is not None and self._after_first_click():
                    # in steps while nothing waits (a prompt waits one step at most; the GIL is
                    # released after each, so the executor takes a prompt at once); in this
                    # thread, whose arena the next scene's arrays come from
                    while self._q.empty() and self._reserve.step():
                        time.sleep(0)
                    if self._reserve.done:
                        self.stats["heap_reserves"] += 1
                        self.stats["heap_reserved_bytes"] += self._reserve.touched
                        self._reserve = None
                elif self._trim_at is not None and time.monotonic() >= self._trim_at:
                    self._trim_at = None
                    if release_free_heap(keep_bytes=self._trim_keep()) and self._keep_heap:
                        self._start_reserve()  # what the next scene needs is faulted in again
                self._expire_held()
                if self.out.stale and self._q.empty():  # the old scene's selection, not replaced
                    self.out.publish([], self._frame())
            except Exception as e:  # keep the worker alive whatever happens
                self.stats["worker_errors"] += 1
                self.internal_error(f"{item[0] if item else 'held prompt'}", e)
            # a scene message (~30 MB) is freed now, not when the next item (a click) arrives
            item = None

    def _after_first_click(self) -> bool:
        """Idle work (freeing the replaced scene, the heap reserve) waits for a new scene's first
        click to be answered, or WARM_DELAY_S: that click has the CPU and the GIL to itself."""
        return self._warm_go.is_set() or self.session is None or time.monotonic() - self._scene_at > self.WARM_DELAY_S

    def _trim_keep(self) -> int:
        """Free heap bytes kept for the next scene."""
        return self.TRIM_KEEP_PER_SCENE_BYTE * self._scene_bytes

    def _start_reserve(self):
        self._reserve = HeapReserve(int(self.RESERVE_PER_SCENE_BYTE * self._scene_bytes),
                                    step_bytes=self.RESERVE_STEP_BYTES)

    def _dispatch(self, item):
        if item[0] == "scene":
            if self._reserve is not None:  # what it touched is free for this scene
                self._reserve.cancel()
                self._reserve = None
            self._load_scene(item[1], item[2])
            # the previous scene's arrays are freed once the worker is idle; what the heap then
            # holds beyond a scene's worth is given back to the OS once no new scene came for a
            # while (returned pages would be faulted in again by the next scene's preparation,
            # ~30 ms for 5 x 512x384 on the development VM: with memory.keep_scene_heap the
            # worker faults in what that scene needs after the release, and after the first scene)
            self._scene_at = time.monotonic()
            self._trim_at = self._scene_at + self.TRIM_IDLE_S
            self._scene_bytes = len(item[2].data)
            if self._keep_heap and self.session is not None:
                set_heap_thresholds(trim_threshold=self._trim_keep())
                if self._reserve_due:  # the next scene is prepared beside this one: in fresh memory
                    self._reserve_due = False
                    self._start_reserve()
        elif item[0] == "reset":
            self._do_reset()
        elif item[0] == "resegment":
            self._do_resegment(item[1])
        else:
            self._handle_prompt(*item)
            self._warm_go.set()

    def _get_segmenter(self, metric: bool = True):
        from ..core.config import resolve_segmenter
        from ..core.presegment.base import SEGMENTERS
        name = resolve_segmenter(self.params["segmenter"], metric)
        if self._segmenter is not None and getattr(self._segmenter, "name", name) != name:
            self._segmenter = None  # auto: the scene's kind changed
        if self._segmenter is None and not self._segmenter_error:
            try:
                self._segmenter = SEGMENTERS.create(name, **SEGMENTERS.kwargs_from_flat(name, self.params.values,
                                                                                         self.params["device"]))
            except Exception as e:
                self._segmenter_error = f"refinement segmenter unavailable ({e}); clicks are answered from the mask cache only"
                self.get_logger().error(self._segmenter_error)
        return self._segmenter

    def _build_session(self, scene):
        from ..core.group_mapping import GroupMapper
        from ..core.prompts.session import InteractiveSession
        # the filter the reconstruction node sent with the scene is used when it holds for these
        # settings (the defaults)
        mapper = GroupMapper(scene, voxel=self.params["mgm.voxel_size_m"] or None,
                             min_agree_frac=self.params["mgm.min_consistency"], use_kept=True)
        if mapper.uses_kept:  # every object is a cut of the sent filter (~1 ms each): now
            mapper.warm(index=False, negatives=False)
        # the objects' segments (largest first; unless cut above) and then the KD-tree are
        # computed on a thread of their own, so the worker is free for the first click (which
        # waits at most for the object being computed; scipy and most of numpy release the GIL)
        self._warm_gen += 1
        self._warm_go.clear()
        self._warm_pool.submit(self._warm_mapper, mapper, self._warm_gen)
        return InteractiveSession(scene, mapper, self._get_segmenter(bool(scene.metric)),
                                  max_click_dist=self.params["prompt.max_distance_m"])

    def _warm_mapper(self, mapper, gen: int):
        """The mapper's pending work, one unit at a time, given up when a newer scene arrives:
        the object segments, then the KD-tree (clicks meanwhile are answered by the exact window
        search), then the negative-prompt keys. The thread runs at a lower CPU priority than the
        worker, so a click does not share a core with it."""
        try:
            _lower_thread_priority()
            if mapper.uses_kept:
                # nothing a click needs is left (its object is cut already): the warm-up and the
                # replaced scene's release wait for the first click to be answered (or
                # WARM_DELAY_S), so that click has the CPU and the GIL to itself
                self._warm_go.wait(self.WARM_DELAY_S)
                self._retired.clear()
            while gen == self._warm_gen and not self._stop.is_set() and mapper.warm(1, index=False):
                pass
            if gen == self._warm_gen and not self._stop.is_set():
                mapper.build_index()
            if gen == self._warm_gen and not self._stop.is_set():
                mapper.prepare_negatives()  # already done with the objects unless they were cut
        except Exception as e:  # clicks compute what they need themselves (the window search
            self.internal_error("scene warm-up", e)  # answers without the index)

    def _load_scene(self, t_recv: float, msg: PointCloud2):
        t0 = time.perf_counter()
        if msg.width * msg.height == 0:
            self.scene, self.session, self.scene_id = None, None, None
            self._set_prompts([], [])
            self.out.publish([], self._frame())
            self.get_logger().info("empty scene received (reconstruction reset): selection cleared")
            return
        # the identity (a SHA-1 hash of ~30 MB) is computed on another thread while the message is
        # decoded: hashlib releases the GIL, so on two cores it costs the preparation nothing
        sid_future = self._id_pool.submit(scene_identity, msg)
        try:
            scene = decode_scene(msg)
        except SceneMessageError as e:
            self._refuse("bad_scene", "bad_scene", f"scene message refused ({e}); the previous scene "
                         "and selection are kept", "error")
            return
        sid = sid_future.result()
        if sid == self.scene_id and self.session is not None:  # the current scene again (e.g. republished after a restart)
            self.stats["scene_republished"] += 1
            self.scene_stamp = msg.header.stamp
            self.get_logger().info("the same scene was received again (republished): selection kept")
            self.out.publish(self.session.results(), self._frame(), self._last_stamp())
            return
        carry = self._recent_clicks(t_recv, msg)  # 3D clicks meant for this scene that came before it
        session = self._build_session(scene)
        # the replaced scene's ~100 MB are freed when no item waits, not before the next click
        # (one at most is kept: in a burst of scenes the one before is freed here)
        self._retired[:] = [(self.scene, self.session)]
        self.scene, self.session, self.scene_stamp, self.scene_id = scene, session, msg.header.stamp, sid
        self._set_prompts([], [])
        self.stats["scenes_loaded"] += 1
        mc = scene.mask_cache  # the decoder's object table counts the ids (object_ids: a pass over ~1M labels)
        n_obj = 0 if mc is None else len(mc.objects) if mc.objects else len(mc.object_ids())
        self.get_logger().info(f"scene ready: {scene.num_views} keyframes {scene.image_shape[1]}x"
                               f"{scene.image_shape[0]}, {n_obj} cached objects, frame '{scene.frame_id}' "
                               f"({1e3 * (time.perf_counter() - t0):.0f} ms to prepare)")
        if not self._restore_session():
            self._replay_on_new_scene(carry)
            if self.prompt_log:
                self.out.publish(self.session.results(), scene.frame_id, self._last_stamp())
                self.stats["prompts_replayed_on_new_scene"] += len(self.prompt_log)
                self._save_session()
            else:  # cleared once no prompt queued during the preparation answers instead (work loop)
                self.out.stale = self.out.shown
        held, self._held = self._held, []
        for item in held:  # prompts that waited for a scene
            self._handle_prompt(*item)

    def _do_reset(self):
        if self.session is not None:
            self.session.reset()
        self._set_prompts([], [])
        self.out.publish([], self._frame())
        self._save_session()

    def _do_resegment(self, queued: threading.Event):
        queued.clear()  # requests from now on need another pass
        if self.scene is None:
            return
        self._segmenter, self._segmenter_error = None, ""
        self.session = self._build_session(self.scene)
        prompts, meta = list(self.prompt_log), list(self._prompt_meta)
        self._set_prompts([], [])
        for (kind, data, positive, new_object), (t, stamp) in zip(prompts, meta):
            if self._apply_prompt(kind, data, positive, new_object, None, stamp):
                self._prompt_meta[-1] = (t, stamp)
        self.out.publish(self.session.results(), self._frame(), self._last_stamp())
        self._save_session()

    # ------------------------------------------------------------------ services
    def _srv_reset(self, req, resp):
        self._put(("reset",))
        resp.success, resp.message = True, "prompts and selection cleared"
        return resp

    def _srv_resegment(self, req, resp):
        if self.scene is None:
            resp.success, resp.message = False, "no scene yet: nothing to re-segment"
            return resp
        if self._resegment_queued.is_set():  # a storm of requests: one re-segmentation does them all
            resp.success, resp.message = True, "a re-segmentation is already queued: it serves this request too"
            return resp
        self._resegment_queued.set()
        self._put(("resegment", self._resegment_queued))
        resp.success = True
        resp.message = f"re-segmenting the current scene and replaying {len(self.prompt_log)} prompt(s)"
        return resp

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        """Key/values of the /diagnostics status (also used by tests and the soak benchmark)."""
        p = self.params
        if self._segmenter_error:
            seg_status = "error"
        elif self._segmenter is not None:
            seg_status = "ready"
        else:
            seg_status = "not loaded yet (loaded with the first scene)"
        scene, reserve = self.scene, self._reserve
        kv = {"segmenter": p["segmenter"], "segmenter_status": seg_status, "device": p["device"],
              "model": p["sam2.checkpoint"] if p["segmenter"] == "sam2" else f"none ({p['segmenter']}: weight-free)",
              "queue": f"{self._q.qsize()}/{self._q.maxsize}", "prompts_waiting_for_scene": str(len(self._held)),
              "scene": (f"{scene.num_views} keyframes, frame '{scene.frame_id}'" if scene is not None else "none"),
              "scene_id": self.scene_id or "none",
              "prompts": str(len(self.prompt_log)),
              "objects": str(len(self.session.results())) if self.session is not None else "0",
              "prompt_latency_p50_ms": f"{percentile(self.latencies_ms, 50):.2f}",
              "prompt_latency_p95_ms": f"{percentile(self.latencies_ms, 95):.2f}",
              "last_error": (self.last_error or self._segmenter_error)[:300] or "none",
              "scene_dir": self._scene_dir() or "(disabled)",
              "heap": ("kept for the next scene" if self._keep_heap else "glibc defaults")
              + (f" (faulting in {reserve.nbytes >> 20} MiB ahead)" if reserve is not None else "")}
        kv.update({k: str(v) for k, v in sorted(self.stats.items())})
        return kv

    def _diagnostic_state(self):
        """(level, message) of this node's /diagnostics status."""
        if self._segmenter_error:
            return DiagnosticStatus.WARN, self._segmenter_error
        if self.last_error:
            return DiagnosticStatus.WARN, self.last_error
        return DiagnosticStatus.OK, "scene loaded" if self.scene is not None else "waiting for a scene"

    def destroy_node(self):
        self._stop.set()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout=2.0)  # no publish on a destroyed publisher
        self._id_pool.shutdown(wait=False)
        self._warm_pool.shutdown(wait=False)
        self._flush_session()
        return super().destroy_node()


def main(args=None):
    from .spin import spin_node
    spin_node(SegmentationNode, args)


if __name__ == "__main__":
    main()
