"""courier_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention (random configurations
over its whole call space in float64: outputs, weights, warnings, every gradient; the fused op
taken exactly where it should be; torch's errors on invalid calls; the Triton backend in the
interpreter; autocast; torch.compile; state_dict) and swap_attention on a Transformer encoder
layer and on a model written like the official COURIER code."""
import copy
import io
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import courier_fast as cf
from courier_fast.ops import attention as cf_attention
from courier_fast.nn import multihead_attention as cf_mha
from courier_fast.ops.selfcheck import tolerances
from conftest import TRITON_DEVICE, launchable, rand_mask, randn, usable_backends

OURS = cf.nn.MultiheadAttention
OP = "reconstruction_attention"
INCLUSIVE = cf_mha.OP_HAS_INCLUSIVE_CAUSAL
F64 = torch.float64


@pytest.fixture
def fused_calls(monkeypatch):
    """The causal argument of every call into courier_fast.reconstruction_attention."""
    calls = []
    real = cf_attention.reconstruction_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cf_attention, "reconstruction_attention", counting)
    return calls


def _pair(gen, dtype=F64, device="cpu", backend="auto", **kw):
    """nn.MultiheadAttention with random non-zero biases and ours loaded from its state_dict."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    mha = nn.MultiheadAttention(dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:  # in_proj_bias, out_proj.bias, bias_k, bias_v
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    ours = OURS(dtype=dtype, backend=backend, **kw)
    ours.load_state_dict(mha.state_dict())
    return mha.to(device), ours.to(device)


def _causal(n, dtype=torch.bool):
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=F64).to(dtype) if dtype != torch.bool \
        else torch.ones(n, n, dtype=torch.bool).triu(1)


def _leaves(src, structure):
    """Fresh leaf copies of the source tensors and (query, key, value) built from them with the
    structure's identities: self (query is key is value), shared (key is value), separate."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in src.items()}
    if structure == "self":
        return leaves, (leaves["x"],) * 3
    if structure == "shared":
        return leaves, (leaves["q"], leaves["kv"], leaves["kv"])
    return leaves, (leaves["q"], leaves["k"], leaves["v"])


def _run(module, src, structure, call, seed):
    leaves, (q, k, v) = _leaves(src, structure)
    torch.manual_seed(seed)  # the same dropout draws for both modules
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, weights = module(q, k, v, **call)
    return leaves, out, weights, [str(w.message) for w in caught]


def _compare(mha, ours, src, structure, call, seed, fused, what):
    """ours vs torch on one call: fused -> equal to rounding where torch's output is finite and
    out_proj.bias elsewhere; not fused -> bitwise torch's results. Then every gradient."""
    lt, out_t, w_t, warn_t = _run(mha, src, structure, call, seed)
    lo, out_o, w_o, warn_o = _run(ours, src, structure, call, seed)
    assert warn_o == warn_t, what
    assert out_o.shape == out_t.shape and out_o.dtype == out_t.dtype, what
    assert (w_o is None) == (w_t is None), what
    finite = torch.isfinite(out_t)
    if fused:
        torch.testing.assert_close(out_o[finite], out_t[finite], msg=lambda m: f"{what}\n{m}")
        bias = ours.out_proj.bias if ours.out_proj.bias is not None else torch.zeros(ours.embed_dim, dtype=out_o.dtype)
        torch.testing.assert_close(out_o[~finite], bias.expand_as(out_o)[~finite], msg=lambda m: f"{what}\n{m}")
    else:
        torch.testing.assert_close(out_o, out_t, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}\n{m}")
        if w_t is not None:
            torch.testing.assert_close(w_o, w_t, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}\n{m}")
    if not bool(finite.all()):
        return  # torch's gradients are NaN: nothing to compare
    g = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(seed), dtype=out_t.dtype)
    gw = None if w_t is None else torch.randn(w_t.shape, generator=torch.Generator().manual_seed(seed + 1),
                                              dtype=w_t.dtype)
    for out, w in ((out_t, w_t), (out_o, w_o)):
        ((out * g).sum() + (0 if w is None else (w * gw).sum())).backward()
    got = {**{f"input {n}": t.grad for n, t in lo.items()}, **{n: p.grad for n, p in ours.named_parameters()}}
    want = {**{f"input {n}": t.grad for n, t in lt.items()}, **{n: p.grad for n, p in mha.named_parameters()}}
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), f"{what}: gradient of {name}"
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{what}: gradient of {name}\n{m}")


