"""Replay a rosbag2 into the WildSeg3D nodes on simulated time.

  ros2 launch wildseg3d_ros bag_replay.launch.py bag:=/data/room_bag profile:=rgbd_cpu \
      image:=/camera/color/image_raw depth:=/camera/aligned_depth_to_color/image_raw \
      camera_info:=/camera/color/camera_info rate:=0.5

Starts `ros2 bag play <bag> --clock` (the bag's time becomes /clock) and the two nodes with
use_sim_time:=true and the layered parameters of wildseg3d_layered.launch.py (base.yaml +
<profile>.yaml + overrides; every argument of that file is accepted here too). Keyframe timing,
depth/pose pairing and TF lookups then follow the recorded stamps. `rate:=0.5` halves the replay
speed (CPU profile on a slow machine); `delay:=2.0` starts playing after the nodes are up; the
reconstruction triggers at keyframes.reconstruct_at keyframes, or call
`ros2 service call /reconstruction_node/reconstruct std_srvs/srv/Trigger` at the end of the bag.
For offline use without ROS, `wildseg3d segment --input <bag>` runs the same pipeline directly.
"""
import importlib.util
import os


def _layered():
    """Import wildseg3d_layered.launch.py from the same folder (shares its arguments and layering)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wildseg3d_layered.launch.py")
    spec = importlib.util.spec_from_file_location("wildseg3d_layered_launch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bag_play_command(bag, rate="1.0", loop=False, start_offset="0.0", topics=""):
    """The `ros2 bag play` command line (a list) for these arguments."""
    if not bag:
        raise ValueError("bag:=<rosbag2 folder or .mcap/.db3 file> is required")
    cmd = ["ros2", "bag", "play", bag, "--clock", "--rate", str(float(rate))]
    if float(start_offset) > 0:
        cmd += ["--start-offset", str(float(start_offset))]
    if loop:
        cmd.append("--loop")
    if topics.strip():
        cmd += ["--topics"] + topics.split()
    return cmd


def _setup(context, *args, **kwargs):
    from launch.actions import ExecuteProcess, TimerAction
    from launch.substitutions import LaunchConfiguration

    get = lambda n: LaunchConfiguration(n).perform(context)  # noqa: E731
    cmd = bag_play_command(get("bag"), get("rate"), get("loop").lower() == "true", get("start_offset"), get("topics"))
    lay = _layered()
    # the player publishes the camera: it needs the large-data transport like the nodes
    play = ExecuteProcess(cmd=cmd, output="screen", name="ros2_bag_play",
                          additional_env=lay.transport_env(get("fastdds_profile")))
    return lay._launch_setup(context) + [TimerAction(period=float(get("delay")), actions=[play])]


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    base = [(n, ("true" if n == "use_sim_time" else d), t) for n, d, t in _layered().launch_arguments()]
    own = [("bag", "", "rosbag2 folder or .mcap/.db3 file to replay (required)"),
           ("rate", "1.0", "replay rate"),
           ("loop", "false", "replay in a loop"),
           ("start_offset", "0.0", "start this many seconds into the bag"),
           ("topics", "", "space-separated topics to replay (default: all)"),
           ("delay", "2.0", "seconds to wait for the nodes before playing")]
    decl = [DeclareLaunchArgument(n, default_value=d, description=t) for n, d, t in own + base]
    return LaunchDescription(decl + [OpaqueFunction(function=_setup)])
