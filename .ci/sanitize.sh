#!/usr/bin/env bash
# CI step: the C++ extension built once more, CPU only, with AddressSanitizer and
# UndefinedBehaviorSanitizer (setup.py's COURIER_FAST_SANITIZE=1), in a temporary copy of the
# tree (the normal in-place build is untouched), then the op tests and the fuzz test run under it
# with the gcc ASan runtime LD_PRELOADed (python itself is not instrumented). Any sanitizer report
# fails the step (halt_on_error; UBSan reports abort too).
#
#   .ci/sanitize.sh [PYTHON]      PYTHON: the interpreter to build and test with (a venv's python
#                                 with torch and pytest); default $COURIER_PYTHON, else python3.
# Measured on the shared 2-core VM: 195 s (build 84 s, tests 111 s); 6 min 8 s when the VM was busy.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-${COURIER_PYTHON:-python3}}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
start=$(date +%s)

# A copy of the sources (no build outputs), with the kernels link the package expects.
tree="$scratch/tree"
mkdir -p "$tree"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | grep -zv '^courier_fast/kernels$' \
    | xargs -0 cp --parents -t "$tree")
ln -s ../kernels "$tree/courier_fast/kernels"
(cd "$tree" && COURIER_FAST_BUILD_CUDA=0 COURIER_FAST_SANITIZE=1 "$py" setup.py -q build_ext --inplace) \
    > "$scratch/build.log" 2>&1 || { tail -40 "$scratch/build.log"; exit 1; }
echo "[sanitize] build took $(( $(date +%s) - start )) s"

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$asan" ] || { echo "[sanitize] no ASan runtime: gcc -print-file-name=libasan.so gave $asan"; exit 1; }
tests=(tests/ops/test_contrastive_lse_op.py tests/ops/test_contrastive_lse_fused.py tests/ops/test_contrastive_lse_cpu_tiles.py tests/ops/test_attention_cpu.py
       tests/ops/test_op_arg_checks.py tests/ops/test_fuzz_ops.py)
[ -f "$tree/tests/ops/test_attention_core_op.py" ] && tests+=(tests/ops/test_attention_core_op.py)
t0=$(date +%s)
cd "$tree"
# The fuzz test's subprocesses inherit the environment, so they run instrumented too.
LD_PRELOAD="$asan:$ubsan" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$tree" \
    "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"
echo "[sanitize] tests took $(( $(date +%s) - t0 )) s; the whole step $(( $(date +%s) - start )) s"
