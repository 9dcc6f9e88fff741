"""Share a base venv's non-ROS packages with a second venv (the Jazzy one made by scripts/run.sh).

    python scripts/share_site_packages.py BASE_SITE_PACKAGES TARGET_VENV

Creates TARGET_VENV/shared-site with one symbolic link per top-level entry of the base venv's
site-packages (torch, OpenCV, SciPy, ... and their dist-info), leaving out everything a ROS wheel
installed (every file of a ``ros-*`` distribution, its ``*.libs`` folders and egg-info) and this
package itself, and writes a path file into the target venv's site-packages that appends
shared-site to ``sys.path``. The target's own site-packages come first, so its ROS wheels (for
Jazzy: rclpy 7.x, Fast DDS 2.14, the message packages) are the ones imported, and the ROS
wheels' bootstrapper only adds the target's ``ros_*.libs`` folders to LD_LIBRARY_PATH. The
point: the second distro costs the ROS wheels (~100 MB), not a second PyTorch (GBs).
"""
from __future__ import annotations

import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def _excluded_top_level(site: Path) -> set:
    out = set()
    for dist in metadata.distributions(path=[str(site)]):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        files = dist.files or []
        ros = name.startswith("ros-") or any(str(f).split("/")[0].startswith("ros_") and
                                             str(f).split("/")[0].endswith(".libs") for f in files)
        if ros or name == "wildseg3d-ros":
            for f in files:
                out.add(str(f).split("/")[0])
            out.add(Path(str(dist._path)).name)  # its dist-info / egg-info folder
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    base, target = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    if not base.is_dir():
        print(f"error: base site-packages {base} not found", file=sys.stderr)
        return 1
    excluded = _excluded_top_level(base)
    farm = target / "shared-site"
    farm.mkdir(parents=True, exist_ok=True)
    for old in farm.iterdir():  # idempotent: rebuild the links every time
        if old.is_symlink():
            old.unlink()
    n = 0
    for entry in sorted(base.iterdir()):
        nm = entry.name
        if nm in excluded or nm.startswith(("ros_", "__editable__", "_distutils_hack", "distutils-precedence",
                                            "pip", "setuptools", "pkg_resources", "wheel", "__pycache__")) \
                or nm.endswith(".pth") or nm.endswith(".egg-info"):
            continue
        (farm / nm).symlink_to(entry)
        n += 1
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "zz_wildseg3d_shared_site.pth").write_text(str(farm) + os.linesep)
    print(f"[setup] {n} packages of {base} shared with {target} (ROS wheels left out: {len(excluded)} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
