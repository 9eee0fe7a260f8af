"""The test seed: printed in the header and with a failure; COURIER_TEST_SEED reproduces a run."""
import os
import re
import shutil
import subprocess
import sys

INNER = '''
import numpy as np
import torch

def test_a(seed, gen):
    print("draw", seed, torch.rand(2, generator=gen).tolist(), torch.rand(1).item(), np.random.rand())
    assert False

def test_b(seed, gen):
    print("draw", seed, torch.rand(2, generator=gen).tolist(), torch.rand(1).item(), np.random.rand())
    assert False
'''


def _run(tmp_path, env_seed=None):
    env = {k: v for k, v in os.environ.items() if k != "COURIER_TEST_SEED"}
    if env_seed is not None:
        env["COURIER_TEST_SEED"] = str(env_seed)
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 1, res.stdout + res.stderr  # the inner test fails on purpose
    return res.stdout


def test_seed_is_printed_and_reproduces_the_inputs(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    first = _run(tmp_path)
    base = int(re.search(r"COURIER_TEST_SEED=(\d+) \(set it", first).group(1))  # the header
    assert first.count(f"COURIER_TEST_SEED={base} reproduces this test") == 2  # each failure report
    draws = re.findall(r"^draw .*$", first, re.M)
    assert len(draws) == 2 and draws[0] != draws[1]  # each test its own seed
    assert re.findall(r"^draw .*$", _run(tmp_path, base), re.M) == draws
