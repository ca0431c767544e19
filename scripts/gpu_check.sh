#!/usr/bin/env bash
# `make gpu-check OUT=DIR`: install the CUDA stack into .venv-gpu and write the GPU report to DIR.
#
# Without a CUDA device (no GPU in `nvidia-smi -L`, no /dev/nvidia[0-9]*) it prints
# "no CUDA device" and exits 0 before installing anything, so CI can call it as a dry run.
# GPU_CHECK_FORCE=1 runs the steps against host memory instead (tests the script; no GPU
# result). GPU_WHEELS=DIR: a machine without a package registry whose python3 has a CUDA torch; the
# rest is installed from DIR's wheels (scripts/gpu_wheels.sh) instead of into .venv-gpu.
# Extra arguments go to bench/gpu_check.py (see its --help).
set -uo pipefail
OUT=${1:-}
shift || true
case "$OUT" in
    "") ;;
    /*) ;;
    *) OUT="$PWD/$OUT" ;;  # relative to where it was called, not the repo root
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-report}
PY=${PY:-python3}
if [ -n "${GPU_CHECK_FORCE:-}" ]; then
    exec "$PY" bench/gpu_check.py --out "$OUT" --host-mode "$@"
fi
if ! { timeout 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "gpu-check: no CUDA device (no GPU in nvidia-smi -L, no /dev/nvidia[0-9]*); nothing installed, nothing run"
    exit 0
fi
if [ -n "${GPU_WHEELS:-}" ]; then
    # no registry there: python3 already holds a CUDA torch; the rest comes as wheels (scripts/gpu_wheels.sh)
    SITE=${GPU_SITE:-/tmp/ucxkv-gpu-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$GPU_WHEELS"/*.whl || { echo "gpu-check: installing the wheels of $GPU_WHEELS failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PY" bench/gpu_check.py --out "$OUT" --python "$PY" --no-install "$@"
fi
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
