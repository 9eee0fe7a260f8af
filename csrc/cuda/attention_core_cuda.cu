// CUDA backend of courier_fast::attention_core: the reconstruction-attention core after the
// Q/K/V projections, over segments (every input layout: padded, history_index, jagged; see
// courier_fast/ops/attention_layout.py). One warp per (target, head) in the forward and the dQ pass,
// each target walking only its own row's keys; in the dK/dV pass one warp per (history item,
// chunk of its row's targets, head) (the split of attention_core.h: a row shared by 10^5 targets
// is not one warp's serial walk), then a fixed-order sum of the chunks' fp32 partials: no
// atomics, K/V read in place (never copied per target), online softmax over the history, so any
// L works without an L x P buffer. Every
// product is an FMA on exactly the (target, key) pairs that exist (no tile padding: short
// histories waste nothing); head dim up to 256 (1, 2, 4 or 8 values per lane, the smallest that
// fits); fp32 accumulation (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../attention_core.h"

// Device-side bound checks of the segment table's contents (trusted by the host, see
// attention_core.h): compiled in with COURIER_DEVICE_ASSERTS (setup.py: COURIER_FAST_DEVICE_ASSERTS=1).
#ifdef COURIER_DEVICE_ASSERTS
#define COURIER_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#else
#define COURIER_KERNEL_ASSERT(cond) ((void)0)
#endif

namespace courier_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 128;  // 4 warps per block

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct Strides {  // (row, head) element strides of a (N, h, dh) view; dh contiguous
  int64_t t, h;
};

// The segment table (courier_fast/ops/attention_layout.py), int64: target t attends the keys
// [key_offsets[r], key_offsets[r+1]) of its row r = target_rows[t]; order[target_offsets[r] ..
// target_offsets[r+1]) are row r's targets; pad (S,) True = padding or null. B rows, T targets,
// S keys: the bounds the device asserts check the table's contents against.
struct Segments {
  const int64_t* target_rows;
  const int64_t* key_rows;
  const int64_t* target_offsets;
  const int64_t* key_offsets;
  const int64_t* order;
  const bool* pad;
  int64_t B, T, S;
};

// The (target, head) of the calling warp (w = t * H + h) and its row's keys [k0, k0 + count);
// false for a warp past the last. The forward's and the dQ pass's preamble.
struct TargetWarp {
  int64_t warp, t, h, row, k0, count;
  int lane;
};

__device__ __forceinline__ bool target_warp(const Segments& seg, int64_t H, TargetWarp& w) {
  w.warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  w.lane = threadIdx.x % kWarp;
  if (w.warp >= seg.T * H) return false;
  w.t = w.warp / H;
  w.h = w.warp % H;
  w.row = seg.target_rows[w.t];
  COURIER_KERNEL_ASSERT(w.row >= 0 && w.row < seg.B);
  w.k0 = seg.key_offsets[w.row];
  w.count = seg.key_offsets[w.row + 1] - w.k0;
  COURIER_KERNEL_ASSERT(w.k0 >= 0 && w.count >= 0 && w.k0 + w.count <= seg.S);
  return true;
}

// kPerLane values per lane: head dims up to 32 * kPerLane (the host picks the smallest).
template <int kPerLane, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_lane(const scalar_t* row, int lane, int dh, acc_t* out, acc_t scale) {
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int j = lane + kWarp * e;
    out[e] = j < dh ? static_cast<acc_t>(row[j]) * scale : acc_t(0);
  }
}

template <int kPerLane, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const acc_t* a, const scalar_t* row, int lane, int dh) {
  acc_t part = 0;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) part += a[e] * static_cast<acc_t>(row[j]);
  }
  return warp_sum(part);
}

// Keys a target at position pos of its row attends: [0, end) of the row's count keys.
// causal 0: all; 1 strict: s < pos; 2 inclusive: s <= pos.
__device__ __forceinline__ int64_t causal_end(int64_t pos, int64_t count, int64_t causal) {
  if (!causal) return count;
  const int64_t end = pos + causal / 2;
  return end < count ? end : count;
}

