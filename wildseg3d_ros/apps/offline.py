"""`wildseg3d segment`: the WildSeg3D pipeline offline, without a ROS runtime.

Input: a rosbag2 (folder with ``metadata.yaml``, or a single ``.mcap`` / ``.db3`` file), an image
folder (sorted file names; optional ``depth/`` sibling folder of 16-bit PNG/PGM or float images),
or a video file (OpenCV; ``--every K`` keeps one frame in K, e.g. for drone footage).

It runs the same core code as the ROS nodes: keyframe selection (:class:`KeyframeBuffer`, the
reconstruction node's policy, or uniform sampling), the pointmap backend (``rgbd``: metric
depth; ``sfm``: RGB only, no weights; ``dust3r``: RGB, a network checkpoint), the per-view
segmenter and Dynamic Global Aligning
(:class:`~wildseg3d_ros.core.pipeline.ReconstructionPipeline`), then an
:class:`~wildseg3d_ros.core.prompts.session.InteractiveSession` (Multi-view Group Mapping)
with the ``--click`` / ``--negative`` pixel prompts, and writes into ``--out``:

* ``object.ply``  the segmented object(s) (xyz, rgb, label)
* ``scene.ply``   every valid point of the aligned scene (xyz, rgb)
* ``montage.png`` keyframes with the object mask + a rendered view of the 3D segment
* ``result.json`` settings, keyframes used (source frame index, stamp), timings, point counts

Bags are read with the ``rosbags`` library (no ROS installation needed). Message types:
``sensor_msgs/msg/Image``, ``sensor_msgs/msg/CompressedImage``, ``sensor_msgs/msg/CameraInfo``,
``geometry_msgs/msg/PoseStamped``, ``nav_msgs/msg/Odometry`` (and
``geometry_msgs/msg/PoseWithCovarianceStamped``). A pose topic must give the *camera optical
frame's* pose in a world frame (camera-to-world, OpenCV axes): there is no TF lookup offline.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..core.camera.sources import Frame, Source, guess_K, open_source
from ..core.config import backend_choices, segmenter_choices
from ..core.errors import InputError

@dataclass
class Prompt:
    positive: bool
    view: int
    u: float
    v: float


def _log(msg: str, quiet: bool = False):
    if not quiet:
        print(f"[wildseg3d segment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tqdm(iterable=None, **kw):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience only
        class _Null:
            def __init__(self, it=None, **_):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def update(self, *_):
                pass

            def set_description_str(self, *_):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *_):
                return False
        return _Null(iterable)
    return tqdm(iterable, **kw)


# =============================================================================================
# argument parsing helpers
# =============================================================================================

def parse_click(text: str) -> Tuple[int, float, float]:
    """``'<view>:<u>,<v>'`` -> (view, u, v); ``u`` column, ``v`` row, in input-image pixels."""
    try:
        view_s, uv = str(text).split(":", 1)
        u_s, v_s = uv.split(",", 1)
        view, u, v = int(view_s), float(u_s), float(v_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected <view>:<u>,<v> (e.g. 0:120,80), got {text!r}") from None
    if view < 0 or not (math.isfinite(u) and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"invalid click {text!r}")
    return view, u, v


def parse_intrinsics(text: str) -> Tuple[float, float, float, float]:
    try:
        vals = [float(x) for x in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy, got {text!r}") from None
    if len(vals) != 4 or vals[0] <= 0 or vals[1] <= 0 or not all(map(math.isfinite, vals)):
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy with positive focals, got {text!r}")
    return tuple(vals)  # type: ignore[return-value]


class _PromptAction(argparse.Action):
    """--click / --negative append to one ordered list (the order of the command line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        lst = list(getattr(namespace, self.dest, None) or [])
        view, u, v = values
        lst.append(Prompt(self.const, view, u, v))
        setattr(namespace, self.dest, lst)


def open_input(args) -> Source:
    """The frame source named by ``--input`` with the CLI's options."""
    bar = _tqdm(total=100, desc="scan input", unit="%", disable=args.quiet or None, leave=False)
    done = [0]

    def progress(frac, _msg):
        step = int(100 * frac) - done[0]
        if step > 0:
            bar.update(step)
            done[0] += step

    try:
        return open_source(args.input, intrinsics=args.intrinsics, every=args.every, image_topic=args.image_topic,
                           depth_topic=args.depth_topic, camera_info_topic=args.camera_info_topic,
                           pose_topic=args.pose_topic, sync_tolerance=args.sync_tolerance,
                           pose_tolerance=args.pose_tolerance, depth_dir=args.depth_dir, poses=args.poses,
                           depth_scale=args.depth_scale, fps=args.fps, progress=progress)
    finally:
        bar.close()


def select_frames(src: Source, args) -> Tuple[List[Frame], dict]:
    """Keyframes of ``src`` (core.keyframes.select_keyframes with the CLI's policy), K filled in."""
    from ..core.config import keyframe_policy_from_flat
    from ..core.keyframes import select_keyframes

    n = src.count()
    total = min(n, args.max_frames) if args.select == "uniform" else n
    bar = _tqdm(total=total, desc="read frames" if args.select == "uniform" else "select keyframes",
                unit="frame", disable=args.quiet or None, leave=False)
    try:
        return select_keyframes(src, args.select, args.max_frames, keyframe_policy_from_flat(flat_params(args)),
                                prepare=lambda fr: _with_K(fr, args), progress=lambda f, m: bar.update(1))
    finally:
        bar.close()


def _with_K(fr: Frame, args) -> Frame:
    if fr.K is None:
        h, w = fr.rgb.shape[:2]
        fr.K = guess_K(w, h, args.hfov)
        fr.K_known = False
        if not getattr(args, "_warned_K", False):
            how = {"dust3r": "", "sfm": "; sfm refines the focal length from it in bundle adjustment"}.get(
                args.backend, " - metric depth needs them")
            _log(f"no intrinsics given: assuming a {args.hfov:.0f} deg horizontal field of view "
                 f"(pass --intrinsics fx,fy,cx,cy{how})", args.quiet)
            args._warned_K = True
    return fr


# =============================================================================================
# the run
# =============================================================================================

def _to_network_resolution(kfs: List[Frame], size: int):
    """DUSt3R works at 512 (long side, multiple-of-16 crop) or 224 (square crop). The aligned
    scene comes out at that resolution, so keyframes are brought there first (same resize/crop as
    ``dust3r.utils.image.load_images``; K adjusted) and clicks are mapped with the returned
    per-keyframe (sx, sy, left, top)."""
    from ..core.pointmaps.dust3r import preprocess_image

    maps = []
    for fr in kfs:
        p = preprocess_image(fr.rgb, fr.K, size=size)
        maps.append((p.scale[0], p.scale[1], p.crop[0], p.crop[1]))
        fr.rgb, fr.K, fr.depth = p.rgb, p.K, None
    return maps


#: a click on a pixel without a reconstructed point moves to the nearest one within this radius
SNAP_PX = 12.0


def _snap_to_reconstructed(valid: np.ndarray, u: float, v: float, radius: float):
    """(u, v, moved): the click, or the nearest pixel with a reconstructed point within
    ``radius`` px when the clicked pixel has none (backends without depth leave holes)."""
    H, W = valid.shape
    c, r = int(round(u)), int(round(v))
    if not (0 <= c < W and 0 <= r < H) or valid[r, c]:
        return u, v, False
    r0, r1 = max(0, r - int(radius)), min(H, r + int(radius) + 1)
    c0, c1 = max(0, c - int(radius)), min(W, c + int(radius) + 1)
    rr, cc = np.nonzero(valid[r0:r1, c0:c1])
    if len(rr) == 0:
        return u, v, False
    d2 = (rr + r0 - r) ** 2 + (cc + c0 - c) ** 2
    k = int(np.argmin(d2))
    if d2[k] > radius * radius:
        return u, v, False
    return float(cc[k] + c0), float(rr[k] + r0), True


def run_segment(args) -> dict:
    """Run the whole offline pipeline for parsed ``args``; returns the result dict (also written
    as result.json) with the in-memory ``scene`` and ``session`` under ``_scene``/``_session``."""
    import torch

    from ..core.output import montage, ply
    from ..eval.metrics import project_segment
    from ..core.config import PipelineConfig
    from ..core.pipeline import ReconstructionPipeline
    from ..core.types import Keyframe
    from ..core.group_mapping import GroupMapper
    from ..core.prompts.session import InteractiveSession

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(int(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}

    src = open_input(args)
    _log(f"input: {json.dumps(src.describe())}", args.quiet)
    if args.backend == "rgbd" and not src.has_depth:
        hint = ("pass --depth-topic <topic> (the bag has no topic with 'depth' in its name)" if src.kind == "rosbag2"
                else "pass --depth-dir <folder of 16-bit depth images>" if src.kind == "image_folder"
                else "a video has no depth")
        raise InputError(f"the input has no depth images, and the 'rgbd' backend needs metric depth: {hint}, "
                         "or reconstruct from RGB only with --backend sfm (structure from motion + stereo, "
                         "CPU, no weights) or --backend dust3r --checkpoint <DUSt3R/MASt3R .pth or hub id> "
                         "(see docs/gpu_setup.md)")
    if args.backend == "dust3r" and not args.checkpoint:
        raise InputError("--backend dust3r needs --checkpoint <local DUSt3R/MASt3R .pth, save_pretrained folder or "
                         "Hugging Face hub id such as naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt> (see docs/gpu_setup.md, "
                         "check with `wildseg3d check-gpu`); or use --backend sfm (no weights)")
    if args.segmenter == "sam2" and not args.sam2_checkpoint:
        raise InputError("--segmenter sam2 needs --sam2-checkpoint <sam2.1_hiera_*.pt> (see docs/gpu_setup.md)")

    t = time.perf_counter()
    frames, sel_stats = select_frames(src, args)
    timings["read_select_s"] = time.perf_counter() - t
    if len(frames) < 2:
        raise InputError(f"only {len(frames)} keyframe(s) selected from {sel_stats['candidate_frames']} frames "
                         f"({sel_stats}); lower --min-flow / --min-translation, raise --max-frames, or use "
                         "--select uniform")
    if args.backend == "rgbd":
        missing = [f.index for f in frames if f.depth is None]
        if missing:
            raise InputError(f"frames {missing} have no depth partner within {args.sync_tolerance} s; raise "
                             "--sync-tolerance or check --depth-topic")
    src_shape = frames[0].rgb.shape[:2]
    click_maps = None
    if args.backend == "dust3r":
        click_maps = _to_network_resolution(frames, args.image_size)
    _log(f"{len(frames)} keyframes: source frames {[f.index for f in frames]} "
         f"({sel_stats['candidate_frames']} candidates, selection '{args.select}')", args.quiet)

    have_poses = all(f.pose is not None for f in frames)
    kfs = [Keyframe(index=i, stamp=f.stamp, rgb=f.rgb, K=f.K, depth=f.depth, pose_prior=f.pose,
                    frame_id=f.frame_id, K_known=f.K_known) for i, f in enumerate(frames)]
    flat = flat_params(args)
    flat["use_pose_priors"] = have_poses and not args.ignore_poses
    if args.backend == "sfm":  # a guessed focal is refined in bundle adjustment
        flat["sfm.refine_intrinsics"] = bool(args.refine_intrinsics or not all(f.K_known for f in frames))
        _log(f"sfm: intrinsics {'refined in bundle adjustment (initial guess' if flat['sfm.refine_intrinsics'] else 'fixed (calibration'}"
             f" fx={kfs[0].K[0, 0]:.1f})", args.quiet)
    cfg = PipelineConfig.from_flat(flat)
    t = time.perf_counter()
    _log(f"building backend '{cfg.backend}' and segmenter '{cfg.segmenter}' on {cfg.device}", args.quiet)
    pipe = ReconstructionPipeline(cfg)
    timings["model_load_s"] = time.perf_counter() - t

    stages = ["pointmaps", "segmentation", "alignment", "mask cache", "done"]
    bar = _tqdm(total=len(stages) - 1, desc="reconstruct", unit="step", disable=args.quiet or None, leave=False)
    state = {"i": 0}

    def progress(stage, frac):
        k = stages.index(stage) if stage in stages else state["i"]
        if k > state["i"]:
            bar.update(k - state["i"])
            state["i"] = k
        bar.set_description_str(f"reconstruct: {stage}")

    frame_id = args.frame_id or ("map" if cfg.use_pose_priors else "wildseg3d_reconstruction")
    for kf in kfs:
        if not cfg.use_pose_priors:
            kf.pose_prior = None
    scene, rec_t = pipe.run(kfs, progress=progress, frame_id=frame_id)
    bar.close()
    timings.update({k: float(v) for k, v in rec_t.items()})
    # keyframes the backend could not use (e.g. not registered by SfM): the scene covers the rest
    kept = list(scene.info.get("kept_views") or range(len(kfs)))
    dropped = dict(scene.info.get("dropped_views") or {})
    scene_view = {k: i for i, k in enumerate(kept)}
    for k, why in sorted(dropped.items()):
        _log(f"view {k} (frame {frames[k].index}) left out of the reconstruction: {why}", args.quiet)
    H_s, W_s = scene.image_shape
    if click_maps is None and (H_s, W_s) != tuple(src_shape):  # the backend worked at a lower resolution
        sx, sy = W_s / src_shape[1], H_s / src_shape[0]
        click_maps = [(sx, sy, 0, 0)] * len(frames)
    _log(f"scene: {scene.num_views} views {scene.image_shape[1]}x{scene.image_shape[0]}, "
         f"{len(scene.mask_cache.object_ids())} cached objects, reconstruction {rec_t['total_s']:.2f} s", args.quiet)

    # prompts
    t = time.perf_counter()
    mapper = GroupMapper(scene, voxel=args.mgm_voxel or None, min_agree_frac=args.mgm_min_consistency)
    session = InteractiveSession(scene, mapper, pipe.segmenter)
    timings["group_mapper_s"] = time.perf_counter() - t
    prompts = list(args.prompts or [])
    prompt_log = []
    t = time.perf_counter()
    valid_px = scene.valid_mask()
    for pr in prompts:
        if pr.view >= len(frames):
            raise InputError(f"click on view {pr.view}, but only {len(frames)} keyframes were selected "
                             f"(views 0..{len(frames) - 1}; result.json lists their source frames)")
        if pr.view in dropped:
            _log(f"click on view {pr.view} skipped: that keyframe was left out of the reconstruction "
                 f"({dropped[pr.view]}); click on one of views {kept}", args.quiet)
            prompt_log.append({"positive": pr.positive, "view": pr.view, "u": pr.u, "v": pr.v,
                               "skipped": f"view {pr.view} is not in the reconstruction: {dropped[pr.view]}"})
            continue
        u, v = pr.u, pr.v
        if click_maps is not None:  # input pixels -> network-resolution pixels
            sx, sy, left, top = click_maps[pr.view]
            u, v = (u + 0.5) * sx - 0.5 - left, (v + 0.5) * sy - 0.5 - top
        u, v, snapped = _snap_to_reconstructed(valid_px[scene_view[pr.view]], u, v, SNAP_PX)
        if snapped:
            _log(f"click {pr.view}:{pr.u:g},{pr.v:g} is on a pixel without a reconstructed point (e.g. a stereo "
                 f"hole): using the nearest reconstructed pixel ({u:.0f}, {v:.0f}) of the scene", args.quiet)
        tp = time.perf_counter()
        res = session.add_pixel_prompt(scene_view[pr.view], u, v, pr.positive)
        prompt_log.append({"positive": pr.positive, "view": pr.view, "u": pr.u, "v": pr.v,
                           "u_scene": round(float(u), 2), "v_scene": round(float(v), 2), "snapped": bool(snapped),
                           "points_after": int(res.num_points), "ms": round((time.perf_counter() - tp) * 1e3, 2)})
    timings["prompts_s"] = time.perf_counter() - t
    obj_pts, obj_rgb, obj_lab = session.combined_cloud()

    # outputs
    t = time.perf_counter()
    valid = scene.valid_mask()
    ply.write_ply(out / "scene.ply", scene.pts3d[valid], scene.rgb[valid])
    ply.write_ply(out / "object.ply", obj_pts, obj_rgb, labels=obj_lab)
    V, H, W = valid.shape
    # the 3D segment seen from each keyframe (projected, occlusion-tested), as the demo shows it
    masks = project_segment(obj_pts, scene) if len(obj_pts) else np.zeros((V, H, W), bool)
    montage.make_montage(scene.rgb, masks, obj_pts, obj_rgb, None, None, out / "montage.png",
                         titles=[f"view {k} (frame {frames[k].index})" for k in kept],
                         view_from=scene.poses[0])
    timings["write_s"] = time.perf_counter() - t
    timings["wall_s"] = time.perf_counter() - t0

    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("func", "prompts")}
    result = {
        "input": src.describe(),
        "settings": settings,
        "prompts": prompt_log,
        "keyframes": [{"view": i, "source_frame": int(f.index), "stamp": float(f.stamp),
                       "has_depth": f.depth is not None, "has_pose": f.pose is not None,
                       "scene_view": scene_view.get(i), **({"left_out": dropped[i]} if i in dropped else {})}
                      for i, f in enumerate(frames)],
        "views_left_out": {str(k): v for k, v in sorted(dropped.items())},
        "selection": sel_stats,
        "source_image_size": [int(src_shape[1]), int(src_shape[0])],
        "scene_image_size": [int(W), int(H)],
        "frame_id": scene.frame_id,
        "metric": bool(scene.metric),
        "scene_points": int(valid.sum()),
        "cached_objects": int(len(scene.mask_cache.object_ids())),
        "object_points": int(len(obj_pts)),
        "objects": [{"label": int(lab), "points": int(seg.num_points),
                     "cache_ids": [int(x) for x in seg.object_ids]} for lab, seg in session.results()],
        "camera_poses": [np.round(p, 6).tolist() for p in scene.poses],
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
        "files": ["object.ply", "scene.ply", "montage.png", "result.json"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    _log(f"object: {len(obj_pts)} points; wrote {out}/object.ply, scene.ply, montage.png, result.json "
         f"in {timings['wall_s']:.1f} s", args.quiet)
    if not prompts:
        _log("no --click given: object.ply is empty; pick a pixel on a keyframe of montage.png and run again "
             "with --click <view>:<u>,<v>", args.quiet)
    result["_scene"] = scene
    result["_session"] = session
    return result


def _segment_main(args) -> int:
    try:
        res = run_segment(args)
    except InputError as e:
        print(f"wildseg3d segment: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # model / pipeline failures: one readable line, details with --verbose
        name = type(e).__name__
        if getattr(args, "verbose", False):
            import traceback
            traceback.print_exc()
        print(f"wildseg3d segment: {name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "keyframes": len(res["keyframes"]),
                      "object_points": res["object_points"], "wall_s": res["timings_s"]["wall_s"]}))
    return 0


def _param_value(text: str):
    """``NAME=VALUE`` of ``--param`` -> (name, value typed as YAML: 3, 0.5, true, text)."""
    import yaml

    name, sep, value = str(text).partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. dga.alpha_p=0.5), got {text!r}")
    try:
        v = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        v = value
    return name.strip(), v


EXACT_POSE_WEIGHT = 1e4  # dga.pose_prior_weight of --exact-poses: holds the cameras (test_dga_align)


def flat_params(args) -> dict:
    """The CLI's options under the flat parameter names of the nodes and the YAML files
    (:mod:`wildseg3d_ros.core.config`); ``--param NAME=VALUE`` sets any of them directly."""
    flat = {
        "backend": args.backend, "segmenter": args.segmenter, "scene_graph": args.scene_graph,
        "device": args.device, "dga.iterations": args.iterations, "dga.weighting": args.weighting,
        "dga.optimizer": args.optimizer,
        "dust3r.checkpoint": args.checkpoint or "", "dust3r.image_size": args.image_size,
        "dust3r.batch_size": args.batch_size, "sam2.config": args.sam2_config,
        "sfm.refine_intrinsics": bool(args.refine_intrinsics), "sfm.max_pairs_per_view": args.sfm_pairs_per_view,
        "sfm.max_image_size": args.sfm_max_size,
        "sam2.checkpoint": args.sam2_checkpoint or "", "sam2.points_per_side": args.points_per_side,
        "use_pose_priors": not args.ignore_poses,
        **({"dga.pose_prior_weight": EXACT_POSE_WEIGHT} if getattr(args, "exact_poses", False) else {}),
        "keyframes.min_interval_s": args.min_interval, "keyframes.min_translation_m": args.min_translation,
        "keyframes.min_rotation_deg": args.min_rotation, "keyframes.min_flow_px": args.min_flow,
        "keyframes.min_sharpness": args.min_sharpness, "keyframes.max_keyframes": max(2, args.max_frames),
    }
    flat.update(dict(getattr(args, "params", None) or []))
    return flat


EPILOG = """\
input kinds:
  rosbag2 folder (metadata.yaml), or one .mcap / .db3 file: topics are found by type when not
      given (colour: first Image/CompressedImage topic without 'depth' in its name; depth: the
      one with 'depth'; CameraInfo; PoseStamped/Odometry for camera poses). Depth must be
      registered to the colour image (same size). 16UC1 depth is millimetres, 32FC1 metres.
  image folder: sorted image files, or color/ (rgb/, images/) + depth/ sub-folders; depth paired
      by file stem or by order; integer depth x --depth-scale (default 0.001 = millimetres).
  video file: OpenCV; --every K keeps one frame in K (aerial/drone footage: e.g. --every 15
      on 30 fps, --backend sfm or dust3r; the camera must move between kept frames).

views and clicks:
  Keyframes are numbered 0..N-1 in time order ("views"); result.json lists the source frame of
  each. --click 0:320,240 is a positive click on view 0 at column 320, row 240 of the INPUT image
  (mapped to the network resolution for dust3r). The first click selects the cached object under
  it (Multi-view Group Mapping); later clicks (and --negative) refine it. Without clicks only
  the scene is reconstructed (montage.png shows the views to click on).

examples:
  wildseg3d segment --input room.mcap --depth-topic /camera/depth/image_raw --click 0:320,240 --out out
  wildseg3d segment --input frames/ --depth-dir depth/ --intrinsics 518,519,325.5,253.5 --click 2:300,200 --out out
  wildseg3d segment --input photos/ --backend sfm --intrinsics 1520.4,1525.9,302.3,246.9 --click 0:300,240 --out out
  wildseg3d segment --input flight.mp4 --every 15 --max-frames 8 --backend dust3r \\
      --checkpoint ckpt/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth --device cuda --click 0:640,360 --out out

exit codes: 0 done, 1 pipeline/model failure, 2 unusable input or options.
"""


def add_segment_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "segment", help="offline: segment an object from a rosbag2 / image folder / video (no ROS runtime)",
        description="Reconstruct a scene from a few keyframes of a recording and segment the clicked object "
                    "in 3D (the WildSeg3D pipeline the ROS nodes run). Writes object.ply, scene.ply, "
                    "montage.png and result.json into --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = s.add_argument_group("input")
    g.add_argument("--input", "-i", required=True,
                   help="rosbag2 folder, .mcap or .db3 file, image folder or video file")
    g.add_argument("--image-topic", help="bag: colour topic (sensor_msgs/Image or CompressedImage)")
    g.add_argument("--depth-topic", help="bag: depth topic registered to the colour image (Image 16UC1/32FC1 or "
                                         "compressedDepth)")
    g.add_argument("--camera-info-topic", help="bag: sensor_msgs/CameraInfo topic (intrinsics)")
    g.add_argument("--pose-topic", help="bag: camera pose topic (PoseStamped / Odometry; camera optical frame "
                                        "in a world frame)")
    g.add_argument("--depth-dir", help="image folder: folder of depth images (default: <input>/depth if present)")
    g.add_argument("--poses", help="image folder: pose file, one line per image: tx ty tz qx qy qz qw "
                                   "(camera-to-world; TUM lines with a leading stamp also accepted)")
    g.add_argument("--intrinsics", type=parse_intrinsics, metavar="FX,FY,CX,CY",
                   help="pinhole intrinsics in input pixels (overrides CameraInfo)")
    g.add_argument("--hfov", type=float, default=60.0,
                   help="horizontal field of view (deg) assumed when no intrinsics are known (default 60)")
    g.add_argument("--depth-scale", type=float, default=0.001,
                   help="metres per unit of integer depth images in folders (default 0.001: millimetres)")
    g.add_argument("--fps", type=float, default=10.0,
                   help="image folder: frame rate used to give frames time stamps (default 10)")
    g.add_argument("--sync-tolerance", type=float, default=0.05,
                   help="bag: max |t_colour - t_depth| (s) to pair a depth image (default 0.05)")
    g.add_argument("--pose-tolerance", type=float, default=0.1,
                   help="bag: max |t_colour - t_pose| (s) to use a pose (default 0.1)")
    g.add_argument("--ignore-poses", action="store_true", help="do not use poses even when available")
    g.add_argument("--exact-poses", action="store_true",
                   help="the given poses are exact (ground truth, motion capture, a bundle-adjusted "
                        "trajectory): the cameras are held at them (dga.pose_prior_weight=1e4), a pose "
                        "that disagrees with the images' geometry is released; without it poses only "
                        "initialise the aligner and place the result in their frame (odometry)")
    k = s.add_argument_group("keyframes")
    k.add_argument("--every", type=int, default=1, metavar="K",
                   help="keep one input frame in K before selection (videos, long bags; default 1)")
    k.add_argument("--max-frames", type=int, default=5, metavar="N",
                   help="number of keyframes (the paper uses a few views; default 5)")
    k.add_argument("--select", choices=("keyframes", "uniform"), default="keyframes",
                   help="keyframes: the reconstruction node's KeyframeBuffer policy (motion, sharpness, "
                        "redundancy eviction); uniform: N evenly spaced frames (default keyframes)")
    k.add_argument("--min-interval", type=float, default=0.0, help="keyframes: min seconds between keyframes")
    k.add_argument("--min-translation", type=float, default=0.05, help="keyframes: min camera motion (m) with poses")
    k.add_argument("--min-rotation", type=float, default=5.0, help="keyframes: min camera rotation (deg) with poses")
    k.add_argument("--min-flow", type=float, default=20.0, help="keyframes: min image motion (px) without poses")
    k.add_argument("--min-sharpness", type=float, default=15.0, help="keyframes: min variance of Laplacian")
    m = s.add_argument_group("models")
    m.add_argument("--backend", choices=backend_choices(), default="rgbd",
                   help="pointmaps from metric depth (rgbd, CPU), from RGB only by structure from motion + dense "
                        "stereo (sfm, CPU, no weights) or from RGB with DUSt3R/MASt3R (dust3r) (default rgbd)")
    m.add_argument("--checkpoint", help="dust3r: DUSt3R/MASt3R checkpoint: .pth file, save_pretrained folder or "
                                        "Hugging Face hub id (e.g. naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt; "
                                        "taken from the local hub cache, downloaded when online)")
    m.add_argument("--refine-intrinsics", action="store_true",
                   help="sfm: refine the focal length in bundle adjustment even when intrinsics are given "
                        "(always done when none are known)")
    m.add_argument("--sfm-pairs-per-view", type=int, default=3, help="sfm: dense stereo pairs per keyframe")
    m.add_argument("--sfm-max-size", type=int, default=1024,
                   help="sfm: downscale keyframes to this long side first (0: full resolution)")
    m.add_argument("--image-size", type=int, choices=(224, 512), default=512, help="dust3r: network input size")
    m.add_argument("--batch-size", type=int, default=4, help="dust3r: pairs per forward pass")
    m.add_argument("--scene-graph", default="complete", help="pair graph: complete | swin-<k> | oneref-<k>")
    m.add_argument("--segmenter", choices=segmenter_choices(), default="auto",
                   help="mask-cache segmenter: geometric (CPU, no weights; RGB-D clutter: support planes, "
                        "depth discontinuities, convexity), classical (CPU, no weights; colour + geometry) or "
                        "sam2; auto (default): geometric with metric depth (rgbd), classical otherwise")
    m.add_argument("--sam2-checkpoint", help="sam2: checkpoint .pt (e.g. sam2.1_hiera_tiny.pt) or Hugging Face hub "
                                             "id (e.g. facebook/sam2.1-hiera-tiny)")
    m.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml",
                   help="sam2: config name inside the sam2 package matching the checkpoint")
    m.add_argument("--points-per-side", type=int, default=16, help="sam2: automatic mask generator grid")
    m.add_argument("--iterations", type=int, default=500, help="DGA iterations (paper: 500)")
    m.add_argument("--optimizer", choices=("gauss_newton", "adam"), default="gauss_newton",
                   help="alignment optimiser: gauss_newton (default, tens of iterations) or adam "
                        "(the reference, --iterations steps)")
    m.add_argument("--weighting", choices=("dga", "confidence"), default="dga",
                   help="alignment weights: dga (paper) or confidence (DUSt3R baseline)")
    m.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default cpu)")
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    m.add_argument("--param", dest="params", action="append", type=_param_value, metavar="NAME=VALUE",
                   help="set any reconstruction parameter by its node/YAML name, e.g. --param dga.alpha_p=0.4 "
                        "--param dga.pose_prior_weight=100 (repeatable; wins over the flags above)")
    m.add_argument("--mgm-voxel", type=float, default=0.0, help="MGM floater-filter voxel (m); 0 = automatic")
    m.add_argument("--mgm-min-consistency", type=float, default=0.5,
                   help="MGM: min share of agreeing views for a point to stay")
    p = s.add_argument_group("prompts and output")
    p.add_argument("--click", dest="prompts", action=_PromptAction, const=True, type=parse_click,
                   metavar="VIEW:U,V", help="positive click on keyframe VIEW at column U, row V (repeatable)")
    p.add_argument("--negative", dest="prompts", action=_PromptAction, const=False, type=parse_click,
                   metavar="VIEW:U,V", help="negative click (repeatable; after a positive one)")
    p.add_argument("--frame-id", default="", help="frame name recorded in result.json (default map with poses, "
                                                  "else wildseg3d_reconstruction)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress log / bars")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    s.set_defaults(func=_segment_main, prompts=[])
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="wildseg3d")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_segment_parser(sub)
    args = ap.parse_args(["segment"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
