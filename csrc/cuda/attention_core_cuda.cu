// CUDA backend of courier_fast::attention_core: the reconstruction-attention core after the
// Q/K/V projections. One warp per (row b, head, target) in the forward and the dQ pass, one
// warp per (row b, head, history item) in the dK/dV pass: no atomics, K/V read in place (never
// copied per target), online softmax over the history, so any L works without an L x P buffer.
// Head dim up to 256 (8 values per lane); fp32 accumulation (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace courier_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxPerLane = 8;  // head dim <= 256
constexpr int kThreads = 128;   // 4 warps per block

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct Strides {  // (batch, head, row) element strides of a (B, h, T, dh) view; dh contiguous
  int64_t b, h, t;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_lane(const scalar_t* row, int lane, int dh, acc_t* out, acc_t scale) {
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int j = lane + kWarp * e;
    out[e] = j < dh ? static_cast<acc_t>(row[j]) * scale : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const acc_t* a, const scalar_t* row, int lane, int dh) {
  acc_t part = 0;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) part += a[e] * static_cast<acc_t>(row[j]);
  }
  return warp_sum(part);
}

template <typename scalar_t, typename acc_t>
__global__ void attn_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, const bool* __restrict__ pad,
                                acc_t* __restrict__ out, acc_t* __restrict__ lse, int64_t B, int64_t H,
                                int64_t P, int64_t L, int dh, acc_t sm_scale, int64_t causal, Strides sq,
                                Strides sk, Strides sv, Strides so) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= B * H * P) return;
  const int64_t p = warp % P, bh = warp / P, h = bh % H, b = bh / H;
  acc_t qr[kMaxPerLane], acc[kMaxPerLane];
  load_lane(q + b * sq.b + h * sq.h + p * sq.t, lane, dh, qr, sm_scale);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) acc[e] = 0;
  acc_t m = -INFINITY, l = 0;
  const int64_t end = causal ? (p + causal / 2 < L ? p + causal / 2 : L) : L;  // strict: s < p; inclusive: s <= p
  for (int64_t s = 0; s < end; ++s) {
    if (pad && pad[b * L + s]) continue;
    const acc_t score = lane_dot(qr, k + b * sk.b + h * sk.h + s * sk.t, lane, dh);
    const acc_t m_new = score > m ? score : m;
    const acc_t alpha = exp(m - m_new);  // m = -inf on the first valid item: alpha = 0
    const acc_t w = exp(score - m_new);
    l = l * alpha + w;
    const scalar_t* vs = v + b * sv.b + h * sv.h + s * sv.t;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int j = lane + kWarp * e;
      acc[e] = acc[e] * alpha + (j < dh ? w * static_cast<acc_t>(vs[j]) : acc_t(0));
    }
    m = m_new;
  }
  acc_t* op = out + b * so.b + h * so.h + p * so.t;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) op[j] = l > 0 ? acc[e] / l : acc_t(0);
  }
  if (lane == 0) lse[warp] = l > 0 ? m + log(l) : acc_t(-INFINITY);
}

// dQ[p] = sm_scale * sum_s P[p,s] (dP[p,s] - delta[p]) K[s],  dP[p,s] = <dO[p], V[s]>.
template <typename scalar_t, typename acc_t>
__global__ void attn_bwd_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                   const scalar_t* __restrict__ v, const bool* __restrict__ pad,
                                   const scalar_t* __restrict__ dout, const acc_t* __restrict__ lse,
                                   const acc_t* __restrict__ delta, acc_t* __restrict__ dq, int64_t B,
                                   int64_t H, int64_t P, int64_t L, int dh, acc_t sm_scale, int64_t causal,
                                   Strides sq, Strides sk, Strides sv, Strides so) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= B * H * P) return;
  const int64_t p = warp % P, bh = warp / P, h = bh % H, b = bh / H;
  acc_t qr[kMaxPerLane], dor[kMaxPerLane], acc[kMaxPerLane];
  load_lane(q + b * sq.b + h * sq.h + p * sq.t, lane, dh, qr, sm_scale);
  load_lane(dout + b * so.b + h * so.h + p * so.t, lane, dh, dor, acc_t(1));
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) acc[e] = 0;
  const acc_t row_lse = lse[warp], row_delta = delta[warp];
  const int64_t end = row_lse == -INFINITY ? 0 : (causal ? (p + causal / 2 < L ? p + causal / 2 : L) : L);
  for (int64_t s = 0; s < end; ++s) {
    if (pad && pad[b * L + s]) continue;
    const scalar_t* ks = k + b * sk.b + h * sk.h + s * sk.t;
    const acc_t prob = exp(lane_dot(qr, ks, lane, dh) - row_lse);
    const acc_t ds = prob * (lane_dot(dor, v + b * sv.b + h * sv.h + s * sv.t, lane, dh) - row_delta);
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int j = lane + kWarp * e;
      if (j < dh) acc[e] += ds * static_cast<acc_t>(ks[j]);
    }
  }
  acc_t* out = dq + warp * dh;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) out[j] = acc[e] * sm_scale;
  }
}

