"""bench/bench_contrastive.py on tiny shapes: every CPU row carries its GEMM floor measured in its
own process (--floor), and --clip rows carry their ratios to open_clip's row at the same N."""
import json
import os
import subprocess
import sys

import pytest

import courier_fast as cf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "bench_contrastive.py")
pytestmark = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, BENCH, *args, "--reps", "1", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def test_floor_rows_report_the_gemm_floor_of_their_own_process(tmp_path):
    rows = _run(tmp_path, "--floor", "--n", "96")
    assert [(r["impl"], r["symmetric"]) for r in rows] == [("courier_fast:cpu", False), ("courier_fast:cpu", True)]
    for r in rows:
        assert r["gemm_gflops"] > 0
        # rounded in the JSON: gemm_gflops to 0.1, floor_ms to 1e-3 ms, floor_ratio to 1e-3
        assert r["floor_ms"] == pytest.approx(3 * 2 * 96 * 96 * 64 / (r["gemm_gflops"] * 1e9) * 1e3, rel=0.01, abs=1e-3)
        assert r["floor_ratio"] == pytest.approx(r["ms_fwd_bwd"] / r["floor_ms"], rel=0.05, abs=2e-3)


def test_clip_rows_carry_their_ratio_to_open_clip(tmp_path):
    pytest.importorskip("open_clip")
    rows = _run(tmp_path, "--clip", "--n", "64", "--d", "16", "--impl", "clip:open_clip", "clip:courier_fast:cpu")
    peer, ours = rows
    assert peer["impl"] == "clip:open_clip" and "vs_open_clip" not in peer
    assert ours["vs_open_clip"]["time"] == pytest.approx(ours["ms_fwd_bwd"] / peer["ms_fwd_bwd"], rel=0.01)
