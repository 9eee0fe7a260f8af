"""courier_fast.reconstruction_attention and nn.ReconstructionAttention: vs the float64
reference, vs nn.MultiheadAttention, causal mode vs its definition, empty rows."""
import math

import pytest
import torch
from torch import nn

import courier_fast as cf
from courier_fast.ops.reference import reconstruction_attention_reference

from courier_fast.ops.selfcheck import tolerances
from conftest import TRITON_DEVICE, backend_params, launchable, rand_mask, randn, tol

OP = "reconstruction_attention"


def _module(gen, d, h, bias=True, dtype=torch.float64):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    m = cf.nn.ReconstructionAttention(d, h, bias=bias, dtype=dtype)
    if bias:  # non-zero biases so that they are really tested
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


def _params(m):
    return (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("b,p,length,d,h", [(1, 1, 1, 4, 1), (3, 17, 7, 12, 3), (2, 5, 33, 8, 4), (4, 1, 5, 6, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_nn_multihead_attention(gen, b, p, length, d, h, bias):
    mha = nn.MultiheadAttention(d, h, bias=bias, batch_first=True, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    ours = cf.nn.ReconstructionAttention.from_mha(mha)
    t, hist = randn(gen, b, p, d, dtype=torch.float64), randn(gen, b, length, d, dtype=torch.float64)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[:, 0] = False  # every row keeps at least one item: nn.MultiheadAttention is defined there
    want = mha(t, hist, hist, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(ours(t, hist, key_padding_mask=pad), want)


def test_state_dict_is_interchangeable_with_mha(gen):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = cf.nn.ReconstructionAttention(8, 2)
    assert set(ours.state_dict()) == set(mha.state_dict())
    ours.load_state_dict(mha.state_dict())
    mha2 = nn.MultiheadAttention(8, 2, batch_first=True)
    mha2.load_state_dict(ours.state_dict())  # and back
    t, hist = randn(gen, 2, 3, 8), randn(gen, 2, 4, 8)
    torch.testing.assert_close(ours(t, hist), mha2(t, hist, hist, need_weights=False)[0])


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_row_without_history_gives_output_bias(gen, backend, device):
    m = _module(gen, 8, 2).to(device)
    t, hist = randn(gen, 3, 4, 8, dtype=torch.float64, device=device), randn(gen, 3, 5, 8, dtype=torch.float64, device=device)
    pad = torch.zeros(3, 5, dtype=torch.bool, device=device)
    pad[1] = True  # row 1 has no valid history
    m.backend = backend
    out = m(t, hist, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], m.out_proj.bias.detach().expand(4, 8))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("b,p,length,d,h", [(2, 1, 1, 3, 1), (3, 17, 7, 8, 4), (2, 5, 33, 12, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference_fwd_bwd(gen, backend, device, b, p, length, d, h, dtype):
    m = _module(gen, d, h, dtype=torch.float64)
    t = randn(gen, b, p, d, dtype=torch.float64)
    hist = randn(gen, b, length, d, dtype=torch.float64)
    pad = rand_mask(gen, b, length, p=0.4)
    pad[0] = True  # an empty row
    ref_inputs = [t.clone().requires_grad_(), hist.clone().requires_grad_()] + [x.detach().clone().requires_grad_() for x in _params(m)]
    ref = reconstruction_attention_reference(*ref_inputs[:2], *ref_inputs[2:], h, key_padding_mask=pad)
    inputs = [x.detach().to(device=device, dtype=dtype).requires_grad_() for x in ref_inputs]
    out = cf.reconstruction_attention(*inputs, h, key_padding_mask=pad.to(device), backend=backend)
    rtol, atol = tol(backend, dtype)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=rtol * 10, atol=atol * 10)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(ref, ref_inputs, g)
    got = torch.autograd.grad(out, inputs, g.to(device=device, dtype=dtype))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol * 10, atol=atol * 10 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,p,length,d,h,causal", [(3, 5, 9, 32, 2, False), (2, 40, 70, 64, 2, False),
                                                   (2, 7, 7, 48, 3, True), (2, 9, 9, 32, 2, "inclusive"),
                                                   (2, 3, 20, 256, 1, False)])
def test_half_within_twice_pytorch_error(gen, backend, device, dtype, b, p, length, d, h, causal):
    """16-bit inputs, forward and every gradient: within the 16-bit bar of
    courier_fast.ops.selfcheck.tolerances, i.e. at most 2x the error of the same attention computed by plain
    PyTorch in that dtype (the reference run on 16-bit tensors), vs float64, plus a quarter unit
    roundoff. Shapes: odd head dims, several target / history tiles, causal, head dim 256."""
    m = _module(gen, d, h, dtype=torch.float64)
    t = randn(gen, b, length if causal else p, d, dtype=torch.float64)
    hist = randn(gen, b, length, d, dtype=torch.float64)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[0] = True  # an empty row
    inputs = [x.detach().to(dtype).double() for x in (t, hist, *_params(m))]  # what the backend sees
    g = torch.randn(t.shape, generator=gen, dtype=torch.float64)

    def run(fn, dt, dev):
        leaves = [x.to(device=dev, dtype=dt).requires_grad_() for x in inputs]
        out = fn(*leaves, h, key_padding_mask=pad.to(dev), causal=causal)
        return [out] + list(torch.autograd.grad(out, leaves, g.to(device=dev, dtype=out.dtype)))

    want = run(reconstruction_attention_reference, torch.float64, "cpu")
    yard = run(reconstruction_attention_reference, dtype, device)
    ours = run(lambda *a, **k: cf.reconstruction_attention(*a, **k, backend=backend), dtype, device)
    assert all(x.dtype == dtype for x in ours)
    cls = tolerances.HALF_DTYPES[dtype]
    for i, (got, want_, base) in enumerate(zip(ours, want, yard)):
        err, allowed = tolerances.rel_error(got, want_), tolerances.allowed_error(cls, tolerances.rel_error(base, want_))
        assert err <= allowed, f"output {i}: error {err:.3g} > allowed {allowed:.3g}"


def causal_by_definition(t, hist, params, h, pad, inclusive=False):
    """Loop spelling of the causal modes: target t attends over valid history items s < t
    (strict) or s <= t (inclusive)."""
    w_in, b_in, w_out, b_out = params
    b, length, d = hist.shape
    dh = d // h
    q = t @ w_in[:d].T + b_in[:d]
    k = hist @ w_in[d:2 * d].T + b_in[d:2 * d]
    v = hist @ w_in[2 * d:].T + b_in[2 * d:]
    out = torch.zeros(b, length, d, dtype=t.dtype)
    for row in range(b):
        for pos in range(length):
            keys = [s for s in range(pos + 1 if inclusive else pos) if not pad[row, s]]
            heads = []
            for head in range(h):
                sl = slice(head * dh, (head + 1) * dh)
                if not keys:
                    heads.append(torch.zeros(dh, dtype=t.dtype))
                    continue
                scores = torch.stack([q[row, pos, sl] @ k[row, s, sl] for s in keys]) / math.sqrt(dh)
                heads.append(torch.softmax(scores, 0) @ v[row, keys, sl])
            out[row, pos] = torch.cat(heads)
    return out @ w_out.T + b_out


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("length,d,h", [(1, 4, 2), (6, 6, 3), (9, 8, 1)])
@pytest.mark.parametrize("causal", [True, "strict", "inclusive"])
def test_causal_matches_definition(gen, backend, device, length, d, h, causal):
    m = _module(gen, d, h)
    hist = randn(gen, 3, length, d, dtype=torch.float64)
    queries = randn(gen, 3, length, d, dtype=torch.float64)  # e.g. another view of the history
    pad = rand_mask(gen, 3, length, p=0.3)
    pad[0, 0], pad[1, 0] = False, True  # position 0: one row sees itself (inclusive), one is padding
    inclusive = causal == "inclusive"
    want = causal_by_definition(queries, hist, [x.detach() for x in _params(m)], h, pad, inclusive)
    m.backend = backend
    got = m.to(device)(queries.to(device), hist.to(device), key_padding_mask=pad.to(device), causal=causal)
    rtol, atol = tol(backend, torch.float64)
    torch.testing.assert_close(got.detach().cpu(), want, rtol=rtol * 10, atol=atol * 10)
    bias = m.out_proj.bias.detach().cpu().expand(3, d)
    if inclusive:  # position 0 sees itself unless it is padding
        assert not torch.allclose(got[~pad[:, 0], 0].detach().cpu(), bias[~pad[:, 0]])
        torch.testing.assert_close(got[pad[:, 0], 0].detach().cpu(), bias[pad[:, 0]])
    else:  # position 0 never has an earlier item: it is the output bias
        torch.testing.assert_close(got[:, 0].detach().cpu(), bias)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_inclusive_causal_equals_nn_multihead_attention_causal_mask(gen, backend, device, mask_kind):
    """causal="inclusive" is nn.MultiheadAttention's causal self-attention (attn_mask from
    generate_square_subsequent_mask, or its bool form, is_causal=True), gradients included,
    wherever MHA's output is defined (each target keeps a valid item at or before it)."""
    b, length, d, h = 3, 7, 12, 3
    mha = nn.MultiheadAttention(d, h, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ours = cf.nn.ReconstructionAttention.from_mha(mha, backend=backend).to(device)
    x = randn(gen, b, length, d, dtype=torch.float64, requires_grad=True)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[:, 0] = False  # position 0 sees itself: every target has a valid key
    attn_mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    kpm = pad
    if mask_kind == "bool":
        attn_mask = attn_mask.isinf()  # True = not allowed
    else:
        kpm = torch.zeros(b, length, dtype=torch.float64).masked_fill(pad, float("-inf"))
    want = mha(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=True, need_weights=False)[0]
    xd = x.detach().to(device).requires_grad_()
    got = ours(xd, xd, key_padding_mask=pad.to(device), causal="inclusive")
    rtol, atol = tol(backend, torch.float64)
    torch.testing.assert_close(got.cpu(), want, rtol=rtol * 10, atol=atol * 10)
    g = randn(gen, b, length, d, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, [x, mha.in_proj_weight, mha.out_proj.weight], g)
    got_grads = torch.autograd.grad(got, [xd, ours.in_proj_weight, ours.out_proj.weight], g.to(device))
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu(), e, rtol=rtol * 10, atol=atol * 10 * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("causal", [1, "Inclusive", "s<=t", None])
def test_causal_rejects_other_spellings(gen, causal):
    m = _module(gen, 4, 2)
    x = randn(gen, 2, 3, 4, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError), match="causal must be"):
        m(x, x, causal=causal)


def test_gradcheck_float64_with_padding_and_causal(gen):
    m = _module(gen, 4, 2)
    t = randn(gen, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    hist = randn(gen, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, True, False], [True, True, True]])
    for causal in (False, True, "inclusive"):
        assert torch.autograd.gradcheck(
            lambda t, hist, *p: cf.reconstruction_attention(t, hist, *p, 2, key_padding_mask=pad, causal=causal),
            (t, hist, *_params(m)))


def test_module_compiles(gen):
    torch._dynamo.reset()
    m = _module(gen, 8, 2, dtype=torch.float32)
    t, hist = randn(gen, 2, 3, 8), randn(gen, 2, 5, 8)
    pad = rand_mask(gen, 2, 5)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(t, hist, key_padding_mask=pad), m(t, hist, key_padding_mask=pad))


def _triton_usable():
    from courier_fast.ops import dispatch
    return dispatch.op_backends(OP)["triton"][0]


needs_triton = pytest.mark.skipif(not _triton_usable(), reason="triton backend not usable here")


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_long_history_many_tiles(gen, causal):
    """L and P span several tiles (online softmax across history tiles), with padding."""
    d, h, length = 8, 2, 70
    p = length if causal else 40
    m = _module(gen, d, h, dtype=torch.float32).to(TRITON_DEVICE)
    t = randn(gen, 2, p, d, device=TRITON_DEVICE, requires_grad=True)
    hist = randn(gen, 2, length, d, device=TRITON_DEVICE, requires_grad=True)
    pad = rand_mask(gen, 2, length, p=0.5, device=TRITON_DEVICE)
    outs = []
    for backend in ("reference", "triton"):
        m.backend = backend
        out = m(t, hist, key_padding_mask=pad, causal=causal)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (t, hist, m.in_proj_weight))))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def _core_args(gen, device, layout, causal=0, length=7, dh=4, h=2):
    """Arguments of the attention-core ops for one layout: q (T, h, dh), k/v (S, h, dh) views of
    a projection buffer (strided like the real ones), the segment table, a mask, causal, scale."""
    from courier_fast.ops import attention_layout

    b, d = 3, h * dh
    hist = randn(gen, b, length, d)
    if layout == "padded":
        targets, kw = randn(gen, b, length if causal else 5, d), {}
        kw["key_padding_mask"] = rand_mask(gen, b, length)
    elif layout == "history_index":
        targets = randn(gen, 8, d)
        kw = {"history_index": torch.tensor([2, 0, 2, 2, 0, 0, 2, 0])}  # row 1 has no targets
    else:
        lengths = torch.tensor([length, 0, 2])
        hist, kw = randn(gen, int(lengths.sum()), d), {"history_offsets": cf.jagged.lengths_to_offsets(lengths)}
        kw["target_offsets"] = kw["history_offsets"] if causal else torch.tensor([0, 3, 4, 6])
        targets = randn(gen, int(kw["target_offsets"][-1]), d)
    kw = {k: x.to(device) for k, x in kw.items()}
    seg = attention_layout.segments(targets.to(device), hist.to(device), **kw)
    q = randn(gen, targets.reshape(-1, d).shape[0], h, dh, device=device, requires_grad=True)
    kv = randn(gen, seg.key_rows.shape[0], 2, h, dh, device=device, requires_grad=True)
    return (q, kv[:, 0], kv[:, 1], seg.target_rows, seg.key_rows, seg.target_offsets, seg.key_offsets,
            seg.order, seg.key_padding_mask, causal, 0.5, seg.max_targets, seg.max_keys)


