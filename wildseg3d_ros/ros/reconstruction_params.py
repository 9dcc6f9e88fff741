"""reconstruction_node's parameter table (declared with descriptors, validated on set; the
README tables are generated from it by scripts/param_tables.py)."""
from __future__ import annotations

from ..core.config import backend_choices, segmenter_choices
from .params import ParamSpec, check_device, check_dir_param, check_file_param, check_scene_graph

PARAMS = [
    ParamSpec("world_frame", "map", "Frame of the published scene when camera poses are known "
              "(odometry/pose topics or TF); otherwise reconstruction_frame is used."),
    ParamSpec("reconstruction_frame", "wildseg3d_reconstruction", "Frame of the scene when no camera "
              "pose is known: anchored at the first keyframe, scale unknown for monocular backends."),
    ParamSpec("use_tf", True, "Look up the camera pose in world_frame from TF (tf2_ros) when it is "
              "importable; pose/odom topics are used otherwise or in addition."),
    ParamSpec("tf_timeout_s", 0.05, "TF lookup timeout per frame (s). Since the pairing never blocks, TF is "
              "polled while a frame waits for its partners (up to input.pairing_timeout_s); kept so that "
              "existing launch files still load.", 0.0, 5.0),
    ParamSpec("input.use_compressed", False, "Subscribe to image/compressed (jpeg/png) instead of image "
              "(fixed at start-up).", read_only=True),
    ParamSpec("input.depth_sync_tolerance_s", 0.05, "Max |t_colour - t_depth| to pair a depth image whose stamp "
              "differs from the colour frame's (an exact stamp always pairs first); capped at 0.45 x the "
              "colour frame period so a lost depth is never replaced by the next frame's.", 0.0, 1.0),
    ParamSpec("input.pose_sync_tolerance_s", 0.1, "Max |t_image - t_pose| of the pose messages used: the pose is "
              "interpolated (SLERP + linear) between the messages before and after the image, or the "
              "nearer one is used.", 0.0, 5.0),
    ParamSpec("input.pairing_timeout_s", 0.5, "How long a colour frame waits for its depth, camera pose and "
              "CameraInfo after it arrived (s) before it is dropped; long enough for a reliable "
              "transport to resend a lost depth. Frames are paired as their partners arrive, nothing "
              "blocks.", 0.0, 10.0),
    ParamSpec("input.max_future_s", 30.0, "Colour, depth and pose messages stamped more than this many "
              "seconds ahead of the node's clock (sim time with use_sim_time) are refused: a far-future "
              "stamp would otherwise become the newest stamp seen and make every later frame 'backwards'. "
              "0 = no check.", 0.0, 1e9),
    ParamSpec("input.max_pixels", 4096 * 3072, "Images above this pixel count are refused.", 1, 1 << 28),
    ParamSpec("input.reliable", False, "Subscribe to the camera topics with reliable QoS (keep last 10) "
              "instead of best effort: use it when large images published from another process are "
              "dropped by the DDS transport (fixed at start-up).", read_only=True),
    ParamSpec("keyframes.min_interval_s", 0.3, "Minimum time between keyframes (s).", 0.0, 60.0),
    ParamSpec("keyframes.min_translation_m", 0.05, "Minimum camera translation between keyframes "
              "when poses are known (m).", 0.0, 10.0),
    ParamSpec("keyframes.min_rotation_deg", 5.0, "Minimum camera rotation between keyframes when "
              "poses are known (deg); either motion threshold suffices.", 0.0, 180.0),
    ParamSpec("keyframes.min_flow_px", 20.0, "Minimum image motion between keyframes when no pose "
              "is known (px at full resolution).", 0.0, 1000.0),
    ParamSpec("keyframes.min_sharpness", 15.0, "Frames whose variance of Laplacian is below this "
              "are rejected as blurred (0 disables).", 0.0, 1e6),
    ParamSpec("keyframes.max_keyframes", 8, "Bounded keyframe buffer size.", 2, 64),
    ParamSpec("keyframes.prepare_ahead", True, "Do each accepted keyframe's own work (features, normals, "
              "pre-segmentation with depth) on a background thread while the camera streams, and on a second "
              "thread its registrations to the earlier keyframes the scene graph pairs it "
              "with, so a reconstruction starts with that done (rgbd, 5 keyframes at 512x384: 6.0 s -> "
              "2.6 s when all of it was done ahead)."),
    ParamSpec("keyframes.reconstruct_at", 5, "Reconstruct automatically when the buffer holds this "
              "many new keyframes (0: only on ~/reconstruct).", 0, 64),
    ParamSpec("backend", "rgbd", "Pointmap backend: rgbd (depth camera), sfm (RGB only, no weights: "
              "structure from motion + stereo, CPU) or dust3r (RGB, DUSt3R/MASt3R checkpoint).",
              choices=backend_choices()),
    ParamSpec("sfm.refine_intrinsics", False, "sfm: refine the focal length in bundle adjustment "
              "(CameraInfo only approximate) instead of trusting the calibration."),
    ParamSpec("sfm.max_pairs_per_view", 3, "sfm: dense stereo pairs kept per keyframe (best by shared "
              "points and triangulation angle).", 1, 16),
    ParamSpec("sfm.max_image_size", 1024, "sfm: keyframes are downscaled to this long side first "
              "(0: full resolution).", 0, 8192),
    ParamSpec("dust3r.checkpoint", "", "DUSt3R/MASt3R checkpoint: .pth file, save_pretrained folder or "
              "Hugging Face hub id (resolved through the local hub cache; HF_HUB_OFFLINE honoured).",
              check=check_file_param),
    ParamSpec("dust3r.image_size", 512, "DUSt3R input size (512 or 224).", 224, 512),
    ParamSpec("dust3r.batch_size", 4, "Pairs per inference batch.", 1, 64),
    ParamSpec("scene_graph", "complete", "Pair graph: complete | swin-<k> | logwin-<k> | oneref-<k>.",
              check=check_scene_graph),
    ParamSpec("segmenter", "auto", "Mask-cache segmenter: geometric (no weights, RGB-D clutter: support "
              "planes, depth discontinuities, local convexity), classical (no weights, colour + geometry), "
              "sam2, or auto: geometric for metric (depth) backends, classical otherwise.",
              choices=segmenter_choices()),
    ParamSpec("sam2.config", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM2 config name in the sam2 package."),
    ParamSpec("sam2.checkpoint", "", "SAM2 checkpoint path (read only).", check=check_file_param),
    ParamSpec("sam2.points_per_side", 16, "Automatic mask generator grid.", 2, 64),
    ParamSpec("device", "cpu", "torch device for alignment / models (cpu, cuda, cuda:N, mps).",
              check=check_device),
    ParamSpec("dga.alpha_p", 0.5, "DGA alpha for matching points (paper: 0.5).", -0.99, 0.99),
    ParamSpec("dga.alpha_n", 0.9, "DGA alpha magnitude for non-matching points (paper: 0.9).", -0.99, 0.99),
    ParamSpec("dga.iterations", 500, "Alignment iterations (paper: 500; Adam steps, the cap of the "
              "gauss_newton optimiser's at most 30).", 1, 10000),
    ParamSpec("dga.optimizer", "gauss_newton", "Alignment optimiser: gauss_newton (Levenberg-Marquardt, "
              "converges in tens of iterations) or adam (the reference: dga.iterations Adam steps).",
              choices=("gauss_newton", "adam")),
    ParamSpec("dga.weighting", "dga", "Per-point weights: dga (paper) or confidence (DUSt3R baseline).",
              choices=("dga", "confidence")),
    ParamSpec("dga.pose_prior_weight", 0.0, "Tie the aligner's camera poses to the known ones (odometry / "
              "pose / TF): 0 = poses only initialise and place the result in world_frame; > 0 a soft penalty; "
              "a large value (e.g. 1e4) for exact poses (motion capture). With > 0, a known pose that "
              "disagrees with the images' geometry (> 5 deg, or > 10 % of the larger of the camera spread and "
              "the scene depth) is released.", 0.0, 1e9),
    ParamSpec("dga.match_threshold", 0.03, "Reciprocal-NN match distance, relative to depth.", 1e-4, 1.0),
    ParamSpec("use_pose_priors", True, "Use known camera poses as alignment priors."),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics messages (s).", 0.1, 60.0),
    ParamSpec("scene_dir", "~/.ros/wildseg3d/scenes", "Folder where every completed scene is saved "
              "atomically (~ expanded; empty disables saving and loading).", check=check_dir_param),
    ParamSpec("load_last_scene", False, "At start-up, load the newest scene of scene_dir and republish it."),
    ParamSpec("max_saved_scenes", 5, "Scene files kept in scene_dir (oldest deleted first).", 1, 1000),
]

