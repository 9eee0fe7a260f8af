"""courier_fast.contrastive_loss: every backend vs the float64 reference, and the reference
itself vs a brute-force per-anchor cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

import courier_fast as cf
from courier_fast.ops import dispatch
from courier_fast.ops.reference import contrastive_loss_reference

from courier_fast.ops.selfcheck import tolerances
from conftest import backend_params, launchable, rand_mask, randn, tol

OP = "contrastive_loss"


def brute_force(anchors, candidates, temperature, weight, mask, normalize, symmetric, scale=None, bias=0.0,
                ids=None, logq=None):
    """Independent spelling of docs/design.md §3.1: a loop of F.cross_entropy per anchor over its
    candidates (kept by the mask, accidental hits by id left out), logits s <r_j, e_i> + b - logq_i;
    the reverse direction's logits for anchor e_j are s <e_j, r_i> + b - logq_j."""
    a, c = anchors.double(), candidates.double()
    if normalize:
        a, c = F.normalize(a, dim=-1), F.normalize(c, dim=-1)
    s = 1.0 / temperature if scale is None else scale
    n = a.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask.cpu()
    w = torch.ones(n, dtype=torch.float64) if weight is None else weight.double().cpu()
    q = torch.zeros(n, dtype=torch.float64) if logq is None else logq.double()
    total, wsum = 0.0, 0.0
    for j in range(n):
        if not keep[j] or w[j] == 0:
            continue
        idx = [i for i in range(n) if keep[i] and (ids is None or i == j or ids[i] != ids[j])]
        target = torch.tensor([idx.index(j)])
        loss = F.cross_entropy((s * a[j] @ c[idx].T + bias - q[idx])[None], target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy((s * c[j] @ a[idx].T + bias - q[j])[None], target))
        total, wsum = total + w[j] * loss, wsum + w[j]
    return total / wsum if wsum > 0 else torch.tensor(0.0, dtype=torch.float64)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("more", [False, True], ids=["plain", "scale+bias+ids+logq"])
def test_reference_matches_brute_force(gen, symmetric, normalize, more):
    n, d = 23, 7
    a, c = randn(gen, n, d, dtype=torch.float64), randn(gen, n, d, dtype=torch.float64)
    mask, w = rand_mask(gen, n, p=0.8), torch.rand(n, generator=gen, dtype=torch.float64)
    extra = dict(scale=torch.tensor(2.5, dtype=torch.float64), bias=-1.5, ids=torch.randint(0, 6, (n,), generator=gen),
                 logq=randn(gen, n, dtype=torch.float64)) if more else {}
    kw = dict(logit_scale=extra["scale"], logit_bias=extra["bias"], candidate_ids=extra["ids"],
              candidate_logq=extra["logq"]) if more else dict(temperature=0.3)
    got = contrastive_loss_reference(a, c, anchor_weight=w, candidate_mask=mask, normalize=normalize,
                                     symmetric=symmetric, **kw)
    want = brute_force(a, c, 0.3, w, mask, normalize, symmetric, **extra)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _inputs(gen, n, d, dtype, device, weight_kind, mask_kind):
    a = randn(gen, n, d, dtype=dtype, device=device, requires_grad=True)
    c = randn(gen, n, d, dtype=dtype, device=device, requires_grad=True)
    weight = {"none": None, "bool": rand_mask(gen, n, p=0.4, device=device),
              "float": torch.rand(n, generator=gen).to(device=device, dtype=dtype)}[weight_kind]
    mask = {"none": None, "all": torch.ones(n, dtype=torch.bool, device=device),
            "random": rand_mask(gen, n, p=0.7, device=device)}[mask_kind]
    return a, c, weight, mask


