"""The ops' own argument checks (issue 30): a malformed tensor passed straight to an op of
torch.ops.courier_fast raises an error naming it before any kernel reads it (the C++ checks in
csrc/contrastive_lse.h and csrc/attention_core.h, the Triton ops' in courier_fast/ops/backends/arg_checks.py).
tests/ops/test_fuzz_ops.py throws random malformed arguments at the same ops."""
import math

import pytest
import torch

import courier_fast as cf

from conftest import TOL  # noqa: F401  (conftest sets TRITON_INTERPRET before triton loads)
from test_contrastive_lse_op import dense_lse

COMPILED = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")
ONE = torch.ones(())


def _lse_ops():
    ops = [pytest.param("compiled", marks=COMPILED)]
    return ops + [pytest.param("triton", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("triton") is None, reason="no triton"))]


def _op(kind, backward=False):
    if kind == "triton":
        from courier_fast.ops.backends import triton as _triton_ops
        return _triton_ops.contrastive_lse_backward if backward else _triton_ops.contrastive_lse
    return torch.ops.courier_fast.contrastive_lse_backward if backward else torch.ops.courier_fast.contrastive_lse


@pytest.mark.parametrize("kind", _lse_ops())
@pytest.mark.parametrize("bad,name", [
    ({"grad_row": torch.ones(3)}, "grad_row"),      # the call: N = 8
    ({"row_lse": slice(0, 3)}, "row_lse"),
    ({"col_lse": slice(0, 2)}, "col_lse"),          # M = 6
    ({"grad_col": torch.ones(0)}, "grad_col"),      # empty with with_columns
    ({"row_lse": "2d"}, "row_lse"),
])
def test_malformed_backward_tensors_raise_naming_them(kind, bad, name):
    x, y = torch.randn(8, 4), torch.randn(6, 4)
    rl, cl = _op(kind)(x, y, None, None, None, None, None, 0, ONE, True, True)
    args = {"grad_row": torch.ones(8), "grad_col": torch.ones(6), "row_lse": rl, "col_lse": cl}
    for k, v in bad.items():
        args[k] = args[k][v] if isinstance(v, slice) else args[k][None] if v == "2d" else v
    with pytest.raises(RuntimeError, match=name):
        _op(kind, True)(args["grad_row"], args["grad_col"], x, y, None, None, None, None, None, 0,
                        args["row_lse"], args["col_lse"], ONE, True, True)


@pytest.mark.parametrize("kind", _lse_ops())
def test_float_mask_is_a_type_error(kind):
    x, y = torch.randn(8, 4), torch.randn(6, 4)
    with pytest.raises(TypeError, match="x_mask must be bool"):
        _op(kind)(x, y, torch.ones(8), None, None, None, None, 0, ONE, True, True)
    with pytest.raises(TypeError, match="y_mask must be bool"):
        _op(kind)(x, y, None, torch.ones(6), None, None, None, 0, ONE, True, True)


@pytest.mark.parametrize("kind", _lse_ops())
def test_saved_lse_of_another_dtype_is_a_type_error(kind):
    x, y = torch.randn(8, 4), torch.randn(6, 4)
    rl, cl = _op(kind)(x, y, None, None, None, None, None, 0, ONE, True, True)
    with pytest.raises(TypeError, match="row_lse must be"):
        _op(kind, True)(torch.ones(8), torch.ones(6), x, y, None, None, None, None, None, 0, rl.half(), cl, ONE,
                        True, True)


