"""Every masked load and store of the Triton kernels gets a bool mask.

Triton 3.9's interpreter (the one torch 2.15 installs) rejects any other mask dtype
(`ValueError: mask has unsupported dtype`), and its interpreter widens a scalar bool or'ed into a
tile, e.g. `tile | (causal == 0)`, to int32: under Triton 3.8 (torch 2.14) the kernels ran,
on 3.9 every attention call failed. The interpreter's load/store are wrapped here to record the
mask dtypes, so the check runs whatever Triton version is installed."""
import numpy as np
import pytest
import torch

import courier_fast as cf
from conftest import TRITON_DEVICE

interpreter = pytest.importorskip("triton.runtime.interpreter")


class _MaskDtypes:
    """A stand-in for the interpreter's native module that records each masked access's mask dtype."""

    def __init__(self, native):
        self._native, self.seen = native, []

    def __getattr__(self, name):
        return getattr(self._native, name)

    def load(self, ptrs, mask, other, dtype):
        self.seen.append(("load", mask.dtype))
        return self._native.load(ptrs, mask.astype(bool), other, dtype)

    def store(self, ptrs, value, mask):
        self.seen.append(("store", mask.dtype))
        return self._native.store(ptrs, value, mask.astype(bool))


@pytest.fixture
def mask_dtypes(monkeypatch):
    if TRITON_DEVICE != "cpu":
        pytest.skip("checks the Triton interpreter (TRITON_INTERPRET=1)")
    spy = _MaskDtypes(interpreter._interpreter)
    monkeypatch.setattr(interpreter, "_interpreter", spy)
    return spy


def _not_bool(seen):
    return sorted({f"{kind} {dtype}" for kind, dtype in seen if dtype != np.bool_})


@pytest.mark.parametrize("length", [5, 20])  # short kernels (L <= 16) and flash kernels
@pytest.mark.parametrize("causal", [False, "strict", "inclusive"])
def test_attention_masks_are_bool(mask_dtypes, length, causal):
    g = torch.Generator().manual_seed(length)
    b, d, h = 3, 8, 2
    targets = torch.randn(b, length, d, generator=g, requires_grad=True)
    history = torch.randn(b, length, d, generator=g, requires_grad=True)
    pad = torch.rand(b, length, generator=g) < 0.3
    w_in, w_out = torch.randn(3 * d, d, generator=g) / d ** 0.5, torch.randn(d, d, generator=g) / d ** 0.5
    out = cf.reconstruction_attention(targets, history, w_in, None, w_out, None, h, key_padding_mask=pad,
                                      causal=causal, backend="triton")
    out.square().sum().backward()
    assert mask_dtypes.seen, "the interpreter's loads were not seen"
    assert not _not_bool(mask_dtypes.seen)


def test_loss_masks_are_bool(mask_dtypes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    y = torch.randn(37, 16, generator=g, requires_grad=True)
    mask = torch.rand(37, generator=g) < 0.8
    cf.contrastive_loss(x, y, candidate_mask=mask, symmetric=True, backend="triton").backward()
    assert mask_dtypes.seen and not _not_bool(mask_dtypes.seen)


@pytest.mark.parametrize("length", [5, 20])
def test_split_backward_masks_are_bool(mask_dtypes, length):
    """A skewed history_index: row 0 holds 70 of 80 targets, more than one dK/dV chunk, so the
    split backward's partials and its reduction run too."""
    g = torch.Generator().manual_seed(7)
    b, d, h = 2, 8, 2
    index = torch.cat([torch.zeros(70, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    targets = torch.randn(80, d, generator=g, requires_grad=True)
    history = torch.randn(b, length, d, generator=g, requires_grad=True)
    w_in, w_out = torch.randn(3 * d, d, generator=g) / d ** 0.5, torch.randn(d, d, generator=g) / d ** 0.5
    out = cf.reconstruction_attention(targets, history, w_in, None, w_out, None, h, history_index=index,
                                      backend="triton")
    out.square().sum().backward()
    assert mask_dtypes.seen and not _not_bool(mask_dtypes.seen)
