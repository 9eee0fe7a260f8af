"""HostReads: counts what reads tensor values back to the host, which on a GPU makes the CPU wait
for the device; on CPU the same calls are counted, so a CPU test shows where a GPU would stall.

    with HostReads() as reads:
        step()
    assert reads.reads == [], reads.reads

Counted, in the thread that entered: scalar reads (item / int / float / bool: the op
aten::_local_scalar_dense), data-dependent shapes (nonzero, masked_select, boolean indexing,
unique) and torch.equal, seen by a TorchDispatchMode; and the Tensor methods tolist / numpy /
cpu, which do not dispatch on a CPU tensor. Reads made inside torch/optim/ (the optimiser's step
counters, CPU tensors on a GPU too) are left out. Each read is one line of `reads`: what was
called and the calling frames.
"""
import os
import threading
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READ_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
            "aten::is_nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}
READ_METHODS = ("tolist", "numpy", "cpu")


_MACHINERY = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")


def _where():
    """The calling frames, innermost first (None for a read made by torch/optim/)."""
    stack = [f for f in traceback.extract_stack()[:-2] if not any(m in f.filename for m in _MACHINERY)]
    if any("torch/optim/" in f.filename for f in stack):
        return None
    return " < ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})" for f in stack[-8:][::-1])


class HostReads:
    def __init__(self):
        self.reads = []
        reads = self.reads

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                bool_index = name == "aten::index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
                if name in READ_OPS or bool_index:
                    where = _where()
                    if where is not None:
                        reads.append(f"{name} at {where}")
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._saved = {}

    def _counting(self, name, original):
        thread, reads = threading.get_ident(), self.reads

        def method(tensor, *args, **kwargs):
            if threading.get_ident() == thread:
                where = _where()
                if where is not None:
                    reads.append(f"Tensor.{name} at {where}")
            return original(tensor, *args, **kwargs)

        return method

    def __enter__(self):
        for name in READ_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, self._saved[name]))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return False