@needs_triton
@pytest.mark.parametrize("layout,causal", [("padded", 0), ("padded", 1), ("padded", 2), ("history_index", 0),
                                           ("jagged", 0), ("jagged", 2)])
@pytest.mark.parametrize("length", [7, 20], ids=["short", "flash"])
def test_opcheck_triton_attention_core(gen, layout, causal, length):
    from courier_fast.ops.backends import triton as _triton_ops
    torch.library.opcheck(_triton_ops.attention_core, _core_args(gen, TRITON_DEVICE, layout, causal, length))


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_lengths_equal_right_padding_mask(gen, backend, device):
    m = _module(gen, 8, 2).to(device)
    m.backend = backend
    t, hist = randn(gen, 4, 3, 8, dtype=torch.float64, device=device), randn(gen, 4, 6, 8, dtype=torch.float64, device=device)
    lengths = torch.tensor([0, 1, 4, 6], device=device)
    mask = torch.arange(6, device=device)[None, :] >= lengths[:, None]
    torch.testing.assert_close(m(t, hist, lengths=lengths), m(t, hist, key_padding_mask=mask))
    extra = rand_mask(gen, 4, 6, device=device)
    torch.testing.assert_close(m(t, hist, key_padding_mask=extra, lengths=lengths),
                               m(t, hist, key_padding_mask=extra | mask))


