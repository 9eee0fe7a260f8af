"""bench/kernel_report.py: the GPU kernels compile for sm_80, sm_86 and sm_90a on this CPU machine within
shared memory, without spills, with 16-bit GEMMs in 16-bit MMA; and the loss's work model
meets its targets. CI compiles the largest variants live; the committed JSON (every variant)
must match the current kernel sources and pass the same bar."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from conftest import import_bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
kernel_report = import_bench("kernel_report")

COMMITTED = os.path.join(ROOT, "bench", "results", "static-kernels.json")
ROW_KEYS = {"op", "kernel", "arch", "dtype", "config", "registers", "spills", "shared_bytes", "mma_precisions"}


def _key(row):
    config = {k: v for k, v in row["config"].items()}
    return row["op"], row["kernel"], row["arch"], row["dtype"], json.dumps(config, sort_keys=True)


def _expected(quick):
    keys = set()
    for op, kernel, dtype, cx, warps, stages, label in kernel_report.triton_tasks(quick):
        config = {**cx, "num_warps": warps, "num_stages": stages, "class": label}
        for arch in kernel_report.TRITON_ARCHS:
            keys.add((op, kernel, arch, dtype, json.dumps(config, sort_keys=True)))
    return keys


def test_largest_variants_compile_for_hopper_and_ampere_and_pass(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--quick", "--no-cuda",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    data = json.loads(out.read_text()) if out.exists() else {}
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {_key(r) for r in data["rows"]} == _expected(quick=True)
    failing, _ = kernel_report.judge_rows(data["rows"])
    assert failing == [] and data["failing"] == []
    for row in data["rows"]:
        assert ROW_KEYS <= set(row), row
        if row["config"].get("products") == "fma":  # the short-history attention kernels: no MMA by design
            assert row["registers"] > 0 and row["mma_precisions"] == [] and row["dots"] == []
        else:
            assert row["registers"] > 0 and row["mma_precisions"] == ["bf16"]
    assert {r["arch"] for r in data["rows"]} == {"sm_80", "sm_86", "sm_90a"}
    assert any(i.startswith("wgmma") for r in data["rows"] if r["arch"] == "sm_90a" for i in r["mma_instructions"])


def test_committed_report_covers_every_variant_of_the_current_kernels():
    data = json.load(open(COMMITTED))
    assert data["kernel_sources_sha256"] == kernel_report.kernel_sources_hash(), \
        "kernels/ changed since bench/results/static-kernels.json: run python bench/kernel_report.py"
    triton_rows = [r for r in data["rows"] if r["config"].get("source") != "csrc/cuda"]
    assert {_key(r) for r in triton_rows} == _expected(quick=False)
    failing, pruned = kernel_report.judge_rows(data["rows"])  # every row, CUDA included
    assert failing == [] and data["failing"] == [] and pruned == data["pruned_at_launch"]
    assert all(p["arch"] == "sm_86" for p in pruned)  # only the 99 KB parts lose a config
    for dtype in ("float32", "bfloat16", "float16"):
        assert any(r["dtype"] == dtype for r in triton_rows)
    cuda = [r for r in data["rows"] if r["config"].get("source") == "csrc/cuda"]
    assert {r["arch"] for r in cuda} == {"sm_80", "sm_90"}, data["cuda_sources"]
    assert all(r["spills"] == 0 and r["registers"] for r in cuda)
    assert data["dirty"] is False, "regenerate the report from a clean tree"


def test_attention_work_reports_the_core_apart_from_the_projections():
    """The projections (exact GEMMs) must not hide the core's padding: reported apart, and at
    COURIER's shapes (P = 10 or 5 targets over L = 5 history items, head dim 64, bf16) the core
    (the packed short-history kernels; 16-row MMA tiles ran ~15x there) and the CUDA core stay
    within 2x their floor (issue 18, item 5). One more history slot of padding shows in the count."""
    for p in (10, 5):
        row = kernel_report.attention_work(4096, p, 5, 256, 4)
        assert row["core"]["products"] == "fma" and row["core"]["ratio"] <= 2 and row["cuda_core"]["ratio"] <= 2
        assert row["core"]["executed_flop"] + row["projections"]["executed_flop"] == row["executed_flop"]
    assert kernel_report.attention_work(4096, 10, 9, 256, 4)["core"]["ratio"] > \
        kernel_report.attention_work(4096, 10, 8, 256, 4)["core"]["ratio"]  # 16 key slots for 9 keys
    assert kernel_report.attention_work(1024, 64, 1024, 256, 4)["core"]["products"] == "mma"
    short, long = (kernel_report.official_pattern_work(4096, 10, length, 256, 4) for length in (5, 50))
    assert 1 < short["ratio"] < long["ratio"] < 10 and short["kv_bytes_ratio"] == long["kv_bytes_ratio"] == 2 * 10


@pytest.mark.parametrize("d", [64, 128, 256, 384, 512, 768, 1024])
def test_contrastive_work_meets_the_targets(d):
    """Executed MMA FLOP <= 1.25x the 8 N^2 d floor (1.5x symmetric) for the feature widths CLIP
    towers use (d = 64 ... 1024, with the accidental-hit and logQ options on: they add no GEMM)."""
    assert kernel_report.contrastive_work(65536, d, symmetric=False)["ratio"] <= 1.25
    assert kernel_report.contrastive_work(65536, d, symmetric=True)["ratio"] <= 1.5


def test_the_bar_rejects_what_it_should():
    good = {"op": "contrastive_loss", "arch": "sm_80", "dtype": "bfloat16", "shared_bytes": 1000, "spills": 0,
            "mma_precisions": ["bf16"], "dots": [{"operands": "bf16", "mma": True}]}
    assert kernel_report.problems(good) == []
    bad = [dict(good, shared_bytes=170 * 1024),  # fits an H100, not an A100
           dict(good, spills=8),
           dict(good, mma_precisions=["bf16", "tf32"]),
           dict(good, dots=[{"operands": "bf16", "mma": True}, {"operands": "fp32", "mma": False}]),
           dict(good, dots=[], mma_precisions=[])]
    for row in bad:
        assert kernel_report.problems(row), row
    assert kernel_report.problems(dict(good, arch="sm_90a", shared_bytes=170 * 1024)) == []
    cuda_row = {"op": "reconstruction_attention", "kernel": "attn_fwd_kernel", "arch": "sm_90", "dtype": "float32",
                "config": {"source": "csrc/cuda"}, "registers": 56, "spills": 16, "shared_bytes": 0, "mma_precisions": []}
    assert kernel_report.judge_rows([cuda_row])[0], "a spilling CUDA kernel must fail the report"


def test_a_config_over_an_archs_shared_memory_is_pruned_only_when_its_table_has_another():
    """sm_86 / sm_89 (99 KB): Triton's autotuner skips a config that is out of resources, so a
    loss config over the limit is acceptable when another config of the same table fits; a
    fixed-tile kernel (attention) or a table with no fitting config fails."""
    def row(bn, smem, op="contrastive_loss", kernel="grad_x"):
        return {"op": op, "kernel": kernel, "arch": "sm_86", "dtype": "bfloat16", "shared_bytes": smem, "spills": 0,
                "mma_precisions": ["bf16"], "dots": [{"operands": "bf16", "mma": True}],
                "config": {"BLOCK_N": bn, "BLOCK_M": 32, "num_warps": 4, "num_stages": 2, "FUSED": True, "class": "d_class=512"}}
    over, fits = row(64, 103000), row(32, 60000)
    failing, pruned = kernel_report.judge_rows([over, fits])
    assert failing == [] and [p["row"] for p in pruned] == [0]
    assert kernel_report.judge_rows([over])[0]  # nothing left to pick
    assert kernel_report.judge_rows([row(64, 103000, "reconstruction_attention", "attn_fwd"),
                                     row(32, 60000, "reconstruction_attention", "attn_fwd")])[0]


def test_mma_parsing():
    ptx = ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...}")
    assert kernel_report.mma_instructions(ptx) == {"wgmma.m64n128k16.bf16": "bf16", "mma.sync.m16n8k8.tf32": "tf32"}
