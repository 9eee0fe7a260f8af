#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool): build against the image's torch, run
# the CUDA-marked and full tests, then the benchmarks; results land in ${OUT:-bench/results}.
# The GPU image has no DALI (its wheel is too large to carry in one call): the decode bench
# then measures torchvision's GPU decode and PIL only, and says so in its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m courier_fast info | tee "$out/info.txt"
python -m pytest -q -m cuda 2>&1 | tail -30 | tee "$out/pytest-cuda.txt"
python -m pytest -q -x 2>&1 | tail -15 | tee "$out/pytest-all.txt"
for b in contrastive attention decode; do
    python "bench/bench_$b.py" --out "$out/$(python -c 'import torch;print(torch.cuda.get_device_name().replace(" ","_"))')-$b.json" \
        2>&1 | tail -60 | tee "$out/bench-$b.txt"
done
# issue 6: train-step throughput (Swin-T at 224, bf16) and the full demo on the GPU
python bench/bench_train_step.py 2>&1 | tail -10 | tee "$out/bench-train_step.txt"
cp bench/results/*train_step.json "$out/" 2>/dev/null
courier-fast demo --seed 0 --no-progress --workdir /tmp/courier_demo_gpu --json "$out/demo-full-seed0.json" \
    2>&1 | tail -15 | tee "$out/demo.txt"
