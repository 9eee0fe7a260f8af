"""The one call a lent GPU machine gets (at most 10 minutes), as a list of steps that each run in
their own process under their own time limit, so that a failure or a hang costs its step only.

    bash bench/gpu_session.sh                 # on a GPU machine (this file does the work)
    bash bench/gpu_session.sh --dry-run       # anywhere: every step on CPU, into a temp dir
    python bench/gpu_session.py --list        # the plan: steps, budgets, commands

Order (most information first): build against the image's torch, `courier-fast info`, the
self-check of every backend on this GPU, the CUDA tests (one pytest step per kernel test file,
the training steps of tests/training/test_train_cuda.py, UNRUN so far: a train_step under sync-debug mode
"error", GradCache against the plain step with drop path, a tiny train + resume; then the rest), the CPU-device tests of the kernel files (which change when a GPU is visible),
the benchmarks, the kernel report with the image's Triton, and, on the time left over, every
other test. Nothing stops at a failure.

Time: each step has a budget (seconds it is sure to get); time an earlier step did not use
passes to the next one, up to what the later steps' budgets leave before the deadline
(--deadline, default 480 s from the start: 8 minutes, so that a 15-minute lease leaves room for
a second try). A step past its limit
gets SIGINT (pytest then prints its summary), then SIGKILL, with every process it started.
A step with budget 0 runs only on time left over.

Output: one JSON, <out>/<device>-gpu_session.json, rewritten atomically before the first step
and after every step, so it is whole even when the call is cut short. Top: the environment
(GPU, driver, torch, CUDA, Triton, nvcc, git commit and dirty files, and `optional_missing`: the
optional parts the machine lacks, DALI, open_clip, DuckDB, faiss, pynvml, whose tests skip). Per step: name, command,
budget_s, limit_s, status (pending / ok / failed / timed_out / skipped), rc, seconds,
timed_out, the tail of its output, a one-line headline and its parsed result: the self-check
verdicts, pytest's counts, failing / erroring test ids with their messages, skip reasons, the
test that was running when a step was stopped; each bench's rows (its JSON is copied to <out>
too), and its output (the last LOG_CHARS characters; one file, not a JSON and a log: what comes
back from a device call is capped at 8 files, and the results need 7 of them). <out> is $OUT when set,
else bench/results; --dry-run writes to $OUT or a new temp dir, never to bench/results.

--dry-run walks the same steps on CPU: the build becomes an import check (recorded as
stubbed), the self-check runs with --device cpu (Triton in its interpreter), the CUDA test
steps run the same selections (they skip on CPU), the CPU-device kernel tests become
tests/ops/test_validation.py (real passes), the leftover-time step only collects, the benches run
tiny shapes with Triton in the interpreter, the kernel report --quick. Exit status: 0 when
every step ran (its own rc is a result in the JSON, not fatal), 1 when one was skipped for
time, 2 on bad arguments or no GPU without --dry-run.
"""
import argparse
import collections
import datetime
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMA = "courier_fast gpu_session 1"
DEADLINE_S = {"gpu": 480, "dry": 1500}  # 8 minutes: a 15-minute lease has room for a second try
MIN_LIMIT_S = 10        # a step that would get less is skipped (reason recorded)
MIN_SLACK_S = 30        # a budget-0 step needs at least this much time left over
GRACE_S = 8             # after SIGINT, before SIGKILL
TAIL_CHARS = 3000       # of each step's output, in the JSON
LOG_CHARS = 1_000_000   # of each step's output, in its "output" (a file that comes back is capped at 16 MiB)
PER_TEST_TIMEOUT_S = 120  # pytest-timeout, where installed: one hung test fails, the rest run

# the kernel test files: one CUDA step each (most important first), then their CPU-device tests
CUDA_STEPS = (("pytest_contrastive_loss", "tests/ops/test_contrastive_loss.py", 55),
              ("pytest_contrastive_lse_op", "tests/ops/test_contrastive_lse_op.py", 25),
              ("pytest_attention", "tests/ops/test_reconstruction_attention.py", 35),
              # training on the GPU (UNRUN so far): a train_step under sync-debug mode "error",
              # GradCache = plain step with drop path, a tiny train + resume
              ("pytest_train_cuda", "tests/training/test_train_cuda.py", 35))
