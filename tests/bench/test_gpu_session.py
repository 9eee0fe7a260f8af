"""bench/gpu_session.sh: the one call a lent GPU gets. Its --dry-run walks every step on CPU and
is checked here (CI has no GPU, so this is what proves the script works); a run with a broken
and a timed-out step shows that later steps still run and both are recorded; the pytest-output
reader, the time rule and the process killing are checked on their own."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import import_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gs = import_bench("gpu_session")


def run_script(args, out, timeout):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def tracked_results():
    """git's view of bench/results (committed results must not change)."""
    return subprocess.run(["git", "status", "--porcelain", "--", "bench/results"], cwd=ROOT,
                          capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session_out")
    before = tracked_results()
    proc = run_script(["--dry-run"], out, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "cpu-gpu_session.json") as f:
        session = json.load(f)
    return out, session, proc.stdout, before


def by_name(session):
    return {s["name"]: s for s in session["steps"]}


def test_dry_run_walks_every_step_in_order(dry_run):
    out, session, stdout, before = dry_run
    planned = [s.name for s in gs.plan(True, sys.executable, "cpu", str(out))]
    assert [s["name"] for s in session["steps"]] == planned
    assert session["schema"] == gs.SCHEMA and session["dry_run"] is True and session["all_steps_ran"] is True
    env = session["environment"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert "commit" in env["git"] and "dirty" in env["git"] or env["git"].get("error")
    for step in session["steps"]:
        assert step["status"] == "ok", (step["name"], step.get("output_tail", "")[-1500:])
        assert step["rc"] == 0 and step["timed_out"] is False
        assert 0 < step["seconds"] <= step["limit_s"] and step["command"]
    assert all(step["output"].endswith(step["output_tail"]) for step in session["steps"])  # the whole output
    assert stdout.strip().splitlines()[-1].startswith("wrote ")
    assert tracked_results() == before  # nothing committed was overwritten


def test_dry_run_stubs_the_build_and_parses_info_and_selftest(dry_run):
    _, session, _, _ = dry_run
    steps = by_name(session)
    assert steps["build"]["stubbed"] is True and "pip install" in steps["build"]["real_command"]
    info = steps["info"]["result"]
    assert info["build"]["cuda_available"] is False and info["backends"]["reference"]["available"] is True
    verdicts = steps["selftest"]["result"]
    assert "--device cpu" in steps["selftest"]["command"]
    assert {"contrastive_loss", "reconstruction_attention"} <= set(verdicts)
    assert all(v["ok"] is True for per in verdicts.values() for v in per.values()), steps["selftest"]["headline"]
    assert "triton" in verdicts["contrastive_loss"]  # the GPU kernels ran, in the interpreter


def test_dry_run_pytest_steps_are_parsed(dry_run):
    _, session, _, _ = dry_run
    steps = by_name(session)
    for name, _, _ in gs.CUDA_STEPS:  # the GPU run's selections: every case selected skips on CPU
        r = steps[name]["result"]
        assert "-x" not in steps[name]["command"].split() and "-m cuda" in steps[name]["command"]
        assert r["selected"] > 0 and r["counts"]["skipped"] == r["selected"] and r["not_run"] == 0, name
        assert r["summary_printed"] and sum(r["skip_reasons"].values()) == r["selected"], name
    cpu = steps["pytest_kernels_cpu_tensors"]["result"]
    assert cpu["counts"]["passed"] == cpu["selected"] > 0 and cpu["failed"] == [] and cpu["summary_printed"]
    assert "real_command" in steps["pytest_kernels_cpu_tensors"]
    rest = steps["pytest_rest"]["result"]
    assert rest["collected"] > 0 and "--collect-only" in steps["pytest_rest"]["command"]
    assert gs.THIS_TEST in steps["pytest_rest"]["command"]  # ignored: a GPU run never runs this file


def test_dry_run_benches_and_kernel_report_land_in_out(dry_run):
    out, session, _, _ = dry_run
    steps = by_name(session)
    for name in ("bench_contrastive_bf16", "bench_contrastive_fp32", "bench_attention", "bench_train_step",
                 "bench_decode"):
        r = steps[name]["result"]
        assert r["file"] and (out / r["file"]).exists(), name
        assert r["rows"] and not any("error" in row for row in r["rows"]), (name, r["rows"])
        assert json.loads((out / r["file"]).read_text())["rows"] == r["rows"]
    assert any(row["impl"] == "courier_fast:triton" for row in steps["bench_attention"]["result"]["rows"])
    report = steps["kernel_report"]["result"]
    assert report["rows"] > 0 and report["n_failing"] == 0 and (out / report["file"]).exists()
    # what comes back from a GPU call is capped at 8 files: the dry run writes no more
    assert len(os.listdir(out)) <= 8


def test_a_broken_and_a_timed_out_step_do_not_stop_the_later_ones(tmp_path):
    proc = run_script(["--dry-run", "--only", "build", "info", "bench_decode", "--break", "build",
                       "--deadline", "300", "--budget", "info=0.2", "bench_decode=300"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((tmp_path / "cpu-gpu_session.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["build", "info", "bench_decode"]
    build, info, decode = steps
    assert build["status"] == "failed" and build["rc"] == 3 and build["broken"] is True
    assert "broken on purpose" in build["output_tail"]
    assert info["status"] == "timed_out" and info["timed_out"] is True and info["limit_s"] < 1
    assert decode["status"] == "ok" and decode["result"]["rows"]


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real run would start")
    proc = run_script([], tmp_path, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and not os.listdir(tmp_path)
    proc = run_script(["--dry-run", "--only", "no_such_step"], tmp_path, timeout=300)
    assert proc.returncode == 2 and "no_such_step" in proc.stderr


def test_gpu_plan_fits_one_call_with_checks_before_benches():
    steps = gs.plan(False, "python3", "NVIDIA_H200", "/scratch", cpus=16)
    names = [s.name for s in steps]
    assert names == [s.name for s in gs.plan(True, "python3", "cpu", "/scratch", cpus=16)]
    assert sum(s.budget for s in steps) <= gs.DEADLINE_S["gpu"] <= 600 - 20  # the device call's limit
    first_bench = min(i for i, n in enumerate(names) if n.startswith("bench_"))
    assert names[:3] == ["build", "info", "selftest"]
    assert all(n.startswith("pytest_") for n in names[3:first_bench])
    assert names.index("kernel_report") > first_bench and steps[-1].budget == 0  # left-over time only
    for s in steps:
        assert "-x" not in s.argv and "--exitfirst" not in s.argv
    assert steps[0].argv[1:4] == ["-m", "pip", "install"] and not steps[0].stubbed
    assert "--device" in steps[2].argv and steps[2].argv[steps[2].argv.index("--device") + 1] == "cuda"
    assert all(s.result_file and "NVIDIA_H200" in os.path.basename(s.result_file)
               for s in steps if s.kind in ("bench", "kernel_report"))
    outputs = {os.path.basename(s.result_file) for s in steps if s.result_file}
    assert len(outputs) + 1 <= 8  # + the session JSON (which holds the outputs): all of it comes back from one call


def test_step_limit_passes_unused_time_forward_and_keeps_later_budgets():
    assert gs.step_limit(60, left=500, reserved_later=300) == 200  # 140 s left over by earlier steps
    assert gs.step_limit(60, left=300, reserved_later=300) == 60  # its own budget
    assert gs.step_limit(60, left=40, reserved_later=0) == 40  # never past the deadline
    assert gs.step_limit(0, left=100, reserved_later=100) == 0  # budget 0: left-over time only
    assert gs.step_limit(0, left=100, reserved_later=30) == 70


PLAIN_CUT = """\
collecting ... collected 6 items / 2 deselected / 4 selected

tests/test_a.py::test_ok[x-1] PASSED                                     [ 25%]
tests/test_a.py::test_bad FAILED                                         [ 50%]
tests/test_a.py::test_skip SKIPPED (no GPU)                              [ 75%]
tests/test_a.py::test_hangs 
"""

PLAIN_DONE = """\
collecting ... collected 5 items / 1 error

tests/test_a.py::test_ok PASSED                                          [ 25%]
tests/test_a.py::test_bad FAILED                                         [ 50%]
tests/test_a.py::test_setup ERROR                                        [ 75%]
tests/test_a.py::test_skip SKIPPED                                       [100%]

============================= slowest 10 durations =============================
2.50s call     tests/test_a.py::test_bad
=========================== short test summary info ============================
SKIPPED [1] tests/test_a.py:12: needs a CUDA GPU
FAILED tests/test_a.py::test_bad - AssertionError: relative error 3e-3 > 1e-3
ERROR tests/test_a.py::test_setup - RuntimeError: CUDA error: an illegal memory access
ERROR tests/test_b.py - AttributeError: module 'courier_fast' has no attribute 'x'
============= 1 failed, 1 passed, 1 skipped, 2 errors in 4.12s =============
"""

XDIST = """\
4 workers [3 items]
scheduling tests via LoadScheduling

tests/test_a.py::test_ok 
tests/test_a.py::test_bad 
[gw0] [ 33%] PASSED tests/test_a.py::test_ok 
[gw1] [ 66%] FAILED tests/test_a.py::test_bad 
tests/test_a.py::test_slow 
"""


def test_parse_pytest_output_cut_off_by_a_kill():
    r = gs.parse_pytest(PLAIN_CUT)
    assert (r["collected"], r["selected"], r["not_run"]) == (6, 4, 1)
    assert r["counts"]["passed"] == 1 and r["counts"]["failed"] == 1 and r["counts"]["skipped"] == 1
    assert r["failed"] == ["tests/test_a.py::test_bad"]
    assert r["running_when_stopped"] == ["tests/test_a.py::test_hangs"] and r["summary_printed"] is False


def test_parse_pytest_summary_messages_errors_and_skip_reasons():
    r = gs.parse_pytest(PLAIN_DONE)
    assert r["summary_printed"] and r["summary"].startswith("1 failed, 1 passed")
    assert r["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1, "xfailed": 0, "xpassed": 0}
    assert r["failed"] == ["tests/test_a.py::test_bad"]
    assert r["errors"] == ["tests/test_a.py::test_setup", "tests/test_b.py"]  # a file that did not collect
    assert r["messages"]["tests/test_a.py::test_bad"].startswith("AssertionError: relative error")
    assert "illegal memory access" in r["messages"]["tests/test_a.py::test_setup"]
    assert r["skip_reasons"] == {"needs a CUDA GPU": 1} and r["running_when_stopped"] == []
    assert r["slowest"] == [[2.5, "call", "tests/test_a.py::test_bad"]]


def test_parse_pytest_xdist_output():
    r = gs.parse_pytest(XDIST)
    assert r["selected"] == 3 and r["not_run"] == 1
    assert r["counts"]["passed"] == 1 and r["failed"] == ["tests/test_a.py::test_bad"]
    assert r["running_when_stopped"] == ["tests/test_a.py::test_slow"]


def test_parse_json_object_skips_noise():
    text = "warning: {not json}\n{\n \"a\": {\"ok\": true}\n}\ntrailing\n"
    assert gs.parse_json_object(text) == {"a": {"ok": True}}
    assert gs.parse_json_object("no json here\n") is None


def test_run_process_kills_a_group_that_ignores_sigint(tmp_path):
    child = tmp_path / "child.pid"
    code = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)']); "
            f"open({str(child)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(600)")
    t0 = time.monotonic()
    rc, timed_out = gs.run_process([sys.executable, "-c", code], dict(os.environ), 3, str(tmp_path / "o.txt"), grace=1)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 30
    assert "started" in (tmp_path / "o.txt").read_text()
    pid = int(child.read_text())
    for _ in range(50):  # the grandchild was killed with its group (reaped by init)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} survived the kill")


def test_session_json_is_saved_before_each_step_and_a_skipped_step_is_recorded(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    session_path = out / "dev-gpu_session.json"
    read_first = ("import json, sys; s = json.load(open(sys.argv[1]))['steps']; "
                  "print('first step was', s[0]['status'], 'rc', s[0]['rc']); print('I am', s[1]['status'])")
    steps = [gs.Step("fails", [sys.executable, "-c", "import sys; sys.exit(4)"], 20),
             gs.Step("reads", [sys.executable, "-c", read_first, str(session_path)], 20),
             gs.Step("too_late", [sys.executable, "-c", "print('ran')"], 0)]
    session = gs.Session(str(out), "dev", {"schema": gs.SCHEMA}, steps)
    all_ran = gs.run_steps(steps, session, time.monotonic() + 25, str(scratch), dict(os.environ))
    data = json.loads(session_path.read_text())
    fails, reads, late = data["steps"]
    assert fails["status"] == "failed" and fails["rc"] == 4
    assert "first step was failed rc 4" in reads["output_tail"] and "I am running" in reads["output_tail"]
    # 25 s deadline: under MIN_SLACK_S left over for a budget-0 step
    assert late["status"] == "skipped" and "deadline" in late["reason"] and "rc" not in late
    assert all_ran is False
