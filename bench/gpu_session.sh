#!/usr/bin/env bash
# One call on a lent GPU machine, at most 10 minutes: build against the image's torch, the
# self-check of every backend on this GPU, the CUDA tests, the benchmarks and the kernel report,
# each step in its own process under its own time limit, none stopping the others. One JSON,
# ${OUT:-bench/results}/<device>-gpu_session.json, is rewritten after every step (steps, rc,
# seconds, output tails, parsed results); bench/gpu_session.py is the driver and says more.
#   bash bench/gpu_session.sh              # on the GPU machine, from anywhere in the repo
#   bash bench/gpu_session.sh --dry-run    # any machine: every step on CPU, into $OUT or a temp dir
#   bash bench/gpu_session.sh --list       # the plan: steps, budgets, commands
set -euo pipefail
cd "$(dirname "$0")/.."
# the image's interpreter is python3 (there may be no `python`); PYTHON overrides
py=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_session.py "$@"
