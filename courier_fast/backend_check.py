"""Self-check of the kernel backends on the user's own device (DESIGN §2, issue 11).

selftest(device) runs every registered non-reference backend of every op on a fixed set of
small random problems (odd shapes, masks all-false and random, empty history rows, causal,
fp32 and bf16, d not a power of two), forward and backward, against the float64 reference,
and returns {op: {backend: {"ok": bool, "worst_error": float, "reason": str}}}.

worst_error is the largest error / allowed-error ratio over all checks (<= 1 passes). Errors
are relative L2 errors per output (loss/out and each gradient; see _rel_errors). Allowed:
fp32 FP32_TOL (DESIGN §4's ~1e-5, x10 as the op tests do for gradients); bf16 twice the
error of plain PyTorch computing the same problem with 16-bit values (the flash-attention
rule), plus BF16_FLOOR (about bf16's unit roundoff: small problems make
the 2x rule alone noisy).

Verdicts are cached per environment (device name, compute capability, driver, torch,
triton, CUDA, package version and a hash of the package's sources and compiled extension) in
the user cache directory ($COURIER_FAST_CACHE_DIR, else $XDG_CACHE_HOME/courier_fast, else
~/.cache/courier_fast), one JSON file per environment, written atomically. dispatch.select
(backend="auto") calls trusted(), which runs the check of one backend the first time it is
needed. COURIER_FAST_VALIDATE=0 trusts without checking; =force re-checks once per process.
"""
import contextlib
import functools
import glob
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import warnings

import torch

from courier_fast import dispatch

FP32_TOL = 1e-4
BF16_FLOOR = 1e-3
NOISE_FLOOR = 0.1  # per element, as the op tests' float32 noise floor
_MEMORY: dict = {}  # (cache file, op, backend) -> verdict, for this process
_TRUSTED: dict = {}  # (op, backend, device, implementation, mode) -> bool, for this process


# ----------------------------------------------------------------------------- problems
def _contrastive_problems():
    """(name, kwargs) of the loss self-check; tensors are made by _contrastive_inputs."""
    return [
        ("fp32 n=7 d=100 random mask, float weights", dict(n=7, d=100, dtype="float32", mask="random", weight="float")),
        ("fp32 n=1 d=3", dict(n=1, d=3, dtype="float32", mask="none", weight="none")),
        ("fp32 n=257 d=64 bool weights", dict(n=257, d=64, dtype="float32", mask="random", weight="bool")),
        ("fp32 n=33 d=10 all candidates masked", dict(n=33, d=10, dtype="float32", mask="false", weight="float", symmetric=True)),
        ("fp32 n=40 d=12 unnormalised, tau=1, reduction none", dict(n=40, d=12, dtype="float32", mask="random", weight="float", normalize=False, temperature=1.0, reduction="none")),
        ("bf16 n=67 d=100 symmetric", dict(n=67, d=100, dtype="bfloat16", mask="random", weight="bool", symmetric=True)),
        ("bf16 n=130 d=64", dict(n=130, d=64, dtype="bfloat16", mask="none", weight="float")),
    ]


def _attention_problems():
    return [
        ("fp32 B=3 P=5 L=7 d=12 h=3, an empty history row", dict(b=3, p=5, length=7, d=12, h=3, dtype="float32", pad="random")),
        ("fp32 causal B=2 L=9 d=8 h=2", dict(b=2, p=9, length=9, d=8, h=2, dtype="float32", pad="random", causal=True)),
        ("fp32 all history padded", dict(b=2, p=3, length=4, d=8, h=2, dtype="float32", pad="all")),
        ("fp32 B=2 P=5 L=20 d=128 h=2 (dh=64)", dict(b=2, p=5, length=20, d=128, h=2, dtype="float32", pad="random")),
        ("bf16 B=3 P=5 L=33 d=64 h=4", dict(b=3, p=5, length=33, d=64, h=4, dtype="bfloat16", pad="random")),
        ("bf16 causal B=2 L=6 d=24 h=2", dict(b=2, p=6, length=6, d=24, h=2, dtype="bfloat16", pad="random", causal=True)),
    ]


def _generator(name):
    return torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


