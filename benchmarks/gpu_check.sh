#!/usr/bin/env bash
# Every GPU code path checked in one command (the checks are in tools/gpu_check.py):
#   bash benchmarks/gpu_check.sh          on a CUDA machine; report and results into benchmarks/
#   bash benchmarks/gpu_check.sh --cpu    the same checks on the CPU, small; report into benchmarks/tmp/
# Other options: --only CHECK ..., --out DIR (python tools/gpu_check.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
