"""Camera input of the reconstruction node through real ROS 2 (rclpy + DDS on loopback):
every colour encoding (rgb8, bgr8, rgba8, bgra8, mono8, padded rows), depth 16UC1 / 32FC1
paired by approximate time, CompressedImage jpeg / png, PoseStamped / Odometry priors.

Each frame is published (camera_info, depth candidates, pose, colour) and the test waits until
the node's keyframe thread has processed it; the node accepts every frame (motion thresholds 0),
so keyframe k must carry exactly the k-th published content."""
import time

import numpy as np
import pytest
from wildseg3d_ros.ros.harness import SpinThread, wait_for as _harness_wait_for

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402

from wildseg3d_ros.core.camera import image_codec  # noqa: E402
from wildseg3d_ros.ros import convert  # noqa: E402

W, H = 320, 240
PROCESSED_PREFIXES = ("keyframe_", "dropped_", "rejected_", "bad_", "frame_errors")


def wait_for(pred, timeout, period=0.01):
    return _harness_wait_for(pred, timeout, period)


def processed(node) -> int:
    return sum(v for k, v in node.stats.items() if k.startswith(PROCESSED_PREFIXES))


@pytest.fixture(scope="module")
def seq():
    from wildseg3d_ros.sim.tabletop import render_sequence

    return render_sequence(n_views=4, width=W, height=H, seed=1)


class Rig:
    """A ReconstructionNode plus a publisher node, spun by one executor in a thread."""

    def __init__(self, compressed=False, **params):
        from wildseg3d_ros.ros.reconstruction_node import ReconstructionNode

        base = {"backend": "rgbd", "use_tf": False, "keyframes.reconstruct_at": 0,
                "keyframes.min_interval_s": 0.0, "keyframes.min_translation_m": 0.0,
                "keyframes.min_rotation_deg": 0.0, "keyframes.min_flow_px": 0.0,
                "keyframes.min_sharpness": 0.0, "keyframes.max_keyframes": 64,
                "input.use_compressed": compressed}
        base.update(params)
        self.node = ReconstructionNode(parameter_overrides=[Parameter(k, value=v) for k, v in base.items()])
        self.pubnode = rclpy.create_node("input_test_publisher")
        rel = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = {
            "image": self.pubnode.create_publisher(CompressedImage if compressed else Image,
                                                   "image/compressed" if compressed else "image", rel),
            "depth": self.pubnode.create_publisher(Image, "depth", rel),
            "info": self.pubnode.create_publisher(CameraInfo, "camera_info", rel),
            "pose": self.pubnode.create_publisher(PoseStamped, "pose", rel),
            "odom": self.pubnode.create_publisher(Odometry, "odom", rel),
        }
        self.ex = MultiThreadedExecutor(num_threads=2)
        self.ex.add_node(self.node)
        self.ex.add_node(self.pubnode)
        self.th = SpinThread(self.ex)
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in self.pub.values()), 10.0), \
            "the node's subscriptions were not discovered within 10 s"

    def send(self, image_msg, stamp, K, depth_msgs=(), pose=None, pose_kind="pose", timeout=10.0):
        """Publish one frame and wait until the node processed it; returns the stats delta."""
        before = dict(self.node.stats)
        n0 = processed(self.node)
        self.pub["info"].publish(convert.make_camera_info(K, W, H, stamp, "camera"))
        wait_for(lambda: self.node.frames.K is not None, 2.0)
        for d in depth_msgs:
            self.pub["depth"].publish(d)
        if pose is not None:
            if pose_kind == "pose":
                self.pub["pose"].publish(PoseStamped(header=convert.make_header("map", pose[0]),
                                                     pose=convert.matrix_to_pose(pose[1])))
            else:
                m = Odometry(header=convert.make_header("map", pose[0]), child_frame_id="camera")
                m.pose.pose = convert.matrix_to_pose(pose[1])
                self.pub["odom"].publish(m)
        time.sleep(0.05)  # let depth / pose land first (the node also waits for them)
        self.pub["image"].publish(image_msg)
        assert wait_for(lambda: processed(self.node) > n0, timeout), \
            f"frame at t={stamp} not processed within {timeout} s (stats {dict(self.node.stats)})"
        return {k: v - before.get(k, 0) for k, v in self.node.stats.items() if v != before.get(k, 0)}

    def close(self):
        self.th.stop()
        self.node.destroy_node()
        self.pubnode.destroy_node()


def _padded_image(arr, encoding, stamp, pad):
    enc, h, w, step, data = image_codec.encode_image(arr, encoding,
                                                     step=arr.shape[1] * image_codec.bytes_per_pixel(encoding) + pad)
    msg = Image(header=convert.make_header("camera", stamp), height=h, width=w, encoding=enc, is_bigendian=0,
                step=step)
    msg.data = data
    return msg