@COMPILED
def test_masked_out_nan_candidate_leaves_the_lse_alone():
    """A NaN (or +inf) in a candidate that the mask leaves out, or in an accidental hit, does not
    reach the LSE (it did: -inf + NaN); a NaN logit that is kept makes the LSE NaN, as in
    torch.logsumexp (it was skipped), and a +inf one +inf."""
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y[1] = math.nan
    y_mask = torch.tensor([True, False, True, True])
    logq = torch.tensor([0.0, 0.0, -math.inf, 0.0], dtype=torch.float64)  # kept column 2: +inf logit
    for args in [(None, y_mask, None), (None, y_mask, logq)]:
        row, _ = torch.ops.courier_fast.contrastive_lse(x, y, *args, None, None, 0, ONE.double(), True, False)
        want, _ = dense_lse(x, y, None, y_mask, 1.0, True, args[2])
        torch.testing.assert_close(row, want)
    row, col = torch.ops.courier_fast.contrastive_lse(x, y, None, None, None, None, None, 0, ONE.double(), True, True)
    assert torch.isnan(row).all() and torch.isnan(col[1]) and not torch.isnan(col[[0, 2, 3]]).any()


@COMPILED
@pytest.mark.parametrize("offset", [2 ** 63 - 1, -2 ** 63, 2 ** 62])
def test_extreme_id_offset_means_no_positive_here(offset):
    """id_offset + row overflowed int64 (UB, flagged by UBSan); any id_offset outside [-N, M] now
    means what -N or M mean: no row's positive among y."""
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ids = torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    got = torch.ops.courier_fast.contrastive_lse(x, y, None, None, None, *ids, offset, ONE.double(), True, True)
    want = torch.ops.courier_fast.contrastive_lse(x, y, None, None, None, *ids, 4, ONE.double(), True, True)
    torch.testing.assert_close(got, want)  # every pair a hit: all -inf
    assert torch.isinf(got[0]).all()


def _core_args():
    from courier_fast.ops import attention_layout
    t, hist = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    seg = attention_layout.segments(t, hist)
    q, kv = torch.randn(6, 2, 2), torch.randn(6, 2, 2, 2)
    return [q, kv[:, 0], kv[:, 1], seg.target_rows, seg.key_rows, seg.target_offsets, seg.key_offsets, seg.order,
            None, 0, 0.5, seg.max_targets, seg.max_keys]


@pytest.mark.parametrize("index,value,exc,name", [
    (3, lambda a: a[:4], RuntimeError, "target_rows"),
    (4, lambda a: a.int(), TypeError, "key_rows"),
    (6, lambda a: a[:2], RuntimeError, "key_offsets"),
    (7, lambda a: a[None], RuntimeError, "order"),
    (8, lambda a: torch.zeros(6), TypeError, "key_padding_mask"),
    (8, lambda a: torch.zeros(5, dtype=torch.bool), RuntimeError, "key_padding_mask"),
    (0, lambda a: a.transpose(1, 2), RuntimeError, "head dim must be contiguous"),
    (9, lambda a: 3, RuntimeError, "causal"),
])
def test_triton_attention_core_checks_every_argument(index, value, exc, name):
    pytest.importorskip("triton")
    from courier_fast.ops.backends import triton as _triton_ops
    args = _core_args()
    args[index] = value(args[index])
    with pytest.raises(exc, match=name):
        _triton_ops.attention_core(*args)


def test_triton_attention_core_asserts_a_negative_row_on_the_device(monkeypatch):
    """Index contents are trusted by the op; the kernel's device assert (compiled in under
    TRITON_DEBUG=1 on a GPU; here the interpreter's debug option, which TRITON_DEBUG does not
    reach, is set for the test) turns a negative target row into an error before it is used to
    read key_offsets (the short-history kernels read target_rows)."""
    pytest.importorskip("triton")
    import dataclasses

    from triton.runtime import interpreter

    from courier_fast.ops.backends import triton as _triton_ops
    from courier_fast.kernels import reconstruction_attention as kernels
    if not kernels.INTERPRET:
        pytest.skip("on a GPU the device asserts need TRITON_DEBUG=1 when the kernels compile")
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    args = _core_args()
    _triton_ops.attention_core(*args)  # a valid table passes the asserts
    args[3] = args[3].clone()
    args[3][2] = -1
    with pytest.raises(Exception, match="negative target_rows"):
        _triton_ops.attention_core(*args)
