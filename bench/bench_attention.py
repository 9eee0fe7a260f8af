"""Reconstruction attention: courier_fast backends side by side with peers, same inputs.

Peers: official (COURIER's public code: flat page-view targets, each with the history row it
belongs to copied per target, `mha(pv.unsqueeze(1), hist[idx], hist[idx])`, no padding mask),
mha_masked (nn.MultiheadAttention, key_padding_mask, no copy), sdpa (projections +
scaled_dot_product_attention with a mask: the peer every layout of ours is compared with), flex
(FlexAttention, where it runs). Ours: courier_fast:<backend> on the padded layout (B, P, d) with
key_padding_mask, and on the same problem as :lengths (right-aligned, as many valid items per row),
:history_index (the official call's own layout, flat targets + history_index: the one-line
change, no copy) and :jagged (history values (B*L, d) + offsets, targets + target_offsets).
Drop-ins: cf_mha (courier_fast.nn.MultiheadAttention) on mha_masked's call, and on
self-attention over the history (mha_self / cf_mha_self: query is key is value, where
nn.MultiheadAttention takes its native fast path in eval mode under no_grad).
Every row times forward+backward of out.float().square().mean() w.r.t. targets, history and the
weights (training mode), the forward under no_grad (ms_fwd), and the forward under no_grad with
the modules in eval mode (ms_fwd_eval). ratio / ratio_eval: the row's fwd+bwd / eval-forward
time over its peer's in the same run (ours and official: sdpa; cf_mha: mha_masked; cf_mha_self:
mha_self). floor_fraction = max(3 x history bytes / measured copy bandwidth, 3 x projection
FLOP / measured matmul rate) / measured fwd+bwd time; floor_fraction_eval the same with one
pass and the projection FLOP once, over the eval forward. On CPU each row runs in its own process,
--rounds times (default 2), the order of the rows reversed every other round (ABBA across rows:
a peer runs before its rows in one round and after them in the next, so that the machine's drift
between processes does not land on one side): a row's times are the medians of its rounds, its
ratios the medians of its per-round ratios (`rounds`: each round's fwd+bwd ms). On CPU a row with a
peer also times itself against the peer inside its own process, alternately on the same inputs
(mine, peer, peer, mine, ...), so that no drift between processes or over the run lands on one
side: paired_ratio / paired_ratio_eval, the median of the per-pair ratios (over the rounds' pairs).

    python bench/bench_attention.py --quick
    python bench/bench_attention.py --shape 4096 50 10     # B L P
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


_MODULES = []  # every module a row builds: measure_row puts them in eval mode for ms_fwd_eval


def _mha(d, h, device, dtype, cls=nn.MultiheadAttention):
    torch.manual_seed(0)
    mha = cls(d, h, batch_first=True, device=device, dtype=dtype)
    _MODULES.append(mha)
    return mha


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


def _ours(mha, backend):
    import courier_fast as cf
    mod = cf.nn.ReconstructionAttention.from_mha(mha, backend=backend)
    _MODULES.append(mod)
    return mod


def courier(mha, backend):
    mod = _ours(mha, backend)
    return lambda t, hist, pad: mod(t, hist, key_padding_mask=pad)


def courier_history_index(mha, backend):
    """The official call with the one-line change: mod(pv, hist, history_index=idx)."""
    mod = _ours(mha, backend)

    def fn(t, hist, pad):
        pv, idx = _flat(t)
        return mod(pv, hist, key_padding_mask=pad, history_index=idx).reshape(t.shape)
    return fn


def courier_lengths(mha, backend):
    """lengths (B,) instead of a mask: each row's valid items right-aligned (as many as pad keeps)."""
    mod = _ours(mha, backend)
    return lambda t, hist, pad: mod(t, hist, lengths=(~pad).sum(1))


def courier_jagged(mha, backend):
    """The same problem as jagged values + offsets (rows of L history items and P targets; the
    values are views of the padded tensors, no copy), max_history_len given (no host read)."""
    mod = _ours(mha, backend)

    def fn(t, hist, pad):
        b, p, d = t.shape
        length = hist.shape[1]
        t_off = torch.arange(b + 1, device=t.device) * p
        h_off = torch.arange(b + 1, device=t.device) * length
        out = mod(t.reshape(b * p, d), hist.reshape(b * length, d), key_padding_mask=pad.reshape(-1),
                  history_offsets=h_off, target_offsets=t_off, max_history_len=length)
        return out.reshape(t.shape)
    return fn


def cf_mha(mha):
    """courier_fast.nn.MultiheadAttention (the drop-in) on mha_masked's call."""
    import courier_fast as cf
    mod = _mha(mha.embed_dim, mha.num_heads, mha.in_proj_weight.device, mha.in_proj_weight.dtype,
               cls=cf.nn.MultiheadAttention)
    return lambda t, hist, pad: mod(t, hist, hist, key_padding_mask=pad, need_weights=False)[0]


