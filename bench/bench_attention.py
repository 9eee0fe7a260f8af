"""Reconstruction attention: courier_fast backends side by side with peers, same inputs.

Peers: official (COURIER's public code: flat page-view targets, each with the history row it
belongs to copied per target, `mha(pv.unsqueeze(1), hist[idx], hist[idx])`, no padding mask),
mha_masked (nn.MultiheadAttention, key_padding_mask, no copy), sdpa (projections +
scaled_dot_product_attention with a mask), flex (FlexAttention, where it runs). Ours:
courier_fast:<backend> on the padded layout (B, P, d) and courier_fast:<backend>:history_index
on the official call's own layout (flat targets + history_index: the one-line change, no copy).
Every row times forward and forward+backward of out.float().square().mean() w.r.t. targets,
history and the weights. floor_fraction = max(3 x history bytes / measured copy bandwidth,
3 x projection FLOP / measured matmul rate) / measured fwd+bwd time.

    python bench/bench_attention.py --quick
    python bench/bench_attention.py --shape 4096 50 10     # B L P
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def _mha(d, h, device, dtype):
    torch.manual_seed(0)
    return nn.MultiheadAttention(d, h, batch_first=True, device=device, dtype=dtype)


def _flat(t):
    """Targets (B, P, d) as the official code holds them: flat (B*P, d) and pv_batch_index (B*P,)."""
    b, p, d = t.shape
    return t.reshape(b * p, d), torch.arange(b, device=t.device).repeat_interleave(p)


def official(mha):
    def fn(t, hist, pad):
        pv, idx = _flat(t)
        return mha(pv.unsqueeze(1), hist[idx], hist[idx], need_weights=False)[0].squeeze(1).reshape(t.shape)
    return fn


def mha_masked(mha):
    return lambda t, hist, pad: mha(t, hist, hist, key_padding_mask=pad, need_weights=False)[0]


def _project(mha, t, hist):
    d, h = mha.embed_dim, mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    split = lambda x: x.view(x.shape[0], x.shape[1], h, d // h).transpose(1, 2)
    return split(F.linear(t, w_q, b_q)), split(F.linear(hist, w_k, b_k)), split(F.linear(hist, w_v, b_v))


def sdpa(mha):
    def fn(t, hist, pad):
        q, k, v = _project(mha, t, hist)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
        return mha.out_proj(o.transpose(1, 2).reshape(t.shape))
    return fn


def flex(mha):
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention)

    def fn(t, hist, pad):
        q, k, v = _project(mha, t, hist)
        score_mod = lambda score, b, h, q_idx, kv_idx: torch.where(pad[b, kv_idx], float("-inf"), score)
        o = compiled(q, k, v, score_mod=score_mod)
        return mha.out_proj(o.transpose(1, 2).reshape(t.shape))
    return fn


def courier(mha, backend):
    import courier_fast as cf
    mod = cf.nn.ReconstructionAttention.from_mha(mha, backend=backend)
    return lambda t, hist, pad: mod(t, hist, key_padding_mask=pad)


def courier_history_index(mha, backend):
    """The official call with the one-line change: mod(pv, hist, history_index=idx)."""
    import courier_fast as cf
    mod = cf.nn.ReconstructionAttention.from_mha(mha, backend=backend)

    def fn(t, hist, pad):
        pv, idx = _flat(t)
        return mod(pv, hist, key_padding_mask=pad, history_index=idx).reshape(t.shape)
    return fn


def implementations(mha, device):
    from courier_fast.ops import dispatch
    impls = {"official": official(mha), "mha_masked": mha_masked(mha), "sdpa": sdpa(mha), "flex": flex(mha),
             "courier_fast:auto": courier(mha, "auto"),
             "courier_fast:auto:history_index": courier_history_index(mha, "auto")}
    for name, (ok, _) in dispatch.op_backends("reconstruction_attention").items():
        impl = dispatch.implementations("reconstruction_attention").get(name)
        if ok and impl and device in impl.devices:
            impls[f"courier_fast:{name}"] = courier(mha, name)
            impls[f"courier_fast:{name}:history_index"] = courier_history_index(mha, name)
    return impls


def measure_row(key, b, length, p, d, h, dtype, device, reps, seed=0):
    mha = _mha(d, h, device, dtype)
    fn = implementations(mha, device)[key]
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, p, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    hist = torch.randn(b, length, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    pad = torch.rand(b, length, generator=g) < 0.3
    pad[:, 0] = False  # nn.MultiheadAttention gives NaN on rows without a valid item
    pad = pad.to(device)
    return harness.measure(lambda t, hist: fn(t, hist, pad).float().square().mean(), [t, hist], device, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("B", "L", "P"))
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dtype", nargs="*")
    ap.add_argument("--impl", nargs="*")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = harness.device_type()
    d, h = args.d, args.heads

    if args.one:
        key, b, length, p, dt = args.one.rsplit(":", 4)
        print(json.dumps(measure_row(key, int(b), int(length), int(p), d, h, getattr(torch, dt), device, args.reps)))
        return

    if args.quick:
        shapes, dtypes, reps = args.shape or [(64, 5, 5), (256, 50, 10)], args.dtype or ["float32"], 3
    elif device == "cuda":
        shapes = args.shape or [(64, 5, 5), (4096, 50, 10), (1024, 1024, 64)]
        dtypes, reps = args.dtype or ["float32", "bfloat16"], args.reps
    else:
        shapes, dtypes, reps = args.shape or [(4096, 5, 10), (4096, 50, 10)], args.dtype or ["float32"], args.reps
    keys = args.impl or list(implementations(_mha(d, h, device, torch.float32), device))

    ceilings = {dt: harness.matmul_ceiling(device, getattr(torch, dt)) for dt in dtypes}
    bandwidth = harness.copy_bandwidth(device)
    print(f"device={device} torch={torch.__version__} copy {bandwidth / 1e9:.1f} GB/s, matmul (TFLOP/s): "
          + ", ".join(f"{k}={v / 1e12:.2f}" for k, v in ceilings.items()))
    print(f"{'impl':<38}{'B':>6}{'L':>6}{'P':>5}{'dtype':>10}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MB':>10}{'floor':>8}")
    rows = []
    for dt in dtypes:
        elem = torch.empty((), dtype=getattr(torch, dt)).element_size()
        for b, length, p in shapes:
            for key in keys:
                if device == "cpu":
                    res = harness.run_isolated(__file__, f"{key}:{b}:{length}:{p}:{dt}", reps)
                else:
                    res = measure_row(key, b, length, p, d, h, getattr(torch, dt), device, reps)
                    torch.cuda.empty_cache()
                row = {"impl": key, "shape": {"B": b, "L": length, "P": p, "d": d, "h": h}, "dtype": dt, **res}
                if "ms_fwd_bwd" in res:
                    proj_flop = 2 * b * (2 * p + 2 * length) * d * d  # Q, K, V and output projections
                    floor_s = max(3 * b * length * d * elem / bandwidth, 3 * proj_flop / ceilings[dt])
                    row["floor_fraction"] = round(floor_s / (res["ms_fwd_bwd"] / 1e3), 4)
                    print(f"{key:<38}{b:>6}{length:>6}{p:>5}{dt:>10}{res['ms_fwd']:>10.2f}{res['ms_fwd_bwd']:>12.2f}"
                          f"{res['peak_mem_mb']:>10.1f}{row['floor_fraction']:>8.3f}")
                else:
                    print(f"{key:<38}{b:>6}{length:>6}{p:>5}{dt:>10}  {res.get('error', '')[:70]}")
                rows.append(row)
    ceilings["copy_bytes_per_s"] = bandwidth
    print("wrote", harness.write_results("attention", ceilings, rows, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