def _check_against_reference(backend, device, a, c, dtype, **kw):
    loss = cf.contrastive_loss(a, c, backend=backend, **kw)
    a64 = a.detach().double().cpu().requires_grad_()
    c64 = c.detach().double().cpu().requires_grad_()
    kw64 = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if isinstance(kw64.get("anchor_weight"), torch.Tensor) and kw64["anchor_weight"].is_floating_point():
        kw64["anchor_weight"] = kw64["anchor_weight"].double()
    ref = contrastive_loss_reference(a64, c64, **kw64)
    rtol, atol = tol(backend, dtype)
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=rtol, atol=atol)
    g = torch.randn(loss.shape, dtype=torch.float64) if loss.dim() else torch.tensor(1.0, dtype=torch.float64)
    ga, gc = torch.autograd.grad(loss, (a, c), g.to(device=device, dtype=loss.dtype))
    ra, rc = torch.autograd.grad(ref, (a64, c64), g)
    # float32 noise floor: where the float64 gradient is ~0 (one candidate: P = 1 exactly) a kernel
    # that rounds the LSE apart from the logit gives s (P - 1) y, ~s^2 eps_32 = 5e-5 at s = 20
    scale = max(ra.abs().max().item(), rc.abs().max().item(), 0.25)
    torch.testing.assert_close(ga.cpu().double(), ra, rtol=rtol, atol=atol * scale * 10)
    torch.testing.assert_close(gc.cpu().double(), rc, rtol=rtol, atol=atol * scale * 10)
    return loss


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("n,d", [(1, 3), (7, 100), (257, 3), (64, 16), (20, 600)])  # d=600: split gradients
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(gen, backend, device, n, d, symmetric, dtype):
    a, c, w, m = _inputs(gen, n, d, dtype, device, "float", "random")
    if m is not None and n > 1:
        m[0] = True  # at least one candidate survives, so some anchor has weight
    if not launchable(OP, backend, anchors=a, candidates=c):  # e.g. Triton fp32 at d > 64 on a GPU
        with pytest.raises(ValueError, match="bf16/fp16"):
            cf.contrastive_loss(a, c, anchor_weight=w, candidate_mask=m, symmetric=symmetric, backend=backend)
        return
    _check_against_reference(backend, device, a, c, dtype, temperature=0.05, anchor_weight=w,
                             candidate_mask=m, symmetric=symmetric)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("weight_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("mask_kind", ["none", "all", "random"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_weights_reductions(gen, backend, device, weight_kind, mask_kind, reduction):
    a, c, w, m = _inputs(gen, 33, 10, torch.float64, device, weight_kind, mask_kind)
    _check_against_reference(backend, device, a, c, torch.float64, temperature=0.1,
                             anchor_weight=w, candidate_mask=m, reduction=reduction)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0])
def test_temperature_and_normalize(gen, backend, device, normalize, temperature):
    a, c, w, m = _inputs(gen, 40, 12, torch.float64, device, "bool", "random")
    if not normalize:  # keep raw logits in a sane range
        a, c = (a.detach() * 0.3).requires_grad_(), (c.detach() * 0.3).requires_grad_()
    _check_against_reference(backend, device, a, c, torch.float64, temperature=temperature,
                             anchor_weight=w, candidate_mask=m, normalize=normalize, symmetric=True)


