"""torch.compile with its default backend, inductor (issue 27 item 7), on CPU: fullgraph=True, with
dynamic=True and by default (static first, then automatic dynamic shapes), across three batch
sizes, equal to eager in the forward and the backward.

aot_eager (the other compile tests) does not lower the graph, so it cannot show inductor's
failures on data-dependent sizes: history_index and jagged targets used to raise
GuardOnDataDependentSymNode (Eq(u1, 1)) in the bmm lowering. Every layout of the attention
op runs in one compiled function, and the losses and the MultiheadAttention drop-in in
another, to keep the number of (slow) inductor compiles small. Sizes 2, 3, 5 avoid the 0/1
specialisation; shapes are tiny (inductor on CPU compiles C++ with gcc).
"""
import pytest
import torch

import courier_fast as cf

D, H, SIZES = 4, 2, (2, 3, 5)


def _attention_layouts(t_pad, hist, lengths, t_flat, index, hist_flat, hist_off, t_off, *w):
    """Every attention layout on the same parameters: padded, lengths, causal, history_index,
    jagged history + jagged targets (no max_history_len), jagged history + history_index."""
    att = cf.reconstruction_attention
    return (att(t_pad, hist, *w, H), att(t_pad, hist, *w, H, lengths=lengths),
            att(hist, hist, *w, H, causal=True), att(t_flat, hist, *w, H, history_index=index),
            att(t_flat, hist_flat, *w, H, history_offsets=hist_off, target_offsets=t_off),
            att(t_flat, hist_flat, *w, H, history_offsets=hist_off, history_index=index))


def _attention_inputs(b, g):
    """Batch size b: b history rows of 3 items, 2b + 1 flat targets (row b - 1 gets 3, some
    rows none in the jagged targets)."""
    t_flat = 2 * b + 1
    index = torch.arange(t_flat) % b
    t_off = torch.tensor([0] + [min(t_flat, 2 * r + 3) for r in range(b - 1)] + [t_flat])
    return [torch.randn(b, 2, D, generator=g), torch.randn(b, 3, D, generator=g), torch.arange(b) % 3 + 1,
            torch.randn(t_flat, D, generator=g), index, torch.randn(3 * b, D, generator=g),
            torch.arange(b + 1) * 3, t_off.clamp(max=t_flat)]


MHA = cf.nn.MultiheadAttention(D, H, batch_first=True)
MHA_NAMES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _losses(a, c, x, scale, *mha_w):
    """contrastive_loss (auto and the C++ op), ClipLoss and the MultiheadAttention drop-in (its
    parameters passed in, so that their gradients are compared too)."""
    out, _ = torch.func.functional_call(MHA, dict(zip(MHA_NAMES, mha_w)), (x, x, x), {"need_weights": False})
    return (cf.contrastive_loss(a, c), cf.contrastive_loss(a, c, symmetric=True, backend="cpu"),
            cf.nn.ClipLoss()(a, c, scale), out)


def _loss_inputs(b, g):
    return [torch.randn(2 * b, D, generator=g), torch.randn(2 * b, D, generator=g),
            torch.randn(b, 3, D, generator=g)]


def _weights(g):
    return [torch.randn(3 * D, D, generator=g), torch.randn(3 * D, generator=g), torch.randn(D, D, generator=g),
            torch.randn(D, generator=g)]


def _check(fn, make_inputs, n_params, dynamic):
    """fn compiled (inductor, fullgraph) vs eager at every size of SIZES: outputs and the
    gradients of a random projection of them w.r.t. every float input and parameter."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in n_params(g)]
    for b in SIZES:
        inputs = make_inputs(b, g)
        results = []
        for f in (fn, compiled):
            leaves = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
            outs = f(*leaves, *params)
            proj = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
            wrt = [x for x in leaves if x.requires_grad] + params
            results.append(([o.detach() for o in outs], torch.autograd.grad(proj, wrt, materialize_grads=True)))
        (want, want_g), (got, got_g) = results
        for w, o in zip(want, got):
            assert o.shape == w.shape, (b, o.shape, w.shape)
            torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)
        for w, o in zip(want_g, got_g):
            torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamic", [True, None])
def test_every_attention_layout_compiles_with_inductor(dynamic):
    torch._dynamo.reset()
    _check(_attention_layouts, _attention_inputs, _weights, dynamic)


@pytest.mark.parametrize("dynamic", [True, None])
def test_losses_and_multihead_attention_compile_with_inductor(dynamic):
    torch._dynamo.reset()
    assert MHA.why_not_fused(*_loss_inputs(2, torch.Generator())[2:] * 3, need_weights=False) == ""
    _check(_losses, _loss_inputs, lambda g: [torch.tensor(10.0), *_weights(g)], dynamic)
