"""courier_fast.reconstruction_attention and nn.ReconstructionAttention: vs the float64
reference, vs nn.MultiheadAttention, causal mode vs its definition, empty rows."""
import math

import pytest
import torch
from torch import nn

import courier_fast as cf
from courier_fast.reference import reconstruction_attention_reference

from courier_fast import tolerances
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
    courier_fast.tolerances, i.e. at most 2x the error of the same attention computed by plain
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
    from courier_fast import dispatch
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


@needs_triton
def test_opcheck_triton_attention_core(gen):
    from courier_fast import _triton_ops
    device = TRITON_DEVICE
    q = randn(gen, 2, 2, 5, 4, device=device, requires_grad=True)
    k = randn(gen, 2, 2, 7, 4, device=device, requires_grad=True)
    v = randn(gen, 2, 2, 7, 4, device=device, requires_grad=True)
    pad = rand_mask(gen, 2, 7, device=device)
    for mask, causal in ((None, 0), (pad, 0)):
        torch.library.opcheck(_triton_ops.attention_core, (q, k, v, mask, causal, 0.5))
    qc = randn(gen, 2, 2, 7, 4, device=device, requires_grad=True)
    for causal in (1, 2):
        torch.library.opcheck(_triton_ops.attention_core, (qc, k, v, pad, causal, 0.5))


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