def test_lengths_rejects_bad_values(gen):
    m = _module(gen, 4, 2)
    t, hist = randn(gen, 2, 3, 4, dtype=torch.float64), randn(gen, 2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="lengths must lie in"):
        m(t, hist, lengths=torch.tensor([1, 6]))
    with pytest.raises(TypeError, match="lengths must have dtype"):
        m(t, hist, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        m(t, hist, lengths=torch.tensor([1, 2, 3]))


@needs_triton
def test_module_with_triton_backend_compiles(gen):
    """torch.compile traces the Triton custom op (fake kernel + autograd) in a full graph."""
    torch._dynamo.reset()
    m = _module(gen, 8, 2, dtype=torch.float32).to(TRITON_DEVICE)
    m.backend = "triton"
    t = randn(gen, 2, 3, 8, device=TRITON_DEVICE, requires_grad=True)
    hist, pad = randn(gen, 2, 5, 8, device=TRITON_DEVICE), rand_mask(gen, 2, 5, device=TRITON_DEVICE)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got, want = compiled(t, hist, key_padding_mask=pad), m(t, hist, key_padding_mask=pad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), t), torch.autograd.grad(want.sum(), t))


# ----------------------------------------------------------------------------- layouts
def _against_reference(gen, backend, device, dtype, h, inputs, kw, causal=False):
    """The backend on `inputs` (float64 leaves: targets, history, the four parameters) in dtype
    on device vs the float64 reference, forward and every gradient."""
    ref_leaves = [x.detach().clone().requires_grad_() for x in inputs]
    want = reconstruction_attention_reference(*ref_leaves, h, causal=causal, **kw)
    leaves = [x.detach().to(device=device, dtype=dtype).requires_grad_() for x in inputs]
    dev_kw = {k: (x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    got = cf.reconstruction_attention(*leaves, h, causal=causal, backend=backend, **dev_kw)
    assert got.shape == want.shape and got.dtype == dtype
    rtol, atol = tol(backend, dtype)
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol * 10, atol=atol * 10)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, leaves, g.to(device=device, dtype=dtype)),
                    torch.autograd.grad(want, ref_leaves, g)):
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol * 10, atol=atol * 10 * max(1.0, e.abs().max().item()))
    return got


