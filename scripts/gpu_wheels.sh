#!/usr/bin/env bash
# `bash scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]`: download requirements-gpu-wheels.txt's wheels
# (no dependencies, Linux x86-64, CPython PYTHON_VERSION, default 3.12) into DIR (default .whl), for a
# CUDA machine without a package registry: `GPU_WHEELS=DIR make gpu-check OUT=...` there. About 53 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat+=(--platform "$p")
done
grep -v '^#' requirements-gpu-wheels.txt | grep . | while read -r req; do
    "${PY:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
        --implementation cp "${plat[@]}" -d "$DIR" "$req"
done
ls "$DIR"
