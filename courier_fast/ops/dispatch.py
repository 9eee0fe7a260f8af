"""The one place that chooses an implementation for a call: select(op, backend, device).

backend="auto" takes the first implementation in AUTO_ORDER for the tensors' device that is
available here, supports the call (Impl.supports) and, when Impl.validate, has passed the
self-check on that device (courier_fast.selftest; verdicts cached on disk, so the check runs
once per device and software version). COURIER_FAST_VALIDATE=0 trusts every backend without
checking, =force re-checks once per process. A backend that fails is skipped with one warning.
What exists (the registry, register(), backends()) lives in courier_fast.ops.registry and is
re-exported here.
"""
from courier_fast.ops.registry import (AUTO_ORDER, BACKENDS, Impl, backends, candidates,  # noqa: F401
                                       implementations, op_backends, ops, register, validated, vetoed)


def select(op, backend, device, probe=None):
    """The implementation of `op` for `backend` ('auto' or a name) and a torch.device.
    probe: keyword arguments for the implementations' supports() predicates (auto only)."""
    impls = implementations(op)
    dev = device.type
    if backend == "auto":
        for name in candidates(op, device, probe):
            if vetoed(op, name, device):  # failed on another rank (selfcheck.check.agree_across_ranks)
                continue
            if not impls[name].validate or validated(op, name, device):
                return impls[name].fn
        raise RuntimeError(f"{op}: no backend can run this call on {device} here "
                           f"(candidates: {candidates(op, device, probe) or 'none'}; see `courier-fast info`)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    impl = impls.get(backend)
    if impl is None:
        have = ", ".join(sorted(impls))
        raise NotImplementedError(f"backend {backend!r} does not implement {op} yet (implemented: {have})")
    ok, reason = backends()[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if dev not in impl.devices:
        raise ValueError(f"backend {backend!r} for {op} runs on {'/'.join(impl.devices)} tensors, got {device}")
    return impl.fn