def _inputs(gen, targets_shape, history_shape, d, h):
    m = _module(gen, d, h)
    return [randn(gen, *targets_shape, dtype=torch.float64), randn(gen, *history_shape, dtype=torch.float64),
            *[x.detach() for x in _params(m)]]


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("length,d,h", [(5, 8, 2), (1, 6, 3), (16, 100, 2), (17, 12, 3), (40, 8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_history_index_equals_copied_history(gen, backend, device, length, d, h, dtype):
    """Flat targets (T, d), target t over history row history_index[t]: the padded reference on a
    copy of its row per target (hist[idx]). Rows with several, one and no targets, an empty
    history row, padding; short (L <= 16) and long histories."""
    b, idx = 4, torch.tensor([3, 0, 3, 2, 3, 0, 3, 3, 0, 2, 3])  # row 1: no targets
    inputs = _inputs(gen, (len(idx), d), (b, length, d), d, h)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[2] = True  # an empty history row
    got = _against_reference(gen, backend, device, dtype, h, inputs, {"history_index": idx, "key_padding_mask": pad})
    t, hist, *params = inputs
    copies = reconstruction_attention_reference(t[:, None], hist[idx], *params, h, key_padding_mask=pad[idx])[:, 0]
    rtol, atol = tol(backend, dtype)
    torch.testing.assert_close(got.double().cpu(), copies, rtol=rtol * 10, atol=atol * 10)


def test_history_index_equals_the_official_copy_pattern(gen):
    """The official COURIER call mha(q.unsqueeze(1), hist[idx], hist[idx])[0] (no padding mask),
    and the one-line replacement with history_index, give the same outputs and gradients."""
    b, length, d, h = 5, 5, 16, 4
    mha = nn.MultiheadAttention(d, h, batch_first=True, dtype=torch.float64)
    ours = cf.nn.ReconstructionAttention.from_mha(mha)
    hist = randn(gen, b, length, d, dtype=torch.float64, requires_grad=True)
    pv = randn(gen, 12, d, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, b, (12,), generator=gen)
    want = mha(pv.unsqueeze(1), hist[idx], hist[idx], need_weights=False)[0].squeeze(1)
    got = ours(pv, hist, history_index=idx)
    torch.testing.assert_close(got, want)
    g = randn(gen, 12, d, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, [pv, hist, ours.in_proj_weight], g),
                    torch.autograd.grad(want, [pv, hist, mha.in_proj_weight], g)):
        torch.testing.assert_close(a, e)


def _jagged_history(gen, lengths, d, dtype=torch.float64):
    offsets = cf.jagged.lengths_to_offsets(torch.tensor(lengths))
    return randn(gen, int(offsets[-1]), d, dtype=dtype), offsets


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("lengths,counts", [([3, 0, 5, 1, 4], [2, 3, 0, 1, 9]), ([20, 7, 0, 33], [4, 0, 11, 2])],
                         ids=["short", "long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jagged_equals_padded(gen, backend, device, lengths, counts, dtype):
    """Jagged history (S, d) + history_offsets and jagged targets (T, d) + target_offsets: odd
    lengths, an empty history row, a row with 0 targets, a key padding mask; the same as the
    padded computation (reference on padded tensors with lengths), forward and gradients."""
    d, h = 12, 3
    hist, h_off = _jagged_history(gen, lengths, d)
    t_off = cf.jagged.lengths_to_offsets(torch.tensor(counts))
    inputs = _inputs(gen, (int(t_off[-1]), d), (1, d), d, h)
    inputs[1] = hist
    pad = rand_mask(gen, hist.shape[0], p=0.2)
    kw = {"history_offsets": h_off, "target_offsets": t_off, "key_padding_mask": pad, "max_history_len": max(lengths) + 3}
    got = _against_reference(gen, backend, device, dtype, h, inputs, kw)
    # the padded form of the same problem
    t, _, *params = inputs
    hist_p, hlen = cf.jagged.jagged_to_padded(hist, h_off)
    pad_p = cf.jagged.jagged_to_padded(pad, h_off, padding_value=True)[0]
    t_p, tlen = cf.jagged.jagged_to_padded(t, t_off)
    want = reconstruction_attention_reference(t_p, hist_p, *params, h, key_padding_mask=pad_p)
    want = cf.jagged.padded_to_jagged(want, tlen)[0]
    rtol, atol = tol(backend, dtype)
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("length", [6, 21])
def test_jagged_history_with_dense_or_indexed_targets(gen, backend, device, length):
    """A jagged history with padded targets (B, P, d) (fbgemm's dense-over-jagged) and with flat
    targets + history_index."""
    d, h = 8, 2
    hist, h_off = _jagged_history(gen, [length, 0, 2, length - 1], d)
    inputs = _inputs(gen, (4, 3, d), (1, d), d, h)
    inputs[1] = hist
    _against_reference(gen, backend, device, torch.float32, h, inputs, {"history_offsets": h_off})
    inputs[0] = randn(gen, 7, d, dtype=torch.float64)
    idx = torch.tensor([1, 0, 3, 0, 2, 3, 3])
    _against_reference(gen, backend, device, torch.float32, h, inputs, {"history_offsets": h_off, "history_index": idx})


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("causal", [True, "inclusive"])
@pytest.mark.parametrize("lengths", [[4, 0, 1, 7], [19, 3, 0, 30]], ids=["short", "long"])
def test_causal_on_jagged_histories_equals_padded(gen, backend, device, causal, lengths):
    """Self-reconstruction on a jagged history (targets share its offsets): each row as the
    padded causal computation of that row alone."""
    d, h = 8, 2
    hist, off = _jagged_history(gen, lengths, d)
    inputs = _inputs(gen, (hist.shape[0], d), (1, d), d, h)
    inputs[1] = hist
    pad = rand_mask(gen, hist.shape[0], p=0.3)
    got = _against_reference(gen, backend, device, torch.float32, h, inputs,
                             {"history_offsets": off, "target_offsets": off, "key_padding_mask": pad}, causal=causal)
    t, _, *params = inputs
    for row, (a, b) in enumerate(zip(off[:-1].tolist(), off[1:].tolist())):
        if a == b:
            continue
        want = causal_by_definition(t[None, a:b], hist[None, a:b], params, h, pad[None, a:b], causal == "inclusive")
        torch.testing.assert_close(got[a:b].double().cpu(), want[0], rtol=1e-4, atol=1e-4)


def _bad_layouts():
    off = torch.tensor([0, 2, 5])
    return [
        ("history_offsets", {"history_offsets": torch.tensor([0, 3, 2])}, ValueError, "history_offsets must be non-decreasing"),
        ("history_offsets", {"history_offsets": torch.tensor([1, 2, 5])}, ValueError, r"history_offsets\[0\] must be 0"),
        ("history_offsets", {"history_offsets": torch.tensor([0, 2, 4])}, ValueError, r"history_offsets\[-1\] must equal .* \(5\)"),
        ("history_offsets", {"history_offsets": torch.tensor([-1, 2, 5])}, ValueError, "history_offsets has negative"),
        ("history_offsets", {"history_offsets": torch.tensor([0., 2., 5.])}, ValueError, "history_offsets must have dtype int32 or int64"),
        ("history_offsets", {"history_offsets": torch.tensor([0, 2, 5], dtype=torch.int16)}, ValueError, "history_offsets must have dtype"),
        ("history_offsets", {"history_offsets": torch.tensor([[0, 2, 5]])}, ValueError, r"history_offsets must be 1-D"),
        ("history_offsets", {"history_offsets": None}, ValueError, "needs history_offsets"),
        ("target_offsets", {"history_offsets": off, "target_offsets": torch.tensor([0, 2, 1, 4])}, ValueError,
         r"target_offsets must have shape \(3,\)"),
        ("target_offsets", {"history_offsets": off, "target_offsets": torch.tensor([0, 3, 2])}, ValueError,
         "target_offsets must be non-decreasing"),
        ("target_offsets", {"history_offsets": off, "target_offsets": torch.tensor([0, 1, 3])}, ValueError,
         r"target_offsets\[-1\] must equal the number of targets"),
        ("history_index", {"history_offsets": off, "history_index": torch.tensor([0, 2, 1, 0])}, ValueError,
         r"history_index must lie in \[0, 2\)"),
        ("history_index", {"history_offsets": off, "history_index": torch.tensor([0, -1, 1, 0])}, ValueError,
         r"history_index must lie in"),
        ("history_index", {"history_offsets": off, "history_index": torch.tensor([0., 1, 1, 0])}, TypeError,
         "history_index must have dtype"),
        ("history_index", {"history_offsets": off, "history_index": torch.tensor([0, 1, 1])}, ValueError,
         r"history_index must have shape \(4,\)"),
        ("history_index", {"history_offsets": off, "history_index": torch.tensor([0, 1, 1, 0]),
                           "target_offsets": torch.tensor([0, 2, 4])}, ValueError, "exactly one of history_index"),
        ("causal", {"history_offsets": off, "history_index": torch.tensor([0, 1, 1, 0]), "causal": True}, ValueError,
         "not history_index"),
        ("causal", {"history_offsets": off, "target_offsets": torch.tensor([0, 2, 4]), "causal": "inclusive"},
         ValueError, "as many targets as history items"),
        ("max_history_len", {"history_offsets": off, "target_offsets": torch.tensor([0, 2, 4]), "max_history_len": 2},
         ValueError, "max_history_len=2 is shorter"),
        ("lengths", {"history_offsets": off, "target_offsets": torch.tensor([0, 2, 4]), "lengths": torch.tensor([1, 1])},
         ValueError, "lengths is for a padded history"),
        ("key_padding_mask", {"history_offsets": off, "target_offsets": torch.tensor([0, 2, 4]),
                              "key_padding_mask": torch.zeros(2, 3, dtype=torch.bool)}, ValueError,
         r"key_padding_mask must have shape \(5,\)"),
    ]


@pytest.mark.parametrize("arg,kw,exc,msg", _bad_layouts(), ids=[f"{b[0]}-{i}" for i, b in enumerate(_bad_layouts())])
def test_bad_offsets_and_indices_are_rejected(gen, arg, kw, exc, msg):
    m = _module(gen, 4, 2)
    t, hist = randn(gen, 4, 4, dtype=torch.float64), randn(gen, 5, 4, dtype=torch.float64)
    kw = dict(kw)
    with pytest.raises(exc, match=msg):
        m(t, hist, **kw)


def test_padded_history_rejects_jagged_arguments(gen):
    m = _module(gen, 4, 2)
    t, hist = randn(gen, 2, 3, 4, dtype=torch.float64), randn(gen, 2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="history_offsets is for a jagged history"):
        m(t, hist, history_offsets=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="history_index is for flat targets"):
        m(t, hist, history_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must be 3-D"):
        m(t[0], hist)


def test_offsets_checks_follow_the_data_checks_switch(gen):
    """Value checks of offsets read the tensors; with the data checks off they are skipped (the
    caller vouches for the offsets), the dtype/shape checks stay."""
    m = _module(gen, 4, 2)
    hist, off = _jagged_history(gen, [2, 3], 4)
    t = randn(gen, 5, 4, dtype=torch.float64)
    with cf._validate.input_checks(False):
        m(t, hist, history_offsets=off, target_offsets=off)
        with pytest.raises(ValueError, match="must have dtype int32 or int64"):
            m(t, hist, history_offsets=off.float(), target_offsets=off)


@pytest.mark.parametrize("shape", [(4, 6, 3), (3, 1), (2, 0, 5), (0, 4)])
def test_padded_jagged_round_trip(gen, shape):
    padded = randn(gen, *shape, dtype=torch.float64, requires_grad=True)
    b, length = shape[:2]
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    values, offsets = cf.jagged.padded_to_jagged(padded, lengths)
    assert values.shape == (int(lengths.sum()), *shape[2:]) and offsets.dtype == torch.int64
    torch.testing.assert_close(cf.jagged.offsets_to_lengths(offsets), lengths)
    back, got_lengths = cf.jagged.jagged_to_padded(values, offsets, max_len=length, padding_value=-7.0)
    valid = torch.arange(length)[None, :] < lengths[:, None]
    valid = valid.view(*valid.shape, *([1] * (len(shape) - 2)))
    torch.testing.assert_close(back, torch.where(valid, padded, torch.full_like(padded, -7.0)))
    torch.testing.assert_close(got_lengths, lengths)
    if values.numel():  # every length 0 (random): all padding, nothing to differentiate
        back.sum().backward()
        torch.testing.assert_close(padded.grad, valid.expand_as(padded).double())


def test_jagged_to_padded_never_truncates():
    with pytest.raises(ValueError, match="max_len=2 is shorter than the longest row"):
        cf.jagged.jagged_to_padded(torch.zeros(5, 2), torch.tensor([0, 3, 5]), max_len=2)
    with pytest.raises(ValueError, match="lengths must lie in"):
        cf.jagged.padded_to_jagged(torch.zeros(2, 3), torch.tensor([1, 4]))


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,length", [("history_index", 5), ("history_index", 40), ("jagged", 6), ("jagged", 33),
                                           ("jagged_inclusive", 9)])
def test_half_layouts_within_twice_pytorch_error(gen, backend, device, dtype, layout, length):
    """16-bit inputs on the history_index and jagged layouts (short and long rows, head dim 32):
    outputs and every gradient within the 16-bit bar of courier_fast.ops.selfcheck.tolerances."""
    d, h, b = 64, 2, 4
    m = _module(gen, d, h)
    causal = layout == "jagged_inclusive" and "inclusive"
    if layout == "history_index":
        hist, kw = randn(gen, b, length, d, dtype=torch.float64), {"history_index": torch.randint(0, b, (13,), generator=gen)}
        t = randn(gen, 13, d, dtype=torch.float64)
        kw["key_padding_mask"] = rand_mask(gen, b, length, p=0.3)
    else:
        hist, off = _jagged_history(gen, [length, 1, 0, length - 2], d)
        t_off = off if causal else cf.jagged.lengths_to_offsets(torch.tensor([5, 0, 3, 10]))
        kw = {"history_offsets": off, "target_offsets": t_off, "key_padding_mask": rand_mask(gen, hist.shape[0], p=0.3)}
        t = randn(gen, int(t_off[-1]), d, dtype=torch.float64)
    inputs = [x.detach().to(dtype).double() for x in (t, hist, *_params(m))]
    g = torch.randn(t.shape, generator=gen, dtype=torch.float64)

    def run(fn, dt, dev):
        leaves = [x.to(device=dev, dtype=dt).requires_grad_() for x in inputs]
        out = fn(*leaves, h, causal=causal, **{k: x.to(dev) for k, x in kw.items()})
        return [out] + list(torch.autograd.grad(out, leaves, g.to(device=dev, dtype=out.dtype)))

    want = run(reconstruction_attention_reference, torch.float64, "cpu")
    yard = run(reconstruction_attention_reference, dtype, device)
    ours = run(lambda *a, **k: cf.reconstruction_attention(*a, **k, backend=backend), dtype, device)
    cls = tolerances.HALF_DTYPES[dtype]
    for i, (got, want_, base) in enumerate(zip(ours, want, yard)):
        err, allowed = tolerances.rel_error(got, want_), tolerances.allowed_error(cls, tolerances.rel_error(base, want_))
        assert err <= allowed, f"output {i}: error {err:.3g} > allowed {allowed:.3g}"


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("length", [5, 24])
def test_history_index_never_copies_history_per_target(gen, backend, device, length):
    """With history_index, no tensor of the forward or backward is as large as the per-target
    history copy (T, L, d) the official pattern builds: K/V are projected once per history row
    (the kernels over the segment table; the reference with its targets grouped into rows)."""
    b, d, h, n = 4, 32, 2, 300
    m = _module(gen, d, h, dtype=torch.float32).to(device)
    m.backend = backend
    hist = randn(gen, b, length, d, device=device, requires_grad=True)
    t = randn(gen, n, d, device=device, requires_grad=True)
    idx = torch.randint(0, b, (n,), generator=gen).to(device)
    with _LargestTensor() as seen:
        m(t, hist, history_index=idx).sum().backward()
    assert seen.largest < n * length * d / 2, (seen.largest, n * length * d)


@needs_triton
def test_jagged_and_history_index_compile_in_a_full_graph(gen):
    """torch.compile traces the segment table and the Triton op for a jagged history (with
    max_history_len: no host read) and for history_index, in one graph, forward and backward."""
    torch._dynamo.reset()
    m = _module(gen, 8, 2, dtype=torch.float32).to(TRITON_DEVICE)
    m.backend = "triton"
    hist, off = _jagged_history(gen, [3, 0, 5], 8, dtype=torch.float32)
    hist, off = hist.to(TRITON_DEVICE), off.to(TRITON_DEVICE)
    t = randn(gen, 6, 8, device=TRITON_DEVICE, requires_grad=True)
    t_off = torch.tensor([0, 2, 2, 6], device=TRITON_DEVICE)
    idx = torch.tensor([2, 0, 2, 2, 0, 1], device=TRITON_DEVICE)
    for kw in ({"history_offsets": off, "target_offsets": t_off, "max_history_len": 5},
               {"history_offsets": off, "history_index": idx, "max_history_len": 5}):
        compiled = torch.compile(lambda t, hist: m(t, hist, **kw), backend="aot_eager", fullgraph=True)
        got, want = compiled(t, hist), m(t, hist, **kw)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), t), torch.autograd.grad(want.sum(), t))


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_a_target_with_one_key_gets_exactly_no_query_gradient(gen, backend, device):
    """With one valid key a target's softmax is constant: the gradient reaching its query is 0,
    and exactly 0 (an output zero by contract, courier_fast.ops.selfcheck.tolerances): the short Triton backward
    and the CUDA one take delta from the same products as dP. Short rows, causal row starts too."""
    b, length, d, h = 3, 6, 16, 2
    m = _module(gen, d, h, dtype=torch.float32).to(device)
    m.backend = backend
    t = randn(gen, b, 4, d, device=device, requires_grad=True)
    hist = randn(gen, b, length, d, device=device)
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[torch.arange(b), torch.randint(0, length, (b,), generator=gen)] = False  # one valid key per row
    out = m(t, hist, key_padding_mask=pad.to(device))
    (grad_t,) = torch.autograd.grad(out, t, randn(gen, *out.shape, device=device))
    assert torch.count_nonzero(grad_t) == 0
    x = randn(gen, b, length, d, device=device, requires_grad=True)
    out = m(x, hist, causal="inclusive")  # position 0 sees exactly one key
    (grad_x,) = torch.autograd.grad(out, x, randn(gen, *out.shape, device=device))
    assert torch.count_nonzero(grad_x[:, 0]) == 0 and torch.count_nonzero(grad_x[:, 1:]) > 0
