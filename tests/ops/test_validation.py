"""Bad input raises ValueError/TypeError naming the argument; nothing is silently wrong."""
import pytest
import torch

import courier_fast as cf

from conftest import randn

N, D = 6, 4


def _loss_kwargs(gen):
    return {"anchors": randn(gen, N, D), "candidates": randn(gen, N, D)}


def _call_loss(kw):
    kw = dict(kw)
    return cf.contrastive_loss(kw.pop("anchors"), kw.pop("candidates"), **kw)


BAD_LOSS = [
    ("anchors", lambda g: {"anchors": randn(g, N, D, 1)}, ValueError, "anchors must be 2-D"),
    ("candidates", lambda g: {"candidates": randn(g, N + 1, D)}, ValueError, "candidates must have shape"),
    ("candidates", lambda g: {"candidates": randn(g, N, D, dtype=torch.float64)}, TypeError, "candidates has dtype"),
    ("anchors", lambda g: {"anchors": torch.ones(N, D, dtype=torch.int64)}, TypeError, "anchors must have dtype"),
    ("anchors", lambda g: {"anchors": [[1.0]]}, TypeError, "anchors must be a torch.Tensor"),
    ("anchors", lambda g: {"anchors": torch.empty(0, D), "candidates": torch.empty(0, D)}, ValueError, "anchors is empty"),
    ("anchors", lambda g: {"anchors": torch.empty(N, 0), "candidates": torch.empty(N, 0)}, ValueError, "feature dimension 0"),
    ("anchors", lambda g: {"anchors": torch.full((N, D), float("nan"))}, ValueError, "anchors contains NaN"),
    ("candidates", lambda g: {"candidates": torch.full((N, D), float("inf"))}, ValueError, "candidates contains Inf"),
    ("temperature", lambda g: {"temperature": 0.0}, ValueError, "temperature must be"),
    ("temperature", lambda g: {"temperature": -1.0}, ValueError, "temperature must be"),
    ("temperature", lambda g: {"temperature": "0.1"}, TypeError, "temperature must be a real number"),
    ("anchor_weight", lambda g: {"anchor_weight": -torch.ones(N)}, ValueError, "anchor_weight must be >= 0"),
    ("anchor_weight", lambda g: {"anchor_weight": torch.ones(N + 1)}, ValueError, "anchor_weight must have shape"),
    ("anchor_weight", lambda g: {"anchor_weight": torch.tensor([float("nan")] * N)}, ValueError, "anchor_weight contains NaN"),
    ("candidate_mask", lambda g: {"candidate_mask": torch.ones(N)}, TypeError, "candidate_mask must have dtype"),
    ("candidate_mask", lambda g: {"candidate_mask": torch.ones(N, 1, dtype=torch.bool)}, ValueError, "candidate_mask must have shape"),
    ("reduction", lambda g: {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ("backend", lambda g: {"backend": "tpu"}, ValueError, "backend must be 'auto' or one of"),
    ("group", lambda g: {"group": object()}, ValueError, "torch.distributed is not initialized"),
]


@pytest.mark.parametrize("arg,make,exc,msg", BAD_LOSS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_LOSS)])
def test_contrastive_loss_rejects(gen, arg, make, exc, msg):
    kw = {**_loss_kwargs(gen), **make(gen)}
    with pytest.raises(exc, match=msg):
        _call_loss(kw)


def test_unimplemented_backend_says_so(gen):
    with pytest.raises(NotImplementedError, match="does not implement reconstruction_attention"):
        m = cf.nn.ReconstructionAttention(4, 2, backend="chunked")  # the loss-only backend
        m(randn(gen, 1, 2, 4), randn(gen, 1, 3, 4))


def test_unavailable_backend_gives_reason(gen):
    ok, reason = cf.backends()["cuda"]
    if ok:
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises((RuntimeError, NotImplementedError)):
        cf.contrastive_loss(randn(gen, 3, 2), randn(gen, 3, 2), backend="cuda")


def _attn_args(gen, b=2, p=3, length=4, d=8):
    m = cf.nn.ReconstructionAttention(d, 2)
    return {"targets": randn(gen, b, p, d), "history": randn(gen, b, length, d),
            "in_proj_weight": m.in_proj_weight, "in_proj_bias": m.in_proj_bias,
            "out_proj_weight": m.out_proj.weight, "out_proj_bias": m.out_proj.bias, "num_heads": 2}