def _contrastive_case(name, spec, device):
    """(run(backend, dtype, inputs) -> outputs, inputs fp64 on CPU) for one loss problem."""
    import courier_fast as cf

    g = _generator(name)
    n, d = spec["n"], spec["d"]
    a, c = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    mask = {"none": None, "random": torch.rand(n, generator=g) < 0.7,
            "false": torch.zeros(n, dtype=torch.bool)}[spec["mask"]]
    if mask is not None and spec["mask"] == "random":
        mask[0] = True
    weight = {"none": None, "bool": torch.rand(n, generator=g) < 0.5,
              "float": torch.rand(n, generator=g, dtype=torch.float64)}[spec["weight"]]
    if spec["dtype"] != "float32":  # the float64 reference sees exactly what the backend sees
        low = getattr(torch, spec["dtype"])
        a, c = a.to(low).double(), c.to(low).double()
        weight = weight if weight is None or weight.dtype == torch.bool else weight.to(low).double()
    kw = dict(temperature=spec.get("temperature", 0.05), normalize=spec.get("normalize", True),
              symmetric=spec.get("symmetric", False), reduction=spec.get("reduction", "mean"))
    upstream = torch.randn(n, generator=g, dtype=torch.float64) if kw["reduction"] == "none" else None

    def run(backend, dtype, leaves, dev):
        w = weight if weight is None or weight.dtype == torch.bool else weight.to(dtype)
        loss = cf.contrastive_loss(*leaves, anchor_weight=None if w is None else w.to(dev),
                                   candidate_mask=None if mask is None else mask.to(dev),
                                   backend=backend, **kw)
        up = torch.ones((), dtype=loss.dtype, device=dev) if upstream is None else upstream.to(dev, loss.dtype)
        return [loss] + list(torch.autograd.grad(loss, leaves, up))

    def yardstick(dtype):
        """Plain PyTorch with 16-bit unit rows (what F.normalize in 16 bits then a dense
        matmul does), differentiated through the rounding: the error a user accepts today."""
        from courier_fast.reference import NORM_EPS, contrastive_loss_reference
        leaves = [t.clone().requires_grad_() for t in (a, c)]
        unit = [(torch.nn.functional.normalize(t, dim=-1, eps=NORM_EPS) if kw["normalize"] else t)
                for t in leaves]
        unit = [u + (u.to(dtype).double() - u).detach() for u in unit]  # round, keep the gradient
        loss = contrastive_loss_reference(*unit, anchor_weight=weight, candidate_mask=mask,
                                          **{**kw, "normalize": False})
        up = torch.ones((), dtype=loss.dtype) if upstream is None else upstream
        return [loss] + list(torch.autograd.grad(loss, leaves, up))

    return run, [a, c], yardstick


