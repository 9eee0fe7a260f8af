"""`courier-fast info` states, per op and backend, the GEMM precision 16-bit inputs run at (issue 27
item 3, the report only): every backend that can be registered has a line, and the report prints
it for those registered here."""
from courier_fast import info
from courier_fast.ops import dispatch


def test_every_registered_backend_states_its_16bit_gemms():
    for op in dispatch.ops():
        for name in dispatch.implementations(op):
            assert (op, name) in info.GEMM_16BIT, (op, name)


def test_report_prints_the_16bit_gemms():
    text = info.report()
    for op in dispatch.ops():
        for name in dispatch.implementations(op):
            assert f"16-bit inputs: {info.GEMM_16BIT[op, name]}" in text, (op, name)
    # the `cuda` loss runs fp32 GEMMs, and says that auto routes 16-bit calls past it
    # (tests/ops/test_16bit_default_path.py checks the routing itself)
    assert dispatch.AUTO_ORDER["cuda"][0] == "cuda"
    cuda = info.GEMM_16BIT["contrastive_loss", "cuda"]
    assert cuda.startswith("fp32") and "sends 16-bit calls to triton" in cuda
