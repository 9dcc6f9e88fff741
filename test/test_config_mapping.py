"""One configuration mapping (core.config) for every front end: the reconstruction node and the
offline CLI build the same PipelineConfig and keyframe policy from the same flat values."""
import pytest

from wildseg3d_ros.apps.cli import build_parser
from wildseg3d_ros.apps.offline import flat_params
from wildseg3d_ros.core.config import PipelineConfig, check_flat, keyframe_policy_from_flat

VALUES = {
    "backend": "dust3r", "dust3r.checkpoint": "/models/dust3r.pth", "dust3r.image_size": 224,
    "dust3r.batch_size": 2, "segmenter": "sam2", "sam2.checkpoint": "/models/sam2.pt",
    "sam2.points_per_side": 8, "scene_graph": "swin-2", "device": "cpu", "dga.iterations": 77,
    "dga.weighting": "confidence", "dga.alpha_p": 0.4, "dga.alpha_n": 0.8, "dga.match_threshold": 0.05,
    "dga.pose_prior_weight": 10.0, "keyframes.min_interval_s": 0.2, "keyframes.min_translation_m": 0.04,
    "keyframes.min_rotation_deg": 4.0, "keyframes.min_flow_px": 15.0, "keyframes.min_sharpness": 12.0,
    "keyframes.max_keyframes": 6,
}


def _cli_flat(values):
    argv = ["segment", "--input", "x", "--out", "y",
            "--backend", values["backend"], "--checkpoint", values["dust3r.checkpoint"],
            "--image-size", str(values["dust3r.image_size"]), "--batch-size", str(values["dust3r.batch_size"]),
            "--segmenter", values["segmenter"], "--sam2-checkpoint", values["sam2.checkpoint"],
            "--points-per-side", str(values["sam2.points_per_side"]), "--scene-graph", values["scene_graph"],
            "--device", values["device"], "--iterations", str(values["dga.iterations"]),
            "--weighting", values["dga.weighting"],
            "--min-interval", str(values["keyframes.min_interval_s"]),
            "--min-translation", str(values["keyframes.min_translation_m"]),
            "--min-rotation", str(values["keyframes.min_rotation_deg"]),
            "--min-flow", str(values["keyframes.min_flow_px"]),
            "--min-sharpness", str(values["keyframes.min_sharpness"]),
            "--max-frames", str(values["keyframes.max_keyframes"])]
    for name in ("dga.alpha_p", "dga.alpha_n", "dga.match_threshold", "dga.pose_prior_weight"):
        argv += ["--param", f"{name}={values[name]}"]
    return flat_params(build_parser().parse_args(argv))


@pytest.mark.ros
def test_node_and_cli_build_the_same_config():
    import rclpy
    from rclpy.parameter import Parameter

    from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

    rclpy.init()
    try:
        node = ReconstructionNode(parameter_overrides=[Parameter(k, value=v) for k, v in VALUES.items()])
        try:
            node_cfg, node_policy = node._pipeline_config(), node._policy()
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown()
    flat = _cli_flat(VALUES)
    cli_cfg, cli_policy = PipelineConfig.from_flat(flat), keyframe_policy_from_flat(flat)
    assert node_cfg == cli_cfg
    assert node_policy == cli_policy
    # and it is what the values say
    assert cli_cfg.backend_kwargs == {"model": "/models/dust3r.pth", "image_size": 224, "batch_size": 2,
                                      "device": "cpu"}
    assert cli_cfg.segmenter_kwargs["checkpoint"] == "/models/sam2.pt" and cli_cfg.segmenter_kwargs["points_per_side"] == 8
    assert (cli_cfg.iterations, cli_cfg.alpha_p, cli_cfg.pose_prior_weight) == (77, 0.4, 10.0)
    assert cli_policy.max_keyframes == 6 and cli_policy.min_flow_px == 15.0


def test_flat_defaults_equal_dataclass_defaults_and_checks():
    assert PipelineConfig.from_flat({}) == PipelineConfig()
    assert PipelineConfig.from_flat({"backend": "rgbd", "dust3r.checkpoint": "ignored"}).backend_kwargs == {}
    assert "never trigger" in check_flat({"keyframes.reconstruct_at": 9, "keyframes.max_keyframes": 8})
    assert "at least 2" in check_flat({"keyframes.reconstruct_at": 1})
    assert "keyframe policy refused" in check_flat({"keyframes.min_flow_px": -1.0})
    assert check_flat({"keyframes.reconstruct_at": 5, "keyframes.max_keyframes": 8}) is None


def test_exact_poses_flag_holds_the_cameras():
    """`--exact-poses` sets dga.pose_prior_weight to the holding weight; `--param` still wins."""
    from wildseg3d_ros.apps.offline import EXACT_POSE_WEIGHT
    base = ["segment", "--input", "x", "--out", "y"]
    p = build_parser()
    assert PipelineConfig.from_flat(flat_params(p.parse_args(base))).pose_prior_weight == 0.0
    assert PipelineConfig.from_flat(flat_params(p.parse_args(base + ["--exact-poses"]))).pose_prior_weight == EXACT_POSE_WEIGHT
    both = p.parse_args(base + ["--exact-poses", "--param", "dga.pose_prior_weight=5"])
    assert PipelineConfig.from_flat(flat_params(both)).pose_prior_weight == 5.0
