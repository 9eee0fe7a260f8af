"""Self-check of the kernel backends on the user's own device (docs/design.md §2, §4).

selftest(device) runs every registered non-reference backend of every op on the problems of
courier_fast.ops.selfcheck.problems (odd shapes, masks, empty history rows, causal, fp32 / bf16 /
fp16, every kernel code path a GPU launches), forward and backward, against the float64
reference, and returns {op: {backend: {"ok": bool, "worst_error": float, "reason": str}}}.
A backend runs only the problems its supports() accepts (as auto would); the verdict names the
others.

Judging (courier_fast.ops.selfcheck.tolerances, the one statement of the bar): each output's error relative
to its own norm, against the bar of the precision the backend computes at: float32 1e-5,
float32 with TF32 GEMMs 3e-4, 16-bit twice plain PyTorch's own 16-bit error (+ a quarter of the
dtype's unit roundoff). worst_error is the largest error / allowed ratio over every output of
every problem (<= 1 passes); a NaN or Inf, a crash or a shape mismatch is fatal (inf) and stays
the worst. The float32 matmul settings (torch.backends.cuda.matmul.allow_tf32,
torch.get_float32_matmul_precision()) are pinned while the check runs and are part of the cache
key: a verdict holds for the settings it was obtained under.

Verdicts are cached per environment (device name, compute capability, driver, torch, triton,
CUDA, package version, float32 matmul settings and a hash of the package's sources, Triton
kernels and compiled extension) in the user cache directory ($COURIER_FAST_CACHE_DIR, else
$XDG_CACHE_HOME/courier_fast, else ~/.cache/courier_fast), one JSON file per environment,
written atomically. dispatch.select(backend="auto") calls trusted(), which runs the check of one
backend the first time it is needed. COURIER_FAST_VALIDATE=0 trusts without checking; =force
re-checks once per process.

Across ranks (agree_across_ranks, called by train() before its first step): every rank judges
every auto candidate, the verdicts are all-reduced, and a backend that fails on any rank is vetoed
on all of them, so auto chooses the same backend everywhere. The driver in the cache key is
NVML's version (pynvml) where installed, else /proc/driver/nvidia/version, else a string saying
that the key lacks it.
"""
import contextlib
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import warnings

import torch

from courier_fast import atomic
from courier_fast._metadata import dist_version
from courier_fast.ops import registry
from courier_fast.ops.selfcheck import tolerances
from courier_fast.ops.selfcheck.problems import PROBLEMS

_MEMORY: dict = {}  # (cache file, op, backend) -> verdict, for this process
_TRUSTED: dict = {}  # (op, backend, device, implementation, mode, matmul settings) -> bool


