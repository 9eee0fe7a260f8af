"""bench/gpu_session.py (issue 31 item 7): the GPU session trains (tests/training/test_train_cuda.py as its
own step, before the benchmarks), fits 8 minutes so that a 15-minute lease has room for a second
try, and says which optional parts the machine lacks instead of failing their steps."""
from conftest import import_bench

gs = import_bench("gpu_session")


def test_the_session_has_a_training_step_and_fits_eight_minutes():
    steps = gs.plan(False, "python3", "NVIDIA_H100", "/scratch", cpus=16)
    by_name = {s.name: s for s in steps}
    train = by_name["pytest_train_cuda"]
    assert "tests/training/test_train_cuda.py" in train.argv and train.argv[train.argv.index("-m", 3) + 1] == "cuda"
    assert train.budget > 0
    names = [s.name for s in steps]
    assert names.index("pytest_train_cuda") < min(i for i, n in enumerate(names) if n.startswith("bench_"))
    rest = by_name["pytest_cuda_rest"]
    assert "--ignore=tests/training/test_train_cuda.py" in rest.argv  # not run twice
    assert sum(s.budget for s in steps) <= gs.DEADLINE_S["gpu"] <= 8 * 60


def test_probe_names_the_optional_parts_the_machine_lacks(monkeypatch):
    assert set(gs.OPTIONAL_MODULES) >= {"dali", "open_clip", "duckdb", "faiss"}
    monkeypatch.setattr(gs, "OPTIONAL_MODULES", {"dali": "nvidia.no_such_dali", "json": "json",
                                                 "faiss": "no_such_faiss_module"})
    assert gs.missing_optional() == ["dali", "faiss"]
    env = gs.probe()
    assert env["optional_missing"] == ["dali", "faiss"]