def test_raw_encodings_depth_pairing_and_pose_priors(ros, seq):
    """rgb8 / bgr8 / rgba8 / bgra8 / mono8 (+ padded rows) colour, 16UC1 and 32FC1 depth with a
    distractor further away in time, PoseStamped and Odometry priors: every keyframe's decoded
    content equals the source and its prior is the pose of its own stamp."""
    rig = Rig(**{"input.depth_sync_tolerance_s": 0.05, "input.pose_sync_tolerance_s": 0.1})
    try:
        cases = [("rgb8", 0, "16UC1", "pose"), ("bgr8", 0, "32FC1", "odom"), ("rgba8", 0, "16UC1", "pose"),
                 ("bgra8", 0, "32FC1", "odom"), ("mono8", 0, "16UC1", "pose"), ("rgb8", 12, "32FC1", "odom"),
                 ("bgr8", 4, "16UC1", "pose")]
        expect = []
        for k, (enc, pad, denc, pkind) in enumerate(cases):
            v = k % seq.num_views
            stamp = 100.0 + k
            rgb = seq.rgb[v]
            src = rgb if enc != "mono8" else np.ascontiguousarray(
                np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8))
            img = _padded_image(src, enc, stamp, pad) if pad else convert.array_to_image(src, enc, stamp, "camera")
            assert img.step == W * image_codec.bytes_per_pixel(enc) + pad
            # the partner depth is 20 ms off; a distractor (another view's depth) 45 ms off the other way
            near = _padded_image(seq.depth[v], denc, stamp + 0.02, 6 if pad else 0) if pad else \
                convert.array_to_image(seq.depth[v], denc, stamp + 0.02, "camera")
            far = convert.array_to_image(seq.depth[(v + 1) % seq.num_views], denc, stamp - 0.045, "camera")
            delta = rig.send(img, stamp, seq.K, depth_msgs=[far, near],
                             pose=(stamp + 0.03, seq.odom_poses[v]), pose_kind=pkind)
            assert delta.get("keyframe_accepted") == 1, (enc, pad, delta)
            want = src if src.ndim == 3 else np.repeat(src[..., None], 3, axis=2)
            expect.append((want, seq.depth[v], seq.odom_poses[v], stamp, denc))

        # a frame whose only depth is 0.2 s away is dropped (tolerance 0.05 s), not mis-paired
        stamp = 100.0 + len(cases)
        delta = rig.send(convert.array_to_image(seq.rgb[0], "rgb8", stamp, "camera"), stamp, seq.K,
                         depth_msgs=[convert.array_to_image(seq.depth[0], "16UC1", stamp + 0.2, "camera")])
        assert delta.get("dropped_no_depth") == 1 and "keyframe_accepted" not in delta, delta

        kfs = rig.node._buffer.keyframes()
        assert len(kfs) == len(cases)
        for kf, (want, d, pose, stamp, denc) in zip(kfs, expect):
            assert kf.stamp == pytest.approx(stamp, abs=1e-6)
            assert np.array_equal(kf.rgb, want), f"decoded colour differs at t={stamp}"
            tol = 0.0005 + 2e-6 if denc == "16UC1" else 1e-6  # millimetre rounding (+ float32)
            assert np.abs(kf.depth - d).max() <= tol, (stamp, denc, np.abs(kf.depth - d).max())
            assert np.allclose(kf.pose_prior, pose, atol=1e-9), f"pose prior wrong at t={stamp}"
            assert np.allclose(kf.K, seq.K)
        assert rig.node.stats["images_superseded"] == 0
        assert rig.node.stats["bad_image"] == 0 and rig.node.stats["bad_depth"] == 0
    finally:
        rig.close()


def test_compressed_jpeg_and_png(ros, seq):
    """input.use_compressed=true: PNG decodes bit-exactly, JPEG (quality 90) within its loss."""
    rig = Rig(compressed=True)
    try:
        sent = []
        for k, fmt in enumerate(["png", "jpeg", "png", "jpeg"]):
            v = k % seq.num_views
            stamp = 200.0 + k
            msg = CompressedImage(header=convert.make_header("camera", stamp),
                                  format=f"rgb8; {fmt} compressed bgr8")
            msg.data = image_codec.encode_compressed(seq.rgb[v], fmt, quality=90)
            delta = rig.send(msg, stamp, seq.K, depth_msgs=[convert.array_to_image(seq.depth[v], "16UC1", stamp,
                                                                                    "camera")])
            assert delta.get("keyframe_accepted") == 1, (fmt, delta)
            sent.append((fmt, seq.rgb[v]))
        kfs = rig.node._buffer.keyframes()
        assert len(kfs) == 4
        for kf, (fmt, rgb) in zip(kfs, sent):
            err = np.abs(kf.rgb.astype(np.int16) - rgb.astype(np.int16))
            if fmt == "png":
                assert err.max() == 0
            else:
                # JPEG q90 on a textured render: mean error a few grey levels, PSNR > 30 dB;
                # a channel swap (RGB/BGR mix-up) would give mean errors of tens of levels
                psnr = 10 * np.log10(255.0 ** 2 / np.mean(err.astype(np.float64) ** 2))
                assert err.mean() < 4.0 and psnr > 30.0, (err.mean(), psnr)
                swapped = np.abs(kf.rgb[..., ::-1].astype(np.int16) - rgb.astype(np.int16)).mean()
                assert swapped > 3 * err.mean()
    finally:
        rig.close()