def _call_attn(kw):
    kw = dict(kw)
    pos = [kw.pop(k) for k in ("targets", "history", "in_proj_weight", "in_proj_bias",
                               "out_proj_weight", "out_proj_bias", "num_heads")]
    return cf.reconstruction_attention(*pos, **kw)


BAD_ATTN = [
    ("targets", lambda g: {"targets": randn(g, 3, 8)}, ValueError, "targets must be 3-D"),
    ("history", lambda g: {"history": randn(g, 3, 4, 8)}, ValueError, "history has batch size 3"),
    ("history", lambda g: {"history": randn(g, 2, 4, 6)}, ValueError, "history has embedding dim 6"),
    ("history", lambda g: {"history": randn(g, 2, 4, 8, dtype=torch.float64)}, TypeError, "history has dtype"),
    ("num_heads", lambda g: {"num_heads": 3}, ValueError, "not divisible by num_heads"),
    ("num_heads", lambda g: {"num_heads": 0}, ValueError, "num_heads must be > 0"),
    ("in_proj_weight", lambda g: {"in_proj_weight": randn(g, 8, 8)}, ValueError, "in_proj_weight must have shape"),
    ("out_proj_bias", lambda g: {"out_proj_bias": randn(g, 7)}, ValueError, "out_proj_bias must have shape"),
    ("key_padding_mask", lambda g: {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, "key_padding_mask must have shape"),
    ("key_padding_mask", lambda g: {"key_padding_mask": torch.zeros(2, 4)}, TypeError, "key_padding_mask must have dtype"),
    ("causal", lambda g: {"causal": True}, ValueError, "needs P == L"),
    ("targets", lambda g: {"targets": torch.full((2, 3, 8), float("nan"))}, ValueError, "targets contains NaN"),
]


@pytest.mark.parametrize("arg,make,exc,msg", BAD_ATTN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_ATTN)])
def test_reconstruction_attention_rejects(gen, arg, make, exc, msg):
    kw = {**_attn_args(gen), **make(gen)}
    with pytest.raises(exc, match=msg):
        _call_attn(kw)


def test_module_rejects_bad_heads():
    with pytest.raises(ValueError, match="not divisible"):
        cf.nn.ReconstructionAttention(10, 4)


def test_from_mha_rejects_unsupported_options():
    with pytest.raises(ValueError, match="add_bias_kv"):
        cf.nn.ReconstructionAttention.from_mha(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="kdim"):
        cf.nn.ReconstructionAttention.from_mha(torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


def test_input_checks_can_be_disabled(gen):
    a = randn(gen, 3, 2)
    a[0, 0] = float("nan")
    cf.set_input_checks(False)
    try:
        assert torch.isnan(cf.contrastive_loss(a, randn(gen, 3, 2)))
    finally:
        cf.set_input_checks(True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (3,), (5, 3), (2, 3, 65)], ids=["flat", "rows_of_3", "5_rows", "3d_rows"])
def test_all_finite_finds_every_nan_and_inf(dtype, shape):
    """_validate.all_finite (row sums by GEMV for float32/64 rows, then aminmax) against isfinite:
    a NaN or an infinity at any position of odd-sized tensors (the vectorised loops and their
    tails), one of each sign in one row (their sum is NaN), empty tensors finite."""
    from courier_fast._validate import all_finite
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    for n in (1, 7, 33, 1030):
        x = torch.randn(n, *shape).to(dtype)
        assert all_finite(x)
        flat = x.view(-1)
        for i in {0, flat.numel() // 2, flat.numel() - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y.view(-1)[i] = bad
                assert not all_finite(y), (n, i, bad)
        if x.dim() >= 2 and x.shape[-1] >= 2:
            y = x.clone()
            y.view(-1, x.shape[-1])[0, :2] = torch.tensor([float("inf"), -float("inf")])
            assert not all_finite(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_is_not_fooled_by_sums_that_overflow(dtype):
    """Finite values whose row sums overflow to inf are finite: the exact test decides."""
    from courier_fast._validate import all_finite
    big = torch.finfo(dtype).max
    x = torch.full((4, 8), big, dtype=dtype)
    assert bool(torch.isinf(torch.mv(x, torch.ones(8, dtype=dtype))).all())
    assert all_finite(x)
    assert all_finite(x.t())  # not contiguous: aminmax only
    x[2, 3] = float("nan")
    assert not all_finite(x) and not all_finite(x.t())
