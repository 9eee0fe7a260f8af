"""The CPU attention core (csrc/attention_core_cpu.cpp, the `cpu` backend of
reconstruction_attention): the op against a float64 dense oracle on every layout (odd head dims,
L = 1, empty rows, rows whose keys are all padding, T = 0, causal strict / inclusive, a skewed
history_index whose long row is split over work items), fp64 / fp32 / bf16, forward and
backward; gradcheck through the public op; malformed direct calls raise. The backend is also in
the backend-parametrised tests of test_reconstruction_attention.py (backend_params)."""
import pytest
import torch

import courier_fast as cf
from courier_fast.ops import attention_layout, dispatch

from conftest import randn
from fuzz_ops_worker import attention_dense  # the float64 dense oracle of the core op's contract

pytestmark = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")
OP = "reconstruction_attention"
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _layout(gen, layout, causal, d):
    """(targets, history, layout keyword arguments) of a small problem with edge cases."""
    if layout == "padded":  # row 1: every key padding; L = 6 (P = L when causal)
        b, length = 3, 6
        pad = torch.rand(b, length, generator=gen) < 0.3
        pad[1] = True
        return randn(gen, b, length if causal else 4, d), randn(gen, b, length, d), {"key_padding_mask": pad}
    if layout == "padded_l1":  # L = 1
        return randn(gen, 4, 3, d), randn(gen, 4, 1, d), {"key_padding_mask": torch.tensor([[False], [True]] * 2)}
    if layout == "skewed":  # 300 targets, 250 of them on row 0 (split into chunks), row 2 without targets
        rows = torch.cat([torch.zeros(250, dtype=torch.long), torch.ones(40, dtype=torch.long),
                          torch.full((10,), 3, dtype=torch.long)])
        index = rows[torch.randperm(300, generator=gen)]
        return randn(gen, 300, d), randn(gen, 4, 7, d), {"history_index": index}
    if layout == "empty":  # T = 0
        return randn(gen, 0, d), randn(gen, 2, 3, d), {"history_index": torch.zeros(0, dtype=torch.long)}
    lengths = torch.tensor([6, 0, 2, 9, 1])  # jagged: an empty history row, a 1-item row
    offsets = cf.jagged.lengths_to_offsets(lengths)
    hist = randn(gen, int(offsets[-1]), d)
    t_off = offsets if causal else torch.tensor([0, 3, 5, 5, 11, 12])  # targets on the empty row
    kw = {"history_offsets": offsets, "target_offsets": t_off,
          "key_padding_mask": torch.rand(hist.shape[0], generator=gen) < 0.3}
    return randn(gen, int(t_off[-1]), d), hist, kw


def _core_args(gen, layout, causal, h, dh, dtype):
    t, hist, kw = _layout(gen, layout, causal, h * dh)
    seg = attention_layout.segments(t, hist, **kw)
    q = randn(gen, seg.target_rows.shape[0], h, dh, dtype=torch.float64)
    kv = randn(gen, seg.key_rows.shape[0], 2, h, dh, dtype=torch.float64)  # k, v strided views, as projected
    return [q.to(dtype), kv[:, 0].to(dtype), kv[:, 1].to(dtype), seg.target_rows, seg.key_rows, seg.target_offsets,
            seg.key_offsets, seg.order, seg.key_padding_mask, causal, 0.37, seg.max_targets, seg.max_keys]


CASES = [("padded", 0), ("padded", 1), ("padded", 2), ("padded_l1", 0), ("skewed", 0), ("empty", 0),
         ("jagged", 0), ("jagged", 1), ("jagged", 2)]


@pytest.mark.parametrize("layout,causal", CASES, ids=[f"{a}-causal{c}" for a, c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("h,dh", [(2, 5), (1, 16), (3, 67)])
def test_core_matches_dense_oracle_forward_and_backward(gen, layout, causal, dtype, h, dh):
    args = _core_args(gen, layout, causal, h, dh, dtype)
    out, lse = torch.ops.courier_fast.attention_core(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == lse.dtype == acc
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in args[:3])
    want_out, want_lse = attention_dense(q64, k64, v64, *args[3:11])
    tol = TOL[torch.float32 if dtype == torch.bfloat16 else dtype]  # out / lse: fp32 arithmetic on bf16 values
    torch.testing.assert_close(out.double(), want_out.detach(), **tol)
    torch.testing.assert_close(lse.double(), want_lse.detach(), **tol)  # -inf where a target has no valid key
    grad = randn(gen, *out.shape, dtype=torch.float64).to(dtype)  # the oracle sees the rounded values too
    got = torch.ops.courier_fast.attention_core_backward(grad, *args[:3], out, lse, *args[3:])
    grad = grad.double()
    want = torch.autograd.grad((want_out * grad).sum(), (q64, k64, v64))
    for g, w, x in zip(got, want, args[:3]):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g.double(), w, **TOL[dtype])


def test_skewed_rows_are_split_and_still_exact(gen):
    """A row holding most targets takes several work items whose partial dK / dV are summed: the
    result equals the same problem computed with every target on its own (no split possible)."""
    args = _core_args(gen, "skewed", 0, 2, 8, torch.float64)
    out, lse = torch.ops.courier_fast.attention_core(*args)
    grad = randn(gen, *out.shape, dtype=torch.float64)
    _, dk, dv = torch.ops.courier_fast.attention_core_backward(grad, *args[:3], out, lse, *args[3:])
    row0 = (args[3] == 0).nonzero().flatten()
    dk0, dv0 = torch.zeros_like(dk), torch.zeros_like(dv)
    for t in row0.tolist():  # the row's targets one at a time: the sum of their dK / dV
        one = grad.clone()
        one[[i for i in range(grad.shape[0]) if i != t]] = 0
        _, dk1, dv1 = torch.ops.courier_fast.attention_core_backward(one, *args[:3], out, lse, *args[3:])
        dk0 += dk1
        dv0 += dv1
    keys = args[4] == 0
    torch.testing.assert_close(dk[keys], dk0[keys], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv[keys], dv0[keys], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True, "inclusive"])