# optional parts whose steps / tests skip without them: the session says which the machine lacks
OPTIONAL_MODULES = {"dali": "nvidia.dali", "open_clip": "open_clip", "duckdb": "duckdb", "faiss": "faiss",
                    "pynvml": "pynvml"}
KERNEL_TEST_FILES = ("tests/ops/test_contrastive_loss.py", "tests/ops/test_contrastive_lse_op.py",
                     "tests/ops/test_reconstruction_attention.py", "tests/ops/test_attention_core_op.py",
                     "tests/ops/test_kernel_limits.py", "tests/ops/test_selftest.py", "tests/ops/test_chunked_backend.py")
DRY_CPU_TESTS = "tests/ops/test_validation.py"
THIS_TEST = "tests/bench/test_gpu_session.py"  # runs this driver's dry run: never from a GPU run's pytest step

_atomic_spec = importlib.util.spec_from_file_location("_courier_atomic",
                                                      os.path.join(ROOT, "courier_fast", "atomic.py"))
atomic = importlib.util.module_from_spec(_atomic_spec)
_atomic_spec.loader.exec_module(atomic)  # stdlib only: the driver runs before the package is built


# --------------------------------------------------------------------------- the plan
@dataclass
class Step:
    """One process: argv run in the repository root with env added to the environment (a None
    value removes a variable). budget: seconds it is sure to get (0: left-over time only).
    kind says how its output is read: plain, json (a JSON object on stdout: info, selftest),
    pytest, bench (result_file: the bench JSON it writes), kernel_report. real: in a dry run,
    the command the GPU run uses instead (stubbed=True: replaced, not scaled down)."""
    name: str
    argv: list
    budget: float
    kind: str = "plain"
    env: dict = field(default_factory=dict)
    result_file: str = None
    real: list = None
    stubbed: bool = False
    files_missing: list = field(default_factory=list)


def module_available(name):
    return importlib.util.find_spec(name) is not None


def pytest_argv(py, marker, paths, ignore=(), collect_only=False, workers=0, per_test_timeout=None):
    """pytest with one line per test (-v), the reasons of failures / errors / skips (-rfEs),
    the slowest tests, and no stop at a failure or a broken test file."""
    argv = [py, "-m", "pytest", "-v", "-rfEs", "--tb=short", "--durations=10", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "-m", marker]
    if collect_only:
        argv.append("--collect-only")
    if workers:
        argv += ["-n", str(workers)]
    if per_test_timeout:
        argv += ["--timeout", str(per_test_timeout)]
    return argv + [f"--ignore={p}" for p in ignore] + list(paths)


def existing(paths):
    """(the paths that exist under ROOT, the ones that do not)."""
    have = [p for p in paths if os.path.exists(os.path.join(ROOT, p))]
    return have, [p for p in paths if p not in have]