// dV[s] = sum_p P[p,s] dO[p],  dK[s] = sm_scale * sum_p P[p,s] (dP[p,s] - delta[p]) Q[p].
template <typename scalar_t, typename acc_t>
__global__ void attn_bwd_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     const scalar_t* __restrict__ v, const bool* __restrict__ pad,
                                     const scalar_t* __restrict__ dout, const acc_t* __restrict__ lse,
                                     const acc_t* __restrict__ delta, acc_t* __restrict__ dk,
                                     acc_t* __restrict__ dv, int64_t B, int64_t H, int64_t P, int64_t L,
                                     int dh, acc_t sm_scale, int64_t causal, Strides sq, Strides sk,
                                     Strides sv, Strides so) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= B * H * L) return;
  const int64_t s = warp % L, bh = warp / L, h = bh % H, b = bh / H;
  acc_t kr[kMaxPerLane], vr[kMaxPerLane], gk[kMaxPerLane], gv[kMaxPerLane];
  load_lane(k + b * sk.b + h * sk.h + s * sk.t, lane, dh, kr, sm_scale);
  load_lane(v + b * sv.b + h * sv.h + s * sv.t, lane, dh, vr, acc_t(1));
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) gk[e] = gv[e] = 0;
  const bool masked = pad && pad[b * L + s];
  for (int64_t p = causal ? s + 1 - causal / 2 : 0; !masked && p < P; ++p) {  // strict: p > s; inclusive: p >= s
    const acc_t row_lse = lse[bh * P + p];
    if (row_lse == -INFINITY) continue;
    const scalar_t* qp = q + b * sq.b + h * sq.h + p * sq.t;
    const scalar_t* dop = dout + b * so.b + h * so.h + p * so.t;
    const acc_t prob = exp(lane_dot(kr, qp, lane, dh) - row_lse);
    const acc_t ds = prob * (lane_dot(vr, dop, lane, dh) - delta[bh * P + p]);
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int j = lane + kWarp * e;
      if (j < dh) {
        gv[e] += prob * static_cast<acc_t>(dop[j]);
        gk[e] += ds * static_cast<acc_t>(qp[j]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int j = lane + kWarp * e;
    if (j < dh) {
      dk[warp * dh + j] = gk[e] * sm_scale;
      dv[warp * dh + j] = gv[e];
    }
  }
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_core: q, k, v must be (B, h, T, dh)");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "attention_core: CUDA tensors expected");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention_core: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention_core: q and k disagree in batch, heads or head dim");
  TORCH_CHECK(q.size(3) <= kWarp * kMaxPerLane, "attention_core: head dim > 256 is not supported");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_core: head dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attention_core: dtypes differ");
}

int64_t blocks_for(int64_t warps) { return (warps * kWarp + kThreads - 1) / kThreads; }

std::tuple<at::Tensor, at::Tensor> attention_core_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const std::optional<at::Tensor>& key_padding_mask,
                                                       int64_t causal, double sm_scale) {
  check_qkv(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), P = q.size(2), L = k.size(2), dh = q.size(3);
  // O in the accumulation type: the backward's delta = rowsum(dO * O) must come from the
  // unrounded O (from a 16-bit O its error does not cancel in dS); the caller rounds O for the
  // output projection.
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, P, H * dh}, q.options().dtype(acc_type));
  at::Tensor out4 = out.view({B, P, H, dh}).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, P}, q.options().dtype(acc_type));
  at::Tensor pad = key_padding_mask.has_value() && key_padding_mask->defined()
                       ? key_padding_mask->to(q.device(), at::kBool).contiguous() : at::Tensor();
  if (B * H * P == 0) return {out, lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_core_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attn_fwd_kernel<scalar_t, acc_t><<<blocks_for(B * H * P), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        pad.defined() ? pad.data_ptr<bool>() : nullptr, out4.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        B, H, P, L, static_cast<int>(dh), static_cast<acc_t>(sm_scale), causal, strides_of(q),
        strides_of(k), strides_of(v), strides_of(out4));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_core_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    int64_t causal, double sm_scale) {
  check_qkv(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), P = q.size(2), L = k.size(2), dh = q.size(3);
  const auto acc_type = lse.scalar_type();
  at::Tensor dout4 = grad_out.to(q.scalar_type()).contiguous().view({B, P, H, dh}).transpose(1, 2);
  at::Tensor out4 = out.view({B, P, H, dh}).transpose(1, 2);
  at::Tensor delta = (dout4.to(acc_type) * out4.to(acc_type)).sum(-1).contiguous();  // (B, H, P)
  at::Tensor dq = at::zeros({B, H, P, dh}, q.options().dtype(acc_type));
  at::Tensor dk = at::zeros({B, H, L, dh}, q.options().dtype(acc_type));
  at::Tensor dv = at::zeros_like(dk);
  at::Tensor pad = key_padding_mask.has_value() && key_padding_mask->defined()
                       ? key_padding_mask->to(q.device(), at::kBool).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_core_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* pp = pad.defined() ? pad.data_ptr<bool>() : nullptr;
    if (B * H * P > 0)
      attn_bwd_dq_kernel<scalar_t, acc_t><<<blocks_for(B * H * P), kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), pp,
          dout4.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dq.data_ptr<acc_t>(),
          B, H, P, L, static_cast<int>(dh), static_cast<acc_t>(sm_scale), causal, strides_of(q),
          strides_of(k), strides_of(v), strides_of(dout4));
    if (B * H * L > 0)
      attn_bwd_dkdv_kernel<scalar_t, acc_t><<<blocks_for(B * H * L), kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), pp,
          dout4.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
          dv.data_ptr<acc_t>(), B, H, P, L, static_cast<int>(dh), static_cast<acc_t>(sm_scale), causal,
          strides_of(q), strides_of(k), strides_of(v), strides_of(dout4));
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