# ----------------------------------------------------------------------------- judging
def matmul_settings():
    """The float32 matmul settings a verdict depends on."""
    return {"allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def pinned_matmul_settings(settings):
    """Hold the float32 matmul settings at `settings` while the check runs; restore after."""
    before = matmul_settings()
    torch.backends.cuda.matmul.allow_tf32 = settings["allow_tf32"]
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before["float32_matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = before["allow_tf32"]


def judge(got, want, cls, yardstick=None):
    """[(error, allowed)] for each output of one problem: rel_error against the float64
    reference `want`, allowed by precision class `cls` ("fp32", "tf32", "bf16", "fp16"); for
    the 16-bit classes `yardstick` holds plain PyTorch's outputs in that dtype."""
    out = []
    for i, (g, w) in enumerate(zip(got, want)):
        yard = None if yardstick is None else tolerances.rel_error(yardstick[i], w)
        out.append((tolerances.rel_error(g, w), tolerances.allowed_error(cls, yard)))
    return out


def _worse(ratio, worst):
    """Whether ratio replaces worst: any NaN counts as inf, and inf is never replaced."""
    ratio = math.inf if math.isnan(ratio) else ratio
    return ratio > worst


def check_backend(op, backend, device):
    """{"ok", "worst_error", "reason"} of one backend of op on device (runs the problems).
    Independent of the caller's context: it may be reached from inside no_grad, inference
    mode or autocast (the first backend="auto" call of a training or evaluation step), and it
    runs under the caller's float32 matmul settings, pinned for its duration."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(kind, enabled=False))
        stack.enter_context(pinned_matmul_settings(matmul_settings()))
        return _check_backend(op, backend, device)


def _check_backend(op, backend, device):
    problems, make = PROBLEMS[op]
    dev = torch.device(device)
    supports = registry.implementations(op)[backend].supports
    worst, worst_what, ran, declined = 0.0, "", 0, []
    labels = ("output",) + tuple(f"grad {i}" for i in range(8))
    for name, spec in problems:
        case = make(name, spec)
        leaves64 = [x.clone().requires_grad_() for x in case.inputs]
        leaves = [x.to(device=dev, dtype=case.dtype).requires_grad_() for x in case.inputs]
        if supports is not None and not supports(**case.probe(leaves)):
            declined.append(name)  # auto never sends this problem to this backend
            continue
        ran += 1
        try:
            want = [w.detach() for w in case.run("reference", torch.float64, leaves64, "cpu")]
            got = case.run(backend, case.dtype, leaves, dev)
        except Exception as exc:  # a crash is a failed check, reported with its message
            return {"ok": False, "worst_error": math.inf,
                    "reason": f"{name}: raised {type(exc).__name__}: {str(exc)[:300]}"}
        cls = tolerances.matmul_class(case.dtype, dev)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cls)
        yard = None if low is None else case.yardstick(low)
        for label, (err, tol) in zip(labels, judge(got, want, cls, yard)):
            ratio = err / tol
            if _worse(ratio, worst):
                worst = math.inf if math.isnan(ratio) else ratio
                worst_what = f"{name}, {label}: error {err:.3g} (allowed {tol:.3g}, {cls})"
    ok = worst <= 1.0 and ran > 0
    verdict = "passed" if ok else "FAILED"
    skipped = f" ({len(declined)} outside its supports(), not run: {'; '.join(declined)})" if declined else ""
    return {"ok": ok, "worst_error": worst,
            "reason": f"{verdict} {ran} problems on {device}{skipped}; worst: {worst_what or 'none ran'}"}


# ----------------------------------------------------------------------------- cache
cache_dir = atomic.cache_dir  # shared with the Triton autotuner's cache (kernels/_tune_cache.py)


def source_files():
    """What a verdict was computed from: the package's Python sources, the Triton kernels and
    the compiled _C (a change to any of them re-validates)."""
    from courier_fast import _extension
    import courier_fast.kernels as kernels

    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # courier_fast/
    files = sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(os.path.dirname(kernels.__file__), "*.py")))
    if _extension.loaded():
        files.append(_extension._C.__file__)
    return files


def _source_hash(files):
    """sha256 (16 hex digits) of the files' names and contents; hashed again only when one's
    size or modification time changed."""
    stamps = []
    for path in files:
        st = os.stat(path)
        stamps.append((path, st.st_mtime_ns, st.st_size))
    return _hash_contents(tuple(stamps))


@functools.lru_cache(maxsize=None)
def _hash_contents(stamps):
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    return digest.hexdigest()[:16]


def _driver_version():
    """The NVIDIA driver version for the cache key: NVML's (pynvml / nvidia-ml-py) where
    installed, else the first line of /proc/driver/nvidia/version, else a string saying the key
    lacks it (torch has no driver-version call: torch._C._cuda_getDriverVersion does not exist)."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                version = pynvml.nvmlSystemGetDriverVersion()
            finally:
                pynvml.nvmlShutdown()
            return "nvml " + (version.decode() if isinstance(version, bytes) else str(version))
        except Exception:  # noqa: BLE001  (NVMLError and its many subclasses)
            pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return "unknown: no NVML (pip install nvidia-ml-py) and no /proc/driver/nvidia/version; the key lacks it"


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
            "triton": dist_version("triton"), "cuda": torch.version.cuda,
            "courier_fast": dist_version("courier_fast"), "sources": _source_hash(source_files()),
            "matmul": matmul_settings()}


def cache_file(device):
    env = environment(device)
    key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), f"selftest-{key}.json"), env


def _fingerprint(op, backend):
    """Identifies the registered implementation (a re-registered one is checked again)."""
    fn = registry.implementations(op)[backend].fn
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = repr(fn)
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:" + hashlib.sha256(src.encode()).hexdigest()[:12]


def _write(path, env, op, backend, verdict):
    """Merge one verdict into the cache file (atomic replace; a lost race loses nothing but a
    re-check)."""
    from courier_fast.atomic import atomic_path

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = atomic.read_json(path) or {"environment": env, "verdicts": {}}
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
            hit = ((atomic.read_json(path) or {}).get("verdicts", {}).get(op, {}).get(backend))
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
    hit = _MEMORY.get((path, op, backend)) or (atomic.read_json(path) or {}).get("verdicts", {}).get(op, {}).get(backend)
    return _public(hit) if hit is not None and hit.get("impl") == _fingerprint(op, backend) else None


