// CPU backend of courier_fast::contrastive_lse: the shared chunked driver (contrastive_lse.h)
// with fused epilogues. Each epilogue makes one or two passes over a tile the GEMM just wrote
// (still in cache) and allocates nothing of tile size.
//
// The float32 loops use a polynomial exp that GCC vectorises, and are compiled for AVX-512,
// AVX2 and baseline x86-64 with runtime selection (target_clones): the extension is built once
// and runs on any x86-64 CPU. float64 (tests, gradcheck) uses the same loops with std::exp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "contrastive_lse.h"
#include "cpu_math.h"  // COURIER_CLONES, COURIER_INLINE, exp_approx

namespace courier_fast {
namespace {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---- the loops, for one block of tile rows (or columns) -------------------------------------

// Reductions keep kLanes independent partial results so that the compiler can vectorise them
// without reassociating floating-point sums on its own (no -ffast-math needed).
constexpr int64_t kLanes = 16;

// Logit s plus bias b (0 or -inf for masked out, minus logq): an entry masked out (b = -inf) or
// an accidental hit (s = -inf) stays -inf whatever the other value is (NaN, +inf): what is left
// out of a set never changes its LSE.
template <typename T>
COURIER_INLINE T kept(T s, T b) {
  return (s == kNegInf<T> || b == kNegInf<T>) ? kNegInf<T> : s + b;
}

// max(a, v) that keeps a NaN once seen (a NaN logit makes its LSE NaN, as torch.logsumexp).
template <typename T>
COURIER_INLINE T nan_max(T a, T v) {
  return (v > a || v != v) ? v : a;
}

template <typename T>
COURIER_INLINE void row_lse_rows(const T* s, const T* bias, int64_t r0, int64_t r1, int64_t m, T* out) {
  const int64_t m_vec = m - m % kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = s + r * m;
    T lane[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) lane[k] = kNegInf<T>;
    for (int64_t i = 0; i < m_vec; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) {
        lane[k] = nan_max(lane[k], bias ? kept(row[i + k], bias[i + k]) : row[i + k]);
      }
    T mx = kNegInf<T>;
    for (int64_t k = 0; k < kLanes; ++k) mx = nan_max(mx, lane[k]);
    for (int64_t i = m_vec; i < m; ++i) mx = nan_max(mx, bias ? kept(row[i], bias[i]) : row[i]);
    // nothing kept: the LSE of an empty set (-inf); a NaN or +inf logit: NaN or +inf
    if (mx == kNegInf<T> || mx != mx || mx == -kNegInf<T>) {
      out[r] = mx;
      continue;
    }
    for (int64_t k = 0; k < kLanes; ++k) lane[k] = 0;
    for (int64_t i = 0; i < m_vec; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) lane[k] += exp_approx((bias ? kept(row[i + k], bias[i + k]) : row[i + k]) - mx);
    T sum = 0;
    for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
    for (int64_t i = m_vec; i < m; ++i) sum += exp_approx((bias ? kept(row[i], bias[i]) : row[i]) - mx);
    out[r] = mx + std::log(sum);
  }
}

// Running column (max, sum) updated with the tile's rows, for columns [c0, c1).
template <typename T>
COURIER_INLINE void col_update_cols(const T* s, const T* x_bias, int64_t rows, int64_t m, int64_t c0,
                                    int64_t c1, T* col_max, T* col_sum, T* scratch) {
  const int64_t w = c1 - c0;
  T* tmax = scratch;
  T* tsum = scratch + w;
  for (int64_t i = 0; i < w; ++i) {
    tmax[i] = col_max[c0 + i];
    tsum[i] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T b = x_bias ? x_bias[r] : T(0);
    if (b == kNegInf<T>) continue;
    const T* row = s + r * m + c0;
    for (int64_t i = 0; i < w; ++i) {
      tmax[i] = nan_max(tmax[i], row[i] + b);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T b = x_bias ? x_bias[r] : T(0);
    if (b == kNegInf<T>) continue;
    const T* row = s + r * m + c0;
    for (int64_t i = 0; i < w; ++i) {
      const T shift = std::isinf(tmax[i]) ? T(0) : tmax[i];
      tsum[i] += exp_approx(row[i] + b - shift);
    }
  }
  // shift 0 for an infinite max: -inf (nothing yet) keeps the sum 0, +inf makes the LSE +inf
  // (finish_columns returns an infinite max as it is); a NaN max stays NaN.
  for (int64_t i = 0; i < w; ++i) {
    const T shift = std::isinf(tmax[i]) ? T(0) : tmax[i];
    col_sum[c0 + i] = col_sum[c0 + i] * exp_approx(col_max[c0 + i] - shift) + tsum[i];
    col_max[c0 + i] = tmax[i];
  }
}

// s <- g[r] exp(s + y_bias - row_lse[r]) + h[i] exp(s + x_bias[r] - col_lse[i]), rows [r0, r1).
// LSEs arrive with -inf replaced by +inf: an empty set contributes exactly 0.
template <typename T>
COURIER_INLINE void grad_rows(T* s, const T* y_bias, const T* x_bias, const T* g, const T* row_lse,
                              const T* h, const T* col_lse, int64_t r0, int64_t r1, int64_t m) {
  constexpr T kInfT = std::numeric_limits<T>::infinity();
  for (int64_t r = r0; r < r1; ++r) {
    T* row = s + r * m;
    const T gr = g[r], lse = row_lse[r];
    const T xb = x_bias ? x_bias[r] : T(0);
    const bool use_row = gr != 0 && lse != kInfT;
    const bool use_col = h != nullptr && xb != kNegInf<T>;
    if (!use_row && !use_col) {  // e.g. an unclicked anchor: no exp at all
      for (int64_t i = 0; i < m; ++i) row[i] = 0;
    } else if (!use_col) {
      for (int64_t i = 0; i < m; ++i) row[i] = gr * exp_approx((y_bias ? kept(row[i], y_bias[i]) : row[i]) - lse);
    } else if (!use_row) {
      for (int64_t i = 0; i < m; ++i) row[i] = h[i] * exp_approx(row[i] + xb - col_lse[i]);
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const T v = row[i];
        row[i] = gr * exp_approx((y_bias ? kept(v, y_bias[i]) : v) - lse) + h[i] * exp_approx(v + xb - col_lse[i]);
      }
    }
  }
}

// s[r, i] <- -inf where candidate i is an accidental hit of row r: the same id, not its positive.
template <typename T>
COURIER_INLINE void mask_hits_rows(T* s, const int64_t* x_ids, const int64_t* y_ids, int64_t positive,
                                   int64_t r0, int64_t r1, int64_t m) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = s + r * m;
    const int64_t id = x_ids[r], own = positive + r;
    for (int64_t i = 0; i < m; ++i) row[i] = (y_ids[i] == id && i != own) ? kNegInf<T> : row[i];
  }
}

