"""Shared measurement harness for bench/*.py: timing, peak memory, ceilings, JSON output.

On CUDA: one process, CUDA-synchronised wall time (median, perf_counter around
torch.cuda.synchronize()), max_memory_allocated above the inputs. On CPU: each row in a fresh
process (run_isolated), peak RSS above the inputs from VmHWM after resetting it (reset_peak_rss):
ru_maxrss cannot be reset and Linux carries it over fork + exec, so a child would report its
parent's high-water mark.
"""
import datetime
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_mb(key):
    """A /proc/self/status memory line (VmRSS, VmHWM) in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_mb():
    """This process's resident memory now (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb():
    """This process's peak resident memory (MB) since it started or since reset_peak_rss()."""
    return _status_mb("VmHWM")


def reset_peak_rss():
    """Make the peak RSS (VmHWM) equal the current RSS, so that peak_rss_mb() sees only what
    happens from now on (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(loss_fn, inputs, device, reps):
    """Median ms of loss_fn(*inputs) without grad and with backward, and the peak memory (MB)
    above the state before the first call (the inputs exist already; warm-up is counted)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_mb()

    def clear():
        for t in inputs:
            t.grad = None

    try:
        loss_fn(*inputs).backward()  # warm-up (imports, autotune, compile)
    except Exception as exc:  # a peer that cannot run this shape/dtype is reported, not hidden
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    clear()

    def fwd():
        with torch.no_grad():
            loss_fn(*inputs)

    def fwd_bwd():
        clear()
        loss_fn(*inputs).backward()

    ms_fwd, ms_fwd_bwd = median_ms(fwd, device, reps), median_ms(fwd_bwd, device, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else peak_rss_mb() - base
    return {"ms_fwd": round(ms_fwd, 3), "ms_fwd_bwd": round(ms_fwd_bwd, 3), "peak_mem_mb": round(peak, 1)}


def run_isolated(script, key, reps):
    """Run `script --one key --reps reps` in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, script, "--one", key, "--reps", str(reps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_ceiling(device, dtype):
    """Measured dense matmul rate (FLOP/s) on this device and dtype."""
    n = 8192 if device == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    x @ x
    return 2 * n**3 / (median_ms(lambda: x @ x, device, 10) / 1e3)


def copy_bandwidth(device):
    """Measured device-to-device copy rate (bytes/s: read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 25)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * n / (median_ms(lambda: y.copy_(x), device, 10) / 1e3)


def device_name():
    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def _version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


RESULTS_PATHSPEC = ":(exclude,top)bench/results"  # a run's own outputs do not make the tree dirty


def git_state(repo=HERE):
    """{"commit": short HEAD or None, "dirty": whether the code differs from HEAD: tracked files
    changed or untracked, not ignored files present, anywhere but bench/results/ (where runs write
    their JSON)} of the repository holding `repo`, now (None values outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo)
        status = subprocess.run(["git", "status", "--porcelain", "--", ":/", RESULTS_PATHSPEC],
                                capture_output=True, text=True, cwd=repo)
    except OSError:
        return {"commit": None, "dirty": None}
    if head.returncode or status.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


_AT_START = git_state()  # when the bench script imported this module: a run must start clean too
_LOAD_AT_START = os.getloadavg()[0]  # other work on the machine slows every timed row


def write_results(bench, ceilings, rows, path=None, quick=False):
    """bench/results/<device>-<bench>.json (…-quick.json for --quick runs, which are not kept
    in git), written atomically. Records the git commit and whether the tree was dirty when the
    run started or when it ended (a figure for the README must come from a clean tree)."""
    end = git_state()
    dirty = None if _AT_START["dirty"] is None else (
        _AT_START["dirty"] or end["dirty"] or end["commit"] != _AT_START["commit"])
    result = {"bench": bench, "device": device_name(), "cores": os.cpu_count(),
              "torch": torch.__version__, "triton": _version("triton"),
              "date": datetime.date.today().isoformat(), "git": _AT_START["commit"], "dirty": dirty,
              "load_average_1min": {"start": round(_LOAD_AT_START, 2), "end": round(os.getloadavg()[0], 2)},
              "ceilings": ceilings, "rows": rows}
    path = path or os.path.join(HERE, "results", f"{device_name()}-{bench}{'-quick' if quick else ''}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path