def trusted(op, backend, device):
    """Whether backend="auto" may use this backend of op on device (see the module doc).
    Memoised per process, so the hot path of an op call is one dict lookup. Inside a
    torch.compile trace it is a constant of the graph (_trusted_in_trace)."""
    if torch.compiler.is_compiling():
        return _trusted_in_trace(op, backend, str(device))
    return _trusted(op, backend, device, may_check=True)


def _constant_in_traces(fn):
    """torch.compiler.assume_constant_result(fn) without importing torch._dynamo when courier_fast
    is imported (about a second, and it probes optional packages): that decorator only sets this
    marker, which Dynamo reads (torch 2.14 and 2.15). If a torch version stops honouring it,
    tests/ops/test_compile_validated_dispatch.py fails."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_in_traces
def _trusted_in_trace(op, backend, device):
    """trusted() for a torch.compile trace: run eagerly once and baked into the graph as a
    constant, because what it reads (the matmul settings, the cache file) cannot be traced (with
    fullgraph=True the trace failed on torch.get_float32_matmul_precision). It never runs the
    check: cached verdicts only."""
    return _trusted(op, backend, device, may_check=False)


def _trusted(op, backend, device, may_check):
    mode = os.environ.get("COURIER_FAST_VALIDATE", "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return True
    settings = matmul_settings()
    key = (op, backend, str(device), id(registry.implementations(op)[backend].fn), mode,
           settings["allow_tf32"], settings["float32_matmul_precision"])
    if key in _TRUSTED:
        return _TRUSTED[key]
    if not may_check:  # never run the check inside a trace: cached verdicts only
        v = cached_verdict(op, backend, device)
        return bool(v and v["ok"])
    v = verdict(op, backend, device, force=mode == "force")
    if not v["ok"]:
        warnings.warn(f"courier_fast: backend {backend!r} of {op} failed its self-check on {device} "
                      f"(worst error {v['worst_error']:.3g} x allowed): {v['reason']}. "
                      f"backend='auto' uses the next backend.", RuntimeWarning, stacklevel=6)
    _TRUSTED[key] = v["ok"]
    return v["ok"]


def registered(device):
    """{op: [backend, ...]}: the non-reference backends registered for device's type and
    available here."""
    dev, status = torch.device(device).type, registry.backends()
    return {op: [name for name, impl in registry.implementations(op).items()
                 if name != "reference" and dev in impl.devices and status[name][0]]
            for op in registry.ops()}


def selftest(device="cuda", force=False):
    """{op: {backend: {"ok", "worst_error", "reason"}}} for every registered non-reference
    backend of device; cached verdicts unless force."""
    return {op: {name: verdict(op, name, device, force=force) for name in names}
            for op, names in registered(device).items()}



# ----------------------------------------------------------------------------- ranks that agree
def agree_across_ranks(device, group=None):
    """Make backend="auto" choose the same backend of every op on every rank of `group` (a
    collective: every rank calls it, e.g. train() before its first step). Each rank judges every
    auto candidate of every op on its `device` (available here, and self-checked where the
    backend validates), one all-reduce (MIN) of the verdicts follows, and a backend that is not
    usable on every rank is vetoed here: auto then skips it on every rank, so each call takes the
    first backend valid everywhere (a rank falling back to `reference` alone would raise under
    ring=True while the others wait in the ring until the timeout). Returns {op: the first
    backend usable on every rank (before supports(), which depends on the call)}."""
    import torch.distributed as dist

    dev = torch.device(device)
    order = registry.AUTO_ORDER.get(dev.type, ("reference",))
    status = registry.backends()
    table, local = [], []
    for op in sorted(registry.ops()):  # the same layout on every rank, whatever is registered where
        impls = registry.implementations(op)
        for name in order:
            impl = impls.get(name)
            ok = (impl is not None and impl.auto and dev.type in impl.devices and status.get(name, (False,))[0]
                  and (not impl.validate or trusted(op, name, dev)))
            table.append((op, name))
            local.append(1 if ok else 0)
    votes = torch.tensor(local, dtype=torch.int32, device=dev)
    dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=group)
    agreed = {}
    for (op, name), vote in zip(table, votes.tolist()):
        if vote:
            agreed.setdefault(op, name)
        else:
            registry.veto(op, name, dev)
    return agreed


# auto asks the registry, which asks this module (late-bound, so a patched `trusted` is seen):
# dispatch never imports the self-check, and the self-check's problems may call the ops.
registry.set_validator(lambda op, backend, device: trusted(op, backend, device))