# ---------------------------------------------------------------------------------------------
# Random configurations over nn.MultiheadAttention's whole call space

MASK_FLOAT = {"causal_float", "causal_3d", "float", "float_3d"}


def _draw(rng, fusable):
    """One configuration. fusable: drawn from the calls the fused op should take (so that about
    half the cases exercise it); otherwise from everything nn.MultiheadAttention accepts."""
    h = rng.choice([1, 2, 3, 4])
    e = h * rng.choice([1, 2, 3])
    c = SimpleNamespace(embed_dim=e, num_heads=h, batch_first=rng.random() < 0.5, bias=rng.random() < 0.8,
                        training=rng.random() < 0.5, batched=rng.random() < 0.8, average=rng.random() < 0.5)
    if fusable:
        c.dropout = 0.0 if c.training else rng.choice([0.0, 0.3])
        c.kdim = c.vdim = None
        c.bias_kv = c.zero_attn = c.need_weights = False
        c.structure = rng.choice(["self", "shared"])
        c.kpm = rng.choice([None, "bool", "float"])
        c.mask = rng.choice([None, None, "causal_bool", "causal_float", "causal_3d"]) if INCLUSIVE else None
    else:
        c.dropout = rng.choice([0.0, 0.0, 0.3])
        c.kdim, c.vdim = (rng.choice([None, e, e + 1, 2]) if rng.random() < 0.2 else None for _ in range(2))
        c.bias_kv, c.zero_attn = rng.random() < 0.2, rng.random() < 0.2
        c.need_weights = rng.random() < 0.5
        c.structure = rng.choice(["self", "shared", "separate"])
        c.kpm = rng.choice([None, "bool", "float", "float_values"])
        c.mask = rng.choice([None, "causal_bool", "causal_float", "causal_3d", "bool", "float", "float_3d"])
    if (c.kdim or e) != e or (c.vdim or e) != e:
        c.structure = "shared" if c.structure != "separate" and c.kdim == c.vdim else "separate"
        if c.structure == "shared":  # key is value needs kdim == vdim; query is key needs kdim == e
            c.kdim = c.vdim = c.kdim or e
    if c.structure == "shared" and (c.kdim or e) != (c.vdim or e):
        c.structure = "separate"
    c.b, c.p = rng.randint(1, 3), rng.randint(1, 5)
    c.length = c.p if c.structure == "self" or (c.mask or "").startswith("causal") else rng.randint(1, 5)
    c.is_causal = (c.mask or "").startswith("causal") and rng.random() < 0.5
    return c


def _expect_fused(c):
    """The calls the docstring promises to fuse, stated independently of the module's code."""
    same_dims = (c.kdim or c.embed_dim) == c.embed_dim and (c.vdim or c.embed_dim) == c.embed_dim
    masks_match = c.kpm is None or c.mask is None or (c.kpm != "bool") == (c.mask in MASK_FLOAT)
    return (not c.need_weights and (not c.training or c.dropout == 0) and same_dims and not c.bias_kv
            and not c.zero_attn and c.structure in ("self", "shared") and c.kpm in (None, "bool", "float")
            and (c.mask is None or (c.mask.startswith("causal") and INCLUSIVE)) and masks_match)


