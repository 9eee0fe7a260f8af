#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool), at most 10 minutes: build against the
# image's torch, self-check every kernel backend on this GPU, run the CUDA tests, compile the
# kernel report with the image's Triton, and run the benchmarks. Every result lands in
# ${OUT:-bench/results}. Each step has its own time limit and the whole run a deadline, so a
# hang costs its step, not the session. PREPARED, NEVER RUN: no session has had a GPU yet.
#   bash bench/gpu_session.sh            # on the GPU machine, from anywhere in the repo
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
deadline=$(( $(date +%s) + ${GPU_SESSION_SECONDS:-570} ))
log() { echo "[gpu_session $(date +%T)] $*" | tee -a "$out/session.log"; }
step() {  # step NAME LIMIT_S CMD...: run CMD with min(LIMIT, time left), output to $out/NAME.txt
    local name=$1 limit=$2; shift 2
    local left=$(( deadline - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then log "skip $name (deadline)"; return 0; fi
    log "start $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    log "end $name rc=$rc"; tail -5 "$out/$name.txt" | sed 's/^/    /'
}
dev=$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))' 2>/dev/null || echo gpu)
export COURIER_FAST_CACHE_DIR="$out/cache"     # the self-check verdicts travel back too

step build 240 pip install --no-build-isolation --no-deps -e .
step info 60 python -m courier_fast info
step selftest 120 python -m courier_fast selftest --device cuda --force --json
cp "$out/selftest.txt" "$out/$dev-selftest.json" 2>/dev/null
# Triton kernels through the image's Triton (3.6) for this GPU's and the other architecture
step kernel_report 120 python bench/kernel_report.py --no-cuda --jobs 14 --out "$out/static-kernels-$dev.json"
step pytest_cuda 120 python -m pytest -q -x -m cuda tests/
# auto on this GPU (validated backends) next to each backend and the peers that are installed
step bench_contrastive_bf16 120 python bench/bench_contrastive.py --n 16384 65536 262144 --d 256 \
    --dtype bfloat16 --reps 5 --out "$out/$dev-contrastive-bf16.json"
step bench_contrastive_fp32 60 python bench/bench_contrastive.py --n 16384 65536 --d 256 \
    --dtype float32 --reps 3 --out "$out/$dev-contrastive-fp32.json"
step bench_attention 60 python bench/bench_attention.py --out "$out/$dev-attention.json"
step bench_decode 45 python bench/bench_decode.py --quick --out "$out/$dev-decode.json"
log "done; results in $out"
