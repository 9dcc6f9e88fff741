"""Launch reconstruction_node + segmentation_node with layered parameters (Isaac ROS / nvblox style):
config/base.yaml, then config/<profile>.yaml on top, then the non-empty launch-argument overrides.

  ros2 launch wildseg3d_ros wildseg3d_layered.launch.py profile:=rgbd_cpu
  ros2 launch wildseg3d_ros wildseg3d_layered.launch.py profile:=dust3r_sam2_gpu \
      image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
      dust3r_checkpoint:=$HOME/ckpt/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth \
      sam2_checkpoint:=$HOME/ckpt/sam2.1_hiera_base_plus.pt
  ros2 launch wildseg3d_ros wildseg3d_layered.launch.py profile:=jetson world_frame:=odom

Profiles: rgbd_cpu | rgb_cpu | dust3r_sam2_gpu | jetson (files in config/). An override left empty keeps the
profile's value. `params_file:=<extra.yaml>` is loaded last (site-specific tweaks).
The nodes start with the large-data Fast DDS profile (config/fastdds_large_data.xml, argument
fastdds_profile:=; empty keeps the environment's): see transport_env().
The launch imports are inside the functions so that this file can be imported (and its parameter
layering tested) without the launch packages installed.
"""
import os

PROFILES = ("rgbd_cpu", "rgb_cpu", "dust3r_sam2_gpu", "jetson")
# launch argument -> (parameter name, nodes it applies to, type)
OVERRIDES = {
    "backend": ("backend", ("reconstruction_node",), str),
    "segmenter": ("segmenter", ("reconstruction_node", "segmentation_node"), str),
    "device": ("device", ("reconstruction_node", "segmentation_node"), str),
    "dust3r_checkpoint": ("dust3r.checkpoint", ("reconstruction_node",), str),
    "sam2_checkpoint": ("sam2.checkpoint", ("reconstruction_node", "segmentation_node"), str),
    "sam2_config": ("sam2.config", ("reconstruction_node", "segmentation_node"), str),
    "world_frame": ("world_frame", ("reconstruction_node",), str),
    "reconstruct_at": ("keyframes.reconstruct_at", ("reconstruction_node",), int),
    "use_compressed": ("input.use_compressed", ("reconstruction_node",), "bool"),
}


def _convert(value, typ):
    if typ == "bool":
        v = str(value).strip().lower()
        if v not in ("true", "false"):
            raise ValueError(f"expected true/false, got {value!r}")
        return v == "true"
    return typ(value)


