"""Shared test helpers: which backends run here, fresh random inputs, tolerances, and the tiny
generated world (+ a one-thread fixture) of the model / train / embed / CLI tests.

Seeds: every run draws one base seed (or reads COURIER_TEST_SEED), prints it in the header and
with every failure; each test's seed is a hash of it and the test's id, and torch, numpy and
random are seeded with it before the test (the `seed` fixture returns it, `gen` is a torch
Generator seeded with it). COURIER_TEST_SEED=<printed seed> reruns with the same inputs.
"""
import importlib.util
import os
import random
import sys
import secrets
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter (read when kernels are defined: set it first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from courier_fast.ops import dispatch  # noqa: E402


BASE_SEED = int(os.environ.get("COURIER_TEST_SEED") or secrets.randbelow(2**31))


def seed_of(nodeid):
    """The seed of the test with this id under BASE_SEED."""
    return zlib.crc32(f"{BASE_SEED}:{nodeid}".encode()) & 0x7FFFFFFF


def _versions():
    """The versions a failure report needs: what this run resolved, not what the docs assume."""
    import importlib.metadata
    import platform

    out = [f"python {platform.python_version()}"]
    for dist in ("torch", "triton", "pytest", "numpy", "open_clip_torch"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def pytest_report_header(config):
    return [f"courier_fast tests: COURIER_TEST_SEED={BASE_SEED} (set it to rerun with the same random inputs)",
            f"courier_fast tests ran with: {_versions()}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("courier_fast seed", f"COURIER_TEST_SEED={BASE_SEED} reproduces this test "
                                                      f"(its own seed: {seed_of(item.nodeid)})"))


@pytest.fixture(autouse=True)
def seed(request):
    """This test's seed; torch, numpy and random are seeded with it before the test runs."""
    s = seed_of(request.node.nodeid)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


@pytest.fixture(autouse=True)
def input_checks_restored():
    """Fails the test that leaves courier_fast's global input checks off (set_input_checks(False)
    without restoring it): every later validation test would stop raising."""
    from courier_fast import _validate
    yield
    if not _validate._DATA_CHECKS:
        _validate.set_input_checks(True)
        pytest.fail("this test left courier_fast's input checks off; use `with _validate.input_checks(False):`")


def _global_state():
    """torch's float32 matmul settings and courier_fast's registry of backends and self-check
    problems: process-wide state a test may patch, which must be as it was after every test."""
    from courier_fast.ops.selfcheck import check as backend_check
    from courier_fast.ops import registry

    return {"matmul settings": backend_check.matmul_settings(),
            "backend registry": {op: dict(impls) for op, impls in registry._REGISTRY.items()},
            "self-check problems": dict(backend_check.PROBLEMS)}


def _restore_global_state(state):
    from courier_fast.ops.selfcheck import check as backend_check
    from courier_fast.ops import registry

    torch.backends.cuda.matmul.allow_tf32 = state["matmul settings"]["allow_tf32"]
    torch.set_float32_matmul_precision(state["matmul settings"]["float32_matmul_precision"])
    registry._REGISTRY.clear()
    registry._REGISTRY.update({op: dict(impls) for op, impls in state["backend registry"].items()})
    backend_check.PROBLEMS.clear()
    backend_check.PROBLEMS.update(state["self-check problems"])


@pytest.fixture(autouse=True)
def global_state_restored():
    """Fails the test that leaves the matmul settings, the backend registry or the self-check's
    problems changed (after its own monkeypatch undo, which runs first), and puts them back, so
    one failing test cannot fail the tests after it."""
    before = _global_state()
    yield
    after = _global_state()
    changed = [name for name in before if before[name] != after[name]]
    if changed:
        _restore_global_state(before)
        pytest.fail(f"this test left global state changed: {', '.join(changed)} (restore it, e.g. "
                    f"with monkeypatch.setitem or backend_check.pinned_matmul_settings)")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Path of a tiny generated world (60 items, 16 px), made once per session; read-only
    (a test that needs to damage it copies it first). Test files with their own `world` override it."""
    from courier_fast.data.generate import WorldConfig, generate

    root = tmp_path_factory.mktemp("world")
    generate(str(root), seed=0, config=WorldConfig(items=60, users=12, requests_per_user=8, image_size=16))
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on the shared 2-core CPU, OpenMP threads waiting on each
    other make tiny models seconds slower per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where the triton backend runs: the GPU when there is one, else the CPU interpreter (above).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def import_bench(name):
    """bench/<name>.py as a module, leaving sys.path as it was. The bench scripts put bench/ on
    sys.path themselves; left there, spawned test workers would import bench/conftest.py as
    `conftest` instead of this file."""
    before = list(sys.path)
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = before


def usable_backends(op, device="cpu"):
    """Backends that implement `op` and can run on `device` here (reference first)."""
    names = []
    for name, (ok, _) in dispatch.op_backends(op).items():
        impl = dispatch.implementations(op).get(name)
        if ok and impl is not None and device in impl.devices:
            names.append(name)
    return names


def launchable(op, backend, **probe):
    """Whether `backend` of `op` launches this call on this machine (its supports(): e.g. the
    Triton kernels take fp32 only up to d = 64 / head dim 64 on a GPU). A declined call asked for
    by name raises a ValueError naming the limit: tests check that instead of the numbers. The
    dense reference's supports() is only auto's size preference, never a limit."""
    impl = dispatch.implementations(op).get(backend)
    if backend == "reference" or impl is None or impl.supports is None:
        return True
    return bool(impl.supports(**probe))


def backend_params(op):
    """pytest params: every backend of `op` on CPU, plus CUDA-device ones marked to skip without a GPU."""
    params = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in usable_backends(op, "cpu")]
    for name, impl in dispatch.implementations(op).items():
        if "cuda" in impl.devices:
            params.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=[requires_cuda, pytest.mark.cuda]))
    return params


@pytest.fixture
def gen(seed):
    """A torch Generator seeded with the test's seed (a different stream per test)."""
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, device="cpu", requires_grad=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def rand_mask(gen, *shape, p=0.5, device="cpu"):
    return (torch.rand(*shape, generator=gen) < p).to(device)


TOL = {  # (rtol, atol) against the float64 reference
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
}
FP32_ONLY = {"triton"}  # backends that compute float64 inputs in float32


def tol(backend, dtype):
    return TOL[torch.float32 if backend in FP32_ONLY else dtype]