// One warp per (target, head) w = t * H + h: online softmax over the target's keys.
template <int kPerLane, typename scalar_t, typename acc_t>
__global__ void attn_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, Segments seg, acc_t* __restrict__ out,
                                acc_t* __restrict__ lse, int64_t H, int dh, acc_t sm_scale,
                                int64_t causal, Strides sq, Strides sk, Strides sv) {
  TargetWarp w;
  if (!target_warp(seg, H, w)) return;
  const int64_t warp = w.warp, t = w.t, h = w.h, row = w.row, k0 = w.k0, count = w.count;
  const int lane = w.lane;
  acc_t qr[kPerLane], acc[kPerLane];
  load_lane<kPerLane>(q + t * sq.t + h * sq.h, lane, dh, qr, sm_scale);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0;
  acc_t m = -INFINITY, l = 0;
  const int64_t end = causal_end(t - seg.target_offsets[row], count, causal);
  for (int64_t s = k0; s < k0 + end; ++s) {
    if (seg.pad && seg.pad[s]) continue;
    const acc_t score = lane_dot<kPerLane>(qr, k + s * sk.t + h * sk.h, lane, dh);
    const acc_t m_new = score > m ? score : m;
    const acc_t alpha = exp(m - m_new);  // m = -inf on the first valid item: alpha = 0
    const acc_t w = exp(score - m_new);
    l = l * alpha + w;
    const scalar_t* vs = v + s * sv.t + h * sv.h;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = lane + kWarp * e;
      acc[e] = acc[e] * alpha + (j < dh ? w * static_cast<acc_t>(vs[j]) : acc_t(0));
    }
    m = m_new;
  }
  acc_t* op = out + warp * dh;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) op[j] = l > 0 ? acc[e] / l : acc_t(0);
  }
  if (lane == 0) lse[warp] = l > 0 ? m + log(l) : acc_t(-INFINITY);
}

// dQ[t] = sm_scale * sum_s P[t,s] (dP[t,s] - delta[t]) K[s],  dP[t,s] = <dO[t], V[s]>; a warp per (t, h).
// delta[t] = <dO[t], O[t]> is computed here, with the same lane products and warp sum as dP, and
// written for the dK/dV pass: a target with one key (O = V exactly) then gets dS = 0 exactly.
template <int kPerLane, typename scalar_t, typename acc_t>
__global__ void attn_bwd_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                   const scalar_t* __restrict__ v, Segments seg,
                                   const scalar_t* __restrict__ dout, const acc_t* __restrict__ out,
                                   const acc_t* __restrict__ lse, acc_t* __restrict__ delta,
                                   acc_t* __restrict__ dq, int64_t H, int dh, acc_t sm_scale,
                                   int64_t causal, Strides sq, Strides sk, Strides sv, Strides so) {
  TargetWarp w;
  if (!target_warp(seg, H, w)) return;
  const int64_t warp = w.warp, t = w.t, h = w.h, row = w.row, k0 = w.k0, count = w.count;
  const int lane = w.lane;
  acc_t qr[kPerLane], dor[kPerLane], acc[kPerLane];
  load_lane<kPerLane>(q + t * sq.t + h * sq.h, lane, dh, qr, sm_scale);
  load_lane<kPerLane>(dout + t * so.t + h * so.h, lane, dh, dor, acc_t(1));
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0;
  const acc_t row_lse = lse[warp], row_delta = lane_dot<kPerLane>(dor, out + warp * dh, lane, dh);
  if (lane == 0) delta[warp] = row_delta;
  const int64_t end = row_lse == -INFINITY ? 0 : causal_end(t - seg.target_offsets[row], count, causal);
  for (int64_t s = k0; s < k0 + end; ++s) {
    if (seg.pad && seg.pad[s]) continue;
    const scalar_t* ks = k + s * sk.t + h * sk.h;
    const acc_t prob = exp(lane_dot<kPerLane>(qr, ks, lane, dh) - row_lse);
    const acc_t ds = prob * (lane_dot<kPerLane>(dor, v + s * sv.t + h * sv.h, lane, dh) - row_delta);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = lane + kWarp * e;
      if (j < dh) acc[e] += ds * static_cast<acc_t>(ks[j]);
    }
  }
  acc_t* o = dq + warp * dh;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) o[j] = acc[e] * sm_scale;
  }
}