def layered_parameters(config_dir, profile, overrides, node, extra_file="", use_sim_time=None):
    """The `parameters=` list of ``node``: base.yaml, <profile>.yaml, [extra_file], then a dict of
    the non-empty overrides (launch-argument name -> string value) and use_sim_time."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    files = [os.path.join(config_dir, "base.yaml"), os.path.join(config_dir, f"{profile}.yaml")]
    if extra_file:
        files.append(extra_file)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"parameter file {f} does not exist")
    d = {}
    for arg, value in overrides.items():
        if arg not in OVERRIDES or value in (None, ""):
            continue
        name, nodes, typ = OVERRIDES[arg]
        if node in nodes:
            d[name] = _convert(value, typ)
    if use_sim_time is not None:
        d["use_sim_time"] = bool(use_sim_time)
    return files + ([d] if d else [])


TRANSPORT_PROFILE = "fastdds_large_data.xml"


def transport_env(profile_path):
    """Environment the nodes are started with: FASTDDS_DEFAULT_PROFILES_FILE=<profile_path> (the
    large-data profile: a 16 MiB shared-memory segment) unless the path is empty; {} then. A
    missing file raises FileNotFoundError (a typo would silently fall back to 512 KiB)."""
    if not profile_path:
        return {}
    if not os.path.isfile(profile_path):
        raise FileNotFoundError(f"Fast DDS profile {profile_path} does not exist")
    return {"FASTDDS_DEFAULT_PROFILES_FILE": profile_path}


def _launch_setup(context, *args, **kwargs):
    from ament_index_python.packages import get_package_share_directory
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    share = get_package_share_directory("wildseg3d_ros")
    get = lambda n: LaunchConfiguration(n).perform(context)  # noqa: E731
    profile = get("profile")
    overrides = {a: get(a) for a in OVERRIDES}
    sim_time = get("use_sim_time").lower() == "true"
    cfg_dir = os.path.join(share, "config")
    env = transport_env(get("fastdds_profile"))
    cam_remaps = [("image", get("image")), ("image/compressed", get("image") + "/compressed"),
                  ("depth", get("depth")), ("camera_info", get("camera_info")), ("odom", get("odom")),
                  ("pose", get("pose"))]
    nodes = [
        Node(package="wildseg3d_ros", executable="reconstruction_node", name="reconstruction_node",
             parameters=layered_parameters(cfg_dir, profile, overrides, "reconstruction_node", get("params_file"),
                                           sim_time),
             remappings=cam_remaps, additional_env=env, output="screen"),
        Node(package="wildseg3d_ros", executable="segmentation_node", name="segmentation_node",
             parameters=layered_parameters(cfg_dir, profile, overrides, "segmentation_node", get("params_file"),
                                           sim_time),
             remappings=[("clicked_point", get("clicked_point"))], additional_env=env, output="screen"),
    ]
    if get("rviz").lower() == "true":
        nodes.append(Node(package="rviz2", executable="rviz2", name="rviz2",
                          arguments=["-d", os.path.join(share, "rviz", "wildseg3d.rviz")],
                          parameters=[{"use_sim_time": sim_time}]))
    return nodes


def launch_arguments():
    """(name, default, description) of every launch argument (also used by bag_replay.launch.py)."""
    return [
        ("profile", "rgbd_cpu", "parameter profile: " + " | ".join(PROFILES) + " (config/<profile>.yaml over base.yaml)"),
        ("params_file", "", "extra parameter file loaded last (optional)"),
        ("image", "/camera/color/image_raw", "colour image topic (image/compressed is <image>/compressed)"),
        ("depth", "/camera/aligned_depth_to_color/image_raw", "depth image topic registered to the colour image"),
        ("camera_info", "/camera/color/camera_info", "CameraInfo topic"),
        ("odom", "/odom", "camera pose as nav_msgs/Odometry (optional; TF is used too)"),
        ("pose", "/camera/pose", "camera pose as geometry_msgs/PoseStamped (optional)"),
        ("clicked_point", "/clicked_point", "rviz2 Publish Point topic (positive 3D prompts)"),
        ("backend", "", "override: rgbd | sfm | dust3r"),
        ("segmenter", "", "override: classical | sam2"),
        ("device", "", "override: cpu | cuda | cuda:N"),
        ("dust3r_checkpoint", "", "override: DUSt3R/MASt3R checkpoint path"),
        ("sam2_checkpoint", "", "override: SAM2 checkpoint path"),
        ("sam2_config", "", "override: SAM2 config name (must match the checkpoint)"),
        ("world_frame", "", "override: world frame of the published scene (default map)"),
        ("reconstruct_at", "", "override: reconstruct automatically at this many keyframes (0: only on ~/reconstruct)"),
        ("use_compressed", "", "override: true to subscribe to <image>/compressed"),
        ("use_sim_time", "false", "use /clock (bag replay)"),
        ("rviz", "false", "start rviz2 with rviz/wildseg3d.rviz"),
        ("fastdds_profile", _default_profile(), "Fast DDS XML profile for the nodes (large camera messages); "
         "empty: keep the environment's FASTDDS_DEFAULT_PROFILES_FILE"),
    ]


def _default_profile():
    """config/fastdds_large_data.xml of the installed package (of this source tree without ament)."""
    try:
        from ament_index_python.packages import get_package_share_directory
        return os.path.join(get_package_share_directory("wildseg3d_ros"), "config", TRANSPORT_PROFILE)
    except Exception:  # not installed with colcon: the source tree's copy
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", TRANSPORT_PROFILE)


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    decl = [DeclareLaunchArgument(n, default_value=d, description=t) for n, d, t in launch_arguments()]
    return LaunchDescription(decl + [OpaqueFunction(function=_launch_setup)])