def _extras(gen, n, device, dtype):
    """A learnable scale and bias, ids with many duplicates, logq: every new argument of §3.1."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(logit_scale=torch.tensor(12.0, dtype=cdt, device=device, requires_grad=True),
                logit_bias=torch.tensor(-4.0, dtype=cdt, device=device, requires_grad=True),
                candidate_ids=torch.randint(0, max(1, n // 3), (n,), generator=gen).to(device),
                candidate_logq=(0.5 * randn(gen, n, dtype=torch.float64)).to(device=device, dtype=dtype))


def _check_extras(backend, device, a, c, dtype, **kw):
    """The loss and the gradients of a, c and logit_scale against the float64 reference; the
    bias changes nothing and gets a gradient of exactly 0."""
    scale, bias = kw["logit_scale"], kw["logit_bias"]
    loss = cf.contrastive_loss(a, c, backend=backend, **kw)
    up = torch.randn(loss.shape, dtype=torch.float64) if loss.dim() else torch.tensor(1.0, dtype=torch.float64)
    got = torch.autograd.grad(loss, (a, c, scale, bias), up.to(device=device, dtype=loss.dtype))
    leaves = [t.detach().double().cpu().requires_grad_() for t in (a, c, scale)]
    kw64 = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw64.update(logit_scale=leaves[2], logit_bias=kw64["logit_bias"].double())
    for k in ("anchor_weight", "candidate_logq"):
        if isinstance(kw64.get(k), torch.Tensor) and kw64[k].is_floating_point():
            kw64[k] = kw64[k].double()
    ref = contrastive_loss_reference(leaves[0], leaves[1], **kw64)
    want = torch.autograd.grad(ref, leaves, up)
    bar = 1e-9 if dtype == torch.float64 and backend not in ("triton",) else 2e-5
    for what, g, e in zip(("loss", "anchors", "candidates", "logit_scale"), (loss,) + got[:3], (ref,) + want):
        if e.abs().max() < 1e-12:  # e.g. N = 1: the loss is lse - z_11 = 0, so is every gradient
            assert g.abs().max() <= bar, f"{what}: {g.abs().max():.3g} where the reference is 0"
            continue
        if what == "logit_scale":  # a difference of weighted mean cosines (terms of size <= 1): relative to 1
            err = abs(g.item() - e.item()) / max(1.0, abs(e.item()))
        else:
            err = tolerances.rel_error(g, e)
        assert err <= bar, f"{what}: relative error {err:.3g} > {bar}"
    # d/db of lse(z + b) - (z_jj + b): exactly 0 (the dense reference adds b to every logit: rounding)
    assert got[3].shape == () and abs(got[3].item()) <= (1e-5 if backend == "reference" else 0.0)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("n,d", [(1, 3), (7, 100), (64, 16), (40, 384), (20, 600), (9, 1100)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_bias_ids_logq_match_reference(gen, backend, device, n, d, symmetric, dtype):
    """Every new argument at once, on every backend (d: the Triton paths: one block, 3 feature
    chunks, 5 chunks, feature groups), with float weights and a random mask."""
    a, c, w, m = _inputs(gen, n, d, dtype, device, "float", "random")
    if n > 1:
        m[0] = True
    if not launchable(OP, backend, anchors=a, candidates=c):
        with pytest.raises(ValueError, match="bf16/fp16"):
            cf.contrastive_loss(a, c, candidate_mask=m, backend=backend, **_extras(gen, n, device, dtype))
        return
    _check_extras(backend, device, a, c, dtype, anchor_weight=w, candidate_mask=m, symmetric=symmetric,
                  **_extras(gen, n, device, dtype))


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("weight_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_scale_bias_ids_logq_with_masks_weights_reductions(gen, backend, device, weight_kind, mask_kind, reduction,
                                                           normalize):
    a, c, w, m = _inputs(gen, 33, 10, torch.float64, device, weight_kind, mask_kind)
    if not normalize:  # keep raw logits in a sane range
        a, c = (a.detach() * 0.1).requires_grad_(), (c.detach() * 0.1).requires_grad_()
    _check_extras(backend, device, a, c, torch.float64, anchor_weight=w, candidate_mask=m, reduction=reduction,
                  normalize=normalize, symmetric=reduction != "sum", **_extras(gen, 33, device, torch.float64))


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_ids_remove_exactly_the_duplicates_of_the_positive(gen, backend, device):
    """Rows 0..3 show one item; row 4 another: with ids, anchor 0's denominator holds itself and
    row 4 only, as if rows 1..3 were masked for it; without ids the copies count (the loss is
    larger)."""
    e = randn(gen, 5, 6, dtype=torch.float64, device=device)
    e[1:4] = e[0]
    r = (e + 0.1 * randn(gen, 5, 6, dtype=torch.float64, device=device)).requires_grad_()
    ids = torch.tensor([7, 7, 7, 7, 8], device=device)
    w = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64, device=device)
    with_ids = cf.contrastive_loss(r, e, candidate_ids=ids, anchor_weight=w, backend=backend)
    as_masked = cf.contrastive_loss(r, e, anchor_weight=w, backend=backend,
                                    candidate_mask=torch.tensor([True, False, False, False, True], device=device))
    without = cf.contrastive_loss(r, e, anchor_weight=w, backend=backend)
    torch.testing.assert_close(with_ids, as_masked, rtol=1e-12, atol=1e-12)
    assert without > with_ids + 0.5


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_logit_scale_equals_temperature(gen, backend, device):
    """s = 1 / temperature as a tensor gives the temperature's loss and gradients; the scale's
    gradient is the finite difference of the loss."""
    a, c, w, m = _inputs(gen, 30, 8, torch.float64, device, "float", "random")
    s = torch.tensor(1 / 0.07, dtype=torch.float64, device=device, requires_grad=True)
    got = cf.contrastive_loss(a, c, logit_scale=s, anchor_weight=w, candidate_mask=m, symmetric=True, backend=backend)
    want = cf.contrastive_loss(a, c, temperature=0.07, anchor_weight=w, candidate_mask=m, symmetric=True,
                               backend=backend)
    tol_ = dict(rtol=1e-5, atol=1e-6) if backend == "triton" else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol_)
    for x, y in zip(torch.autograd.grad(got, (a, c)), torch.autograd.grad(want, (a, c))):
        torch.testing.assert_close(x, y, **tol_)
    (gs,) = torch.autograd.grad(cf.contrastive_loss(a, c, logit_scale=s, anchor_weight=w, candidate_mask=m,
                                                    symmetric=True, backend=backend), s)
    h = 1e-2 if backend == "triton" else 1e-4  # triton: float32 losses, so a wider step
    fd = [cf.contrastive_loss(a.detach(), c.detach(), logit_scale=s.detach() + k * h, anchor_weight=w, candidate_mask=m,
                              symmetric=True, backend=backend).item() for k in (1, -1)]
    assert gs.item() == pytest.approx((fd[0] - fd[1]) / (2 * h), rel=1e-3 if backend == "triton" else 1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "chunked"])  # triton computes in float32
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64_with_scale_ids_logq(gen, backend, symmetric):
    a = randn(gen, 7, 5, dtype=torch.float64, requires_grad=True)
    c = randn(gen, 7, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    ids, logq = torch.tensor([0, 1, 0, 2, 1, 3, 0]), randn(gen, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, y, s, b: cf.contrastive_loss(x, y, logit_scale=s, logit_bias=b, anchor_weight=w, candidate_ids=ids,
                                               candidate_logq=logq, symmetric=symmetric, backend=backend), (a, c, s, b))


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_scale_stays_on_the_device(gen, backend, device):
    """A step with a tensor logit_scale (and bias, ids, logq) reads nothing back from the device
    once the data checks are off, as in training."""
    from courier_fast._validate import input_checks
    from host_reads import HostReads

    a, c, w, m = _inputs(gen, 20, 8, torch.float32, device, "bool", "random")
    kw = _extras(gen, 20, device, torch.float32)
    with input_checks(False), HostReads() as reads:
        loss = cf.contrastive_loss(a, c, anchor_weight=w, candidate_mask=m, symmetric=True, backend=backend, **kw)
        loss.backward()
    assert reads.reads == [], reads.reads
    assert kw["logit_scale"].grad is not None and torch.isfinite(kw["logit_scale"].grad)


def test_new_arguments_are_validated():
    a, c = torch.randn(5, 3), torch.randn(5, 3)
    s = torch.tensor(10.0)
    cases = [
        (dict(temperature=0.1, logit_scale=s), ValueError, "temperature or logit_scale, not both"),
        (dict(logit_scale=10.0), TypeError, "logit_scale must be a torch.Tensor"),
        (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must have exactly one element"),
        (dict(logit_scale=torch.tensor(1)), TypeError, "logit_scale must have dtype"),
        (dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale contains NaN"),
        (dict(logit_bias="1"), TypeError, "logit_bias must be"),
        (dict(logit_bias=float("inf")), ValueError, "logit_bias must be"),
        (dict(logit_bias=torch.ones(3)), ValueError, "logit_bias must have exactly one element"),
        (dict(candidate_ids=torch.arange(4)), ValueError, "candidate_ids must have shape"),
        (dict(candidate_ids=torch.arange(5.0)), TypeError, "candidate_ids must have dtype"),
        (dict(candidate_logq=torch.zeros(4)), ValueError, "candidate_logq must have shape"),
        (dict(candidate_logq=torch.tensor([0.0, float("-inf"), 0, 0, 0])), ValueError, "candidate_logq contains Inf"),
        (dict(candidate_logq=torch.zeros(5, dtype=torch.long)), TypeError, "candidate_logq must have dtype"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            cf.contrastive_loss(a, c, **kw)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="logit_scale is on"):
            cf.contrastive_loss(a, c, logit_scale=s.cuda())
    assert torch.equal(cf.contrastive_loss(a, c), cf.contrastive_loss(a, c, temperature=0.05))  # the default


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("how", ["zero_weights", "false_bools", "no_candidates", "own_masked"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_no_active_anchor_gives_exact_zero(gen, backend, device, how, symmetric):
    n = 9
    a = randn(gen, n, 4, device=device, requires_grad=True)
    c = randn(gen, n, 4, device=device, requires_grad=True)
    kw = {"zero_weights": {"anchor_weight": torch.zeros(n, device=device)},
          "false_bools": {"anchor_weight": torch.zeros(n, dtype=torch.bool, device=device)},
          "no_candidates": {"candidate_mask": torch.zeros(n, dtype=torch.bool, device=device)},
          "own_masked": {"anchor_weight": torch.arange(n, device=device) < 3,
                         "candidate_mask": torch.arange(n, device=device) >= 3}}[how]
    s = torch.tensor(20.0, device=device, requires_grad=True)
    loss = cf.contrastive_loss(a, c, backend=backend, symmetric=symmetric, logit_scale=s,
                               candidate_ids=torch.zeros(n, dtype=torch.long, device=device), **kw)
    assert loss.item() == 0.0
    ga, gc, gs = torch.autograd.grad(loss, (a, c, s))
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gc, torch.zeros_like(gc)) and gs.item() == 0.0


def _torch_16bit_loss(a, c, w, temperature, symmetric):
    """Plain PyTorch computing the loss in the inputs' 16-bit dtype: the yardstick of the
    16-bit bar (courier_fast.ops.selfcheck.tolerances)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target, reduction="none"))
    return (loss * w).sum() / w.sum()


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,symmetric", [(128, 64, False), (67, 100, True), (45, 300, False), (24, 600, True)])
def test_half_within_twice_pytorch_error(gen, backend, device, dtype, n, d, symmetric):
    """16-bit inputs, forward and backward: the loss and both gradients within the 16-bit bar
    (each at most 2x the error of plain PyTorch computing in that dtype, vs float64, plus a
    quarter unit roundoff: the flash-attention rule, applied to gradients too); gradients come
    back in the input dtype. d covers the Triton paths: whole feature block, feature loop,
    split gradients."""
    a = randn(gen, n, d).to(device=device, dtype=dtype)
    c = randn(gen, n, d).to(device=device, dtype=dtype)
    w = torch.rand(n, generator=gen).to(device=device, dtype=dtype)
    kw = dict(temperature=0.05, symmetric=symmetric)
    a64, c64 = (t.detach().double().cpu().requires_grad_() for t in (a, c))
    ref = contrastive_loss_reference(a64, c64, anchor_weight=w.double().cpu(), **kw)
    want = [ref] + list(torch.autograd.grad(ref, (a64, c64)))
    leaves = [t.clone().requires_grad_() for t in (a, c)]
    loss = cf.contrastive_loss(*leaves, anchor_weight=w, backend=backend, **kw)
    ours = [loss] + list(torch.autograd.grad(loss, leaves))
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    leaves = [t.clone().requires_grad_() for t in (a, c)]
    naive = _torch_16bit_loss(*leaves, w, **kw)
    yard = [naive] + list(torch.autograd.grad(naive, leaves))
    cls = tolerances.HALF_DTYPES[dtype]
    for what, got, want_, base in zip(("loss", "grad anchors", "grad candidates"), ours, want, yard):
        err, allowed = tolerances.rel_error(got, want_), tolerances.allowed_error(cls, tolerances.rel_error(base, want_))
        assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_large_logits_stay_finite(gen, backend, device):
    """tau = 0.01 (logits up to 100) with identical rows: no overflow, matches reference."""
    a = randn(gen, 50, 8, device=device)
    a = torch.cat([a, a[:5]]).requires_grad_()
    c = (a.detach() + 0.01 * randn(gen, 55, 8, device=device)).requires_grad_()
    loss = _check_against_reference(backend, device, a, c, torch.float32, temperature=0.01)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # triton computes in float32
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64(gen, backend, symmetric):
    a = randn(gen, 6, 5, dtype=torch.float64, requires_grad=True)
    c = randn(gen, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    m = torch.tensor([True, True, False, True, True, True])
    assert torch.autograd.gradcheck(
        lambda x, y: cf.contrastive_loss(x, y, temperature=0.5, anchor_weight=w, candidate_mask=m,
                                         symmetric=symmetric, backend=backend), (a, c))


def test_auto_picks_cpu_backend_on_cpu():
    from courier_fast.ops import dispatch
    assert dispatch.select(OP, "auto", torch.device("cpu")) is dispatch.implementations(OP)["cpu"].fn


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_symmetric_module_equals_open_clip_cliploss(gen, backend, device):
    """InBatchContrastiveLoss(symmetric=True), no masks == open_clip's ClipLoss (when installed)."""
    loss_mod = pytest.importorskip("open_clip.loss", reason="open_clip ([bench] extra) not installed")
    img = randn(gen, 31, 16, dtype=torch.float64, device=device, requires_grad=True)
    txt = randn(gen, 31, 16, dtype=torch.float64, device=device, requires_grad=True)
    ours = cf.nn.InBatchContrastiveLoss(temperature=0.05, symmetric=True, backend=backend)(img, txt)
    theirs = loss_mod.ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), 1 / 0.05)
    rtol, atol = tol(backend, torch.float64)
    torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, (img, txt)), torch.autograd.grad(theirs, (img, txt))):
        torch.testing.assert_close(g_ours.double(), g_theirs, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_large_batch_float32_matches_float64_cpu(gen, temperature):
    """N = 20000 (a 3.2 GB float64 logit matrix for the dense reference): the cpu backend's float32 result agrees
    with its own float64 path (validated against the reference above) and stays finite."""
    if "cpu" not in dict((n, ok) for n, (ok, _) in dispatch.op_backends(OP).items() if ok):
        pytest.skip("cpu backend not built")
    n, d = 20000, 8
    a64, c64 = randn(gen, n, d, dtype=torch.float64), randn(gen, n, d, dtype=torch.float64)
    w = rand_mask(gen, n, p=0.1)
    losses, grads = [], []
    for dtype in (torch.float32, torch.float64):
        a = a64.to(dtype).requires_grad_()
        c = c64.to(dtype).requires_grad_()
        loss = cf.contrastive_loss(a, c, temperature=temperature, anchor_weight=w, backend="cpu")
        losses.append(loss.double())
        grads.append([g.double() for g in torch.autograd.grad(loss, (a, c))])
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for g32, g64 in zip(*grads):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())