// The dK/dV split (attention_core.h: dkdv_target_chunk; kernels/attention_split.py): row r's
// targets form m_r = ceil(n_r / chunk) pieces; its (piece c, key slot) pairs, chunk-major, are the
// warps key_pieces[r] + c * L_r + slot (L_r = min(row's keys, max_keys)), and for m_r > 1 also
// the workspace rows ws_offsets[r] + c * L_r + slot. All int64 (B+1,) device tables.
struct DkdvSplit {
  const int64_t* key_pieces;  // (B+1,) exclusive cumsum of m_r * L_r
  const int64_t* ws_offsets;  // (B+1,) exclusive cumsum of m_r * L_r over rows with m_r > 1
  int64_t chunk, max_keys;
};

// The last r in [0, B) with offsets[r] <= j, for 0 <= j < offsets[B] (offsets non-decreasing).
__device__ __forceinline__ int64_t row_of(const int64_t* offsets, int64_t B, int64_t j) {
  int64_t lo = 0, hi = B;  // offsets[lo] <= j < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= j) lo = mid;
    else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ int64_t row_keys(const Segments& seg, const DkdvSplit& split, int64_t row) {
  const int64_t n = seg.key_offsets[row + 1] - seg.key_offsets[row];
  return n < split.max_keys ? n : split.max_keys;
}

// Phase 1: dV[s] = sum_t P[t,s] dO[t],  dK[s] = sm_scale * sum_t P[t,s] (dP[t,s] - delta[t]) Q[t]
// over one piece's targets (<= chunk of key s's row, through order); a warp per (piece, key, head)
// w = j * H + h. A one-piece row writes dK/dV, a longer one fp32 partials into wk/wv.
template <int kPerLane, typename scalar_t, typename acc_t>
__global__ void attn_bwd_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     const scalar_t* __restrict__ v, Segments seg, DkdvSplit split,
                                     const scalar_t* __restrict__ dout, const acc_t* __restrict__ lse,
                                     const acc_t* __restrict__ delta, acc_t* __restrict__ dk,
                                     acc_t* __restrict__ dv, acc_t* __restrict__ wk, acc_t* __restrict__ wv,
                                     int64_t H, int dh, acc_t sm_scale, int64_t causal, Strides sq, Strides sk,
                                     Strides sv, Strides so) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t j = warp / H, h = warp % H;
  if (j >= split.key_pieces[seg.B]) return;  // past the last (piece, key): the grid is a host bound
  const int64_t row = row_of(split.key_pieces, seg.B, j), local = j - split.key_pieces[row];
  const int64_t keys = row_keys(seg, split, row), c = local / keys, slot = local % keys;
  const int64_t s = seg.key_offsets[row] + slot;
  const int64_t t0 = seg.target_offsets[row], count = seg.target_offsets[row + 1] - t0;
  const int64_t pieces = (count + split.chunk - 1) / split.chunk;
  COURIER_KERNEL_ASSERT(s < seg.S && t0 >= 0 && count >= 0 && t0 + count <= seg.T);
  acc_t kr[kPerLane], vr[kPerLane], gk[kPerLane], gv[kPerLane];
  load_lane<kPerLane>(k + s * sk.t + h * sk.h, lane, dh, kr, sm_scale);
  load_lane<kPerLane>(v + s * sv.t + h * sv.h, lane, dh, vr, acc_t(1));
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) gk[e] = gv[e] = 0;
  const bool masked = seg.pad && seg.pad[s];
  // this piece's targets [c * chunk, min((c + 1) * chunk, count)); causal: the targets at
  // positions p > slot (strict) or p >= slot (inclusive) see this key
  const int64_t first = causal ? slot + 1 - causal / 2 : 0, lo = c * split.chunk;
  const int64_t hi = lo + split.chunk < count ? lo + split.chunk : count;
  for (int64_t p = first > lo ? first : lo; !masked && p < hi; ++p) {
    const int64_t t = seg.order[t0 + p];
    COURIER_KERNEL_ASSERT(t >= 0 && t < seg.T);
    const acc_t row_lse = lse[t * H + h];
    if (row_lse == -INFINITY) continue;
    const scalar_t* qp = q + t * sq.t + h * sq.h;
    const scalar_t* dop = dout + t * so.t + h * so.h;
    const acc_t prob = exp(lane_dot<kPerLane>(kr, qp, lane, dh) - row_lse);
    const acc_t ds = prob * (lane_dot<kPerLane>(vr, dop, lane, dh) - delta[t * H + h]);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int jj = lane + kWarp * e;
      if (jj < dh) {
        gv[e] += prob * static_cast<acc_t>(dop[jj]);
        gk[e] += ds * static_cast<acc_t>(qp[jj]);
      }
    }
  }
  const int64_t at = pieces == 1 ? (s * H + h) * dh : ((split.ws_offsets[row] + local) * H + h) * dh;
  acc_t* ok_k = pieces == 1 ? dk : wk;
  acc_t* ok_v = pieces == 1 ? dv : wv;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int jj = lane + kWarp * e;
    if (jj < dh) {
      ok_k[at + jj] = gk[e] * sm_scale;
      ok_v[at + jj] = gv[e];
    }
  }
}