def _attention_case(name, spec, device):
    import courier_fast as cf
    from courier_fast.reference import reconstruction_attention_reference

    g = _generator(name)
    b, p, length, d, h = spec["b"], spec["p"], spec["length"], spec["d"], spec["h"]
    t = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    hist = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(3 * d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b_in = torch.randn(3 * d, generator=g, dtype=torch.float64)
    w_out = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b_out = torch.randn(d, generator=g, dtype=torch.float64)
    pad = torch.rand(b, length, generator=g) < 0.3 if spec["pad"] == "random" else torch.ones(b, length, dtype=torch.bool)
    if spec["pad"] == "random":
        pad[0] = True  # an empty history row
    causal = spec.get("causal", False)
    upstream = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    inputs = [t, hist, w_in, b_in, w_out, b_out]
    if spec["dtype"] != "float32":  # the float64 reference sees exactly what the backend sees
        inputs = [x.to(getattr(torch, spec["dtype"])).double() for x in inputs]

    def call(fn, leaves, dev):
        out = fn(*leaves, h, key_padding_mask=pad.to(dev), causal=causal)
        return [out] + list(torch.autograd.grad(out, leaves, upstream.to(dev, out.dtype)))

    def run(backend, dtype, leaves, dev):
        return call(functools.partial(cf.reconstruction_attention, backend=backend), leaves, dev)

    def yardstick(dtype):  # the reference computes in its inputs' dtype: genuinely 16-bit
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        return [o.double() for o in call(reconstruction_attention_reference, leaves, "cpu")]

    return run, inputs, yardstick


CASES = {"contrastive_loss": (_contrastive_problems, _contrastive_case),
         "reconstruction_attention": (_attention_problems, _attention_case)}


def _rel_errors(got, want):
    """Relative L2 error of each output: ||got - want|| / max(||want||, NOISE_FLOOR * sqrt(n)).
    The floor keeps outputs that are ~0 by construction (e.g. N = 1 gradients) from turning
    float32 rounding into huge ratios, as the op tests do."""
    out = []
    for gv, wv in zip(got, want):
        gv = gv.detach().double().cpu()
        if gv.shape != wv.shape:
            out.append(float("inf"))
            continue
        floor = NOISE_FLOOR * math.sqrt(max(wv.numel(), 1))
        err = torch.linalg.vector_norm(gv - wv).item() / max(torch.linalg.vector_norm(wv).item(), floor)
        out.append(err if math.isfinite(err) else float("inf"))
    return out


def check_backend(op, backend, device):
    """{"ok", "worst_error", "reason"} of one backend of op on device (runs the problems).
    Independent of the caller's context: it may be reached from inside no_grad, inference
    mode or autocast (the first backend="auto" call of a training or evaluation step)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(kind, enabled=False))
        return _check_backend(op, backend, device)


def _probe(op, spec, leaves):
    """The keyword arguments dispatch gives the backends' supports() for this problem."""
    if op == "contrastive_loss":
        return {"anchors": leaves[0], "candidates": leaves[1]}
    return {"targets": leaves[0], "num_heads": spec["h"]}


def _check_backend(op, backend, device):
    problems, make = CASES[op]
    dev = torch.device(device)
    supports = dispatch._REGISTRY[op][backend].supports
    worst, worst_what, ran, declined = 0.0, "", 0, []
    labels = ("forward",) + tuple(f"grad {i}" for i in range(8))
    for name, spec in problems():
        dtype = getattr(torch, spec["dtype"])
        run, inputs64, yardstick = make(name, spec, dev)
        leaves64 = [x.clone().requires_grad_() for x in inputs64]  # exactly representable in dtype
        leaves = [x.to(device=dev, dtype=dtype).requires_grad_() for x in inputs64]
        if supports is not None and not supports(**_probe(op, spec, leaves)):
            declined.append(name)  # auto never sends this problem to this backend
            continue
        ran += 1
        try:
            want = [w.detach() for w in run("reference", torch.float64, leaves64, "cpu")]
            got = run(backend, dtype, leaves, dev)
        except Exception as exc:  # a crash is a failed check, reported with its message
            return {"ok": False, "worst_error": float("inf"),
                    "reason": f"{name}: raised {type(exc).__name__}: {str(exc)[:300]}"}
        if dtype == torch.float32:
            allowed = [FP32_TOL] * len(want)
        else:
            allowed = [2 * e + BF16_FLOOR for e in _rel_errors(yardstick(dtype), want)]
        for label, err, tol in zip(labels, _rel_errors(got, want), allowed):
            ratio = err / tol
            if not ratio <= worst:  # also catches NaN
                worst, worst_what = ratio, f"{name}, {label}: error {err:.3g} (allowed {tol:.3g})"
    ok = worst <= 1.0 and ran > 0
    verdict = "passed" if ok else "FAILED"
    skipped = f" ({len(declined)} outside its supports(), not run: {'; '.join(declined)})" if declined else ""
    return {"ok": ok, "worst_error": worst,
            "reason": f"{verdict} {ran} problems on {device}{skipped}; worst: {worst_what or 'none ran'}"}


# ----------------------------------------------------------------------------- cache
def cache_dir():
    root = os.environ.get("COURIER_FAST_CACHE_DIR")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "courier_fast")


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _source_hash():
    """sha256 over the package's Python sources, the Triton kernels and the compiled _C."""
    from courier_fast import _extension
    import courier_fast.kernels as kernels

    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "*.py")) + glob.glob(os.path.join(os.path.dirname(kernels.__file__), "*.py")))
    if _extension.loaded():
        files.append(_extension._C.__file__)
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    return digest.hexdigest()[:16]


