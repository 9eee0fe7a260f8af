"""Where the eval forward of reconstruction attention spends its time, ours against projections +
SDPA, stage by stage in one process (CPU): the NaN/Inf checks, the Q and K/V projections, the
attention core (ours: courier_fast::attention_core; SDPA's: scaled_dot_product_attention with the
mask), the output projection, and both whole calls. Every stage is timed under no_grad on the same
inputs as bench_attention.py's padded rows (B = 4096, P = 10, d = 256, h = 4, 30 % of the history
masked, item 0 always kept), in --rounds rounds whose stage order is reversed every other round;
each figure is the median of the rounds' medians.

    python bench/attention_eval_stages.py            # L = 5 and 50
    python bench/attention_eval_stages.py --L 5 --reps 9

writes bench/results/cpu-attention_eval_stages.json.
"""
import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def stages(b, length, p, d, h, seed=0):
    """{stage: zero-argument function}, each on the same seeded inputs."""
    import courier_fast as cf
    from courier_fast import _validate
    from courier_fast.ops import attention_layout

    torch.manual_seed(seed)
    dh = d // h
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True).eval()
    w, bw = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    wo, bo = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()
    t, hist = torch.randn(b, p, d), torch.randn(b, length, d)
    pad = torch.rand(b, length) < 0.3
    pad[:, 0] = False
    keep = ~pad[:, None, None, :]
    q = F.linear(t.reshape(-1, d), w[:d], bw[:d]).view(-1, h, dh)
    k, v = F.linear(hist.reshape(-1, d), w[d:], bw[d:]).view(-1, 2, h, dh).unbind(1)
    seg = attention_layout.segments(t, hist, pad)

    def our_core():
        return torch.ops.courier_fast.attention_core(q, k, v, seg.target_rows, seg.key_rows, seg.target_offsets,
                                                     seg.key_offsets, seg.order, seg.key_padding_mask, 0,
                                                     1 / math.sqrt(dh), seg.max_targets, seg.max_keys)

    out = our_core()[0]
    qs, ks, vs = (x.view(b, -1, h, dh).transpose(1, 2) for x in (q, k, v))

    def sdpa_total():
        qp = F.linear(t, w[:d], bw[:d]).view(b, p, h, dh).transpose(1, 2)
        kp, vp = F.linear(hist, w[d:], bw[d:]).view(b, length, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)
        return F.linear(o.transpose(1, 2).reshape(b, p, d), wo, bo)

    return {
        "checks": lambda: (_validate.all_finite(t), _validate.all_finite(hist)),
        "q_proj": lambda: F.linear(t.reshape(-1, d), w[:d], bw[:d]),
        "kv_proj": lambda: F.linear(hist.reshape(-1, d), w[d:], bw[d:]),
        "core_ours": our_core,
        "core_sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep),
        "out_proj": lambda: F.linear(out, wo, bo),
        "total_ours": lambda: cf.reconstruction_attention(t, hist, w, bw, wo, bo, h, key_padding_mask=pad,
                                                          backend="cpu"),
        "total_sdpa": sdpa_total,
    }


def measure(length, reps, rounds, b=4096, p=10, d=256, h=4):
    fns = stages(b, length, p, d, h)
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for r in range(rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[name].append(harness.median_ms(fns[name], "cpu", reps))
    return {"shape": {"B": b, "L": length, "P": p, "d": d, "h": h},
            "ms": {name: round(statistics.median(ts), 3) for name, ts in times.items()},
            "rounds_ms": {name: [round(x, 3) for x in ts] for name, ts in times.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, nargs="*", default=[5, 50])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for length in args.L:
        row = measure(length, args.reps, args.rounds)
        print(f"L = {length}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["ms"].items()))
        rows.append(row)
    print("wrote", harness.write_results("attention_eval_stages", {}, rows, args.out))


if __name__ == "__main__":
    main()