def mha_self(mha):
    """Self-attention over the history: nn's native fast path in eval mode under no_grad."""
    return lambda t, hist, pad: mha(hist, hist, hist, key_padding_mask=pad, need_weights=False)[0]


def cf_mha_self(mha):
    import courier_fast as cf
    mod = _mha(mha.embed_dim, mha.num_heads, mha.in_proj_weight.device, mha.in_proj_weight.dtype,
               cls=cf.nn.MultiheadAttention)
    return lambda t, hist, pad: mod(hist, hist, hist, key_padding_mask=pad, need_weights=False)[0]


LAYOUTS = {"": courier, ":lengths": courier_lengths, ":history_index": courier_history_index,
           ":jagged": courier_jagged}
PEER = {"cf_mha": "mha_masked", "cf_mha_self": "mha_self"}  # the rest: sdpa
SELF = ("mha_self", "cf_mha_self")  # rows whose queries are the history (P = L)


def implementations(mha, device):
    from courier_fast.ops import dispatch
    impls = {"sdpa": sdpa(mha), "official": official(mha), "mha_masked": mha_masked(mha), "flex": flex(mha),
             "cf_mha": cf_mha(mha), "mha_self": mha_self(mha), "cf_mha_self": cf_mha_self(mha)}
    impls.update({f"courier_fast:auto{suffix}": make(mha, "auto") for suffix, make in LAYOUTS.items()})
    for name, (ok, _) in dispatch.op_backends("reconstruction_attention").items():
        impl = dispatch.implementations("reconstruction_attention").get(name)
        if ok and impl and device in impl.devices:
            impls.update({f"courier_fast:{name}{suffix}": make(mha, name) for suffix, make in LAYOUTS.items()})
    return impls


def _eval_forward_ms(fn, t, hist, pad, device, reps):
    """Median ms of the forward under no_grad with every module of the row in eval mode."""
    for m in _MODULES:
        m.eval()
    try:
        with torch.no_grad():
            fn(t, hist, pad)  # warm-up
            return round(harness.median_ms(lambda: fn(t, hist, pad), device, reps), 3)
    finally:
        for m in _MODULES:
            m.train()


def _paired(fn, peer_fn, t, hist, pad, reps):
    """fn's time over peer_fn's, both in this process on the same inputs, alternating (mine, peer,
    peer, mine, ...): per mode, the median of the reps per-pair ratios (and the ratios), for
    fwd+bwd in training mode and for the forward under no_grad in eval mode."""
    def train_step(f):
        t.grad = hist.grad = None
        f(t, hist, pad).float().square().mean().backward()

    def eval_step(f):
        with torch.no_grad():
            f(t, hist, pad)

    out = {}
    try:
        for name, step, training in (("paired_ratio", train_step, True), ("paired_ratio_eval", eval_step, False)):
            for m in _MODULES:
                m.train(training)
            step(fn), step(peer_fn)  # warm-up
            ratios = []
            for r in range(reps):
                ms = {}
                for which, f in (("mine", fn), ("peer", peer_fn)) if r % 2 == 0 else (("peer", peer_fn), ("mine", fn)):
                    t0 = time.perf_counter()
                    step(f)
                    ms[which] = time.perf_counter() - t0
                ratios.append(ms["mine"] / ms["peer"])
            out[name + "s"] = [round(x, 4) for x in ratios]
    finally:
        for m in _MODULES:
            m.train()
    return out


