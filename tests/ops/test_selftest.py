"""Validated dispatch: the self-check, its cache, COURIER_FAST_VALIDATE, and auto skipping a
backend that fails (here: a deliberately wrong implementation registered on CPU)."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import courier_fast as cf
from courier_fast.ops.selfcheck import check as backend_check
from courier_fast.ops import dispatch

OP = "contrastive_loss"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A private verdict cache and fresh per-process memo for one test."""
    monkeypatch.setenv("COURIER_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("COURIER_FAST_VALIDATE", raising=False)
    monkeypatch.setattr(backend_check, "_MEMORY", {})
    monkeypatch.setattr(backend_check, "_TRUSTED", {})
    return tmp_path


@pytest.fixture
def wrong_cpu_backend(monkeypatch):
    """Registers, through the public dispatch.register, a `cpu` loss that is 1 % off (and
    restores the real one afterwards)."""
    monkeypatch.setitem(dispatch.implementations(OP), "cpu", dispatch.implementations(OP)["cpu"])
    real = dispatch.implementations(OP)["chunked"].fn

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    dispatch.register(OP, "cpu", wrong, devices=("cpu",))
    return wrong


def _probe(n):
    x = torch.zeros(n, 4)
    return {"anchors": x, "candidates": x}


def test_wrong_implementation_is_rejected_and_never_picked_by_auto(cache, wrong_cpu_backend):
    with pytest.warns(RuntimeWarning, match=r"'cpu' of contrastive_loss failed its self-check on cpu"):
        fn = dispatch.select(OP, "auto", torch.device("cpu"), probe=_probe(8))
    assert fn is not wrong_cpu_backend
    assert fn is dispatch.implementations(OP)["chunked"].fn  # the next backend in AUTO_ORDER
    v = backend_check.verdict(OP, "cpu", "cpu")
    assert v["ok"] is False and v["worst_error"] > 1 and "FAILED" in v["reason"]
    # and a real call through auto gives the right loss
    a, c = torch.randn(9, 5), torch.randn(9, 5)
    torch.testing.assert_close(cf.contrastive_loss(a, c), cf.contrastive_loss(a, c, backend="reference"))


def test_failing_backend_warns_once(cache, wrong_cpu_backend, recwarn):
    for _ in range(3):
        dispatch.select(OP, "auto", torch.device("cpu"), probe=_probe(8))
    assert sum("failed its self-check" in str(w.message) for w in recwarn) == 1


def test_correct_backend_passes_and_verdict_is_cached_on_disk(cache, monkeypatch):
    v = backend_check.verdict(OP, "chunked", "cpu")
    assert v["ok"] and 0 <= v["worst_error"] <= 1, v
    path, env = backend_check.cache_file("cpu")
    data = json.loads(open(path).read())
    assert data["environment"] == env and data["verdicts"][OP]["chunked"]["ok"]
    assert not [f for f in os.listdir(cache) if ".tmp" in f]  # atomic: no leftovers
    monkeypatch.setattr(backend_check, "_MEMORY", {})  # a new process: the disk cache answers
    monkeypatch.setattr(backend_check, "check_backend", lambda *a: pytest.fail("re-ran a cached check"))
    assert backend_check.verdict(OP, "chunked", "cpu") == v


def test_cache_key_covers_the_environment(cache):
    env = backend_check.environment("cpu")
    for key in ("device", "capability", "driver", "torch", "triton", "cuda", "courier_fast", "sources"):
        assert key in env


def test_validate_0_trusts_and_force_rechecks(cache, wrong_cpu_backend, monkeypatch):
    calls = []
    real_check = backend_check.check_backend
    monkeypatch.setattr(backend_check, "check_backend", lambda *a: calls.append(a) or real_check(*a))
    monkeypatch.setenv("COURIER_FAST_VALIDATE", "0")
    assert dispatch.select(OP, "auto", torch.device("cpu"), probe=_probe(8)) is wrong_cpu_backend
    assert not calls
    monkeypatch.setenv("COURIER_FAST_VALIDATE", "1")
    with pytest.warns(RuntimeWarning):
        dispatch.select(OP, "auto", torch.device("cpu"), probe=_probe(8))
    assert len(calls) == 1
    monkeypatch.setenv("COURIER_FAST_VALIDATE", "force")  # cached, but checked again: once
    with pytest.warns(RuntimeWarning):
        for _ in range(2):
            dispatch.select(OP, "auto", torch.device("cpu"), probe=_probe(8))
    assert len(calls) == 2


def test_a_crashing_backend_fails_with_its_message(cache, monkeypatch):
    monkeypatch.setitem(dispatch.implementations(OP), "cpu", dispatch.implementations(OP)["cpu"])

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    dispatch.register(OP, "cpu", broken, devices=("cpu",))
    v = backend_check.verdict(OP, "cpu", "cpu")
    assert not v["ok"] and v["worst_error"] == float("inf") and "no kernel image" in v["reason"]


def test_auto_on_cuda_never_reaches_the_dense_reference_for_large_n():
    names = dispatch.candidates(OP, torch.device("cuda"), _probe(65536))
    assert "reference" not in names and names[-1] == "chunked"
    assert dispatch.AUTO_ORDER["cuda"][:3] == ("cuda", "triton", "chunked")
    assert "reference" in dispatch.candidates(OP, torch.device("cuda"), _probe(64))  # small N only
    assert "reference" not in dispatch.candidates(OP, torch.device("cpu"), _probe(65536))


def test_cli_selftest_on_cpu_runs_the_interpreter_and_passes(tmp_path):
    """`courier-fast selftest --device cpu --json`: every CPU backend (Triton in its
    interpreter) passes."""
    env = {**os.environ, "COURIER_FAST_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the command sets it for its own process
    cmd = [sys.executable, "-m", "courier_fast", "selftest", "--device", "cpu", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    verdicts = json.loads(run.stdout)
    assert set(verdicts) == {"contrastive_loss", "reconstruction_attention"}
    assert {"cpu", "chunked"} <= set(verdicts["contrastive_loss"])
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in verdicts["reconstruction_attention"] and "triton" in verdicts["contrastive_loss"]
    for per_backend in verdicts.values():
        for v in per_backend.values():
            assert v["ok"] and set(v) == {"ok", "worst_error", "reason"}


def test_check_is_independent_of_the_callers_grad_mode(cache):
    """The first auto call may come from an evaluation loop under no_grad / inference_mode."""
    with torch.inference_mode():
        v = backend_check.check_backend(OP, "chunked", "cpu")
    assert v["ok"], v


def test_selftest_function_returns_every_backend_verdict(cache, monkeypatch):
    """courier_fast.selftest(device, force) -> {op: {backend: {ok, worst_error, reason}}}."""
    seen = []
    monkeypatch.setattr(backend_check, "verdict", lambda op, backend, device, force=False: seen.append(
        (op, backend, device, force)) or {"ok": True, "worst_error": 0.0, "reason": "stub"})
    out = cf.selftest("cpu", force=True)
    assert set(out) == set(dispatch.ops()) and {"cpu", "chunked"} <= set(out[OP])
    assert "reference" not in out[OP] and all(f for *_, f in seen)


def test_problems_outside_a_backends_supports_are_not_run(cache, monkeypatch):
    """A backend that declines some calls (e.g. Triton with wide fp32 inputs on a GPU) is checked
    on the problems auto would send it, and the verdict names the ones it skipped."""
    impl = dispatch.implementations(OP)["chunked"]
    calls = []

    def fn(*args, **kwargs):
        calls.append(args[0].shape[-1])
        return impl.fn(*args, **kwargs)

    only_narrow = lambda anchors, **_: anchors.shape[-1] <= 64
    monkeypatch.setitem(dispatch.implementations(OP), "chunked", dataclasses.replace(impl, fn=fn, supports=only_narrow))
    v = backend_check.check_backend(OP, "chunked", "cpu")
    assert v["ok"], v
    assert "outside its supports(), not run" in v["reason"] and "d=100" in v["reason"]
    assert calls and max(calls) <= 64


# ----------------------------------------------------------------------------- the bar itself
def _synthetic(monkeypatch, outputs_by_backend, dtype=torch.float32, yardstick=None):
    """Replace the loss's problems by one synthetic problem whose reference output is `want`
    and whose backend outputs are given, so the judging can be driven exactly."""
    from courier_fast.ops.selfcheck.problems import Case

    want = outputs_by_backend["reference"]

    def make(name, spec):
        run = lambda backend, dt, leaves, dev: [o.clone() for o in outputs_by_backend[backend]]
        return Case([torch.zeros(2, 3, dtype=torch.float64)], dtype, run,
                    lambda leaves: {"anchors": leaves[0], "candidates": leaves[0]},
                    lambda low: [o.clone() for o in (yardstick if yardstick is not None else want)])

    monkeypatch.setitem(backend_check.PROBLEMS, OP, ([("synthetic", {})], make))


def _at_relative_error(want, rel, gen):
    """want + a random perturbation whose L2 norm is exactly rel * ||want||."""
    noise = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    return want + noise * (rel * want.norm() / noise.norm())


@pytest.mark.parametrize("cls,dtype,precision", [("fp32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                                                 ("bf16", torch.bfloat16, "highest"), ("fp16", torch.float16, "highest")])
def test_an_error_just_above_the_bar_is_rejected_and_just_below_passes(cache, monkeypatch, gen, cls, dtype, precision):
    """The stated tolerances (courier_fast.ops.selfcheck.tolerances) are the ones applied: per output, relative
    to its own norm, 1 % above the bar fails and 1 % below passes."""
    from courier_fast.ops.selfcheck import tolerances

    # Set through the self-check's own helper, never by monkeypatching torch's module objects:
    # torch serves allow_tf32 through __getattr__, and pytest >= 9.2 undoes such a patch with a
    # delattr that raises and leaves the test's other patches in place.
    with backend_check.pinned_matmul_settings({"allow_tf32": False, "float32_matmul_precision": precision}):
        want = [torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)]
        yard = None
        if cls in ("bf16", "fp16"):
            yard = [_at_relative_error(w, 3e-3, gen) for w in want]  # plain PyTorch's own error: 3e-3
        allowed = tolerances.allowed_error(cls, 3e-3 if yard else None)
        assert tolerances.matmul_class(dtype, "cpu") == cls
        for factor, ok in ((1.01, False), (0.99, True)):
            got = [want[0], _at_relative_error(want[1], factor * allowed, gen)]  # only the gradient is off
            _synthetic(monkeypatch, {"reference": want, "cpu": got}, dtype=dtype, yardstick=yard)
            v = backend_check.check_backend(OP, "cpu", "cpu")
            assert v["ok"] is ok, (factor, v)
            assert abs(v["worst_error"] - factor) < 1e-6, v
    assert tolerances.FP32 == 1e-5 and tolerances.TF32 == 3e-4 and tolerances.HALF_FACTOR == 2.0  # docs/design.md §4


def test_nan_is_fatal_and_stays_the_worst(cache, monkeypatch, gen):
    """A NaN in one output fails the verdict even when a later output is finite and accurate."""
    from courier_fast.ops.selfcheck.problems import Case

    want = [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    outputs = {"reference": want, "cpu": [torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), want[1]]}
    _synthetic(monkeypatch, outputs)
    v = backend_check.check_backend(OP, "cpu", "cpu")
    assert not v["ok"] and v["worst_error"] == float("inf") and "grad 0" not in v["reason"], v
    assert backend_check._worse(float("nan"), 0.5) and not backend_check._worse(0.5, float("inf"))


def test_an_output_zero_by_contract_must_be_exactly_zero(gen):
    from courier_fast.ops.selfcheck import tolerances

    zero = torch.zeros(4, dtype=torch.float64)
    assert tolerances.rel_error(zero.clone(), zero) == 0.0
    assert tolerances.rel_error(torch.full((4,), 1e-30, dtype=torch.float64), zero) == float("inf")


def test_matmul_settings_are_pinned_during_the_check_and_key_the_cache(cache, monkeypatch):
    """The verdict belongs to the float32 matmul settings it ran under: they are in the cache key,
    held while the check runs (a backend cannot change them midway) and restored after."""
    seen = []

    def run_that_changes_settings(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        torch.set_float32_matmul_precision("medium")
        return real(*args, **kwargs)

    real = dispatch.implementations(OP)["chunked"].fn
    monkeypatch.setitem(dispatch.implementations(OP), "chunked",
                        dataclasses.replace(dispatch.implementations(OP)["chunked"], fn=run_that_changes_settings))
    before = torch.get_float32_matmul_precision()
    path_highest, env = backend_check.cache_file("cpu")
    assert env["matmul"] == backend_check.matmul_settings()
    try:
        torch.set_float32_matmul_precision("high")
        path_high, _ = backend_check.cache_file("cpu")
        backend_check.check_backend(OP, "chunked", "cpu")
        assert torch.get_float32_matmul_precision() == "high"  # restored after the check
        assert seen and seen[0] == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert path_high != path_highest


def test_editing_a_kernel_source_revalidates(cache, monkeypatch, tmp_path):
    """The cache key hashes the sources: an edited kernel file gives another cache file, so the
    next verdict runs the check again instead of trusting the old one."""
    import courier_fast.kernels.contrastive_lse as kernel_file

    copy = tmp_path / "contrastive_lse.py"
    copy.write_bytes(open(kernel_file.__file__, "rb").read())
    monkeypatch.setattr(backend_check, "source_files", lambda: [str(copy)])
    calls = []
    monkeypatch.setattr(backend_check, "check_backend",
                        lambda *a: calls.append(a) or {"ok": True, "worst_error": 0.0, "reason": "stub"})
    backend_check.verdict(OP, "chunked", "cpu")
    backend_check.verdict(OP, "chunked", "cpu")
    assert len(calls) == 1  # cached
    before, _ = backend_check.cache_file("cpu")
    with open(copy, "a") as f:
        f.write("\n# edited\n")
    after, _ = backend_check.cache_file("cpu")
    assert after != before
    backend_check.verdict(OP, "chunked", "cpu")
    assert len(calls) == 2  # re-validated


# ----------------------------------------------------------------------------- coverage
def test_problems_reach_every_triton_loss_path_a_gpu_launches():
    """Each (kernel, constexpr branch, dtype) the Triton loss can launch on a GPU is exercised by
    a self-check problem that its GPU supports() accepts: a verdict vouches for no unchecked path."""
    pytest.importorskip("triton")
    from courier_fast.kernels import contrastive_lse as lse
    from courier_fast.ops.selfcheck.problems import CONTRASTIVE, contrastive_paths

    covered = set()
    for _, spec in CONTRASTIVE:
        dtype = getattr(torch, spec["dtype"])
        if dtype == torch.float32 and spec["d"] > lse.FP32_MAX_D:
            continue  # declined on a GPU
        covered |= contrastive_paths(spec["d"], spec["dtype"], spec.get("symmetric", False))
    reachable = set()
    for dtype in ("float32", "bfloat16", "float16"):
        for d in (3, 16, 64, 100, 128, 129, 256, 300, 512, 513, 700, 1024):
            if dtype == "float32" and d > lse.FP32_MAX_D:
                continue
            for symmetric in (False, True):
                reachable |= contrastive_paths(d, dtype, symmetric)
    assert reachable - covered == set()


def test_problems_reach_every_triton_attention_path_a_gpu_launches():
    pytest.importorskip("triton")
    from courier_fast.kernels import reconstruction_attention as attn
    from courier_fast.ops.selfcheck.problems import ATTENTION, ATTENTION_CAUSAL, ATTENTION_LAYOUTS, attention_paths

    covered = set()
    for _, spec in ATTENTION:
        dh = spec["d"] // spec["h"]
        if spec["dtype"] == "float32" and dh > attn.FP32_MAX_HEAD_DIM:
            continue
        covered |= attention_paths(spec["p"], spec["length"], dh, spec["dtype"], spec.get("causal", False),
                                   spec.get("layout", "padded"))
    reachable = set()
    for dtype in ("float32", "bfloat16", "float16"):
        for dh in (8, 16, 32, 64, 128, 256):
            if dtype == "float32" and dh > attn.FP32_MAX_HEAD_DIM:
                continue
            for p, length in ((1, 1), (300, 300)):
                for causal in ATTENTION_CAUSAL:
                    for layout in ATTENTION_LAYOUTS:
                        reachable |= attention_paths(p, length, dh, dtype, causal, layout)
    assert reachable - covered == set()


@pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")
def test_problems_take_the_compiled_loss_across_several_tiles():
    """At least one fp32 and one 16-bit loss problem runs the C++/CUDA op on several row tiles
    (the automatic size would be one tile at these N), so a verdict covers the column updates
    and gradient sums between tiles."""
    from courier_fast.ops.selfcheck.problems import CONTRASTIVE, _tiles

    multi = set()
    for _, spec in CONTRASTIVE:
        if spec.get("tile_rows"):
            with _tiles(spec["tile_rows"]):
                rows = torch.ops.courier_fast.lse_tile_rows(spec["n"], spec["n"], True)
            assert rows == spec["tile_rows"] and spec["n"] > 2 * rows
            multi.add(spec["dtype"] == "float32")
    assert torch.ops.courier_fast.lse_tile_rows(150, 150, True) >= 150  # outside: one tile
    assert multi == {True, False}
