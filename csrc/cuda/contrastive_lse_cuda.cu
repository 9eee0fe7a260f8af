// CUDA backend of courier_fast::contrastive_lse: cuBLAS GEMMs (through ATen) on row chunks of
// the anchors, with fused CUDA epilogues for the accidental-hit mask, the masked row LSE, the
// online column LSE and the softmax-weighted gradient tile. Same chunked driver as the CPU backend (contrastive_lse.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../contrastive_lse.h"

namespace courier_fast {
namespace {

constexpr int kThreads = 256;

// Logit s plus bias b (0 or -inf for masked out, minus logq): an entry masked out or an
// accidental hit (s = -inf) stays -inf whatever the other value is (NaN, +inf).
template <typename T>
__device__ __forceinline__ T kept(T s, const T* bias, int64_t i) {
  if (!bias) return s;
  const T b = bias[i];
  return (s == T(-INFINITY) || b == T(-INFINITY)) ? T(-INFINITY) : s + b;
}

// Running (max, sum of exp(. - max)), with torch.logsumexp's special values: -inf entries are
// skipped (an empty set stays (-inf, 0)), a NaN entry makes the max NaN for good, a +inf entry
// makes it +inf (the sum then counts the +inf entries). No inf - inf appears.
template <typename T>
__device__ __forceinline__ T rescale(T l, T from, T to) {
  return from == to ? l : l * exp(from - to);
}

template <typename T>
__device__ __forceinline__ void online_add(T& m, T& l, T v) {
  if (v == -INFINITY || m != m) return;
  if (v != v) {
    m = v;
  } else if (v > m) {
    l = rescale(l, m, v) + T(1);
    m = v;
  } else {
    l += rescale(T(1), v, m);
  }
}

template <typename T>
__device__ __forceinline__ void online_merge(T& m, T& l, T m2, T l2) {
  if (m2 == -INFINITY || m != m) return;
  if (m == -INFINITY || m2 != m2) {
    m = m2;
    l = l2;
    return;
  }
  const T mx = m > m2 ? m : m2;
  l = rescale(l, m, mx) + rescale(l2, m2, mx);
  m = mx;
}

// One block per tile row: out[r] = logsumexp_i(s[r, i] + y_bias[i]).
template <typename T>
__global__ void row_lse_kernel(const T* __restrict__ s, const T* __restrict__ y_bias, int64_t m_cols,
                               T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const T* row = s + r * m_cols;
  T m = -INFINITY, l = 0;
  for (int64_t i = threadIdx.x; i < m_cols; i += blockDim.x)
    online_add(m, l, kept(row[i], y_bias, i));
  __shared__ T sm[kThreads], sl[kThreads];
  sm[threadIdx.x] = m;
  sl[threadIdx.x] = l;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      T a = sm[threadIdx.x], b = sl[threadIdx.x];
      online_merge(a, b, sm[threadIdx.x + stride], sl[threadIdx.x + stride]);
      sm[threadIdx.x] = a;
      sl[threadIdx.x] = b;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[r] = sm[0] == -INFINITY ? T(-INFINITY) : sm[0] + log(sl[0]);
}

// One thread per column: fold the tile's rows into the running column (max, sum).
template <typename T>
__global__ void col_update_kernel(const T* __restrict__ s, const T* __restrict__ x_bias, int64_t rows,
                                  int64_t m_cols, T* __restrict__ col_max, T* __restrict__ col_sum) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= m_cols) return;
  T m = col_max[i], l = col_sum[i];
  for (int64_t r = 0; r < rows; ++r) online_add(m, l, kept(s[r * m_cols + i], x_bias, r));
  col_max[i] = m;
  col_sum[i] = l;
}

// s <- g[r] exp(s + y_bias[i] - row_lse[r]) + h[i] exp(s + x_bias[r] - col_lse[i]).
// LSEs arrive with -inf replaced by +inf, so empty sets contribute exactly 0.
template <typename T>
__global__ void grad_tile_kernel(T* __restrict__ s, int64_t rows, int64_t m_cols,
                                 const T* __restrict__ y_bias, const T* __restrict__ x_bias,
                                 const T* __restrict__ g, const T* __restrict__ row_lse,
                                 const T* __restrict__ h, const T* __restrict__ col_lse) {
  const int64_t total = rows * m_cols;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / m_cols, i = idx - r * m_cols;
    const T v = s[idx];
    // a row or column whose LSE is infinite (arrives as +inf) gets no gradient, as on the CPU
    T out = row_lse[r] == T(INFINITY) ? T(0) : g[r] * exp(kept(v, y_bias, i) - row_lse[r]);
    if (h && col_lse[i] != T(INFINITY)) out += h[i] * exp(kept(v, x_bias, r) - col_lse[i]);
    s[idx] = out;
  }
}

// s[r, i] <- -inf where candidate i is an accidental hit of tile row r (same id, not its positive).
template <typename T>
__global__ void mask_hits_kernel(T* __restrict__ s, int64_t rows, int64_t m_cols, const int64_t* __restrict__ x_ids,
                                 const int64_t* __restrict__ y_ids, int64_t positive) {
  const int64_t total = rows * m_cols;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / m_cols, i = idx - r * m_cols;
    if (y_ids[i] == x_ids[r] && i != positive + r) s[idx] = T(-INFINITY);
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

struct CudaTileOps {
  static constexpr TilePolicy kTiles = kCudaTiles;  // by rows: >= 256 rows per GEMM

  static void mask_hits(at::Tensor& s, const TileIds& ids) {
    const int64_t rows = s.size(0), cols = s.size(1);
    if (rows * cols == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t blocks = std::min<int64_t>((rows * cols + kThreads - 1) / kThreads, 65535 * 8);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mask_hits_kernel", [&] {
      mask_hits_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), rows, cols, ids.x_ids.data_ptr<int64_t>(), ids.y_ids.data_ptr<int64_t>(),
          ids.positive);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void row_lse(at::Tensor& s, const at::Tensor& y_bias, at::Tensor& out) {
    const int64_t rows = s.size(0), cols = s.size(1);
    if (rows == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "row_lse_kernel", [&] {
      row_lse_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(y_bias), cols, out.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void col_update(const at::Tensor& s, const at::Tensor& x_bias, at::Tensor& col_max,
                         at::Tensor& col_sum) {
    const int64_t rows = s.size(0), cols = s.size(1);
    if (cols == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t blocks = (cols + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "col_update_kernel", [&] {
      col_update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(x_bias), rows, cols,
          col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void grad_tile(at::Tensor& s, const at::Tensor& y_bias, const at::Tensor& x_bias,
                        const at::Tensor& g, const at::Tensor& row_lse, const at::Tensor& h,
                        const at::Tensor& col_lse) {
    const int64_t rows = s.size(0), cols = s.size(1);
    if (rows * cols == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t blocks = std::min<int64_t>((rows * cols + kThreads - 1) / kThreads, 65535 * 8);
    at::Tensor gc = g.contiguous(), rl = row_lse.contiguous();
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "grad_tile_kernel", [&] {
      grad_tile_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), rows, cols, ptr_or_null<scalar_t>(y_bias),
          ptr_or_null<scalar_t>(x_bias), gc.data_ptr<scalar_t>(), rl.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(h), ptr_or_null<scalar_t>(col_lse));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CUDA, m) {
  register_contrastive_lse<CudaTileOps, c10::cuda::CUDAGuard>(m);
}

}  // namespace courier_fast
