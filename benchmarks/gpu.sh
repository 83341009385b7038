#!/usr/bin/env bash
# The GPU figures of docs/performance.md on one H100 or H200, in under 8 minutes:
#   bash benchmarks/gpu.sh [--json results.json]
# Needs a CUDA build of torch and the project's dependencies (PYTHON picks the interpreter;
# default: .venv/bin/python if present, else python3). `bash benchmarks/gpu.sh --tiny` checks the
# script on the CPU in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_bench.py "$@"
