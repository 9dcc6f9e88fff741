#!/usr/bin/env bash
# One entry point for the README's two commands:
#   bash scripts/run.sh demo [demo args...]   install everything, run the demo
#   bash scripts/run.sh test [pytest args...] install everything, run the test suite
# Installs into ./.venv (idempotent: a second run only checks). Needs Python 3.11 or 3.12
# (the ROS 2 wheels exist for those); override with PYTHON=/path/to/python3.x.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
cmd=${1:-}
shift || true
case "$cmd" in demo|test) ;; *) echo "usage: bash scripts/run.sh demo|test [args...]" >&2; exit 2;; esac

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

VENV="$ROOT/.venv"
STAMP="$VENV/.wildseg3d-installed"
want=$(cat requirements.txt requirements-test.txt setup.py scripts/run.sh | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(pick_python)
  echo "[setup] creating $VENV with $PY"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] python venv module missing: installing it with apt-get"
      apt-get update -qq && apt-get install -y -qq "$(basename "$PY")-venv" || apt-get install -y -qq python3-venv
      rm -rf "$VENV"; "$PY" -m venv "$VENV"
    else
      echo "error: '$PY -m venv' failed; install the python3-venv package" >&2; exit 1
    fi
  fi
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing requirements into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt 2>&1 | grep -v "is ignored" || true
  # SAM2 from PyPI without compiling its optional CUDA extension (needs torch already present).
  SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install -q --no-build-isolation "sam2>=1.0" 2>&1 | grep -v "is ignored" || true
  # DUSt3R for the tests (NAVER's code, CC BY-NC-SA 4.0, non-commercial): mini-dust3r without its UI
  # dependencies (gradio, rerun, trimesh); what its inference imports is in requirements-test.txt.
  "$VENV/bin/python" -m pip install -q --no-deps "mini-dust3r==0.1.2" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import rclpy, torch, torchvision, cv2, skimage, scipy, rosbags, sam2, pycolmap, huggingface_hub, wildseg3d_ros; import mini_dust3r.inference" \
    || { echo "error: installation incomplete (see pip output above)" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi

# Keep ROS 2 traffic of the demo/tests on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export PYTHONUNBUFFERED=1
case "$cmd" in
  demo) exec "$VENV/bin/wildseg3d" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
esac