def _driver_version():
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is not None:
        try:
            return str(getter())
        except Exception:
            pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


def environment(device):
    """What a verdict depends on (the cache key)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name, cap = torch.cuda.get_device_name(index), list(torch.cuda.get_device_capability(index))
        driver = _driver_version()
    else:
        name, cap, driver = platform.processor() or platform.machine(), None, None
    return {"device": name, "capability": cap, "driver": driver, "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda,
            "courier_fast": _version("courier_fast"), "sources": _source_hash()}


def cache_file(device):
    env = environment(device)
    key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), f"selftest-{key}.json"), env


def _fingerprint(op, backend):
    """Identifies the registered implementation (a re-registered one is checked again)."""
    fn = dispatch._REGISTRY[op][backend].fn
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = repr(fn)
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:" + hashlib.sha256(src.encode()).hexdigest()[:12]


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path, env, op, backend, verdict):
    """Merge one verdict into the cache file (atomic replace; a lost race loses nothing but a
    re-check)."""
    from courier_fast.atomic import atomic_path

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read(path) or {"environment": env, "verdicts": {}}
    data["verdicts"].setdefault(op, {})[backend] = verdict
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
    except OSError as exc:  # a read-only cache is not an error: the check reruns next time
        warnings.warn(f"courier_fast.selftest: could not write {path}: {exc}", RuntimeWarning, stacklevel=3)


def _public(verdict):
    return {k: verdict[k] for k in ("ok", "worst_error", "reason")}


def verdict(op, backend, device, force=False):
    """The (cached) self-check verdict of one backend of op on device."""
    path, env = cache_file(device)
    key = (path, op, backend)
    fingerprint = _fingerprint(op, backend)
    if not force:
        hit = _MEMORY.get(key)
        if hit is None:
            hit = ((_read(path) or {}).get("verdicts", {}).get(op, {}).get(backend))
        if hit is not None and hit.get("impl") == fingerprint:
            _MEMORY[key] = hit
            return _public(hit)
    result = {**check_backend(op, backend, device), "impl": fingerprint}
    _MEMORY[key] = result
    _write(path, env, op, backend, result)
    return _public(result)


def cached_verdict(op, backend, device):
    """The cached verdict, or None when this backend has not been checked here yet."""
    path, _ = cache_file(device)
    hit = _MEMORY.get((path, op, backend)) or (_read(path) or {}).get("verdicts", {}).get(op, {}).get(backend)
    return _public(hit) if hit is not None and hit.get("impl") == _fingerprint(op, backend) else None


def trusted(op, backend, device):
    """Whether backend="auto" may use this backend of op on device (see the module doc).
    Memoised per process, so the hot path of an op call is one dict lookup."""
    mode = os.environ.get("COURIER_FAST_VALIDATE", "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return True
    key = (op, backend, str(device), id(dispatch._REGISTRY[op][backend].fn), mode)
    if key in _TRUSTED:
        return _TRUSTED[key]
    if torch.compiler.is_compiling():  # never run the check inside a trace: cached verdicts only
        v = cached_verdict(op, backend, device)
        return bool(v and v["ok"])
    v = verdict(op, backend, device, force=mode == "force")
    if not v["ok"]:
        warnings.warn(f"courier_fast: backend {backend!r} of {op} failed its self-check on {device} "
                      f"(worst error {v['worst_error']:.3g} x allowed): {v['reason']}. "
                      f"backend='auto' uses the next backend.", RuntimeWarning, stacklevel=4)
    _TRUSTED[key] = v["ok"]
    return v["ok"]


def registered(device):
    """{op: [backend, ...]}: the non-reference backends registered for device's type and
    available here."""
    dev, status = torch.device(device).type, dispatch.backends()
    return {op: [name for name, impl in dispatch._REGISTRY[op].items()
                 if name != "reference" and dev in impl.devices and status[name][0]]
            for op in dispatch.ops()}


def selftest(device="cuda", force=False):
    """{op: {backend: {"ok", "worst_error", "reason"}}} for every registered non-reference
    backend of device; cached verdicts unless force."""
    return {op: {name: verdict(op, name, device, force=force) for name in names}
            for op, names in registered(device).items()}