def _inputs(c, gen):
    """Source tensors and the call's keyword arguments for configuration c (float64)."""
    kd, vd = c.kdim or c.embed_dim, c.vdim or c.embed_dim

    def seq(n, d):
        shape = ((c.b, n, d) if c.batch_first else (n, c.b, d)) if c.batched else (n, d)
        return randn(gen, *shape, dtype=F64)

    if c.structure == "self":
        src = {"x": seq(c.p, c.embed_dim)}
    elif c.structure == "shared":
        src = {"q": seq(c.p, c.embed_dim), "kv": seq(c.length, kd)}
    else:
        src = {"q": seq(c.p, c.embed_dim), "k": seq(c.length, kd), "v": seq(c.length, vd)}
    call = {"need_weights": c.need_weights, "average_attn_weights": c.average, "is_causal": c.is_causal}
    kpm_shape = (c.b, c.length) if c.batched else (c.length,)
    if c.kpm is not None:
        pad = rand_mask(gen, *kpm_shape, p=0.3)
        if c.kpm == "bool":
            call["key_padding_mask"] = pad
        elif c.kpm == "float":
            call["key_padding_mask"] = torch.zeros(kpm_shape, dtype=F64).masked_fill(pad, float("-inf"))
        else:
            call["key_padding_mask"] = randn(gen, *kpm_shape, dtype=F64)
    heads = (c.b * c.num_heads,) if c.batched else (c.num_heads,)
    if c.mask == "causal_bool":
        call["attn_mask"] = _causal(c.p)
    elif c.mask == "causal_float":
        call["attn_mask"] = _causal(c.p, F64)
    elif c.mask == "causal_3d":
        call["attn_mask"] = _causal(c.p, F64).expand(*heads, c.p, c.p).clone()
    elif c.mask == "bool":
        call["attn_mask"] = rand_mask(gen, c.p, c.length, p=0.3)
        while c.p == c.length and torch.equal(call["attn_mask"], _causal(c.p)):  # causal by chance
            call["attn_mask"] = rand_mask(gen, c.p, c.length, p=0.3)
    elif c.mask == "float":
        call["attn_mask"] = randn(gen, c.p, c.length, dtype=F64)
    elif c.mask == "float_3d":
        call["attn_mask"] = randn(gen, *heads, c.p, c.length, dtype=F64)
    return src, call


@pytest.mark.parametrize("part", range(4))
def test_random_configurations_match_torch(gen, seed, part, fused_calls):
    """50 configurations per part (200 in all), half drawn from the fused calls."""
    rng = random.Random(seed)
    expected_fused = 0
    for i in range(50):
        c = _draw(rng, fusable=i % 2 == 0)
        mha, ours = _pair(gen, embed_dim=c.embed_dim, num_heads=c.num_heads, dropout=c.dropout, bias=c.bias,
                          add_bias_kv=c.bias_kv, add_zero_attn=c.zero_attn, kdim=c.kdim, vdim=c.vdim,
                          batch_first=c.batch_first)
        mha.train(c.training)
        ours.train(c.training)
        src, call = _inputs(c, gen)
        fused = _expect_fused(c)
        before = len(fused_calls)
        _compare(mha, ours, src, c.structure, call, seed + i, fused, what=f"config {i}: {vars(c)}")
        assert len(fused_calls) - before == int(fused), f"config {i}: fused expected {fused}: {vars(c)}"
        expected_fused += fused
    assert expected_fused >= 15  # the draw really exercises the fused path (about 25 of 50 on average)


# ---------------------------------------------------------------------------------------------
# Targeted cases: which calls are fused, the hint, the empty row, NaN, the mask-verdict memory


def _x(gen, b, n, e, batch_first=True):
    return randn(gen, *((b, n, e) if batch_first else (n, b, e)), dtype=F64)


