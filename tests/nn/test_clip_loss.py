"""courier_fast.nn.ClipLoss against open_clip's ClipLoss (open_clip_torch, installed in the test
extra): the same value and every gradient (features, logit_scale, logit_bias) on random
configurations of one process and on 2 and 3 gloo ranks for local_loss x gather_with_grad (and our
ring), the same return values, a training loop that ends with the same parameters, and never the
B x global-B logits."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import courier_fast as cf
from conftest import BENCH, usable_backends

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch (the [test] extra) not installed")

OP = "contrastive_loss"
BACKENDS = usable_backends(OP, "cpu")  # reference, cpu, chunked, triton (interpreter) where available


def _tol(backend, dtype):
    """Relative bar: float64 on a float64 backend agrees to rounding; triton computes in float32."""
    return 1e-9 if dtype == torch.float64 and backend != "triton" else 2e-5


def _features(g, n, d, dtype, scale=0.3):
    """Unnormalised features (ClipLoss takes them as given), small enough for logits ~ 10."""
    return [(scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() for _ in range(2)]


def _run(loss_fn, img, txt, scale, bias, **kw):
    """(value, [grad img, grad txt, grad scale, grad bias or None]) of loss_fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = loss_fn(*leaves, b, **kw) if b is not None else loss_fn(*leaves, **kw)
    value = out["contrastive_loss"] if isinstance(out, dict) else out
    grads = torch.autograd.grad(value, leaves + ([b] if b is not None else []))
    return out, list(grads) + ([None] if b is None else [])


def _term_sizes(img, txt, scale):
    """The size of the terms each gradient is a difference of (features: logit_scale x a
    candidate's norm / N per row; logit_scale: <img_j, txt_i>): a computation in float32 rounds
    relative to these, also where the terms cancel to an exact 0 (N = 1: p = 1)."""
    n = img.shape[0]
    feats = float(scale) * max(img.double().norm(), txt.double().norm()).item() / n
    return feats, feats, (img.double().norm(dim=1) * txt.double().norm(dim=1)).mean().item()


def _assert_same(ours, theirs, bar, where="", sizes=(0.0, 0.0, 0.0)):
    """Loss within bar (relative); each gradient within bar relative to its norm, or to the size
    of its terms where that is larger (`sizes`, _term_sizes; at least 0.01)."""
    (v_ours, g_ours), (v_theirs, g_theirs) = ours, theirs
    v_ours = v_ours["contrastive_loss"] if isinstance(v_ours, dict) else v_ours
    v_theirs = v_theirs["contrastive_loss"] if isinstance(v_theirs, dict) else v_theirs
    assert v_ours.shape == v_theirs.shape == ()
    assert abs(v_ours.item() - v_theirs.item()) <= bar * max(1.0, abs(v_theirs.item())), where
    for what, a, b, size in zip(("image", "text", "logit_scale"), g_ours[:3], g_theirs[:3], sizes):
        # with B = 1 the loss and its gradients are exactly 0: relative to the terms' size then
        err = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), size, 1e-2)
        assert err <= bar, f"{where} grad {what}: {err:.3g}"
    if g_theirs[3] is not None:  # the bias cancels: open_clip's gradient is rounding noise, ours 0
        assert abs(g_ours[3].item()) <= 1e-6 and abs(g_theirs[3].item()) <= 1e-6, where


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_one_process_equals_open_clip_on_random_configurations(backend, case, gen):
    """Random N (1 included), d, dtype, scale, bias, output_dict and cache_labels (two calls, so
    a cached label tensor is reused): loss, return type and every gradient equal open_clip's."""
    n = [1, 2, 7, 33, 16, 50][case]
    d = int(torch.randint(2, 70, (), generator=gen))
    dtype = torch.float64 if case % 2 == 0 else torch.float32
    img, txt = _features(gen, n, d, dtype)
    scale = torch.tensor(float(torch.empty(()).uniform_(2.0, 30.0, generator=gen)), dtype=dtype)
    bias = None if case % 3 == 0 else torch.tensor(-5.0 * case, dtype=dtype)
    kw = dict(cache_labels=case % 2 == 1)
    output = {"output_dict": case >= 3}
    ours_fn, theirs_fn = cf.nn.ClipLoss(backend=backend, **kw), open_clip_loss.ClipLoss(**kw)
    for call in range(2):
        ours, theirs = _run(ours_fn, img, txt, scale, bias, **output), _run(theirs_fn, img, txt, scale, bias, **output)
        assert type(ours[0]) is type(theirs[0]) and (not isinstance(ours[0], dict) or ours[0].keys() == theirs[0].keys())
        _assert_same(ours, theirs, _tol(backend, dtype), f"call {call}", _term_sizes(img, txt, scale))