def plan(dry, py, device, scratch, cpus=None):
    """The steps, in order. device: the file-name form of the GPU ("cpu" in a dry run)."""
    cpus = cpus or os.cpu_count() or 1
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    wide = {"COLUMNS": "240"}  # pytest cuts the summary's failure messages at the terminal width
    gpu_pytest = dict(workers=0 if dry or not module_available("xdist") else min(4, max(1, cpus // 4)),
                      per_test_timeout=None if dry or not module_available("pytest_timeout") else PER_TEST_TIMEOUT_S)
    steps = []

    def add(name, argv, budget, dry_argv=None, dry_budget=None, **kw):
        step = Step(name, dry_argv if dry and dry_argv is not None else argv,
                    dry_budget if dry else budget, real=argv if dry and dry_argv is not None else None, **kw)
        steps.append(step)
        return step

    import_check = [py, "-c", "import courier_fast, courier_fast._C, courier_fast.kernels; "
                              "print('imported', courier_fast.__file__)"]
    add("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                  "--disable-pip-version-check", "-e", "."], 120, dry_argv=import_check, dry_budget=120,
        stubbed=dry, env={"MAX_JOBS": str(cpus)})
    add("info", [py, "-m", "courier_fast", "info", "--json"], 15, dry_budget=120, kind="json")
    add("selftest", [py, "-m", "courier_fast", "selftest", "--device", "cuda", "--force", "--json"], 55,
        dry_argv=[py, "-m", "courier_fast", "selftest", "--device", "cpu", "--force", "--json"],
        dry_budget=300, kind="json")

    done = []
    for name, path, budget in CUDA_STEPS:
        paths, missing = existing([path])
        add(name, pytest_argv(py, "cuda", paths, **gpu_pytest), budget, dry_budget=180, kind="pytest",
            files_missing=missing, env=wide)
        done += paths
    add("pytest_cuda_rest", pytest_argv(py, "cuda", ["tests"], ignore=done, **gpu_pytest), 15,
        dry_budget=180, kind="pytest", env=wide)
    kernel_files, missing = existing(KERNEL_TEST_FILES)
    add("pytest_kernels_cpu_tensors", pytest_argv(py, "not cuda and not distributed", kernel_files, **gpu_pytest),
        20, dry_argv=pytest_argv(py, "not cuda", [DRY_CPU_TESTS]), dry_budget=180, kind="pytest",
        files_missing=missing, env=wide)

    def bench(name, script, args, budget, dry_args, result_name, **kw):
        path = os.path.join(scratch, result_name)
        return add(name, [py, f"bench/{script}"] + args + ["--out", path], budget,
                   dry_argv=[py, f"bench/{script}"] + dry_args + ["--out", path], dry_budget=240,
                   kind="bench", result_file=path, env=interp, **kw)

    bench("bench_contrastive_bf16", "bench_contrastive.py",
          ["--n", "16384", "65536", "262144", "--d", "256", "--dtype", "bfloat16", "--reps", "3"], 25,
          ["--n", "64", "--d", "16", "--dtype", "bfloat16", "--reps", "1", "--impl", "courier_fast:auto",
           "courier_fast:triton"], f"{device}-contrastive-bf16.json")
    bench("bench_contrastive_fp32", "bench_contrastive.py",
          ["--n", "16384", "65536", "--d", "64", "256", "--dtype", "float32", "--reps", "3"], 10,
          ["--n", "64", "--d", "16", "--dtype", "float32", "--reps", "1", "--impl", "naive",
           "courier_fast:triton:symmetric"], f"{device}-contrastive-fp32.json")
    bench("bench_clip", "bench_contrastive.py",  # open_clip's ClipLoss against ours, to where open_clip runs out
          ["--clip", "--n", "16384", "65536", "262144", "--dtype", "bfloat16", "--reps", "3", "--impl",
           "clip:open_clip", "clip:courier_fast:auto"], 10,
          ["--clip", "--n", "64", "--d", "16", "--reps", "1", "--impl", "clip:open_clip", "clip:courier_fast:auto"],
          f"{device}-clip.json")
    bench("bench_attention", "bench_attention.py",
          ["--shape", "64", "5", "5", "--shape", "4096", "50", "10", "--shape", "1024", "1024", "64",
           "--dtype", "bfloat16", "--reps", "3"], 15,
          ["--shape", "4", "5", "5", "--d", "32", "--heads", "2", "--dtype", "float32", "--reps", "1",
           "--impl", "mha_masked", "courier_fast:triton"], f"{device}-attention.json")
    # bench_train_step.py has no --out: it writes bench/results/<device>-train_step[-quick].json
    train = "-quick" if dry else ""
    add("bench_train_step", [py, "bench/bench_train_step.py", "--steps", "10", "--warmup", "2"], 20,
        dry_argv=[py, "bench/bench_train_step.py", "--quick", "--steps", "2", "--warmup", "1", "--batch-size", "8"],
        dry_budget=240, kind="bench", result_file=os.path.join(HERE, "results", f"{device}-train_step{train}.json"))
    bench("bench_decode", "bench_decode.py", ["--n", "256", "--workers", "1", "4", "8", "--reps", "2"], 10,
          ["--n", "8", "--batch", "4", "--workers", "1", "--reps", "1"], f"{device}-decode.json")
    report = os.path.join(scratch, f"static-kernels-{device}.json")
    add("kernel_report", [py, "bench/kernel_report.py", "--no-cuda", "--jobs", str(max(1, cpus - 2)), "--out", report],
        15, dry_argv=[py, "bench/kernel_report.py", "--quick", "--no-cuda", "--jobs", str(min(2, cpus)),
                      "--out", report], dry_budget=300, kind="kernel_report", result_file=report,
        env={"TRITON_INTERPRET": None})
    ignore = kernel_files + existing([THIS_TEST])[0]
    add("pytest_rest", pytest_argv(py, "not cuda", ["tests"], ignore=ignore, **gpu_pytest), 0,
        dry_argv=pytest_argv(py, "not cuda", ["tests"], ignore=ignore, collect_only=True), dry_budget=180,
        kind="pytest", env=wide)
    return steps


def step_limit(budget, left, reserved_later):
    """Seconds a step may run: its budget plus what earlier steps left unused, keeping the later
    steps' budgets, never past the deadline. budget 0: only left-over time."""
    return min(left, max(budget, left - reserved_later))


# --------------------------------------------------------------------------- reading output
_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
_PYTEST_LINE = re.compile(rf"^(?:\[gw\d+\] \[\s*\d+%\] (?P<x_outcome>{_OUTCOMES}) (?P<x_id>\S+::\S+)"
                          rf"|(?P<id>\S+::\S+) (?P<outcome>{_OUTCOMES})\b)")
_PYTEST_STARTED = re.compile(r"^(\S+::\S+) ?$")
_PYTEST_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
_PYTEST_SKIPS = re.compile(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$")
_PYTEST_COLLECTED = re.compile(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?")
_PYTEST_FINAL = re.compile(r"^=+ (.+ in [\d.]+s(?: \([^)]*\))?) =+$")
_PYTEST_SLOW = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+::\S+)$")
_PYTEST_XDIST_COLLECTED = re.compile(r"^\d+ workers \[(\d+) items?\]")
_OUTCOME_KEY = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest(text):
    """pytest -v -rfEs output (plain or pytest-xdist's), whole or cut off by a kill -> counts per
    outcome, failing / erroring ids with the summary's message, skip reasons with counts, how
    many were selected and collected, the tests running when it stopped and the slowest tests."""
    counts = collections.Counter()
    outcomes = {}
    messages, skip_reasons, slowest = {}, collections.Counter(), []
    collected = selected = None
    started, final = {}, None  # started and not finished, in order (several with pytest-xdist)
    for raw in text.splitlines():
        line = raw.rstrip()
        m = _PYTEST_LINE.match(line)
        if m:
            test_id = m.group("x_id") or m.group("id")
            outcome = _OUTCOME_KEY[m.group("x_outcome") or m.group("outcome")]
            counts[outcome] += 1
            if outcome in ("failed", "error"):
                outcomes.setdefault(test_id, outcome)
            started.pop(test_id, None)
            continue
        m = _PYTEST_STARTED.match(line)
        if m:
            started[m.group(1)] = True
            continue
        m = _PYTEST_SUMMARY.match(line)
        if m:
            outcomes.setdefault(m.group(2), "error" if m.group(1) == "ERROR" else "failed")
            messages[m.group(2)] = (m.group(3) or "")[:300]
            continue
        m = _PYTEST_SKIPS.match(line)
        if m:
            skip_reasons[m.group(2)[:200]] += int(m.group(1))
            continue
        m = _PYTEST_COLLECTED.search(line)
        if m and collected is None:
            collected = int(m.group(1))
            selected = collected - int(m.group(2) or 0)
            continue
        m = _PYTEST_XDIST_COLLECTED.match(line)
        if m:  # pytest-xdist: "N workers [M items]", the selected count
            selected = int(m.group(1))
            continue
        m = _PYTEST_SLOW.match(line)
        if m:
            slowest.append([float(m.group(1)), m.group(2), m.group(3)])
            continue
        m = _PYTEST_FINAL.match(line)
        if m:
            final = m.group(1)
    ran = sum(counts[k] for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))
    return {"selected": selected, "collected": collected,
            "counts": {k: counts[k] for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")},
            "not_run": None if selected is None else max(0, selected - ran),
            "failed": [t for t, o in outcomes.items() if o == "failed"],
            "errors": [t for t, o in outcomes.items() if o == "error"],
            "messages": messages, "skip_reasons": dict(skip_reasons),
            "running_when_stopped": list(started), "summary": final, "summary_printed": final is not None,
            "slowest": slowest[:10]}


def parse_json_object(text):
    """The first JSON object printed on its own lines ('{' at a line start) in text, or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"(?m)^\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def read_result(step, text, out_dir):
    """(parsed result, one-line headline) of a finished step."""
    if step.kind == "pytest":
        r = parse_pytest(text)
        c = r["counts"]
        head = ", ".join(f"{v} {k}" for k, v in c.items() if v) or r["summary"] or "no test ran"
        if r["selected"] is not None:
            head += f" (of {r['selected']} selected)"
        if r["running_when_stopped"]:
            head += f"; stopped in {', '.join(r['running_when_stopped'])}"
        if step.files_missing:
            r["files_missing"] = step.files_missing
        return r, head
    if step.kind == "json":
        obj = parse_json_object(text)
        if obj is None:
            return None, "no JSON in the output"
        if step.name == "selftest":
            verdicts = {op: {b: v.get("ok") for b, v in per.items()} for op, per in obj.items()}
            return obj, "; ".join(f"{op}: " + ", ".join(f"{b} {'ok' if ok else 'FAIL'}" for b, ok in per.items())
                                  for op, per in verdicts.items())
        build = obj.get("build", {})
        avail = [b for b, v in obj.get("backends", {}).items() if v.get("available")]
        head = f"gpu={build.get('gpu')} cuda_compiled={build.get('cuda_compiled')} backends: {', '.join(avail)}"
        if build.get("cuda_build_error"):
            head += f"; CUDA build error: {build['cuda_build_error'][:120]}"
        return obj, head
    if step.kind in ("bench", "kernel_report"):
        if not step.result_file or not os.path.exists(step.result_file):
            return {"file": None}, "wrote no results file"
        with open(step.result_file) as f:
            data = json.load(f)
        name = os.path.basename(step.result_file)
        copy = os.path.join(out_dir, name)
        if os.path.abspath(copy) != os.path.abspath(step.result_file):
            with atomic.atomic_path(copy) as tmp:
                shutil.copyfile(step.result_file, tmp)
        rows = data.get("rows", [])
        if step.kind == "kernel_report":
            failing = data.get("failing", [])
            return ({"file": name, "rows": len(rows), "n_failing": len(failing), "failing": failing[:20],
                     "triton": data.get("triton")}, f"{len(rows)} rows, {len(failing)} failing -> {name}")
        errors = sum(1 for r in rows if "error" in r)
        return {"file": name, "rows": rows}, f"{len(rows)} rows ({errors} with an error) -> {name}"
    last = [line.strip() for line in text.splitlines() if line.strip()][-1:]
    return None, last[0][:200] if last else ""


# --------------------------------------------------------------------------- the environment
def probe():
    """The machine, the packages and the GPU, as a dict (runs in its own process: importing
    torch or touching the GPU may hang, and that must cost only the probe)."""
    env = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count()}
    try:
        import torch
        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1),
                       multiprocessors=p.multi_processor_count)
    except Exception as exc:  # recorded, not fatal: the steps will say more
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    for tool, args in (("nvcc", ["--version"]),
                       ("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                       "--format=csv,noheader"])):
        exe = shutil.which(tool)
        if exe:
            try:
                out = subprocess.run([exe] + args, capture_output=True, text=True, timeout=20).stdout.strip()
                env[tool] = out.splitlines()[-1] if tool == "nvcc" and out else out
            except (OSError, subprocess.SubprocessError) as exc:
                env[tool] = f"failed: {exc}"
    env["optional_missing"] = missing_optional()
    return env


def missing_optional():
    """The optional parts this machine lacks (their steps and tests skip; said, not failed)."""
    return [name for name, module in OPTIONAL_MODULES.items() if not _importable(module)]


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def git_state():
    """Commit and dirty files of the tree being run, or why they are unknown."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "error": head.stderr.strip()[:200]}
        status = git("status", "--porcelain").stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "error": str(exc)[:200]}
    changed = [line[3:] for line in status if not line.startswith("??")]
    untracked = [line[3:] for line in status if line.startswith("??")]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed_files": changed[:100],
            "untracked_files": untracked[:100]}


def run_probe(py, timeout=90):
    try:
        out = subprocess.run([py, os.path.abspath(__file__), "--probe"], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
        return parse_json_object(out.stdout) or {"error": (out.stderr or out.stdout).strip()[-500:]}
    except subprocess.TimeoutExpired:
        return {"error": f"the probe took over {timeout} s (torch import or GPU init hung)"}


def file_name_of(gpu):
    """The device's file-name form, as bench/harness.py writes it."""
    return gpu.replace(" ", "_") if gpu else "cpu"


# --------------------------------------------------------------------------- running
class Session:
    """The session JSON in out_dir; save() after every change."""

    def __init__(self, out_dir, device, header, steps):
        self.path = os.path.join(out_dir, f"{device}-gpu_session.json")
        self.out_dir = out_dir
        self.data = {**header, "finished": None, "steps": [
            {"name": s.name, "status": "pending", "kind": s.kind, "command": shlex.join(s.argv),
             "budget_s": s.budget, **({"real_command": shlex.join(s.real)} if s.real else {}),
             **({"stubbed": True} if s.stubbed else {})} for s in steps]}

    def save(self):
        with atomic.atomic_path(self.path) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)


def say(msg):
    print(f"[gpu_session {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def run_process(argv, env, limit, output_path, grace=GRACE_S):
    """Run argv (own process group) with stdout+stderr into output_path; past `limit` seconds
    SIGINT the group, `grace` seconds later SIGKILL it. -> (rc, timed_out)."""
    with open(output_path, "wb") as out:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            out.write(f"could not start: {exc}\n".encode())
            return 127, False
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that ignored SIGINT after the leader exited
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(), True


def run_steps(steps, session, deadline, scratch, base_env, breaks=()):
    """Run steps in order, each under step_limit(), recording each in the session and saving it
    after every step. breaks: names whose command is replaced by one that fails (to test this
    driver). -> True when every step ran (none skipped for time)."""
    all_ran = True
    session.save()
    for i, step in enumerate(steps):
        rec = session.data["steps"][i]
        left = deadline - time.monotonic()
        later = sum(s.budget for s in steps[i + 1:])
        limit = step_limit(step.budget, left, later)
        if limit < (MIN_SLACK_S if step.budget == 0 else min(MIN_LIMIT_S, step.budget)):
            rec.update(status="skipped", reason=f"deadline: {left:.0f} s left, {later:.0f} s kept for later steps")
            say(f"skip {step.name} ({rec['reason']})")
            all_ran = False
            session.save()
            continue
        argv = step.argv
        if step.name in breaks:
            argv = [sys.executable, "-c", "import sys; print('broken on purpose (--break)'); sys.exit(3)"]
            rec.update(broken=True, command=shlex.join(argv))
        env = dict(base_env)
        for k, v in step.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if step.result_file and os.path.exists(step.result_file):
            os.remove(step.result_file)  # never report a stale file as this run's
        rec.update(status="running", limit_s=round(limit, 1),
                   started=datetime.datetime.now().isoformat(timespec="seconds"))
        session.save()
        say(f"start {step.name} (limit {limit:.0f} s)")
        t0 = time.monotonic()
        output_path = os.path.join(scratch, f"{step.name}.txt")
        rc, timed_out = run_process(argv, env, limit, output_path)
        seconds = time.monotonic() - t0
        with open(output_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        try:
            result, headline = read_result(step, text, session.out_dir)
        except Exception as exc:  # a reader bug must not cost the session
            result, headline = {"read_error": f"{type(exc).__name__}: {exc}"}, "could not read the result"
        status = "timed_out" if timed_out else ("ok" if rc == 0 else "failed")
        rec.update(status=status, rc=rc, timed_out=timed_out, seconds=round(seconds, 1), headline=headline,
                   result=result, output_tail=text[-TAIL_CHARS:], output=text[-LOG_CHARS:])
        session.save()
        say(f"end {step.name}: {status} rc={rc} {seconds:.0f} s {headline}")
    return all_ran


def summary_table(records):
    lines = [f"{'step':<28}{'status':<11}{'rc':>5}{'s':>7}{'limit':>7}  headline"]
    for r in records:
        rc = "" if r.get("rc") is None else r["rc"]
        lines.append(f"{r['name']:<28}{r['status']:<11}{rc!s:>5}{r.get('seconds', ''):>7}{r.get('limit_s', ''):>7}  "
                     f"{(r.get('headline') or r.get('reason') or '')[:110]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="walk every step on CPU (no GPU needed)")
    ap.add_argument("--deadline", type=float, help=f"seconds for the whole run (default {DEADLINE_S['gpu']}, "
                                                   f"{DEADLINE_S['dry']} with --dry-run; env GPU_SESSION_SECONDS)")
    ap.add_argument("--budget", action="extend", nargs="+", default=[], metavar="STEP=SECONDS",
                    help="override steps' budgets")
    ap.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (in plan order)")
    ap.add_argument("--break", dest="breaks", nargs="+", default=[], metavar="STEP",
                    help="replace these steps' commands with one that fails (tests the driver)")
    ap.add_argument("--out", help="output folder (default $OUT, else bench/results; --dry-run: $OUT, else a temp dir)")
    ap.add_argument("--list", action="store_true", help="print the plan as JSON and exit")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: print probe() as JSON
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(), indent=1))
        return 0

    started = time.monotonic()
    py = sys.executable
    scratch = tempfile.mkdtemp(prefix="gpu_session_")
    env_info = run_probe(py) if not args.list else {}
    if not args.dry_run and not args.list and not env_info.get("cuda_available"):
        print("gpu_session: no CUDA GPU is visible here (probe: "
              f"{env_info.get('torch_error') or env_info.get('error') or 'torch.cuda.is_available() is False'}); "
              "run with --dry-run to walk the steps on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else file_name_of(env_info.get("gpu"))
    steps = plan(args.dry_run, py, device, scratch)
    names = [s.name for s in steps]
    for name in (args.only or []) + args.breaks + [b.split("=")[0] for b in args.budget]:
        if name not in names:
            ap.error(f"unknown step {name!r}; steps: {', '.join(names)}")
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            ap.error(f"--budget {item!r}: expected STEP=SECONDS")
        next(s for s in steps if s.name == name).budget = seconds
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    if args.list:
        print(json.dumps([{"name": s.name, "budget_s": s.budget, "kind": s.kind, "command": shlex.join(s.argv)}
                          for s in steps], indent=1))
        shutil.rmtree(scratch, ignore_errors=True)
        return 0

    deadline_s = args.deadline or float(os.environ.get("GPU_SESSION_SECONDS")
                                        or DEADLINE_S["dry" if args.dry_run else "gpu"])
    out_dir = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="gpu_session_dry_") if args.dry_run
                                                    else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    test_seed = os.environ.get("COURIER_TEST_SEED") or str(secrets.randbelow(2**31))
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COURIER_TEST_SEED": test_seed,
                "COURIER_FAST_CACHE_DIR": os.path.join(scratch, "cache")}  # one verdict cache for every step
    header = {"schema": SCHEMA, "dry_run": args.dry_run, "device": device,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "deadline_s": deadline_s,
              "courier_test_seed": test_seed, "environment": {**env_info, "git": git_state()},
              "argv": sys.argv[1:] if argv is None else list(argv)}
    session = Session(out_dir, device, header, steps)
    say(f"{'dry run' if args.dry_run else 'GPU run'} on {env_info.get('gpu') or 'cpu'}: {len(steps)} steps, "
        f"deadline {deadline_s:.0f} s; results in {session.path}")
    missing = env_info.get("optional_missing") or []
    say("optional parts missing here (their steps / tests skip): " + (", ".join(missing) if missing else "none"))
    all_ran = run_steps(steps, session, started + deadline_s, scratch, base_env, set(args.breaks))
    session.data.update(finished=datetime.datetime.now().isoformat(timespec="seconds"),
                        seconds=round(time.monotonic() - started, 1), all_steps_ran=all_ran)
    session.save()
    shutil.rmtree(scratch, ignore_errors=True)
    print(summary_table(session.data["steps"]))
    print(f"wrote {session.path}")
    return 0 if all_ran else 1


if __name__ == "__main__":
    sys.exit(main())