def test_fused_calls_and_why_not(gen, fused_calls):
    mha, ours = _pair(gen, embed_dim=8, num_heads=2, batch_first=True)
    x, q = _x(gen, 2, 4, 8), _x(gen, 2, 3, 8)
    x0, xf = x[0], x.float()
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    fpad = torch.zeros(2, 4, dtype=F64).masked_fill(pad, float("-inf"))
    fused = [
        ((q, x, x), {}),
        ((x, x, x), {"key_padding_mask": pad}),
        ((x, x, x), {"key_padding_mask": fpad}),
        ((x0, x0, x0), {"key_padding_mask": pad[0]}),  # unbatched
    ]
    causal = [
        ((x, x, x), {"attn_mask": _causal(4)}),
        ((x, x, x), {"attn_mask": _causal(4, F64), "key_padding_mask": fpad, "is_causal": True}),
        ((x, x, x), {"attn_mask": _causal(4).expand(4, 4, 4).clone(), "key_padding_mask": pad}),
    ]
    other = x.clone()
    declined = [
        ((q, x, x), {"need_weights": True}, "need_weights=True"),
        ((q, x, other), {}, "key is not value"),
        ((x, x, x), {"key_padding_mask": fpad.clamp(min=-1e9)}, "other than 0 and -inf"),
        ((x, x, x), {"attn_mask": rand_mask(gen, 4, 4)}, "not the causal mask" if INCLUSIVE else "inclusive"),
        ((x, x, x), {"attn_mask": _causal(4, F64), "key_padding_mask": pad}, "different dtypes"),
        ((q, x, x), {"key_padding_mask": fpad.float()}, "dtype is not query's"),
        ((q, x, x), {"attn_mask": torch.zeros(3, 4, dtype=F64)}, "query length != key length"
         if INCLUSIVE else "inclusive"),
        ((x, x, x), {"is_causal": True}, "without attn_mask"),
        ((q.float(), xf, xf), {}, "one dtype"),
    ]
    for i, (args, kw) in enumerate(fused + causal):
        kw = {"need_weights": False, **kw}
        why_not = ours.why_not_fused(*args, **kw)
        assert why_not == "" if i < len(fused) or INCLUSIVE else "inclusive" in why_not, (kw, why_not)
    for args, kw, reason in declined:
        kw = {"need_weights": False, **kw}
        assert reason in ours.why_not_fused(*args, **kw), (kw, ours.why_not_fused(*args, **kw))
    n = len(fused_calls)
    for args, kw in fused + causal:
        ours(*args, need_weights=False, **kw)
    assert len(fused_calls) - n == len(fused) + (len(causal) if INCLUSIVE else 0)
    if INCLUSIVE:
        assert fused_calls[-len(causal):] == ["inclusive"] * len(causal)
    n = len(fused_calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for args, kw, _ in declined[:-2]:  # the last two raise in torch
            ours(*args, **{"need_weights": False, **kw})
    assert len(fused_calls) == n
    assert ["mismatched key_padding_mask and attn_mask" in str(w.message) for w in caught] == [True]  # torch's
    ours.train()
    ours.dropout = 0.1
    assert "dropout is active" in ours.why_not_fused(x, x, x, need_weights=False)
    ours.eval()
    assert ours.why_not_fused(x, x, x, need_weights=False) == ""  # dropout is off in eval mode
    for kw, reason in (({"kdim": 6}, "kdim"), ({"add_bias_kv": True}, "add_bias_kv"),
                       ({"add_zero_attn": True}, "add_zero_attn")):
        other = OURS(8, 2, batch_first=True, dtype=F64, **kw)
        assert reason in other.why_not_fused(q, x, x, need_weights=False)


@pytest.mark.skipif(not INCLUSIVE, reason="needs the op's inclusive causal mode")
def test_is_causal_hint_is_taken_where_torch_takes_it(gen, fused_calls):
    """is_causal=True without key_padding_mask: torch never reads attn_mask (SDPA is_causal), and
    neither do we, even for a mask that is not causal. With a key_padding_mask torch uses the
    mask's values: ours reads it and takes torch's path for a non-causal one."""
    mha, ours = _pair(gen, embed_dim=8, num_heads=2, batch_first=False)
    src = {"x": _x(gen, 3, 5, 8, batch_first=False)}
    wrong = rand_mask(gen, 5, 5)
    n = len(fused_calls)
    _compare(mha, ours, src, "self", {"attn_mask": wrong, "is_causal": True, "need_weights": False}, 1, True, "hint")
    assert len(fused_calls) == n + 1
    pad = rand_mask(gen, 3, 5, p=0.2)
    pad[:, 0] = False
    call = {"attn_mask": wrong, "is_causal": True, "need_weights": False, "key_padding_mask": pad}
    _compare(mha, ours, src, "self", call, 2, False, "hint with padding")
    assert len(fused_calls) == n + 1


@pytest.mark.skipif(not INCLUSIVE, reason="needs the op's inclusive causal mode")
def test_mask_verdict_is_read_again_after_an_in_place_change(gen, fused_calls):
    _, ours = _pair(gen, embed_dim=4, num_heads=1, batch_first=True)
    x = _x(gen, 1, 3, 4)
    mask = _causal(3)
    assert ours.why_not_fused(x, x, x, attn_mask=mask, need_weights=False) == ""
    assert ours.why_not_fused(x, x, x, attn_mask=mask, need_weights=False) == ""  # remembered
    mask[0, 1] = False  # no longer causal
    assert "not the causal mask" in ours.why_not_fused(x, x, x, attn_mask=mask, need_weights=False)
    pad = torch.zeros(1, 3, dtype=F64)
    assert ours.why_not_fused(x, x, x, key_padding_mask=pad, need_weights=False) == ""
    pad[0, 1] = -5.0
    assert "other than 0 and -inf" in ours.why_not_fused(x, x, x, key_padding_mask=pad, need_weights=False)


def test_fully_padded_target_gets_output_bias(gen, fused_calls):
    """A target whose keys are all padding: ours gives out_proj.bias. torch gives NaN where it
    takes a softmax (need_weights=True) and, depending on its SDPA kernel, NaN or the same bias
    with need_weights=False."""
    mha, ours = _pair(gen, embed_dim=6, num_heads=3, batch_first=True)
    x, kv = _x(gen, 2, 3, 6), _x(gen, 2, 4, 6)
    pad = torch.tensor([[True] * 4, [False, True, False, True]])
    got = ours(x, kv, kv, key_padding_mask=pad, need_weights=False)[0]
    assert len(fused_calls) == 1
    bias = ours.out_proj.bias.expand(3, 6)
    torch.testing.assert_close(got[0], bias)
    with_weights = mha(x, kv, kv, key_padding_mask=pad)[0]
    assert bool(torch.isnan(with_weights[0]).all())
    torch.testing.assert_close(got[1], with_weights[1])
    want = mha(x, kv, kv, key_padding_mask=pad, need_weights=False)[0]
    assert bool(torch.isnan(want[0]).all()) or torch.allclose(want[0], bias)
    torch.testing.assert_close(got[1], want[1])


def test_nan_input_gives_nan_like_torch_not_an_error(gen, fused_calls):
    mha, ours = _pair(gen, embed_dim=4, num_heads=2, batch_first=True)
    x = _x(gen, 2, 3, 4)
    x[0, 1, 2] = float("nan")
    want = mha(x, x, x, need_weights=False)[0]
    got = ours(x, x, x, need_weights=False)[0]
    assert len(fused_calls) == 1
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want[0]).any())
    torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# Invalid calls raise what torch raises