def measure_row(key, b, length, p, d, h, dtype, device, reps, seed=0):
    mha = _mha(d, h, device, dtype)
    impls = implementations(mha, device)
    fn = impls[key]
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, p, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    hist = torch.randn(b, length, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    pad = torch.rand(b, length, generator=g) < 0.3
    pad[:, 0] = False  # nn.MultiheadAttention gives NaN on rows without a valid item
    pad = pad.to(device)
    res = harness.measure(lambda t, hist: fn(t, hist, pad).float().square().mean(), [t, hist], device, reps)
    if "error" not in res:
        res["ms_fwd_eval"] = _eval_forward_ms(fn, t, hist, pad, device, reps)
        peer = PEER.get(key, "sdpa")
        if device == "cpu" and key not in (peer, "mha_masked", "mha_self"):
            res.update(_paired(fn, impls[peer], t, hist, pad, reps))
    return res


def _combined(runs):
    """One row from its rounds: the first error if any failed, else the median times, the largest
    peak memory, and each round's fwd+bwd ms."""
    for res in runs:
        if "ms_fwd_bwd" not in res:
            return res
    out = dict(runs[0])
    for k in ("ms_fwd", "ms_fwd_bwd", "ms_fwd_eval"):
        if k in out:
            out[k] = round(statistics.median(res[k] for res in runs), 3)
    out["peak_mem_mb"] = max(res["peak_mem_mb"] for res in runs)
    out["rounds"] = [res["ms_fwd_bwd"] for res in runs]
    for k in ("paired_ratio", "paired_ratio_eval"):  # the median of every round's pairs
        if k + "s" in out:
            out[k + "s"] = [x for res in runs for x in res[k + "s"]]
            out[k] = round(statistics.median(out[k + "s"]), 3)
    return out


def _median_ratio(mine, theirs, key):
    """Median over rounds of my time over the peer's in the same round."""
    return round(statistics.median(a[key] / b[key] for a, b in zip(mine, theirs)), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("B", "L", "P"))
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dtype", nargs="*")
    ap.add_argument("--impl", nargs="*")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="CPU: runs of every row, in ABBA order across rows")
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
    if args.quick and not args.impl:  # auto's rows only (on CPU they are the cpu backend's)
        keys = [k for k in keys if not k.startswith("courier_fast:") or k.startswith("courier_fast:auto")]
    # peers first, so that every later row has its ratio
    keys = sorted(keys, key=lambda k: (k not in ("sdpa", "mha_masked", "mha_self"), keys.index(k)))

    ceilings = {dt: harness.matmul_ceiling(device, getattr(torch, dt)) for dt in dtypes}
    bandwidth = harness.copy_bandwidth(device)
    print(f"device={device} torch={torch.__version__} copy {bandwidth / 1e9:.1f} GB/s, matmul (TFLOP/s): "
          + ", ".join(f"{k}={v / 1e12:.2f}" for k, v in ceilings.items()))
    print(f"{'impl':<34}{'B':>6}{'L':>5}{'P':>4}{'dtype':>9}{'fwd+bwd ms':>11}{'ratio':>7}{'floor':>7}"
          f"{'eval fwd ms':>12}{'ratio':>7}{'floor':>7}{'peak MB':>9}{'paired':>7}{'p.eval':>7}")
    rows = []
    for dt in dtypes:
        elem = torch.empty((), dtype=getattr(torch, dt)).element_size()
        for b, length, p in shapes:
            done, runs = {}, {key: [] for key in keys}
            for r in range(max(1, args.rounds) if device == "cpu" else 1):
                for key in keys if r % 2 == 0 else keys[::-1]:
                    if device == "cpu":
                        runs[key].append(harness.run_isolated(__file__, f"{key}:{b}:{length}:{p}:{dt}", reps))
                    else:
                        runs[key].append(measure_row(key, b, length, p, d, h, getattr(torch, dt), device, reps))
                        torch.cuda.empty_cache()
            for key in keys:
                res = _combined(runs[key])
                row = {"impl": key, "shape": {"B": b, "L": length, "P": p, "d": d, "h": h}, "dtype": dt, **res}
                done[key] = row
                if "ms_fwd_bwd" not in res:
                    print(f"{key:<34}{b:>6}{length:>5}{p:>4}{dt:>9}  {res.get('error', '')[:70]}")
                    rows.append(row)
                    continue
                queries = length if key in SELF else p
                proj_flop = 2 * b * (2 * queries + 2 * length) * d * d  # Q, K, V and output projections
                floor_s = max(3 * b * length * d * elem / bandwidth, 3 * proj_flop / ceilings[dt])
                row["floor_fraction"] = round(floor_s / (res["ms_fwd_bwd"] / 1e3), 4)
                row["floor_fraction_eval"] = round(floor_s / 3 / (res["ms_fwd_eval"] / 1e3), 4)
                peer = done.get(PEER.get(key, "sdpa"))
                if peer and "ms_fwd_bwd" in peer and peer is not row:
                    mine, theirs = runs[key], runs[peer["impl"]]
                    row["peer"] = peer["impl"]
                    row["ratio"] = _median_ratio(mine, theirs, "ms_fwd_bwd")
                    row["ratio_eval"] = _median_ratio(mine, theirs, "ms_fwd_eval")
                ratio = lambda k: f"{row[k]:>7.2f}" if k in row else f"{'':>7}"
                print(f"{key:<34}{b:>6}{length:>5}{p:>4}{dt:>9}{res['ms_fwd_bwd']:>11.1f}{ratio('ratio')}"
                      f"{row['floor_fraction']:>7.3f}{res['ms_fwd_eval']:>12.1f}{ratio('ratio_eval')}"
                      f"{row['floor_fraction_eval']:>7.3f}{res['peak_mem_mb']:>9.1f}{ratio('paired_ratio')}"
                      f"{ratio('paired_ratio_eval')}")
                rows.append(row)
    ceilings["copy_bytes_per_s"] = bandwidth
    print("wrote", harness.write_results("attention", ceilings, rows, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