// Phase 2: a thread per (key s, head h, feature e) of a multi-piece row sums its partials
// wk/wv[ws_offsets[r] + c * L_r + slot] in chunk order c = 0 .. m_r - 1 (deterministic).
template <typename acc_t>
__global__ void attn_bwd_dkdv_reduce_kernel(Segments seg, DkdvSplit split, const acc_t* __restrict__ wk,
                                            const acc_t* __restrict__ wv, acc_t* __restrict__ dk,
                                            acc_t* __restrict__ dv, int64_t H, int64_t dh) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= seg.S * H * dh) return;
  const int64_t s = i / (H * dh), he = i % (H * dh), row = seg.key_rows[s];
  COURIER_KERNEL_ASSERT(row >= 0 && row < seg.B);
  const int64_t count = seg.target_offsets[row + 1] - seg.target_offsets[row];
  const int64_t pieces = (count + split.chunk - 1) / split.chunk, keys = row_keys(seg, split, row);
  const int64_t slot = s - seg.key_offsets[row];
  if (pieces <= 1 || slot >= keys) return;
  acc_t gk = 0, gv = 0;
  for (int64_t c = 0; c < pieces; ++c) {
    const int64_t at = (split.ws_offsets[row] + c * keys + slot) * H * dh + he;
    gk += wk[at];
    gv += wv[at];
  }
  dk[i] = gk;
  dv[i] = gv;
}

// The device tables of the split (ATen ops on the device: no host read) and its host bounds.
struct DkdvPlan {
  at::Tensor key_pieces, ws_offsets;
  int64_t chunk, warps_per_head, ws_rows;
};

