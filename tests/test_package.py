"""Packaging: build_info, backends, the info CLI, kernels import, and import without _C."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import courier_fast as cf
from courier_fast.ops import dispatch


def test_build_info_keys():
    info = cf.build_info()
    for key in ("cuda_compiled", "cuda_version", "torch", "triton"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)


def test_extension_built_with_cuda_when_torch_has_cuda():
    """The README install compiles csrc/cuda/ wherever torch is a CUDA build (CI included)."""
    info = cf.build_info()
    assert info["extension_loaded"], info["extension_error"]
    if torch.version.cuda and os.environ.get("COURIER_FAST_BUILD_CUDA") != "0":
        assert info["cuda_compiled"]
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's at::parallel_for is not OpenMP here")
def test_cpu_kernels_split_their_work_over_torchs_threads():
    """at::parallel_for, which every CPU kernel of ours uses, is a header template: a module built
    without -fopenmp runs its whole range on the calling thread. The CPU loss and attention then
    used one core of two (seen: 1 thread here before setup.py added the flag)."""
    assert cf.build_info()["extension_loaded"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.courier_fast.parallel_for_threads(8) == 2
        torch.set_num_threads(1)
        assert torch.ops.courier_fast.parallel_for_threads(8) == 1
    finally:
        torch.set_num_threads(before)


def test_backends_report_all_four_with_reasons():
    table = cf.backends()
    assert list(table) == list(dispatch.BACKENDS)
    for name, (ok, reason) in table.items():
        assert isinstance(ok, bool) and reason, name
    assert table["reference"][0]
    if not torch.cuda.is_available():
        assert not table["cuda"][0] and "GPU" in table["cuda"][1]


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_info_lists_backends_and_versions():
    for cmd in ([sys.executable, "-m", "courier_fast", "info"],):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        for word in ("reference", "cpu", "triton", "cuda", "torch", "dali", "timm"):
            assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "courier_fast", "info", "--json"], capture_output=True, text=True, timeout=300)
    data = json.loads(out.stdout)
    assert set(data["backends"]) == set(dispatch.BACKENDS)


def test_console_script_installed():
    import shutil
    # Next to the running python first: `venv/bin/python -m pytest` without the venv activated
    # has the venv's scripts off PATH, but they are installed beside its interpreter.
    exe = shutil.which("courier-fast", path=os.path.dirname(sys.executable)) or shutil.which("courier-fast")
    assert exe, f"the courier-fast console script is neither beside {sys.executable} nor on PATH"
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "backends:" in out.stdout


def test_kernels_package_importable():
    import courier_fast.kernels as k
    assert os.path.basename(os.path.dirname(k.__file__)) == "kernels"


def test_unloadable_extension_warns_once_with_the_fix_and_the_reference_works():
    out = _run("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "courier_fast._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import courier_fast as cf
            import courier_fast.nn
        msgs = [str(w.message) for w in caught if "courier_fast._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation --no-deps -e ." in msgs[0], msgs[0]
        import torch
        assert cf.build_info()["extension_loaded"] is False
        assert cf.build_info()["compiled_torch"], "build info read from the binary's file"
        assert cf.backends()["cpu"][0] is False and "simulated" in cf.backends()["cpu"][1]
        a, c = torch.randn(5, 3), torch.randn(5, 3)
        print(float(cf.contrastive_loss(a, c)))  # auto falls back to the reference
        print(cf.reconstruction_attention(torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(12, 4), None, torch.randn(4, 4), None, 2).shape)
    """)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 2, 4])" in out.stdout


_CALL_TRAIN = """
    def call_train():  # a data directory that does not exist: train() validates and raises at once
        try:
            cf.train({"data": missing, "out": missing})
        except FileNotFoundError as exc:  # raised inside the function; a module would raise TypeError
            assert "data:" in str(exc), exc
            return "called"
        raise AssertionError("cf.train returned without validating its config")
"""


@pytest.mark.parametrize("order", [
    "cf.TrainConfig(data=missing, out=missing); print(call_train(), call_train())",
    "print(call_train()); cf.TrainConfig(data=missing, out=missing); print(call_train())",
    "import courier_fast.training.loop; print(call_train(), call_train())",
    "from courier_fast.training.loop import train; print(call_train(), call_train())",
])
def test_cf_train_stays_the_function_whatever_is_imported_first(order, tmp_path):
    """`cf.train` is the function in every import order: the module is courier_fast.training.loop, so
    importing it (lazily through cf.TrainConfig, or directly) does not rebind the package's `train`."""
    missing = str(tmp_path / "no-such-dir")
    out = _run(f"import courier_fast as cf\nmissing = {missing!r}\n" + textwrap.dedent(_CALL_TRAIN) + order +
               "\nimport courier_fast.training.loop as m\nassert cf.train is m.train and cf.TrainConfig is m.TrainConfig\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["called", "called"], out.stdout