def _invalid_calls(gen):
    x, x3 = _x(gen, 2, 4, 8), _x(gen, 3, 4, 8)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    return {
        "4-D query": ((x[None], x[None], x[None]), {}),
        "3-D query, 2-D key": ((x, x[0], x[0]), {}),
        "embed dim": ((x[..., :6], x[..., :6], x[..., :6]), {}),
        "batch sizes differ": ((x, x3, x3), {}),
        "dtype": ((x.float(), x.float(), x.float()), {}),
        "kpm shape": ((x, x, x), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}),
        "kpm 3-D": ((x, x, x), {"key_padding_mask": pad[None]}),
        "kpm int": ((x, x, x), {"key_padding_mask": pad.long()}),
        "attn_mask shape": ((x, x, x), {"attn_mask": torch.zeros(4, 5, dtype=torch.bool)}),
        "attn_mask 3-D shape": ((x, x, x), {"attn_mask": torch.zeros(3, 4, 4, dtype=torch.bool)}),
        "attn_mask 4-D": ((x, x, x), {"attn_mask": torch.zeros(1, 1, 4, 4, dtype=torch.bool)}),
        "attn_mask int": ((x, x, x), {"attn_mask": _causal(4).long()}),
        "is_causal without mask": ((x, x, x), {"is_causal": True}),
        "unbatched kpm 2-D": ((x[0], x[0], x[0]), {"key_padding_mask": pad}),
        "unbatched attn_mask 3-D shape": ((x[0], x[0], x[0]), {"attn_mask": torch.zeros(3, 4, 4, dtype=torch.bool)}),
        "causal attn_mask 3-D for the wrong batch": ((x, x, x), {"attn_mask": _causal(4).expand(6, 4, 4)}),
    }