DkdvPlan dkdv_plan(const at::Tensor& target_offsets, const at::Tensor& key_offsets, int64_t T, int64_t S,
                   int64_t max_keys, int64_t max_targets) {
  const int64_t B = target_offsets.size(0) - 1;
  const int64_t chunk = dkdv_target_chunk(T, B);
  const at::Tensor n = target_offsets.slice(0, 1) - target_offsets.slice(0, 0, B);
  const at::Tensor keys = (key_offsets.slice(0, 1) - key_offsets.slice(0, 0, B)).clamp_max(max_keys);
  const at::Tensor m = at::div(n + (chunk - 1), chunk, "floor");
  const at::Tensor per_row = m * keys;
  const at::Tensor zero = at::zeros({1}, per_row.options());
  return {at::cat({zero, per_row.cumsum(0)}),
          at::cat({zero, at::where(m > 1, per_row, at::zeros_like(per_row)).cumsum(0)}), chunk,
          dkdv_key_pieces(T, S, chunk, max_keys), dkdv_workspace_rows(T, S, chunk, max_keys, max_targets)};
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// What the forward and the backward share: the checked arguments, the device guard, the segment
// table's pointers (int64 contiguous tensors, kept alive here) and the sizes.
struct Launch {
  c10::cuda::CUDAGuard guard;
  at::Tensor target_rows, key_rows, target_offsets, key_offsets, order, pad;
  int64_t T, H, dh, S;
  cudaStream_t stream;

  Launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& target_rows_,
         const at::Tensor& key_rows_, const at::Tensor& target_offsets_, const at::Tensor& key_offsets_,
         const at::Tensor& order_, const std::optional<at::Tensor>& key_padding_mask, int64_t causal,
         int64_t max_targets, int64_t max_keys)
      : guard((check_attention_core_args(q, k, v, target_rows_, key_rows_, target_offsets_, key_offsets_, order_,
                                         key_padding_mask, causal, max_targets, max_keys, kWarp * 8),
               q.device())),
        target_rows(target_rows_.contiguous()), key_rows(key_rows_.contiguous()),
        target_offsets(target_offsets_.contiguous()), key_offsets(key_offsets_.contiguous()),
        order(order_.contiguous()),
        pad(key_padding_mask.has_value() && key_padding_mask->defined() ? key_padding_mask->contiguous()
                                                                        : at::Tensor()),
        T(q.size(0)), H(q.size(1)), dh(q.size(2)), S(k.size(0)), stream(at::cuda::getCurrentCUDAStream()) {}

  Segments segments() const {
    return {target_rows.data_ptr<int64_t>(), key_rows.data_ptr<int64_t>(), target_offsets.data_ptr<int64_t>(),
            key_offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
            pad.defined() ? pad.data_ptr<bool>() : nullptr, target_offsets.size(0) - 1, T, S};
  }
};

int64_t blocks_for(int64_t warps) { return (warps * kWarp + kThreads - 1) / kThreads; }

// Calls body.template operator()<kPerLane>() with the smallest kPerLane in {1, 2, 4, 8} such that
// 32 * kPerLane >= dh.
template <typename F>
void with_per_lane(int64_t dh, F&& body) {
  if (dh <= kWarp) body(std::integral_constant<int, 1>());
  else if (dh <= 2 * kWarp) body(std::integral_constant<int, 2>());
  else if (dh <= 4 * kWarp) body(std::integral_constant<int, 4>());
  else body(std::integral_constant<int, 8>());
}

