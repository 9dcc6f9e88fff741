"""`wildseg3d` command line: demo | segment | check-gpu."""
from __future__ import annotations

import argparse
import json
import sys

from ..core.config import segmenter_choices


def _demo(args) -> int:
    from .demo import run_demo
    try:
        m = run_demo(out_dir=args.out, width=args.width, height=args.height, num_frames=args.frames,
                     seed=args.seed, target_rank=args.target, iterations=args.iterations,
                     segmenter=args.segmenter, backend=args.backend, rate_hz=args.rate,
                     timeout_s=args.timeout if args.timeout else (110.0 if args.backend == "rgbd" else 300.0))
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: m[k] for k in ("segment_iou_mean", "click_to_pointcloud2_ms", "demo_wall_s")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wildseg3d", description="WildSeg3D: segment any object in 3D from a few views.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run camera simulator + both nodes over real ROS 2 on the embedded scene, "
                                    "click one object, write PLY/PNG/JSON results")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--width", type=int, default=512)
    d.add_argument("--height", type=int, default=384)
    d.add_argument("--frames", type=int, default=5, help="camera frames = keyframes (default 5)")
    d.add_argument("--seed", type=int, default=0, help="scene seed")
    d.add_argument("--target", type=int, default=0, help="click the N-th largest object of keyframe 0")
    d.add_argument("--iterations", type=int, default=500, help="DGA iterations (paper: 500)")
    d.add_argument("--rate", type=float, default=2.0,
                   help="camera frames per second (default 2: each keyframe is prepared -- features, "
                        "pre-segmentation -- before the next arrives, as with a real camera's keyframe spacing)")
    d.add_argument("--segmenter", default="auto", choices=segmenter_choices(),
                   help="mask-cache segmenter (default auto: geometric for rgbd, classical for sfm)")
    d.add_argument("--backend", default="rgbd", choices=("rgbd", "sfm"),
                   help="rgbd: RGB-D camera with odometry (default); sfm: the RGB-only variant (colour + camera "
                        "info, no depth, no odometry: structure from motion + dense stereo, no weights)")
    d.add_argument("--timeout", type=float, default=0.0,
                   help="seconds to wait for the scene (default 110 for rgbd, 300 for sfm)")
    d.set_defaults(func=_demo)
    try:
        from .offline import add_segment_parser
        add_segment_parser(sub)
    except ImportError:
        pass
    try:
        from .gpu_check import add_check_gpu_parser
        add_check_gpu_parser(sub)
    except ImportError:
        pass
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
