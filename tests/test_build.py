"""The build: toolchain choices (requirements, architectures, error lines), the build info the
extension carries, and the warning when _C cannot be loaded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import courier_fast as cf
from courier_fast import _extension

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_backend"))
import cuda_toolchain as toolchain  # noqa: E402


def test_pip_requirements_pin_the_whole_compiler_and_cccl_to_torch_cuda():
    reqs = toolchain.pip_requirements("13.0", system="Linux", machine="x86_64")
    assert reqs == ["nvidia-cuda-nvcc==13.0.*", "nvidia-nvvm==13.0.*", "nvidia-cuda-crt==13.0.*",
                    "nvidia-cuda-cccl==13.0.*"]
    assert toolchain.pip_requirements("13.2", system="Linux", machine="aarch64")[-1] == "nvidia-cuda-cccl==13.2.*"
    assert toolchain.pip_requirements("12.8", system="Linux", machine="x86_64") == [
        "nvidia-cuda-nvcc-cu12==12.8.*", "nvidia-cuda-cccl-cu12==12.8.*"]
    assert toolchain.pip_requirements(None, system="Linux", machine="x86_64") == []  # CPU torch
    assert toolchain.pip_requirements("13.0", system="Darwin", machine="arm64") == []


TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def test_arch_list_without_gpu_is_torch_archs_nvcc_supports_plus_ptx_for_the_newest():
    supported = {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0", "12.1"}
    assert toolchain.arch_list(TORCH_ARCHS, [], supported) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    # an nvcc that cannot emit sm_120 (older toolkit) drops it; PTX moves to the newest left
    assert toolchain.arch_list(TORCH_ARCHS, [], supported - {"12.0"}) == "7.5;8.0;8.6;9.0;10.0+PTX"
    assert toolchain.arch_list(TORCH_ARCHS + ["compute_120"], [], supported).count("+PTX") == 1


def test_arch_list_with_visible_gpus_builds_for_them():
    assert toolchain.arch_list(TORCH_ARCHS, [(9, 0)], {"8.0", "9.0"}) == "9.0+PTX"
    assert toolchain.arch_list(TORCH_ARCHS, [(9, 0), (8, 0), (9, 0)], {"8.0", "9.0"}) == "8.0;9.0+PTX"


def test_arch_list_falls_back_to_ampere_ada_hopper_when_torch_reports_nothing():
    assert toolchain.arch_list([], [], {"7.5", "8.0", "8.6", "8.9", "9.0", "10.0"}) == "8.0;8.6;8.9;9.0+PTX"


def test_first_error_line_finds_the_compiler_error_not_ninja_noise():
    log = textwrap.dedent("""\
        [1/3] c++ -MMD -c csrc/a.cpp -Werror=return-type -o a.o
        FAILED: attention_core_cuda.o
        /x/nvcc -c csrc/cuda/attention_core_cuda.cu -o attention_core_cuda.o
        In file included from /x/include/cuda_fp16.h:4492:
        /x/include/cuda_fp16.h:4492:10: fatal error: nv/target: No such file or directory
        compilation terminated.
        ninja: build stopped: subcommand failed.
        """)
    assert toolchain.first_error_line(log) == "/x/include/cuda_fp16.h:4492:10: fatal error: nv/target: No such file or directory"
    assert toolchain.first_error_line("all good\n[2/2] linking\n") is None
    assert "Unsupported gpu architecture" in toolchain.first_error_line("nvcc fatal   : Unsupported gpu architecture 'compute_30'")


def test_build_info_is_recorded_in_the_binary_and_matches_the_module():
    path = _extension.extension_path()
    assert path is not None and _extension.loaded(), _extension.LOAD_ERROR
    from_file = _extension.read_build_info(path)
    assert from_file == _extension.BUILD
    assert from_file["torch"] == torch.__version__  # built against the torch that runs the tests
    info = cf.build_info()
    assert info["cuda_compiled"] == from_file["cuda_compiled"]
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["cuda_archs"][-1].endswith("+PTX")
        assert info["cuda_build_error"] is None and info["cuda_skip_reason"] is None
    else:
        assert info["cuda_archs"] == []
        assert info["cuda_build_error"] or info["cuda_skip_reason"]  # always says why


def test_read_build_info_of_a_file_without_marker_is_empty(tmp_path):
    plain = tmp_path / "_C.so"
    plain.write_bytes(b"\x7fELF no marker here\0")
    assert _extension.read_build_info(str(plain)) == {}
    assert _extension.read_build_info(str(tmp_path / "missing.so")) == {}
    marked = tmp_path / "_C2.so"
    marked.write_bytes(b"\x7fELF..." + _extension.MARKER + b'{"torch": "2.15.0+cu132"}\0rest')
    assert _extension.read_build_info(str(marked)) == {"torch": "2.15.0+cu132"}


def test_abi_mismatch_message_names_both_torches_and_the_fix():
    msg = _extension.load_failure_message("ImportError: undefined symbol: _ZN3c10", {"torch": "2.15.0+cu132"},
                                          "2.14.1+cu130", "/x/_C.so")
    assert "2.15.0+cu132" in msg and "2.14.1+cu130" in msg
    assert "pip install --no-build-isolation --no-deps -e ." in msg and "undefined symbol" in msg
    unbuilt = _extension.load_failure_message("ModuleNotFoundError: no _C", {}, "2.14.1", None)
    assert "not built" in unbuilt and "pip install --no-build-isolation --no-deps -e ." in unbuilt


def _warnings_of_import(prelude):
    code = textwrap.dedent("""
        import json, warnings
        import torch
        built = torch.__version__
        torch.__version__ = "9.9.9"  # the running torch is now another one than _C was built against
        PRELUDE
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import courier_fast as cf
        print(json.dumps({"built": built, "loaded": cf.build_info()["extension_loaded"],
                          "msgs": [str(w.message) for w in caught if "courier_fast._C" in str(w.message)],
                          "loss": float(cf.contrastive_loss(torch.randn(4, 3), torch.randn(4, 3)))}))
    """).replace("PRELUDE", prelude)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_changed_since_the_build_warns_once_naming_both_versions():
    got = _warnings_of_import("")
    assert got["loaded"] and len(got["msgs"]) == 1, got
    assert got["built"] in got["msgs"][0] and "9.9.9" in got["msgs"][0]
    assert "pip install --no-build-isolation --no-deps -e ." in got["msgs"][0]


def test_torch_changed_and_extension_unloadable_warns_once_and_the_package_works():
    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'courier_fast._C':\n"
             "            raise ImportError('simulated: undefined symbol _ZN3c10')\n"
             "sys.meta_path.insert(0, Block())\n")
    got = _warnings_of_import(block)
    assert not got["loaded"] and len(got["msgs"]) == 1, got
    msg = got["msgs"][0]
    assert got["built"] in msg and "9.9.9" in msg and "fails to load" in msg and "undefined symbol" in msg
    assert "pip install --no-build-isolation --no-deps -e ." in msg


def test_ops_import_without_the_data_stack(tmp_path):
    """contrastive_loss and the attention need torch only: the model/training API is lazy."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pyarrow", "timm", "torchvision", "sklearn", "PIL"):
                    raise ImportError("simulated: not installed")
        sys.meta_path.insert(0, Block())
        import torch, courier_fast as cf
        attn = cf.nn.ReconstructionAttention(4, 2)
        print(float(cf.contrastive_loss(torch.randn(4, 3), torch.randn(4, 3))), attn(torch.randn(1, 2, 4), torch.randn(1, 3, 4)).shape)
        assert "pyarrow" not in sys.modules and "timm" not in sys.modules
        from courier_fast.cli import main
        assert main(["info"]) == 0  # the diagnostic works on a torch-only install
        assert main(["train", "--data", "d", "--out", "o"]) == 2  # and train says what is missing
        assert main(["import", "--interactions", "f", "--items", "f", "--images", "d", "--out", "o"]) == 2
        from courier_fast.ops.selfcheck import check as backend_check  # the self-check and its cache need torch only too
        assert backend_check.verdict("contrastive_loss", "chunked", "cpu", force=True)["ok"]
        assert "pyarrow" not in sys.modules
    """)
    env = {**os.environ, "COURIER_FAST_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert any(f.startswith("selftest-") for f in os.listdir(tmp_path))
    assert "torch.Size([1, 2, 4])" in out.stdout and "backends:" in out.stdout
    assert "courier-fast train: error: " in out.stderr and "simulated: not installed" in out.stderr


@pytest.mark.parametrize("value", ["yes", "2"])
def test_bad_build_mode_is_a_clear_error(value, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "setup.py"), "--name"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "COURIER_FAST_BUILD_CUDA": value},
                         cwd=tmp_path)
    assert out.returncode != 0 and "COURIER_FAST_BUILD_CUDA must be 0, 1 or unset" in out.stderr