// float32 entry points, cloned per instruction set.
COURIER_CLONES void row_lse_f32(const float* s, const float* b, int64_t r0, int64_t r1, int64_t m, float* out) {
  row_lse_rows(s, b, r0, r1, m, out);
}
COURIER_CLONES void col_update_f32(const float* s, const float* xb, int64_t rows, int64_t m, int64_t c0,
                                   int64_t c1, float* cm, float* cs, float* scratch) {
  col_update_cols(s, xb, rows, m, c0, c1, cm, cs, scratch);
}
COURIER_CLONES void grad_rows_f32(float* s, const float* yb, const float* xb, const float* g, const float* rl,
                                  const float* h, const float* cl, int64_t r0, int64_t r1, int64_t m) {
  grad_rows(s, yb, xb, g, rl, h, cl, r0, r1, m);
}

void row_lse_any(const float* s, const float* b, int64_t r0, int64_t r1, int64_t m, float* out) {
  row_lse_f32(s, b, r0, r1, m, out);
}
void row_lse_any(const double* s, const double* b, int64_t r0, int64_t r1, int64_t m, double* out) {
  row_lse_rows(s, b, r0, r1, m, out);
}
void col_update_any(const float* s, const float* xb, int64_t rows, int64_t m, int64_t c0, int64_t c1,
                    float* cm, float* cs, float* scratch) {
  col_update_f32(s, xb, rows, m, c0, c1, cm, cs, scratch);
}
void col_update_any(const double* s, const double* xb, int64_t rows, int64_t m, int64_t c0, int64_t c1,
                    double* cm, double* cs, double* scratch) {
  col_update_cols(s, xb, rows, m, c0, c1, cm, cs, scratch);
}
void grad_rows_any(float* s, const float* yb, const float* xb, const float* g, const float* rl,
                   const float* h, const float* cl, int64_t r0, int64_t r1, int64_t m) {
  grad_rows_f32(s, yb, xb, g, rl, h, cl, r0, r1, m);
}
void grad_rows_any(double* s, const double* yb, const double* xb, const double* g, const double* rl,
                   const double* h, const double* cl, int64_t r0, int64_t r1, int64_t m) {
  grad_rows(s, yb, xb, g, rl, h, cl, r0, r1, m);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

struct CpuTileOps {
  // 2^21 logits (8 MB fp32) per tile: amortises the GEMM's re-packing of y per tile; measured
  // best of 2^20..2^22 at N = 16384, d = 64 on the 2-core CI machine.
  static constexpr TilePolicy kTiles = kCpuTiles;
  static constexpr int64_t kColBlock = 512;

  static void mask_hits(at::Tensor& s, const TileIds& ids) {
    const int64_t rows = s.size(0), m = s.size(1);
    const int64_t* xi = ids.x_ids.data_ptr<int64_t>();
    const int64_t* yi = ids.y_ids.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mask_hits_cpu", [&] {
      scalar_t* sp = s.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        mask_hits_rows(sp, xi, yi, ids.positive, r0, r1, m);
      });
    });
  }

  static void row_lse(at::Tensor& s, const at::Tensor& y_bias, at::Tensor& out) {
    const int64_t rows = s.size(0), m = s.size(1);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "row_lse_cpu", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* bp = ptr_or_null<scalar_t>(y_bias);
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) { row_lse_any(sp, bp, r0, r1, m, op); });
    });
  }

  static void col_update(const at::Tensor& s, const at::Tensor& x_bias, at::Tensor& col_max,
                         at::Tensor& col_sum) {
    const int64_t rows = s.size(0), m = s.size(1);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "col_update_cpu", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* xb = ptr_or_null<scalar_t>(x_bias);
      scalar_t* cm = col_max.data_ptr<scalar_t>();
      scalar_t* cs = col_sum.data_ptr<scalar_t>();
      // Each thread owns whole column blocks: no races.
      at::parallel_for(0, (m + kColBlock - 1) / kColBlock, 1, [&](int64_t b0, int64_t b1) {
        scalar_t scratch[2 * kColBlock];
        for (int64_t b = b0; b < b1; ++b)
          col_update_any(sp, xb, rows, m, b * kColBlock, std::min(m, (b + 1) * kColBlock), cm, cs, scratch);
      });
    });
  }

  static void grad_tile(at::Tensor& s, const at::Tensor& y_bias, const at::Tensor& x_bias,
                        const at::Tensor& g, const at::Tensor& row_lse, const at::Tensor& h,
                        const at::Tensor& col_lse) {
    const int64_t rows = s.size(0), m = s.size(1);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "grad_tile_cpu", [&] {
      scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t *yb = ptr_or_null<scalar_t>(y_bias), *xb = ptr_or_null<scalar_t>(x_bias);
      const scalar_t *gp = g.data_ptr<scalar_t>(), *rl = row_lse.data_ptr<scalar_t>();
      const scalar_t *hp = ptr_or_null<scalar_t>(h), *cl = h.defined() ? col_lse.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        grad_rows_any(sp, yb, xb, gp, rl, hp, cl, r0, r1, m);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CPU, m) {
  register_contrastive_lse<CpuTileOps, NoDeviceGuard>(m);
}

}  // namespace courier_fast
