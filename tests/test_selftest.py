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
from courier_fast import backend_check, dispatch

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
    monkeypatch.setitem(dispatch._REGISTRY[OP], "cpu", dispatch._REGISTRY[OP]["cpu"])
    real = dispatch._REGISTRY[OP]["chunked"].fn

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
    assert fn is dispatch._REGISTRY[OP]["chunked"].fn  # the next backend in AUTO_ORDER
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
    monkeypatch.setitem(dispatch._REGISTRY[OP], "cpu", dispatch._REGISTRY[OP]["cpu"])

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
    impl = dispatch._REGISTRY[OP]["chunked"]
    calls = []

    def fn(*args, **kwargs):
        calls.append(args[0].shape[-1])
        return impl.fn(*args, **kwargs)

    only_narrow = lambda anchors, **_: anchors.shape[-1] <= 64
    monkeypatch.setitem(dispatch._REGISTRY[OP], "chunked", dataclasses.replace(impl, fn=fn, supports=only_narrow))
    v = backend_check.check_backend(OP, "chunked", "cpu")
    assert v["ok"], v
    assert "outside its supports(), not run" in v["reason"] and "d=100" in v["reason"]
    assert calls and max(calls) <= 64
