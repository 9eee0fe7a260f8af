"""The default CUDA path for 16-bit inputs (issue 27 item 3): `auto` must not hand a bf16 / fp16
loss to the `cuda` backend, which makes fp32 copies and runs fp32 GEMMs, while the Triton kernels
(16-bit tensor-core MMA, fp32 accumulation) are available and validated on the device. A CUDA
machine is emulated on CPU: backends() reports cuda and triton available, the validator is
stubbed, and the tensors' device is the only thing read from them (supports() probes)."""
import types

import pytest
import torch

from courier_fast.ops import contrastive, dispatch, registry

OP = contrastive.OP


class _On:
    """A probe tensor that says it lives on `device` (dispatch reads dtype, device, shape only)."""

    def __init__(self, t, device):
        self._t, self.device, self.dtype, self.shape = t, torch.device(device), t.dtype, t.shape

    def __getattr__(self, name):
        return getattr(self._t, name)


@pytest.fixture
def cuda_machine(monkeypatch):
    """cuda and triton registered and available for the loss; `trusted` decides the validator."""
    impls = dispatch.implementations(OP)
    for name in ("cuda", "triton"):
        # a marker fn per backend (cpu and cuda share one fn); the registered supports() where the
        # build registered the backend, else the rule it would register (a CPU-only build)
        supports = impls[name].supports if name in impls else (contrastive._cuda_supports if name == "cuda" else None)
        monkeypatch.setitem(impls, name, registry.Impl(fn=_marker(name), devices=("cuda",), supports=supports))
    real = registry.backends()
    emulated = lambda: {**real, "cuda": (True, "emulated"), "triton": (True, "emulated")}  # noqa: E731
    monkeypatch.setattr(registry, "backends", emulated)
    monkeypatch.setattr(dispatch, "backends", emulated)
    trusted = {"cuda": True, "triton": True}
    monkeypatch.setattr(registry, "_VALIDATOR", lambda op, backend, device: trusted[backend])
    return types.SimpleNamespace(trusted=trusted, impls=impls)


def _marker(name):
    def fn(*args, **kwargs):
        return name
    return fn


def _probe(dtype, n=64, d=32):
    x = torch.zeros(n, d, dtype=dtype)
    return {"anchors": _On(x, "cuda"), "candidates": _On(x, "cuda")}


def _chosen(probe):
    return dispatch.select(OP, "auto", torch.device("cuda"), probe=probe)()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_calls_go_to_the_validated_triton_kernels(cuda_machine, dtype):
    assert _chosen(_probe(dtype)) == "triton"


def test_fp32_calls_stay_on_cuda(cuda_machine):
    assert _chosen(_probe(torch.float32)) == "cuda"


def test_16bit_falls_back_to_cuda_when_triton_failed_its_self_check(cuda_machine):
    cuda_machine.trusted["triton"] = False
    assert _chosen(_probe(torch.bfloat16)) == "cuda"


def test_cuda_by_name_still_runs_16bit(cuda_machine):
    assert dispatch.select(OP, "cuda", torch.device("cuda"))() == "cuda"
