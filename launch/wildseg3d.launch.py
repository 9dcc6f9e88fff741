"""Launch reconstruction_node + segmentation_node with config/wildseg3d.yaml.

ros2 launch wildseg3d_ros wildseg3d.launch.py image:=/camera/color/image_raw \
    depth:=/camera/aligned_depth_to_color/image_raw camera_info:=/camera/color/camera_info \
    odom:=/odom config:=<path/to/params.yaml> rviz:=true sim:=false

The nodes start with the large-data Fast DDS profile config/fastdds_large_data.xml
(FASTDDS_DEFAULT_PROFILES_FILE; fastdds_profile:= "" keeps the environment's). The camera driver's
process needs it too (or FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA): see the README, Troubleshooting.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("wildseg3d_ros")
    args = [
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "wildseg3d.yaml"),
                              description="parameter file for both nodes"),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw", description="colour image topic"),
        DeclareLaunchArgument("depth", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="depth image topic (aligned to colour)"),
        DeclareLaunchArgument("camera_info", default_value="/camera/color/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("odom", default_value="/odom", description="camera pose (nav_msgs/Odometry) topic"),
        DeclareLaunchArgument("pose", default_value="/camera/pose", description="camera pose (PoseStamped) topic"),
        DeclareLaunchArgument("clicked_point", default_value="/clicked_point",
                              description="rviz2 Publish Point topic (positive 3D prompts)"),
        DeclareLaunchArgument("sim", default_value="false", description="also start camera_sim_node (embedded scene)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with rviz/wildseg3d.rviz"),
        DeclareLaunchArgument("fastdds_profile", default_value=os.path.join(share, "config", "fastdds_large_data.xml"),
                              description="Fast DDS XML profile for the nodes (large camera messages); empty: "
                              "keep the environment's FASTDDS_DEFAULT_PROFILES_FILE"),
    ]
    transport = [SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                                        condition=IfCondition(PythonExpression(
                                            ["'", LaunchConfiguration("fastdds_profile"), "' != ''"])))]
    cfg = LaunchConfiguration("config")
    cam_remaps = [("image", LaunchConfiguration("image")), ("depth", LaunchConfiguration("depth")),
                  ("camera_info", LaunchConfiguration("camera_info")), ("odom", LaunchConfiguration("odom"))]
    nodes = [
        Node(package="wildseg3d_ros", executable="reconstruction_node", name="reconstruction_node",
             parameters=[cfg], remappings=cam_remaps + [("pose", LaunchConfiguration("pose"))], output="screen"),
        Node(package="wildseg3d_ros", executable="segmentation_node", name="segmentation_node",
             parameters=[cfg], remappings=[("clicked_point", LaunchConfiguration("clicked_point"))], output="screen"),
        Node(package="wildseg3d_ros", executable="camera_sim_node", name="camera_sim_node",
             parameters=[{"loop": False}], remappings=cam_remaps, output="screen",
             condition=IfCondition(LaunchConfiguration("sim"))),
        Node(package="rviz2", executable="rviz2", name="rviz2",
             arguments=["-d", os.path.join(share, "rviz", "wildseg3d.rviz")],
             condition=IfCondition(LaunchConfiguration("rviz"))),
    ]
    return LaunchDescription(args + transport + nodes)