@pytest.mark.parametrize("batch_first", [True, False])
def test_invalid_calls_raise_what_torch_raises(gen, batch_first):
    mha, ours = _pair(gen, embed_dim=8, num_heads=2, batch_first=batch_first)
    for name, (args, kw) in _invalid_calls(gen).items():
        if not batch_first:
            args = tuple(a.transpose(0, 1) if a.dim() == 3 else a for a in args)
        for need_weights in (False, True):
            call = {"need_weights": need_weights, **kw}
            with pytest.raises(Exception) as want:
                mha(*args, **call)
            with pytest.raises(type(want.value)) as got:
                ours(*args, **call)
            assert str(got.value) == str(want.value), name


def test_constructor_and_swap_reject_bad_arguments():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        OURS(8, 2, backend="fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        OURS(8, 2, backend=None)
    for kw in ({"embed_dim": 0, "num_heads": 2}, {"embed_dim": 7, "num_heads": 2}):
        with pytest.raises(Exception) as want:
            nn.MultiheadAttention(**kw)
        with pytest.raises(type(want.value), match=str(want.value)):
            OURS(**kw)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        cf.nn.swap_attention(object())
    with pytest.raises(ValueError, match="backend must be"):
        cf.nn.swap_attention(nn.Linear(2, 2), backend="fast")


# ---------------------------------------------------------------------------------------------
# Module surface: constructor, state_dict, pickling, autocast, torch.compile, Triton


def test_same_constructor_parameters_and_state_dict(gen):
    args = (12, 3, 0.1, False, True, True, 5, 7, True)  # nn.MultiheadAttention's positional order
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(*args, dtype=F64)
    torch.manual_seed(0)
    ours = OURS(*args, dtype=F64)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in mha.named_parameters()]
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, dict(mha.named_parameters())[n], rtol=0, atol=0)  # same init
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(mha, attr), attr
    assert ours.backend == "auto" and "backend" not in ours.state_dict()
    mha2, ours2 = _pair(gen, embed_dim=8, num_heads=2)
    assert list(ours2.state_dict()) == list(mha2.state_dict())
    back = nn.MultiheadAttention(8, 2, dtype=F64)
    back.load_state_dict(ours2.state_dict())
    for n, t in back.state_dict().items():
        assert torch.equal(t, mha2.state_dict()[n]), n


def test_pickle_and_deepcopy_keep_backend(gen):
    _, ours = _pair(gen, embed_dim=4, num_heads=2, backend="reference")
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(ours), torch.load(buffer, weights_only=False)):
        assert type(clone) is OURS and clone.backend == "reference"
        x = randn(gen, 3, 2, 4, dtype=F64)
        torch.testing.assert_close(clone(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])
    state = ours.__dict__.copy()
    del state["backend"]  # pickled before `backend` existed
    fresh = OURS.__new__(OURS)
    fresh.__setstate__(state)
    assert fresh.backend == "auto"