std::tuple<at::Tensor, at::Tensor> attention_core_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& target_rows,
    const at::Tensor& key_rows, const at::Tensor& target_offsets, const at::Tensor& key_offsets,
    const at::Tensor& order, const std::optional<at::Tensor>& key_padding_mask, int64_t causal,
    double sm_scale, int64_t max_targets, int64_t max_keys) {
  const Launch run(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask, causal,
                   max_targets, max_keys);
  const int64_t T = run.T, H = run.H, dh = run.dh;
  // O in the accumulation type: the backward's delta = rowsum(dO * O) must come from the
  // unrounded O (from a 16-bit O its error does not cancel in dS); the caller rounds O for the
  // output projection.
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({T, H * dh}, q.options().dtype(acc_type));
  at::Tensor lse = at::empty({T, H}, q.options().dtype(acc_type));
  if (T * H == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_core_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_per_lane(dh, [&](auto per_lane) {
      attn_fwd_kernel<decltype(per_lane)::value, scalar_t, acc_t><<<blocks_for(T * H), kThreads, 0, run.stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), run.segments(),
          out.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), H, static_cast<int>(dh),
          static_cast<acc_t>(sm_scale), causal, strides_of(q), strides_of(k), strides_of(v));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_core_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& target_rows, const at::Tensor& key_rows,
    const at::Tensor& target_offsets, const at::Tensor& key_offsets, const at::Tensor& order,
    const std::optional<at::Tensor>& key_padding_mask, int64_t causal, double sm_scale,
    int64_t max_targets, int64_t max_keys) {
  const Launch run(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask, causal,
                   max_targets, max_keys);
  check_attention_core_backward_args(grad_out, q, out, lse);
  const int64_t T = run.T, H = run.H, dh = run.dh, S = run.S;
  const auto acc_type = lse.scalar_type();
  const at::Tensor lse_c = lse.contiguous();  // (T, H), read at t * H + h
  at::Tensor dout = grad_out.to(q.scalar_type()).contiguous().view({T, H, dh});
  at::Tensor out_c = out.to(acc_type).contiguous();  // (T, H * dh)
  at::Tensor delta = at::empty({T, H}, q.options().dtype(acc_type));  // written by the dQ pass
  at::Tensor dq = at::zeros({T, H, dh}, q.options().dtype(acc_type));
  at::Tensor dk = at::zeros({S, H, dh}, q.options().dtype(acc_type));
  at::Tensor dv = at::zeros_like(dk);
  const Segments seg = run.segments();
  const cudaStream_t stream = run.stream;
  const DkdvPlan plan = dkdv_plan(run.target_offsets, run.key_offsets, T, S, max_keys, max_targets);
  TORCH_CHECK(plan.warps_per_head * H * kWarp / kThreads < (int64_t(1) << 31),
              "attention_core: too many (target chunk, key, head) warps for one dK/dV launch");
  // fp32 (fp64 for fp64 inputs) partials of multi-piece rows; unused (and empty) when ws_rows = 0
  at::Tensor wk = at::empty({plan.ws_rows, H, dh}, q.options().dtype(acc_type));
  at::Tensor wv = at::empty_like(wk);
  const DkdvSplit split{plan.key_pieces.data_ptr<int64_t>(), plan.ws_offsets.data_ptr<int64_t>(), plan.chunk,
                        max_keys};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_core_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_per_lane(dh, [&](auto per_lane) {
      constexpr int kPerLane = decltype(per_lane)::value;
      if (T * H > 0)
        attn_bwd_dq_kernel<kPerLane, scalar_t, acc_t><<<blocks_for(T * H), kThreads, 0, stream>>>(
            q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), seg,
            dout.data_ptr<scalar_t>(), out_c.data_ptr<acc_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
            dq.data_ptr<acc_t>(), H, static_cast<int>(dh), static_cast<acc_t>(sm_scale), causal, strides_of(q),
            strides_of(k), strides_of(v), strides_of(dout));
      if (S * H > 0 && T > 0 && plan.warps_per_head > 0) {  // after the dQ pass: it reads delta
        attn_bwd_dkdv_kernel<kPerLane, scalar_t, acc_t>
            <<<blocks_for(plan.warps_per_head * H), kThreads, 0, stream>>>(
                q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), seg, split,
                dout.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
                dv.data_ptr<acc_t>(), wk.data_ptr<acc_t>(), wv.data_ptr<acc_t>(), H, static_cast<int>(dh),
                static_cast<acc_t>(sm_scale), causal, strides_of(q), strides_of(k), strides_of(v),
                strides_of(dout));
        if (plan.ws_rows > 0)
          attn_bwd_dkdv_reduce_kernel<acc_t><<<(S * H * dh + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
              seg, split, wk.data_ptr<acc_t>(), wv.data_ptr<acc_t>(), dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(),
              H, dh);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CUDA, m) {
  m.impl("attention_core", &attention_core_cuda);
  m.impl("attention_core_backward", &attention_core_backward_cuda);
}

}  // namespace courier_fast
