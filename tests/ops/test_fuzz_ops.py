"""Fuzzing every op of torch.ops.courier_fast and the public functions and modules with malformed
arguments (issue 30): each call raises a Python exception or returns the float64 reference's
result. The cases run in a subprocess per target (tests/ops/fuzz_ops_worker.py), so that a segfault
or a sanitizer abort fails that target's test, naming the case it crashed on, instead of
killing pytest. .ci/sanitize.sh runs this file under ASan/UBSan."""
import os
import subprocess
import sys

import pytest

import courier_fast as cf

HERE = os.path.dirname(os.path.abspath(__file__))
COMPILED = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")

# (target, cases): sized so that the whole file takes about a minute on the 2-core CI machine
# (the Triton targets run in the interpreter, ~0.1 s a case).
TARGETS = [
    pytest.param("contrastive_lse", 400, marks=COMPILED),
    pytest.param("contrastive_lse_backward", 400, marks=COMPILED),
    pytest.param("contrastive_lse_and_grad", 300, marks=COMPILED),
    pytest.param("attention_core", 60, marks=COMPILED),
    pytest.param("attention_core_backward", 60, marks=COMPILED),
    pytest.param("tile_rows", 200, marks=COMPILED),
    pytest.param("contrastive_loss_cpu", 100, marks=COMPILED),
    pytest.param("contrastive_loss_chunked", 80),
    pytest.param("reconstruction_attention_reference", 80),
    pytest.param("reconstruction_attention_module", 60),
    pytest.param("contrastive_lse_triton", 40),
    pytest.param("contrastive_lse_triton_backward", 40),
    pytest.param("attention_core_triton", 40),
    pytest.param("attention_core_triton_backward", 40),
    pytest.param("contrastive_loss_triton", 30),
    pytest.param("reconstruction_attention_triton", 30),
]


def run_worker(target, seed, cases, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(HERE, "fuzz_ops_worker.py"), target, str(seed), str(cases)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("target,cases", TARGETS)
def test_malformed_arguments_raise_or_match_reference(target, cases):
    if "triton" in target:
        pytest.importorskip("triton")
    proc = run_worker(target, 0, cases)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 1):  # a crash: signal, sanitizer abort
        last = next((ln for ln in reversed(lines) if ln.startswith("case ")), "before the first case")
        pytest.fail(f"{target} crashed (exit status {proc.returncode}) on {last}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, "\n".join([ln for ln in lines if not ln.startswith("case ")][-20:]) + proc.stderr[-2000:]
    assert f"{target}: {cases} cases" in proc.stdout


def test_a_crash_fails_the_test_and_names_the_case():
    """The subprocess harness itself: a worker killed by a signal is reported with its last case."""
    code = "import os, signal; print('case 7: x', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode not in (0, 1)
    assert proc.stdout.strip().splitlines()[-1] == "case 7: x"