def test_autocast_bf16_like_torch(gen, fused_calls):
    """Under CPU autocast both compute in bfloat16 (F.linear casts), return bfloat16, and ours
    is within the 16-bit bar: 2x torch's own error against float64, plus the floor."""
    mha, ours = _pair(gen, dtype=torch.float32, embed_dim=16, num_heads=2, batch_first=True)
    ref = copy.deepcopy(mha).double()
    x = randn(gen, 3, 6, 16)
    pad = rand_mask(gen, 3, 6, p=0.3)
    pad[:, 0] = False
    results = []
    for module in (mha, ours, ref):
        xi = x.detach().clone().to(module.in_proj_weight.dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=module is not ref):
            out = module(xi, xi, xi, key_padding_mask=pad, need_weights=False)[0]
        out.float().pow(2).sum().backward()
        results.append({"out": out, "input": xi.grad, **{n: p.grad for n, p in module.named_parameters()}})
    assert len(fused_calls) == 1
    assert results[0]["out"].dtype == results[1]["out"].dtype == torch.bfloat16
    for name, want in results[2].items():
        torch_error = tolerances.rel_error(results[0][name], want)
        assert tolerances.rel_error(results[1][name], want) <= tolerances.allowed_error("bf16", torch_error), name


def test_torch_compile_aot_eager(gen, fused_calls):
    mha, ours = _pair(gen, embed_dim=8, num_heads=2, batch_first=True)
    compiled = torch.compile(ours, backend="aot_eager")
    src = {"x": _x(gen, 2, 5, 8)}
    pad = rand_mask(gen, 2, 5, p=0.3)
    pad[:, 0] = False
    call = {"key_padding_mask": pad, "need_weights": False}
    for kwargs in (call, {**call, "attn_mask": _causal(5), "is_causal": True}):
        results = []
        for module in (mha, compiled):
            leaves, (q, k, v) = _leaves(src, "self")
            out = module(q, k, v, **kwargs)[0]
            out.pow(2).sum().backward()
            results.append([out, leaves["x"].grad, *(p.grad.clone() for p in module.parameters())])
            module.zero_grad()
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want)
    assert fused_calls  # traced through the fused op


@pytest.mark.parametrize("causal", [False, True])
def test_fused_triton_backend_in_interpreter(gen, fused_calls, causal):
    if "triton" not in usable_backends(OP, TRITON_DEVICE):
        pytest.skip("triton is not installed")
    b, p, length, e, h = 2, 5, 5 if causal else 7, 16, 2
    mha, ours = _pair(gen, dtype=torch.float32, device=TRITON_DEVICE, backend="triton", embed_dim=e,
                      num_heads=h, batch_first=False)
    ref = copy.deepcopy(mha).double()
    assert launchable(OP, "triton", targets=torch.empty(b, p, e, device=TRITON_DEVICE), num_heads=h)
    q, kv = randn(gen, p, b, e, device=TRITON_DEVICE), randn(gen, length, b, e, device=TRITON_DEVICE)
    pad = rand_mask(gen, b, length, p=0.3, device=TRITON_DEVICE)
    pad[:, 0] = False
    call = {"key_padding_mask": pad, "need_weights": False}
    if causal:
        call.update(attn_mask=_causal(p).to(TRITON_DEVICE), is_causal=True)
    results = []
    for module in (ref, ours):
        qi = q.detach().clone().to(module.in_proj_weight.dtype).requires_grad_()
        kvi = kv.detach().clone().to(module.in_proj_weight.dtype).requires_grad_()
        out = module(qi, kvi, kvi, **call)[0]
        out.pow(2).sum().backward()
        results.append({"out": out, "query": qi.grad, "kv": kvi.grad,
                        **{n: t.grad for n, t in module.named_parameters()}})
    assert len(fused_calls) == int(INCLUSIVE or not causal)
    bar = tolerances.allowed_error(tolerances.matmul_class(torch.float32, TRITON_DEVICE))
    for name, want in results[0].items():
        assert tolerances.rel_error(results[1][name], want) <= bar, name


