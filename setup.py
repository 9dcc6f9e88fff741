"""ament_python / pip build script for wildseg3d_ros."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "wildseg3d_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "benchmarks"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "scipy>=1.10",
        "opencv-python-headless>=4.8",
        "scikit-image>=0.21",
        "pyyaml>=6",
        "tqdm>=4.60",
        "torch>=2.1",
    ],
    extras_require={
        "sam2": ["sam2>=1.0", "torchvision"],
        "bags": ["rosbags>=0.10"],
        "sfm": ["pycolmap>=4.0"],
        "hub": ["huggingface_hub>=0.22", "safetensors>=0.4"],
        "test": ["pytest>=7", "hypothesis>=6", "pytest-timeout>=2"],
    },
    zip_safe=False,
    maintainer="wildseg3d_ros maintainers",
    maintainer_email="maintainers@wildseg3d.invalid",
    description="Online 3D segmentation of any object from a few views (WildSeg3D) for ROS 2.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "wildseg3d = wildseg3d_ros.apps.cli:main",
            "reconstruction_node = wildseg3d_ros.ros.reconstruction_node:main",
            "segmentation_node = wildseg3d_ros.ros.segmentation_node:main",
            "camera_sim_node = wildseg3d_ros.ros.camera_sim_node:main",
        ],
    },
)
