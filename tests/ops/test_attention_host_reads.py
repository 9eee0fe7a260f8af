"""Host reads of the triton attention backend (issue 27 item 4): with history_index or
target_offsets and a history longer than 16 items, the flash kernels' grid needs the most
targets in a row, read once in the forward and once in the backward (stated in
reconstruction_attention's docstring and docs/design.md); every other layout reads nothing.

tests/host_reads.HostReads cannot see these: its dispatch mode sees the custom op
(courier_fast::attention_core) as one call, not the reads its implementation makes; so the
Tensor methods that read a value are wrapped here instead, for the duration of the call."""
import traceback

import pytest
import torch

import courier_fast as cf
from courier_fast._validate import input_checks
from conftest import TRITON_DEVICE

triton_attention = pytest.importorskip("courier_fast.kernels.reconstruction_attention")
READERS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")


class _Reads:
    """Records (method, calling function) for every value read of a tensor while active."""

    def __init__(self, monkeypatch):
        self.reads, self._mp = [], monkeypatch

    def __enter__(self):
        for name in READERS:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *args, _real=real, _name=name):
                self.reads.append(f"{_name} in {traceback.extract_stack()[-2].name}")
                return _real(t, *args)

            self._mp.setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        self._mp.undo()


def _call(monkeypatch, layout, length, d=8, h=2, b=3):
    """(forward reads, backward reads) of one triton call with b rows of `length` history items."""
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3 * d, d, generator=g), torch.randn(3 * d, generator=g), torch.randn(d, d, generator=g), None]
    kw = {}
    if layout == "padded":
        targets, history = torch.randn(b, 2, d, generator=g), torch.randn(b, length, d, generator=g)
    elif layout == "history_index":
        targets, history = torch.randn(5, d, generator=g), torch.randn(b, length, d, generator=g)
        kw["history_index"] = torch.tensor([0, 2, 2, 1, 0])
    else:  # jagged history and targets, with max_history_len (no read for the keys)
        targets, history = torch.randn(5, d, generator=g), torch.randn(b * length, d, generator=g)
        kw.update(history_offsets=torch.arange(b + 1) * length, target_offsets=torch.tensor([0, 2, 2, 5]),
                  max_history_len=length)
    targets = targets.to(TRITON_DEVICE).requires_grad_()
    history, kw = history.to(TRITON_DEVICE), {k: getattr(v, "to", lambda _: v)(TRITON_DEVICE) for k, v in kw.items()}
    w = [None if x is None else x.to(TRITON_DEVICE) for x in w]
    with input_checks(False):
        with _Reads(monkeypatch) as fwd:
            out = cf.reconstruction_attention(targets, history, *w, h, backend="triton", **kw)
        with _Reads(monkeypatch) as bwd:
            out.sum().backward()
    return fwd.reads, bwd.reads


@pytest.mark.parametrize("layout", ["history_index", "target_offsets"])
def test_long_history_reads_the_most_targets_once_each_way(monkeypatch, layout):
    fwd, bwd = _call(monkeypatch, layout, length=20)
    for reads in (fwd, bwd):
        assert len(reads) == 1 and "_max_targets" in reads[0], reads


@pytest.mark.parametrize("layout,length", [("padded", 20), ("history_index", 5), ("target_offsets", 5)])
def test_other_layouts_read_nothing(monkeypatch, layout, length):
    assert _call(monkeypatch, layout, length) == ([], [])