# ---------------------------------------------------------------------------------------------
# swap_attention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad", "causal"])
def test_swap_in_transformer_encoder_layer(gen, fused_calls, batch_first, norm_first, mode):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=F64)
    layer.train(mode in ("train", "causal"))
    before = copy.deepcopy(layer)
    params = dict(layer.named_parameters())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    assert cf.nn.swap_attention(layer) is layer
    assert type(layer.self_attn) is OURS and layer.self_attn.backend == "auto"
    assert layer.training == before.training and layer.self_attn.training == before.training
    assert all(p is params[n] for n, p in layer.named_parameters())  # the optimizer's parameters
    assert optimizer.param_groups[0]["params"][0] is layer.self_attn.in_proj_weight
    src = _x(gen, 3, 5, 8, batch_first)
    pad = rand_mask(gen, 3, 5, p=0.3)
    pad[:, 0] = False
    kwargs = {"src_key_padding_mask": pad}
    if mode == "causal":
        kwargs.update(src_mask=_causal(5), is_causal=True)
    results = []
    for module in (before, layer):
        x = src.detach().clone().requires_grad_(mode != "eval_no_grad")
        with torch.set_grad_enabled(mode != "eval_no_grad"):
            out = module(x, **kwargs)
        if mode != "eval_no_grad":
            out.pow(2).sum().backward()
        results.append([out] + ([] if mode == "eval_no_grad" else [x.grad, *(p.grad for p in module.parameters())]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    # Without autograd in eval mode and batch_first, torch's own encoder-layer kernel runs and
    # never calls self_attn.
    expected = {"train": 1, "eval": 1, "eval_no_grad": int(not batch_first), "causal": int(INCLUSIVE)}[mode]
    assert len(fused_calls) == expected


def test_swap_keeps_other_modules_device_dtype_and_leaves_subclasses(gen):
    class Custom(nn.MultiheadAttention):  # may override forward: not ours to change
        pass

    shared = nn.MultiheadAttention(4, 2, dtype=F64)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "c": Custom(4, 2),
                           "d": OURS(4, 2, backend="reference"), "e": nn.Linear(4, 4)}).eval()
    cf.nn.swap_attention(model, backend="cpu")
    assert type(model["a"]) is OURS and model["b"][0] is model["a"] and model["a"].backend == "cpu"
    assert type(model["c"]) is Custom and model["d"].backend == "reference" and type(model["e"]) is nn.Linear
    assert model["a"].in_proj_weight.dtype == F64 and not model["a"].training
    lone = nn.MultiheadAttention(4, 2)
    assert cf.nn.swap_attention(lone) is lone and type(lone) is OURS


class OfficialStyleCourier(nn.Module):
    """The official COURIER model's attention step, rewritten: each shown (PV) item's embedding
    queries its user's click-history embeddings, copied per PV item by indexing."""

    def __init__(self, features=5, d=8, heads=2, shared_kv=False):
        super().__init__()
        self.encoder = nn.Linear(features, d, dtype=F64)
        self.attn_layer = nn.MultiheadAttention(d, heads, batch_first=True, dtype=F64)
        self.shared_kv = shared_kv

    def forward(self, pv_images, seq_images, pv_batch_index):
        pv_emb, user_seq_emb = self.encoder(pv_images), self.encoder(seq_images)
        if not self.shared_kv:  # verbatim: two copies, need_weights left at its default (True)
            return self.attn_layer(query=pv_emb.unsqueeze(1), key=user_seq_emb[pv_batch_index],
                                   value=user_seq_emb[pv_batch_index])[0].mean(1)
        history = user_seq_emb[pv_batch_index]  # one copy used as key and value, no weights
        return self.attn_layer(pv_emb.unsqueeze(1), history, history, need_weights=False)[0].mean(1)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_swap_in_official_style_courier_model(gen, fused_calls, shared_kv):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    model = OfficialStyleCourier(shared_kv=shared_kv)
    with torch.no_grad():
        model.attn_layer.in_proj_bias.normal_()
        model.attn_layer.out_proj.bias.normal_()
    before = copy.deepcopy(model)
    cf.nn.swap_attention(model)
    pv, seq = randn(gen, 7, 5, dtype=F64), randn(gen, 3, 4, 5, dtype=F64)  # 7 PV items, 3 users x 4 clicks
    index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    results = []
    for module in (before, model):
        out = module(pv, seq, index)
        out.pow(2).sum().backward()
        results.append([out, *(p.grad for p in module.parameters())])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    assert len(fused_calls) == int(shared_kv)  # the verbatim call needs weights and two copies
