#!/usr/bin/env bash
# One entry point for the README's two commands (and the Jazzy pass of CI):
#   bash scripts/run.sh demo [demo args...]         install everything, run the demo
#   bash scripts/run.sh test [pytest args...]       install everything, run the test suite (ROS 2 Kilted)
#   bash scripts/run.sh test-jazzy [pytest args...] the same tests against ROS 2 Jazzy's wheels
#                                                   (second venv ./.venv-jazzy; CI passes -m ros)
# Installs into ./.venv (idempotent: a second run only checks). Needs Python 3.11 or 3.12
# (the ROS 2 wheels exist for those); override with PYTHON=/path/to/python3.x.
# WILDSEG3D_VENV=/path/to/venv uses an existing, complete venv as it is (nothing installed into it).
# .venv-jazzy holds only the ros-jazzy-* wheels (rclpy 7.1.6, Fast DDS 2.14, the message
# packages); every other package (torch, OpenCV, ...) is shared from ./.venv through a path file
# (scripts/share_site_packages.py), so the second distro costs ~100 MB and under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
cmd=${1:-}
shift || true
case "$cmd" in demo|test|test-jazzy) ;; *) echo "usage: bash scripts/run.sh demo|test|test-jazzy [args...]" >&2; exit 2;; esac

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in python3.11 python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then
      v=$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      case "$v" in 3.11|3.12) echo "$p"; return;; esac
    fi
  done
  echo "error: Python 3.11 or 3.12 is required (ROS 2 wheels exist only for those)" >&2
  exit 1
}

make_venv() {  # make_venv PYTHON DIR
  if ! "$1" -m venv "$2" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] python venv module missing: installing it with apt-get"
      apt-get update -qq && apt-get install -y -qq "$(basename "$1")-venv" || apt-get install -y -qq python3-venv
      rm -rf "$2"; "$1" -m venv "$2"
    else
      echo "error: '$1 -m venv' failed; install the python3-venv package" >&2; exit 1
    fi
  fi
}

pipq() {  # pipq PYTHON ARGS...: quiet pip, without the noise of the offline index mirrors
  local py=$1; shift
  "$py" -m pip install -q "$@" 2>&1 | grep -v "is ignored" || true
}

VENV="${WILDSEG3D_VENV:-$ROOT/.venv}"
if [ -n "${WILDSEG3D_VENV:-}" ]; then
  "$VENV/bin/python" -c "import rclpy, torch, cv2, wildseg3d_ros" \
    || { echo "error: WILDSEG3D_VENV=$VENV is not a complete wildseg3d venv" >&2; exit 1; }
else
  STAMP="$VENV/.wildseg3d-installed"
  want=$(cat requirements.txt requirements-test.txt setup.py scripts/run.sh | sha256sum | cut -c1-16)
  if [ ! -x "$VENV/bin/python" ]; then
    PY=$(pick_python)
    echo "[setup] creating $VENV with $PY"
    make_venv "$PY" "$VENV"
  fi
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[setup] installing requirements into $VENV (first time: a few minutes)"
    pipq "$VENV/bin/python" --upgrade pip setuptools wheel
    pipq "$VENV/bin/python" -r requirements.txt -r requirements-test.txt
    # SAM2 from PyPI without compiling its optional CUDA extension (needs torch already present).
    SAM2_BUILD_CUDA=0 pipq "$VENV/bin/python" --no-build-isolation "sam2>=1.0"
    # DUSt3R for the tests (NAVER's code, CC BY-NC-SA 4.0, non-commercial): mini-dust3r without its UI
    # dependencies (gradio, rerun, trimesh); what its inference imports is in requirements-test.txt.
    pipq "$VENV/bin/python" --no-deps "mini-dust3r==0.1.2"
    pipq "$VENV/bin/python" --no-deps --no-build-isolation -e .
    "$VENV/bin/python" -c "import rclpy, torch, torchvision, cv2, skimage, scipy, rosbags, sam2, pycolmap, huggingface_hub, wildseg3d_ros; import mini_dust3r.inference" \
      || { echo "error: installation incomplete (see pip output above)" >&2; exit 1; }
    echo "$want" > "$STAMP"
  fi
fi
PYBIN="$VENV/bin/python"

if [ "$cmd" = test-jazzy ]; then
  JVENV="${WILDSEG3D_JAZZY_VENV:-$ROOT/.venv-jazzy}"
  JSTAMP="$JVENV/.wildseg3d-installed"
  jwant=$( (cat requirements-jazzy.txt setup.py; echo "$VENV") | sha256sum | cut -c1-16)
  if [ ! -x "$JVENV/bin/python" ]; then
    BASEPY=$("$PYBIN" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
    echo "[setup] creating $JVENV (ROS 2 Jazzy wheels) with $BASEPY"
    make_venv "$BASEPY" "$JVENV"
  fi
  if [ ! -f "$JSTAMP" ] || [ "$(cat "$JSTAMP")" != "$jwant" ]; then
    echo "[setup] installing the ROS 2 Jazzy wheels into $JVENV"
    BASESITE=$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$PYBIN" scripts/share_site_packages.py "$BASESITE" "$JVENV"
    pipq "$JVENV/bin/python" --upgrade pip setuptools wheel
    pipq "$JVENV/bin/python" -r requirements-jazzy.txt
    pipq "$JVENV/bin/python" --no-deps --no-build-isolation -e .
    "$JVENV/bin/python" - <<'PY' || { echo "error: Jazzy installation incomplete (see pip output above)" >&2; exit 1; }
import importlib.metadata as md, os, sys, rclpy, torch, cv2, wildseg3d_ros  # noqa: F401
v = md.version("ros-rclpy")
script = os.path.join(os.path.dirname(sys.executable), "reconstruction_node")
assert os.path.exists(script), f"console scripts missing in {os.path.dirname(sys.executable)} (pip install -e . failed)"
assert v.startswith("7."), f"expected Jazzy's rclpy 7.x in .venv-jazzy, found {v}"
print(f"[setup] Jazzy venv ready: rclpy {v}, torch {torch.__version__}")
PY
    echo "$jwant" > "$JSTAMP"
  fi
  PYBIN="$JVENV/bin/python"
fi

# Keep ROS 2 traffic of the demo/tests on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export PYTHONUNBUFFERED=1
case "$cmd" in
  demo) exec "$VENV/bin/wildseg3d" demo "$@" ;;
  test|test-jazzy) exec "$PYBIN" -m pytest "$@" ;;
esac
