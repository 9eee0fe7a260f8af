"""backend="auto" inside a torch.compile trace with fullgraph=True, where auto's first choice
needs the self-check (validate=True: on CPU the cpu attention core, on a GPU cuda and triton).

The verdict is a constant of the graph, read once eagerly: the trace never calls what it cannot
trace (before, torch.get_float32_matmul_precision in the verdict lookup failed the fullgraph
trace: `Unsupported: torch.* op returned non-Tensor`), and it never runs the check itself."""
import pytest
import torch

import courier_fast as cf
from courier_fast.ops import registry
from courier_fast.ops.selfcheck import check as backend_check

OP = "reconstruction_attention"


@pytest.fixture
def fresh_verdicts(monkeypatch, tmp_path):
    monkeypatch.setenv("COURIER_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("COURIER_FAST_VALIDATE", raising=False)
    monkeypatch.setattr(backend_check, "_TRUSTED", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("checked_first", [True, False])
def test_auto_with_a_validated_backend_compiles_fullgraph(fresh_verdicts, checked_first):
    impl = registry.implementations(OP).get("cpu")
    if impl is None or not impl.validate:
        pytest.skip("needs the C++ cpu attention backend (validated before auto uses it)")
    g = torch.Generator().manual_seed(0)
    d, h = 8, 2
    targets, history = torch.randn(3, 4, d, generator=g), torch.randn(3, 5, d, generator=g)
    w_in, w_out = torch.randn(3 * d, d, generator=g) / d ** 0.5, torch.randn(d, d, generator=g) / d ** 0.5

    def fn(t, hist):
        return cf.reconstruction_attention(t, hist, w_in, None, w_out, None, h)

    if checked_first:  # an eager check first: its verdict is on disk and in memory
        assert backend_check.trusted(OP, "cpu", torch.device("cpu"))
    graphs = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    out = torch.compile(fn, fullgraph=True, backend=record)(targets, history)
    expected = cf.reconstruction_attention(targets.double(), history.double(), w_in.double(), None,
                                           w_out.double(), None, h, backend="reference")
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    uses_core = any("attention_core" in graph for graph in graphs)
    # checked: the graph calls the cpu core; never checked: a trace does not run the check, so
    # auto takes the next backend (the reference) and says so by its graph
    assert uses_core == checked_first
    assert backend_check.cached_verdict(OP, "cpu", "cpu") is not None or not checked_first
