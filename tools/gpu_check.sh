#!/usr/bin/env bash
# Builds and verifies dsmoe on a GPU machine within a time budget, in priority order:
#   tools/gpu_check.sh OUT [--budget 540] [--stages env,build,smoke,tier,sanitize,bench] [--cpu] [--plan]
# Everything (stages, time slices, outputs, CPU mode) is described in tools/gpu_check.py and docs/gpu.md.
# PYTHON picks the interpreter (default python3: on the GPU machine, the one that holds CUDA torch).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