def test_gradcheck_through_the_public_op(gen, causal):
    d, h, b, length = 6, 2, 2, 4
    t = randn(gen, b, length, d, dtype=torch.float64, requires_grad=True)
    hist = randn(gen, b, length, d, dtype=torch.float64, requires_grad=True)
    w_in, b_in = randn(gen, 3 * d, d, dtype=torch.float64, requires_grad=True), randn(gen, 3 * d, dtype=torch.float64)
    w_out = randn(gen, d, d, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, True, False, False], [True, True, True, True]])  # row 1 all padding

    def fn(t, hist, w_in, w_out):
        return cf.reconstruction_attention(t, hist, w_in, b_in, w_out, None, h, key_padding_mask=pad,
                                           causal=causal, backend="cpu")
    assert torch.autograd.gradcheck(fn, (t, hist, w_in, w_out))


def test_auto_prefers_the_cpu_backend_on_cpu():
    ok, note = dispatch.op_backends(OP)["cpu"]
    assert ok, note
    assert dispatch.candidates(OP, torch.device("cpu"))[0] == "cpu"
    assert dispatch.implementations(OP)["cpu"].validate  # only after its self-check passes


def test_self_check_passes_on_cpu():
    from courier_fast.ops.selfcheck import check
    verdict = check.check_backend(OP, "cpu", "cpu")
    assert verdict["ok"], verdict["reason"]


def _valid():
    gen = torch.Generator().manual_seed(0)
    return _core_args(gen, "jagged", 0, 2, 4, torch.float32)


@pytest.mark.parametrize("index,bad,exc,match", [
    (0, lambda a: a.int(), TypeError, "dtypes differ"),
    (0, lambda a: a[:, :, :3], RuntimeError, "head dim"),
    (1, lambda a: a.double(), TypeError, "dtypes differ"),
    (1, lambda a: a[:-1], RuntimeError, "k and v shapes differ"),
    (0, lambda a: a.transpose(1, 2), RuntimeError, "q, k, v must be|head dim|disagree"),
    (3, lambda a: a[:-1], RuntimeError, "target_rows"),
    (3, lambda a: a.int(), TypeError, "target_rows"),
    (4, lambda a: a.float(), TypeError, "key_rows"),
    (5, lambda a: a[None], RuntimeError, "target_offsets"),
    (6, lambda a: a[:-1], RuntimeError, "key_offsets"),
    (7, lambda a: a[:, None], RuntimeError, "order"),
    (8, lambda a: a.float(), TypeError, "key_padding_mask"),
    (8, lambda a: a[:-1], RuntimeError, "key_padding_mask"),
    (9, lambda a: 3, RuntimeError, "causal"),
    # contents: the CPU kernel checks every index it follows
    (3, lambda a: a.clone().fill_(9), RuntimeError, "order must list each target"),
    (4, lambda a: a.flip(0), RuntimeError, "key_rows"),
    (5, lambda a: a.clone().index_fill_(0, torch.tensor([5]), 99), RuntimeError, "target_offsets must run"),
    (5, lambda a: torch.tensor([0, 5, 3, 3, 11, 12]), RuntimeError, "non-decreasing|order"),
    (6, lambda a: a - 1, RuntimeError, "key_offsets must run"),
    # a row past the end that a later row comes back from: caught before that row's entries are read
    (6, lambda a: torch.cat([a[:1], a[1:2] + 10 ** 6, a[2:]]), RuntimeError, "key_offsets must be non-decreasing"),
    (5, lambda a: torch.cat([a[:1], a[1:2] + 10 ** 6, a[2:]]), RuntimeError, "target_offsets must be non-decreasing"),
    (7, lambda a: torch.zeros_like(a), RuntimeError, "order must list each target"),
    (7, lambda a: a + 100, RuntimeError, "order must list each target"),
])
def test_malformed_direct_calls_raise(index, bad, exc, match):
    args = _valid()
    args[index] = bad(args[index])
    with pytest.raises(exc, match=match):
        torch.ops.courier_fast.attention_core(*args)


@pytest.mark.parametrize("name,bad", [("grad_out", lambda g, o, l: (g[:-1], o, l)),
                                      ("out", lambda g, o, l: (g, o[:, :-1], l)),
                                      ("lse", lambda g, o, l: (g, o, l.double())),
                                      ("lse", lambda g, o, l: (g, o, l[:-1]))])
def test_malformed_backward_tensors_raise(name, bad):
    args = _valid()
    out, lse = torch.ops.courier_fast.attention_core(*args)
    g, o, l = bad(torch.ones_like(out), out, lse)
    with pytest.raises((RuntimeError, TypeError), match=name):
        torch.ops.courier_fast.attention_core_backward(g, *args[:3], o, l, *args[3:])
