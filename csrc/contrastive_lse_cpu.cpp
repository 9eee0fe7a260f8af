// CPU epilogues of courier_fast::contrastive_lse on one logits tile (interface and tile layout:
// contrastive_lse_cpu_tiles.h; the driver: contrastive_lse_cpu_driver.cpp). Each makes one or two
// passes over a tile its worker's GEMM just wrote (still in that core's cache) and allocates nothing.
//
// The float32 loops use a polynomial exp that GCC vectorises, and are compiled for AVX-512,
// AVX2 and baseline x86-64 with runtime selection (target_clones): the extension is built once
// and runs on any x86-64 CPU. float64 (tests, gradcheck) uses the same loops with std::exp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "contrastive_lse_cpu_tiles.h"
#include "cpu_math.h"  // COURIER_CLONES, COURIER_INLINE, exp_approx

namespace courier_fast {
namespace {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---- the loops, for one tile (see contrastive_lse_cpu_tiles.h) -------------------------------

// Reductions keep kLanes independent partial results so that the compiler can vectorise them
// without reassociating floating-point sums on its own (no -ffast-math needed). 64 lanes are
// four AVX-512 registers: four independent chains (with one, every max or add of the loop
// waits for the previous one; the row max ran ~6x slower).
constexpr int64_t kLanes = 64;

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
COURIER_INLINE T row_value(const T* row, const T* bias, int64_t i) {
  return bias ? kept(row[i], bias[i]) : row[i];
}

// Largest kept entry of one tile row (-inf for none, NaN if any is NaN).
template <typename T>
COURIER_INLINE T row_max(const T* row, const T* bias, int64_t w) {
  const int64_t w_vec = w - w % kLanes;
  T lane[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) lane[k] = kNegInf<T>;
  for (int64_t i = 0; i < w_vec; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lane[k] = nan_max(lane[k], row_value(row, bias, i + k));
  T mx = kNegInf<T>;
  for (int64_t k = 0; k < kLanes; ++k) mx = nan_max(mx, lane[k]);
  for (int64_t i = w_vec; i < w; ++i) mx = nan_max(mx, row_value(row, bias, i));
  return mx;
}

// sum_i exp(row value - shift), and, when col_sum is given, col_sum[i] += each term.
template <typename T>
COURIER_INLINE T row_exp_sum(const T* row, const T* bias, int64_t w, T shift, T* col_sum) {
  const int64_t w_vec = w - w % kLanes;
  T lane[kLanes] = {};
  if (col_sum) {
    for (int64_t i = 0; i < w_vec; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) {
        const T e = exp_approx(row_value(row, bias, i + k) - shift);
        lane[k] += e;
        col_sum[i + k] += e;
      }
  } else {
    for (int64_t i = 0; i < w_vec; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) lane[k] += exp_approx(row_value(row, bias, i + k) - shift);
  }
  T sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
  for (int64_t i = w_vec; i < w; ++i) {
    const T e = exp_approx(row_value(row, bias, i) - shift);
    sum += e;
    if (col_sum) col_sum[i] += e;
  }
  return sum;
}

template <typename T>
COURIER_INLINE void merge_state(T& m, T& s, T m2, T s2) {
  if (m2 == kNegInf<T>) return;  // nothing new
  if (m == kNegInf<T>) {
    m = m2;
    s = s2;
    return;
  }
  const T nm = nan_max(m, m2);
  if (nm != nm || std::isinf(nm)) {  // NaN or +inf: the LSE is nm whatever the sums
    m = nm;
    s = 1;
    return;
  }
  s = s * std::exp(m - nm) + s2 * std::exp(m2 - nm);
  m = nm;
}

template <typename T>
constexpr bool kOneExp = false;  // float64 keeps one exp per direction (its exact path)
template <>
constexpr bool kOneExp<float> = true;

// How far below the tile's largest entry every row's and column's own largest entry may lie for
// the one-exp forward (exp(v - T) then keeps every term within e^-37 of its own set's largest,
// still a normal float), and how far apart a tile's LSEs may lie for the one-exp gradient
// (terms below e^-47 of their set's total are dropped).
constexpr float kForwardSpread = 50.f;
constexpr float kGradSpread = 40.f;

// Forward of one tile. Pass 1: every row's and column's largest entry (rm, cm). Pass 2, one exp
// per logit, when float32, columns, no y_bias and no row or column lies more than kForwardSpread
// below the tile's largest entry T: e = exp(s - T) feeds both the row sum and the column sum
// (each a state (T, sum)). Otherwise each direction shifts by its own maxima.
template <typename T>
COURIER_INLINE void forward_tile_impl(const T* s, int64_t h, int64_t w, const T* y_bias, const T* x_bias,
                                      bool columns, T* row_m, T* row_s, T* col_m, T* col_s, T* scratch) {
  T* rm = scratch;
  T* cm = scratch + h;
  T* csum = scratch + h + w;
  auto col_row = [&](int64_t r) { return columns && !(x_bias && x_bias[r] == kNegInf<T>); };
  if (columns)
    for (int64_t i = 0; i < w; ++i) cm[i] = kNegInf<T>, csum[i] = 0;
  T top = kNegInf<T>;
  for (int64_t r = 0; r < h; ++r) {
    const T* row = s + r * w;
    rm[r] = row_max(row, y_bias, w);
    top = nan_max(top, rm[r]);
    if (col_row(r))
      for (int64_t i = 0; i < w; ++i) cm[i] = nan_max(cm[i], row[i]);
  }
  bool one_exp = kOneExp<T> && columns && y_bias == nullptr && std::isfinite(top);
  if (one_exp) {
    for (int64_t i = 0; i < w; ++i) top = nan_max(top, cm[i]);
    const T low = top - T(kForwardSpread);
    one_exp = std::isfinite(top);
    for (int64_t r = 0; r < h && one_exp; ++r) one_exp = rm[r] == kNegInf<T> || rm[r] >= low;
    for (int64_t i = 0; i < w && one_exp; ++i) one_exp = cm[i] == kNegInf<T> || cm[i] >= low;
  }
  if (one_exp) {
    for (int64_t r = 0; r < h; ++r) {
      const T sum = row_exp_sum(s + r * w, y_bias, w, top, col_row(r) ? csum : nullptr);
      merge_state(row_m[r], row_s[r], rm[r] == kNegInf<T> ? kNegInf<T> : top, sum);
    }
    for (int64_t i = 0; i < w; ++i) merge_state(col_m[i], col_s[i], cm[i] == kNegInf<T> ? kNegInf<T> : top, csum[i]);
    return;
  }
  for (int64_t r = 0; r < h; ++r) {
    const T mx = rm[r];
    if (mx == kNegInf<T>) continue;
    // a NaN or +inf entry: the LSE is mx
    const T sum = (mx != mx || std::isinf(mx)) ? T(1) : row_exp_sum(s + r * w, y_bias, w, mx, (T*)nullptr);
    merge_state(row_m[r], row_s[r], mx, sum);
  }
  if (!columns) return;
  // shift 0 for an infinite column max: -inf keeps the sum 0, +inf makes the LSE +inf
  for (int64_t r = 0; r < h; ++r) {
    if (!col_row(r)) continue;
    const T* row = s + r * w;
    for (int64_t i = 0; i < w; ++i) {
      const T sh = std::isinf(cm[i]) ? T(0) : cm[i];
      csum[i] += exp_approx(row[i] - sh);
    }
  }
  for (int64_t i = 0; i < w; ++i) merge_state(col_m[i], col_s[i], cm[i], csum[i]);
}

// Gradient of one tile. One exp per logit, when float32, no y_bias and the tile's relevant LSEs
// (rows with g != 0, columns with hc != 0, finite) lie within kGradSpread of their largest C:
// s <- exp(s - C) * (a[r] + b[i]), a[r] = g[r] exp(C - row_lse[r]), b[i] = hc[i] exp(C - col_lse[i]).
// Otherwise two exps, one per direction. A row with neither term is set to 0 without an exp.
template <typename T>
COURIER_INLINE void grad_tile_impl(T* s, int64_t h, int64_t w, const T* y_bias, const T* x_bias, const T* g,
                                   const T* row_lse, const T* hc, const T* col_lse, T* scratch) {
  constexpr T kInfT = std::numeric_limits<T>::infinity();
  auto use_row = [&](int64_t r) { return g[r] != 0 && row_lse[r] != kInfT; };
  auto use_col = [&](int64_t r) { return hc != nullptr && !(x_bias && x_bias[r] == kNegInf<T>); };
  bool one_exp = kOneExp<T> && y_bias == nullptr;
  T top = kNegInf<T>, low = kInfT;
  if (one_exp) {
    auto see = [&](T lse) {
      if (lse != lse) one_exp = false;
      top = std::max(top, lse);
      low = std::min(low, lse);
    };
    for (int64_t r = 0; r < h; ++r)
      if (use_row(r)) see(row_lse[r]);
    if (hc)
      for (int64_t i = 0; i < w; ++i)
        if (hc[i] != 0 && col_lse[i] != kInfT) see(col_lse[i]);
    one_exp = one_exp && std::isfinite(top) && top - low <= T(kGradSpread);
  }
  if (one_exp) {
    T* a = scratch;
    T* b = scratch + h;
    for (int64_t r = 0; r < h; ++r) a[r] = use_row(r) ? g[r] * std::exp(top - row_lse[r]) : T(0);
    for (int64_t i = 0; i < w && hc; ++i) b[i] = hc[i] * std::exp(top - col_lse[i]);
    for (int64_t r = 0; r < h; ++r) {
      T* row = s + r * w;
      const T ar = a[r];
      if (!use_row(r) && !use_col(r)) {
        for (int64_t i = 0; i < w; ++i) row[i] = 0;
      } else if (use_col(r)) {
        for (int64_t i = 0; i < w; ++i) row[i] = exp_approx(row[i] - top) * (ar + b[i]);
      } else {
        for (int64_t i = 0; i < w; ++i) row[i] = exp_approx(row[i] - top) * ar;
      }
    }
    return;
  }
  for (int64_t r = 0; r < h; ++r) {
    T* row = s + r * w;
    const T gr = g[r], lse = row_lse[r];
    const T xb = x_bias ? x_bias[r] : T(0);
    if (!use_row(r) && !use_col(r)) {  // e.g. an unclicked anchor: no exp at all
      for (int64_t i = 0; i < w; ++i) row[i] = 0;
    } else if (!use_col(r)) {
      for (int64_t i = 0; i < w; ++i) row[i] = gr * exp_approx(row_value(row, y_bias, i) - lse);
    } else if (!use_row(r)) {
      for (int64_t i = 0; i < w; ++i) row[i] = hc[i] * exp_approx(row[i] + xb - col_lse[i]);
    } else {
      for (int64_t i = 0; i < w; ++i) {
        const T v = row[i];
        row[i] = gr * exp_approx((y_bias ? kept(v, y_bias[i]) : v) - lse) + hc[i] * exp_approx(v + xb - col_lse[i]);
      }
    }
  }
}

// row[i] <- exp(row value - shift) in place; returns their sum. __restrict: the bias never
// aliases the row, so that the loop vectorises (without it GCC kept it scalar).
template <typename T>
COURIER_INLINE T exp_in_place(T* __restrict row, const T* __restrict bias, int64_t w, T shift) {
  const int64_t w_vec = w - w % kLanes;
  T lane[kLanes] = {};
  for (int64_t i = 0; i < w_vec; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const T e = exp_approx(row_value(row, bias, i + k) - shift);
      row[i + k] = e;
      lane[k] += e;
    }
  T sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
  for (int64_t i = w_vec; i < w; ++i) {
    const T e = exp_approx(row_value(row, bias, i) - shift);
    row[i] = e;
    sum += e;
  }
  return sum;
}

// Softmax numerators of whole rows, in place (the fused loss): see contrastive_lse_cpu_tiles.h.
template <typename T>
COURIER_INLINE void exp_rows_impl(T* s, int64_t h, int64_t w, const T* y_bias, T* row_m, T* row_sum) {
  for (int64_t r = 0; r < h; ++r) {
    T* row = s + r * w;
    const T m = row_max(row, y_bias, w);
    row_m[r] = m;
    if (m == kNegInf<T>) {
      for (int64_t i = 0; i < w; ++i) row[i] = 0;
      row_sum[r] = 0;
    } else {
      row_sum[r] = y_bias ? exp_in_place(row, y_bias, w, m) : exp_in_place<T>(row, nullptr, w, m);
    }
  }
}

template <typename T>
COURIER_INLINE void mask_hits_impl(T* s, int64_t h, int64_t w, const int64_t* x_ids, const int64_t* y_ids,
                                   int64_t own) {
  for (int64_t r = 0; r < h; ++r) {
    T* row = s + r * w;
    const int64_t id = x_ids[r], pos = own + r;
    for (int64_t i = 0; i < w; ++i) row[i] = (y_ids[i] == id && i != pos) ? kNegInf<T> : row[i];
  }
}

// float32 entry points, cloned per instruction set.
COURIER_CLONES void forward_tile_f32(const float* s, int64_t h, int64_t w, const float* yb, const float* xb,
                                     bool columns, float* rm, float* rs, float* cm, float* cs, float* scratch) {
  forward_tile_impl(s, h, w, yb, xb, columns, rm, rs, cm, cs, scratch);
}
COURIER_CLONES void grad_tile_f32(float* s, int64_t h, int64_t w, const float* yb, const float* xb,
                                  const float* g, const float* rl, const float* hc, const float* cl, float* scratch) {
  grad_tile_impl(s, h, w, yb, xb, g, rl, hc, cl, scratch);
}
COURIER_CLONES void exp_rows_f32(float* s, int64_t h, int64_t w, const float* yb, float* rm, float* rs) {
  exp_rows_impl(s, h, w, yb, rm, rs);
}
COURIER_CLONES void mask_hits_f32(float* s, int64_t h, int64_t w, const int64_t* xi, const int64_t* yi,
                                  int64_t own) {
  mask_hits_impl(s, h, w, xi, yi, own);
}

}  // namespace

namespace cpu_tiles {

void mask_hits(float* s, int64_t h, int64_t w, const int64_t* x_ids, const int64_t* y_ids, int64_t own) {
  mask_hits_f32(s, h, w, x_ids, y_ids, own);
}
void mask_hits(double* s, int64_t h, int64_t w, const int64_t* x_ids, const int64_t* y_ids, int64_t own) {
  mask_hits_impl(s, h, w, x_ids, y_ids, own);
}
void forward_tile(const float* s, int64_t h, int64_t w, const float* y_bias, const float* x_bias, bool columns,
                  float* row_m, float* row_s, float* col_m, float* col_s, float* scratch) {
  forward_tile_f32(s, h, w, y_bias, x_bias, columns, row_m, row_s, col_m, col_s, scratch);
}
void forward_tile(const double* s, int64_t h, int64_t w, const double* y_bias, const double* x_bias,
                  bool columns, double* row_m, double* row_s, double* col_m, double* col_s, double* scratch) {
  forward_tile_impl(s, h, w, y_bias, x_bias, columns, row_m, row_s, col_m, col_s, scratch);
}
void grad_tile(float* s, int64_t h, int64_t w, const float* y_bias, const float* x_bias, const float* g,
               const float* row_lse, const float* hc, const float* col_lse, float* scratch) {
  grad_tile_f32(s, h, w, y_bias, x_bias, g, row_lse, hc, col_lse, scratch);
}
void grad_tile(double* s, int64_t h, int64_t w, const double* y_bias, const double* x_bias, const double* g,
               const double* row_lse, const double* hc, const double* col_lse, double* scratch) {
  grad_tile_impl(s, h, w, y_bias, x_bias, g, row_lse, hc, col_lse, scratch);
}

void exp_rows(float* s, int64_t h, int64_t w, const float* y_bias, float* row_m, float* row_sum) {
  exp_rows_f32(s, h, w, y_bias, row_m, row_sum);
}
void exp_rows(double* s, int64_t h, int64_t w, const double* y_bias, double* row_m, double* row_sum) {
  exp_rows_impl(s, h, w, y_bias, row_m, row_sum);
}

template <typename T>
static void merge_states_impl(T* m, T* s, const T* m2, const T* s2, int64_t n) {
  for (int64_t k = 0; k < n; ++k) merge_state(m[k], s[k], m2[k], s2[k]);
}
void merge_states(float* m, float* s, const float* m2, const float* s2, int64_t n) {
  merge_states_impl(m, s, m2, s2, n);
}
void merge_states(double* m, double* s, const double* m2, const double* s2, int64_t n) {
  merge_states_impl(m, s, m2, s2, n);
}

template <typename T>
static void finish_states_impl(const T* m, const T* s, T* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = std::isinf(m[k]) ? m[k] : m[k] + std::log(s[k]);
}
void finish_states(const float* m, const float* s, float* out, int64_t n) { finish_states_impl(m, s, out, n); }
void finish_states(const double* m, const double* s, double* out, int64_t n) { finish_states_impl(m, s, out, n); }

}  // namespace cpu_tiles
}  // namespace courier_fast
