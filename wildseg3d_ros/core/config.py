"""The reconstruction's configuration, and the one mapping from flat parameter names to it.

A parameter has one name from the YAML file through the ROS node (its parameter), the offline
CLI (its flag maps onto the same name) and the demo into the core: ``backend``, ``segmenter``,
``scene_graph``, ``device``, ``use_pose_priors``, ``dga.*``, ``keyframes.*``, and each
backend's / segmenter's own ``<name>.*`` parameters (declared in their registries,
:data:`wildseg3d_ros.core.pointmaps.BACKENDS` and
:data:`wildseg3d_ros.core.presegment.base.SEGMENTERS`). :meth:`PipelineConfig.from_flat`,
:func:`keyframe_policy_from_flat` and :func:`check_flat` are used by every front end, so the
same values always give the same configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .keyframes import KeyframePolicy

#: flat name -> PipelineConfig field, for the fields that are not backend / segmenter options
_PIPELINE_FLAT = {
    "backend": "backend",
    "segmenter": "segmenter",
    "scene_graph": "scene_graph",
    "device": "device",
    "use_pose_priors": "use_pose_priors",
    "dga.alpha_p": "alpha_p",
    "dga.alpha_n": "alpha_n",
    "dga.iterations": "iterations",
    "dga.weighting": "weighting",
    "dga.match_threshold": "match_threshold",
    "dga.optimizer": "optimizer",
    "dga.pose_prior_weight": "pose_prior_weight",
}

#: flat name -> KeyframePolicy field
_KEYFRAME_FLAT = {
    "keyframes.min_interval_s": "min_interval_s",
    "keyframes.min_translation_m": "min_translation_m",
    "keyframes.min_rotation_deg": "min_rotation_deg",
    "keyframes.min_flow_px": "min_flow_px",
    "keyframes.min_sharpness": "min_sharpness",
    "keyframes.max_keyframes": "max_keyframes",
}


@dataclass
class PipelineConfig:
    """Everything a reconstruction depends on (the flat names are in brackets).

    backend [backend] / backend_kwargs [<backend>.*]: pointmap backend and its options;
    segmenter [segmenter] / segmenter_kwargs [<segmenter>.*]: pre-segmentation ('auto' resolves
    to geometric for metric backends, classical otherwise);
    scene_graph [scene_graph]; device [device] (torch device of the aligner and the models);
    alpha_p, alpha_n, iterations, weighting, match_threshold, optimizer [dga.*]: Dynamic Global
    Aligning (optimizer gauss_newton, or adam: the reference first-order optimiser);
    use_pose_priors [use_pose_priors]: known camera poses (odometry / TF / a pose file) help the
    reconstruction (registration initialisation, and DGA priors when pose_prior_weight > 0);
    when False they only place the result in the world frame.
    pose_prior_weight [dga.pose_prior_weight]: 0 = the aligner is free, > 0 ties its poses to
    the known ones (a soft penalty; use a large value for exact poses, e.g. motion capture).
    """

    backend: str = "rgbd"
    backend_kwargs: Dict[str, Any] = field(default_factory=dict)
    segmenter: str = "classical"
    segmenter_kwargs: Dict[str, Any] = field(default_factory=dict)
    scene_graph: str = "complete"
    device: str = "cpu"
    alpha_p: float = 0.5
    alpha_n: float = 0.9
    iterations: int = 500
    weighting: str = "dga"
    match_threshold: float = 0.03
    optimizer: str = "gauss_newton"   # or "adam" (the reference optimiser)
    use_pose_priors: bool = True
    pose_prior_weight: float = 0.0

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "PipelineConfig":
        """Configuration from flat parameters (missing names keep their defaults)."""
        from .pointmaps import BACKENDS
        from .presegment.base import SEGMENTERS

        kw = {f: values[n] for n, f in _PIPELINE_FLAT.items() if n in values}
        cfg = cls(**kw)
        cfg.segmenter = resolve_segmenter(cfg.segmenter, BACKENDS.entry(cfg.backend).metric)
        cfg.backend_kwargs = BACKENDS.kwargs_from_flat(cfg.backend, values, cfg.device)
        cfg.segmenter_kwargs = SEGMENTERS.kwargs_from_flat(cfg.segmenter, values, cfg.device)
        return cfg

    def model_key(self) -> tuple:
        """What the loaded models depend on: equal keys can reuse a built pipeline."""
        return (self.backend, tuple(sorted(self.backend_kwargs.items())), self.segmenter,
                tuple(sorted(self.segmenter_kwargs.items())), self.device)


def resolve_segmenter(name: str, metric: bool) -> str:
    """``auto`` -> ``geometric`` for metric pointmaps (depth cameras: support planes, depth
    discontinuities and convexity in metres), ``classical`` otherwise; other names unchanged."""
    if str(name).strip().lower() == "auto":
        return "geometric" if metric else "classical"
    return name


def keyframe_policy_from_flat(values: Mapping[str, Any]) -> KeyframePolicy:
    """Keyframe selection policy from ``keyframes.*`` parameters (missing ones keep defaults)."""
    return KeyframePolicy(**{f: values[n] for n, f in _KEYFRAME_FLAT.items() if n in values})


def check_flat(values: Mapping[str, Any]) -> Optional[str]:
    """Cross-parameter checks of a flat parameter set: the reason it is refused, or None."""
    try:
        keyframe_policy_from_flat(values).validate()
    except ValueError as e:
        return f"keyframe policy refused: {e}"
    n_at = values.get("keyframes.reconstruct_at")
    n_max = values.get("keyframes.max_keyframes", KeyframePolicy().max_keyframes)
    if n_at is not None:
        if n_at > n_max:
            return (f"keyframes.reconstruct_at={n_at} exceeds keyframes.max_keyframes={n_max}: the "
                    "automatic reconstruction would never trigger")
        if n_at == 1:
            return "keyframes.reconstruct_at=1: a reconstruction needs at least 2 keyframes (0 disables)"
    return None


def backend_choices() -> tuple:
    """The registered pointmap backends (parameter choices, CLI flags): a new entry in
    ``pointmaps.BACKENDS`` is selectable everywhere."""
    from .pointmaps import BACKENDS
    return tuple(BACKENDS.names())


def segmenter_choices() -> tuple:
    """``auto`` and the registered segmenters (``presegment.base.SEGMENTERS``)."""
    from .presegment.base import SEGMENTERS
    return ("auto",) + tuple(SEGMENTERS.names())