def test_scale_as_a_number_and_the_constructor_surface():
    img, txt = _features(torch.Generator().manual_seed(0), 9, 5, torch.float64)
    got = cf.nn.ClipLoss(backend="cpu")(img, txt, 14.0)
    want = open_clip_loss.ClipLoss()(img, txt, 14.0)
    torch.testing.assert_close(got, want)
    loss = cf.nn.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)
    assert (loss.local_loss, loss.gather_with_grad, loss.cache_labels, loss.rank, loss.world_size,
            loss.use_horovod) == (True, True, True, 0, 1, False)
    with pytest.raises(ValueError, match="use_horovod"):
        cf.nn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed"):
        cf.nn.ClipLoss(rank=1, world_size=2)(img, txt, torch.tensor(10.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="logit_scale must have exactly one element"):
        cf.nn.ClipLoss()(img, txt, torch.ones(2, dtype=torch.float64))


def test_a_training_loop_ends_where_open_clip_s_does():
    """Two linear towers with a learned logit_scale (exp of a parameter, as open_clip's model)
    and logit_bias, 8 AdamW steps: importing ours instead of open_clip's ClipLoss gives the same
    parameters after every step."""
    def model():
        torch.manual_seed(0)
        towers = torch.nn.ModuleDict({"img": torch.nn.Linear(12, 8), "txt": torch.nn.Linear(10, 8)}).double()
        towers.logit_scale = torch.nn.Parameter(torch.tensor(2.3, dtype=torch.float64))
        towers.logit_bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        return towers

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(24, 12, generator=g, dtype=torch.float64), torch.randn(24, 10, generator=g, dtype=torch.float64))
            for _ in range(8)]
    runs = []
    for loss_fn in (open_clip_loss.ClipLoss(), cf.nn.ClipLoss(backend="cpu")):
        m = model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        history = []
        for x, y in data:
            img = torch.nn.functional.normalize(m["img"](x), dim=-1)  # open_clip normalises in the model
            txt = torch.nn.functional.normalize(m["txt"](y), dim=-1)
            loss = loss_fn(img, txt, m.logit_scale.exp(), m.logit_bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append([p.detach().clone() for p in m.parameters()])
        runs.append(history)
    for step, (theirs, ours) in enumerate(zip(*runs)):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {step}")


# ----------------------------------------------------------------------------- several ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETTINGS = [(local, with_grad, ring) for local in (False, True) for with_grad in (False, True) for ring in (False, True)]


def _rank(rank, port, world, n, backend, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sl = slice(rank * n, (rank + 1) * n)
        img, txt = data["img"][sl], data["txt"][sl]
        out = {}
        for local, with_grad, ring in SETTINGS:
            kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world)
            ours = _run(cf.nn.ClipLoss(ring=ring, backend=backend, **kw), img, txt, data["scale"], data["bias"])
            theirs = _run(open_clip_loss.ClipLoss(**kw), img, txt, data["scale"], data["bias"])
            out[local, with_grad, ring] = [(v.detach(), [g if g is None else g.detach() for g in grads])
                                           for v, grads in (ours, theirs)]
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world,backend", [(2, "cpu"), (3, "chunked")])
def test_ranks_equal_open_clip_for_every_setting(world, backend):
    """On each rank, for local_loss x gather_with_grad (all-gathered and ring): the loss and the
    gradients of this rank's features, logit_scale and logit_bias equal open_clip's on the same
    rank (gather_with_grad=False: no gradient to the other ranks' features, exactly as open_clip)."""
    n = 6
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    img, txt = _features(g, world * n, 11, torch.float64)
    data = {"img": img.detach(), "txt": txt.detach(), "scale": torch.tensor(9.0, dtype=torch.float64),
            "bias": torch.tensor(-2.0, dtype=torch.float64)}
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), world, n, backend, data, results), nprocs=world)
    for rank in range(world):
        for setting, (ours, theirs) in results[rank].items():
            _assert_same(ours, theirs, 1e-9, f"rank {rank} local_loss, gather_with_grad, ring = {setting}")


# ----------------------------------------------------------------------------- memory
_PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[4])  # bench/: the harness's peak-RSS reading
    import harness
    import courier_fast as cf
    import open_clip.loss
    n, d, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    loss_fn = open_clip.loss.ClipLoss() if which == "open_clip" else cf.nn.ClipLoss(backend=which)
    img, txt = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn(img[:64], txt[:64], scale).backward()  # warm up allocator and imports
    img.grad = txt.grad = scale.grad = None
    harness.reset_peak_rss()
    base = harness.rss_mb()
    loss_fn(img, txt, scale).backward()
    print(json.dumps({"extra_mb": harness.peak_rss_mb() - base}))
""")


def _extra_peak_mb(n, d, which):
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(d), which, BENCH], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def test_never_the_n_by_n_logits():
    """B = 8192: ours (cpu and chunked) stays under 15 % of the B x B fp32 logits above the inputs
    in a fresh process; open_clip, measured the same way, holds more than the logits (so the
    reading can fail)."""
    n, d = 8192, 16
    dense_mb = n * n * 4 / 2**20
    for backend in ("cpu", "chunked"):
        extra = _extra_peak_mb(n, d, backend)
        assert extra < 0.15 * dense_mb, (backend, extra, dense_mb)
    assert _extra_peak_mb(n, d, "open_clip") > dense_mb
