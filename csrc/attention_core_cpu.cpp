// CPU backend of courier_fast::attention_core and its backward: the reconstruction-attention core
// after the Q/K/V projections, over segments (every layout: padded, history_index, jagged; see
// courier_fast/ops/attention_layout.py and the schema in csrc/courier_fast.cpp).
//
// q (T, h, dh), k / v (S, h, dh) are read in place through (row, head) strides (dh contiguous);
// 16-bit inputs are converted to float32 once. Arithmetic in float32 (float64 for float64 inputs,
// then with std::exp: exact enough for gradcheck). Target t attends the keys of its row
// r = target_rows[t], [key_offsets[r], key_offsets[r+1]), less padding, within the causal window.
//
// Forward: work items of up to 4 kBlock targets of one row (long rows spread over threads),
// split between threads by cost; per head the row's K^T once, then per block of kBlock targets
// the scores S = scale Q K^T, the exact softmax per target (two passes, no online rescaling) and
// O = P V, small register-blocked GEMMs over row pointers (no copy of q / k / v).
// Backward, atomics-free: a work item is (row, a block of its targets); it writes dQ of its own
// targets and dK / dV of the row's keys (each element written by one item: no zero fill), in
// place when the row is one item, else into a partial buffer per item that a second pass sums
// (a row with very many targets, e.g. a Zipf-skewed history_index, is split over the threads
// instead of running on one). Scores are recomputed from the saved lse, never stored.
//
// The segment table's contents are checked here (host reads cost nothing on CPU): offsets
// monotone from 0 to T / S, `order` a permutation grouping the targets by target_rows, key_rows
// consistent with key_offsets. A malformed call raises; nothing is read out of bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_core.h"
#include "cpu_math.h"

namespace courier_fast {
namespace {

// Column block of the GEMM micro-kernels and the padding of a row's keys in the transposed
// scratch (so that the score GEMM runs on whole blocks).
constexpr int64_t kLanes = 16;

template <typename A>
struct View {  // a (N, h, dh) tensor's data and (row, head) strides; dh contiguous
  const A* p;
  int64_t s0, s1;
  COURIER_INLINE const A* at(int64_t i, int64_t h) const { return p + i * s0 + h * s1; }
};

// The checked segment table (int64, contiguous) and the problem's sizes.
struct Table {
  const int64_t* target_offsets;
  const int64_t* key_offsets;
  const int64_t* order;
  const bool* pad;  // (S,) True = padding, or null
  int64_t B, T, S, H, dh, causal;
  int64_t max_keys;  // the most keys in a row (from key_offsets, not the caller's bound)
};

// Keys [0, end) of its row's count that a target at position pos within its row attends.
COURIER_INLINE int64_t causal_end(int64_t pos, int64_t count, int64_t causal) {
  return causal ? std::min(count, pos + causal / 2) : count;
}

// ---- a small GEMM over row pointers -----------------------------------------------------------
// c[i][j] (+)= alpha * sum_e a[i][e] * b[e][j], i < m, j < n, e < kk: every operand a list of
// contiguous rows (views of q / k / v / dO rows, or scratch), so that no operand is copied. Blocks
// of 4 rows x kLanes columns are accumulated in registers (4 loads of b amortised over 4 rows).
template <typename A>
COURIER_INLINE void gemm_rows(int64_t m, int64_t n, int64_t kk, const A* const* a, const A* const* b,
                              A* const* c, A alpha, bool accumulate) {
  constexpr int64_t R = 4;
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    int64_t i0 = 0;
    for (; i0 + R <= m; i0 += R) {
      A acc[R][kLanes];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t k = 0; k < kLanes; ++k) acc[r][k] = 0;
      for (int64_t e = 0; e < kk; ++e) {
        const A* br = b[e] + j0;
        for (int64_t r = 0; r < R; ++r) {
          const A av = a[i0 + r][e];
          for (int64_t k = 0; k < kLanes; ++k) acc[r][k] += av * br[k];
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        A* cr = c[i0 + r] + j0;
        for (int64_t k = 0; k < kLanes; ++k) cr[k] = (accumulate ? cr[k] : A(0)) + alpha * acc[r][k];
      }
    }
    for (; i0 < m; ++i0) {
      A acc[kLanes];
      for (int64_t k = 0; k < kLanes; ++k) acc[k] = 0;
      for (int64_t e = 0; e < kk; ++e) {
        const A av = a[i0][e];
        const A* br = b[e] + j0;
        for (int64_t k = 0; k < kLanes; ++k) acc[k] += av * br[k];
      }
      A* cr = c[i0] + j0;
      for (int64_t k = 0; k < kLanes; ++k) cr[k] = (accumulate ? cr[k] : A(0)) + alpha * acc[k];
    }
  }
  for (int64_t i = 0; i < m && j0 < n; ++i)  // the last n % kLanes columns (head dims not a multiple)
    for (int64_t j = j0; j < n; ++j) {
      A acc = 0;
      for (int64_t e = 0; e < kk; ++e) acc += a[i][e] * b[e][j];
      c[i][j] = (accumulate ? c[i][j] : A(0)) + alpha * acc;
    }
}

// float32: the same with explicit 8-float vectors (GCC keeps the 4 x 16 accumulator block in
// registers only this way; with arrays it spills them to the stack).
typedef float v8f __attribute__((vector_size(32)));
COURIER_INLINE v8f load8(const float* p) {
  v8f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
COURIER_INLINE void store8(float* p, v8f x, float alpha, bool accumulate) {
  x *= alpha;
  if (accumulate) x += load8(p);
  std::memcpy(p, &x, sizeof(x));
}

COURIER_INLINE void gemm_rows(int64_t m, int64_t n, int64_t kk, const float* const* a, const float* const* b,
                              float* const* c, float alpha, bool accumulate) {
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16) {
    int64_t i0 = 0;
    for (; i0 + 4 <= m; i0 += 4) {
      v8f c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      const float *a0 = a[i0], *a1 = a[i0 + 1], *a2 = a[i0 + 2], *a3 = a[i0 + 3];
      for (int64_t e = 0; e < kk; ++e) {
        const v8f b0 = load8(b[e] + j0), b1 = load8(b[e] + j0 + 8);
        c00 += a0[e] * b0;
        c01 += a0[e] * b1;
        c10 += a1[e] * b0;
        c11 += a1[e] * b1;
        c20 += a2[e] * b0;
        c21 += a2[e] * b1;
        c30 += a3[e] * b0;
        c31 += a3[e] * b1;
      }
      store8(c[i0] + j0, c00, alpha, accumulate);
      store8(c[i0] + j0 + 8, c01, alpha, accumulate);
      store8(c[i0 + 1] + j0, c10, alpha, accumulate);
      store8(c[i0 + 1] + j0 + 8, c11, alpha, accumulate);
      store8(c[i0 + 2] + j0, c20, alpha, accumulate);
      store8(c[i0 + 2] + j0 + 8, c21, alpha, accumulate);
      store8(c[i0 + 3] + j0, c30, alpha, accumulate);
      store8(c[i0 + 3] + j0 + 8, c31, alpha, accumulate);
    }
    for (; i0 < m; ++i0) {
      v8f x0 = {}, x1 = {};
      const float* ai = a[i0];
      for (int64_t e = 0; e < kk; ++e) {
        x0 += ai[e] * load8(b[e] + j0);
        x1 += ai[e] * load8(b[e] + j0 + 8);
      }
      store8(c[i0] + j0, x0, alpha, accumulate);
      store8(c[i0] + j0 + 8, x1, alpha, accumulate);
    }
  }
  for (; j0 + 8 <= n; j0 += 8)
    for (int64_t i = 0; i < m; ++i) {
      v8f x0 = {};
      for (int64_t e = 0; e < kk; ++e) x0 += a[i][e] * load8(b[e] + j0);
      store8(c[i] + j0, x0, alpha, accumulate);
    }
  for (int64_t i = 0; i < m && j0 < n; ++i)
    for (int64_t j = j0; j < n; ++j) {
      float acc = 0;
      for (int64_t e = 0; e < kk; ++e) acc += a[i][e] * b[e][j];
      c[i][j] = (accumulate ? c[i][j] : 0.f) + alpha * acc;
    }
}

// The head-h rows of the row's keys, transposed into t (dh, ld): t[e * ld + j] = x_j[e], zero for
// j in [count, ld). ld = count rounded up to kLanes. rows: scratch for count pointers. Each t row
// is written contiguously (the reads hit the same count rows' cache lines for every e).
template <typename A>
COURIER_INLINE void transpose_rows(const View<A>& x, int64_t k0, int64_t count, int64_t h, int64_t dh, int64_t ld,
                                   A* t, const A** rows) {
  for (int64_t j = 0; j < count; ++j) rows[j] = x.at(k0 + j, h);
  for (int64_t e = 0; e < dh; ++e) {
    A* te = t + e * ld;
    for (int64_t j = 0; j < count; ++j) te[j] = rows[j][e];
    for (int64_t j = count; j < ld; ++j) te[j] = 0;
  }
}

inline int64_t padded(int64_t count) { return (count + kLanes - 1) / kLanes * kLanes; }

// Work items: row `row`'s targets at order positions [a, b) (at most kBlock at a time inside).
struct Item {
  int64_t row, a, b, partial;  // partial: -1, or the element offset of the item's dK / dV buffers
};
constexpr int64_t kBlock = 32;

// Scratch (values of A) per thread for a row of at most max_keys keys: two transposed (dh, ld)
// matrices, two (kBlock, ld) and two (ld, kBlock) blocks, and pointer lists (2 values each).
inline int64_t scratch_size(int64_t max_keys, int64_t dh) {
  const int64_t ld = padded(std::max<int64_t>(max_keys, 1));
  return 2 * dh * ld + 4 * kBlock * ld + 2 * 3 * (ld + kBlock + dh) + 8;
}

struct Scratch {  // carved from one buffer
  template <typename A>
  static A* take(A*& p, int64_t n) {
    A* r = p;
    p += n;
    return r;
  }
};

// ---- forward: one item ------------------------------------------------------------------------
// out (T, h*dh) and lse (T, h) in A. Per head: K^T of the row once, then per block of targets
// the scores S = scale Q K^T, the masked exact softmax per target, and O = P V / l.
template <typename A>
COURIER_INLINE void forward_item(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                 const Item& it, A* out, A* lse, A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh, row = it.row, k0 = seg.key_offsets[row];
  const int64_t count = seg.key_offsets[row + 1] - k0, ld = padded(count);
  A* p = scratch;
  A* kt = Scratch::take(p, dh * ld);
  A* sc = Scratch::take(p, kBlock * ld);
  const A** ptr = reinterpret_cast<const A**>(p);  // ld + kBlock + dh pointers each
  const A** arow = ptr;
  const A** brow = ptr + (ld + kBlock + dh);
  A** crow = const_cast<A**>(ptr + 2 * (ld + kBlock + dh));
  A inv[kBlock];
  for (int64_t h = 0; h < H; ++h) {
    if (count) transpose_rows(k, k0, count, h, dh, ld, kt, brow);
    for (int64_t e = 0; e < dh; ++e) brow[e] = kt + e * ld;
    for (int64_t blk = it.a; blk < it.b; blk += kBlock) {
      const int64_t nb = std::min(kBlock, it.b - blk);
      for (int64_t i = 0; i < nb; ++i) {
        arow[i] = q.at(seg.order[blk + i], h);
        crow[i] = sc + i * ld;
      }
      if (count) gemm_rows(nb, ld, dh, arow, brow, crow, scale, false);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = seg.order[blk + i];
        const int64_t end = causal_end(blk + i - seg.target_offsets[row], count, seg.causal);
        A* s = sc + i * ld;
        A m = kNegInf;
        for (int64_t j = 0; j < count; ++j) {
          const A x = (j < end && !(seg.pad && seg.pad[k0 + j])) ? s[j] : kNegInf;
          s[j] = x;
          m = x > m ? x : m;
        }
        A l = 0;
        for (int64_t j = 0; j < count; ++j) {
          const A e = m == kNegInf ? A(0) : exp_approx(s[j] - m);  // exactly 0 for a masked key
          s[j] = e;
          l += e;
        }
        inv[i] = l > 0 ? A(1) / l : A(0);  // no valid key: out 0, lse -inf
        lse[t * H + h] = l > 0 ? m + std::log(l) : kNegInf;
        arow[i] = s;
        crow[i] = out + (t * H + h) * dh;
      }
      for (int64_t j = 0; j < count; ++j) brow[j] = v.at(k0 + j, h);
      gemm_rows(nb, dh, count, arow, brow, crow, A(1), false);
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t e = 0; e < dh; ++e) crow[i][e] *= inv[i];
      for (int64_t e = 0; e < dh; ++e) brow[e] = kt + e * ld;
    }
  }
}

// ---- backward: one item -----------------------------------------------------------------------
// Writes dq (T, h, dh) of the item's targets (zeros for a target without valid keys) and the
// row's dK / dV, (count, h, dh) from dk / dv, every element (zeros for padding). dout (T, h, dh),
// lse (T, h) in A (the forward's out is not read: delta = <dO, O> = sum_s P dP). Per head: K^T
// and V^T once; per block of targets P and dS = P (dP - delta) against every key, then dQ = scale dS K, dK (+)= scale dS^T Q and
// dV (+)= P^T dO, each one small GEMM over row pointers.
template <typename A>
COURIER_INLINE void backward_item(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                  const A* dout, const A* lse, const Item& it, A* dq, A* dk, A* dv,
                                  A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh, row = it.row, k0 = seg.key_offsets[row];
  const int64_t count = seg.key_offsets[row + 1] - k0, ld = padded(count), a = it.a, b = it.b;
  if (a == b) {  // no targets: the row's keys get no gradient
    for (int64_t e = 0; e < count * H * dh; ++e) dk[e] = dv[e] = 0;
    return;
  }
  A* p = scratch;
  A* kt = Scratch::take(p, dh * ld);
  A* vt = Scratch::take(p, dh * ld);
  A* prob = Scratch::take(p, kBlock * ld);  // (kBlock, ld)
  A* dsc = Scratch::take(p, kBlock * ld);   // (kBlock, ld)
  A* prob_t = Scratch::take(p, ld * kBlock);  // (ld, kBlock)
  A* dsc_t = Scratch::take(p, ld * kBlock);   // (ld, kBlock)
  const A** ptr = reinterpret_cast<const A**>(p);
  const A** arow = ptr;
  const A** brow = ptr + (ld + kBlock + dh);
  A** crow = const_cast<A**>(ptr + 2 * (ld + kBlock + dh));
  for (int64_t h = 0; h < H; ++h) {
    if (count) {
      transpose_rows(k, k0, count, h, dh, ld, kt, brow);
      transpose_rows(v, k0, count, h, dh, ld, vt, brow);
    }
    for (int64_t blk = a; blk < b; blk += kBlock) {
      const int64_t nb = std::min(kBlock, b - blk);
      // scores and dP = dO V^T
      for (int64_t i = 0; i < nb; ++i) {
        arow[i] = q.at(seg.order[blk + i], h);
        crow[i] = prob + i * ld;
      }
      for (int64_t e = 0; e < dh; ++e) brow[e] = kt + e * ld;
      if (count) gemm_rows(nb, ld, dh, arow, brow, crow, scale, false);
      for (int64_t i = 0; i < nb; ++i) {
        arow[i] = dout + (seg.order[blk + i] * H + h) * dh;
        crow[i] = dsc + i * ld;
      }
      for (int64_t e = 0; e < dh; ++e) brow[e] = vt + e * ld;
      if (count) gemm_rows(nb, ld, dh, arow, brow, crow, A(1), false);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = seg.order[blk + i];
        const A row_lse = lse[t * H + h];
        const int64_t end = row_lse == kNegInf ? 0 : causal_end(blk + i - seg.target_offsets[row], count, seg.causal);
        A* pi = prob + i * ld;
        A* di = dsc + i * ld;
        for (int64_t j = 0; j < count; ++j) {
          const bool valid = j < end && !(seg.pad && seg.pad[k0 + j]);
          pi[j] = valid ? pi[j] - row_lse : kNegInf;
          di[j] = valid ? di[j] : A(0);
        }
        for (int64_t j = 0; j < count; ++j) pi[j] = exp_approx(pi[j]);  // vectorised; 0 for invalid keys
        // delta = <dO, O> = sum_s P dP, from the same products as dP: a target with one valid key
        // (P = 1) gets dS = 0 exactly, as the contract of the other backends
        A dsum = 0;
        for (int64_t j = 0; j < count; ++j) dsum += pi[j] * di[j];
        for (int64_t j = 0; j < count; ++j) di[j] = pi[j] * (di[j] - dsum);
        for (int64_t j = 0; j < count; ++j) {  // transposed copies for dK / dV
          prob_t[j * kBlock + i] = pi[j];
          dsc_t[j * kBlock + i] = di[j];
        }
      }
      // dQ = scale dS K (written once: the block's targets are its own)
      for (int64_t i = 0; i < nb; ++i) {
        arow[i] = dsc + i * ld;
        crow[i] = dq + (seg.order[blk + i] * H + h) * dh;
      }
      for (int64_t j = 0; j < count; ++j) brow[j] = k.at(k0 + j, h);
      gemm_rows(nb, dh, count, arow, brow, crow, scale, false);
      // dK (+)= scale dS^T Q, dV (+)= P^T dO over the block's targets
      for (int64_t i = 0; i < nb; ++i) brow[i] = q.at(seg.order[blk + i], h);
      for (int64_t j = 0; j < count; ++j) {
        arow[j] = dsc_t + j * kBlock;
        crow[j] = dk + (j * H + h) * dh;
      }
      gemm_rows(count, dh, nb, arow, brow, crow, scale, blk != a);
      for (int64_t i = 0; i < nb; ++i) brow[i] = dout + (seg.order[blk + i] * H + h) * dh;
      for (int64_t j = 0; j < count; ++j) {
        arow[j] = prob_t + j * kBlock;
        crow[j] = dv + (j * H + h) * dh;
      }
      gemm_rows(count, dh, nb, arow, brow, crow, A(1), blk != a);
    }
  }
}

// float32 entry points, cloned per instruction set; float64 runs the same loops uncloned.
COURIER_CLONES void forward_item_f32(const View<float>& q, const View<float>& k, const View<float>& v,
                                     const Table& seg, float scale, const Item& it, float* out, float* lse,
                                     float* scratch) {
  forward_item(q, k, v, seg, scale, it, out, lse, scratch);
}
COURIER_CLONES void backward_item_f32(const View<float>& q, const View<float>& k, const View<float>& v,
                                      const Table& seg, float scale, const float* dout, const float* lse,
                                      const Item& it, float* dq, float* dk, float* dv,
                                      float* scratch) {
  backward_item(q, k, v, seg, scale, dout, lse, it, dq, dk, dv, scratch);
}
void forward_any(const View<float>& q, const View<float>& k, const View<float>& v, const Table& seg, float scale,
                 const Item& it, float* out, float* lse, float* scratch) {
  forward_item_f32(q, k, v, seg, scale, it, out, lse, scratch);
}
void forward_any(const View<double>& q, const View<double>& k, const View<double>& v, const Table& seg,
                 double scale, const Item& it, double* out, double* lse, double* scratch) {
  forward_item(q, k, v, seg, scale, it, out, lse, scratch);
}
void backward_any(const View<float>& q, const View<float>& k, const View<float>& v, const Table& seg, float scale,
                  const float* dout, const float* lse, const Item& it, float* dq, float* dk,
                  float* dv, float* scratch) {
  backward_item_f32(q, k, v, seg, scale, dout, lse, it, dq, dk, dv, scratch);
}
void backward_any(const View<double>& q, const View<double>& k, const View<double>& v, const Table& seg,
                  double scale, const double* dout, const double* lse, const Item& it,
                  double* dq, double* dk, double* dv, double* scratch) {
  backward_item(q, k, v, seg, scale, dout, lse, it, dq, dk, dv, scratch);
}

// Runs body(i0, i1) over [0, n) split into about 4 parts per thread of equal cost, where
// prefix[i] is the cost of items [0, i) (size n + 1, non-decreasing).
template <typename F>
void balanced_for(const std::vector<int64_t>& prefix, const F& body) {
  const int64_t n = static_cast<int64_t>(prefix.size()) - 1;
  if (n <= 0) return;
  const int64_t parts = std::min<int64_t>(n, 4 * at::get_num_threads());
  const int64_t total = prefix[n];
  auto start = [&](int64_t part) -> int64_t {  // first item whose cost starts at or after the part's share
    if (part >= parts) return n;
    const int64_t target = static_cast<int64_t>(static_cast<double>(total) * part / parts);
    return std::lower_bound(prefix.begin(), prefix.end() - 1, target) - prefix.begin();
  };
  at::parallel_for(0, parts, 1, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 == 0 ? 0 : start(b0), i1 = start(b1);
    if (i0 < i1) body(i0, i1);
  });
}

// The checked arguments, the segment table's contents checked, and what both passes share.
struct Prepared {
  at::Tensor target_offsets, key_offsets, order, pad, q, k, v;
  Table seg{};
  int64_t max_keys = 0;  // the most keys in a row (from key_offsets, not the caller's bound)
  at::ScalarType acc;

  Prepared(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& target_rows,
           const at::Tensor& key_rows, const at::Tensor& target_offsets_, const at::Tensor& key_offsets_,
           const at::Tensor& order_, const std::optional<at::Tensor>& key_padding_mask, int64_t causal,
           int64_t max_targets, int64_t max_keys_) {
    check_attention_core_args(q_, k_, v_, target_rows, key_rows, target_offsets_, key_offsets_, order_,
                              key_padding_mask, causal, max_targets, max_keys_, std::numeric_limits<int64_t>::max());
    TORCH_CHECK(q_.device().is_cpu(), "attention_core (CPU kernel): q is on ", q_.device());
    acc = q_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    // 16-bit inputs: one float32 copy each (the arithmetic is float32 anyway).
    q = q_.to(acc);
    k = k_.to(acc);
    v = v_.to(acc);
    target_offsets = target_offsets_.contiguous();
    key_offsets = key_offsets_.contiguous();
    order = order_.contiguous();
    pad = key_padding_mask.has_value() && key_padding_mask->defined() ? key_padding_mask->contiguous() : at::Tensor();
    const int64_t B = target_offsets.size(0) - 1, T = q.size(0), S = k.size(0);
    seg = {target_offsets.data_ptr<int64_t>(), key_offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
           pad.defined() ? pad.data_ptr<bool>() : nullptr, B, T, S, q.size(1), q.size(2), causal, 0};
    check_contents(target_rows.contiguous(), key_rows.contiguous());
    seg.max_keys = max_keys;
  }

  // Every index the kernels follow, checked by value: offsets [0] = 0, non-decreasing, [B] = T / S;
  // order[target_offsets[r] .. target_offsets[r+1]) are targets of row r (target_rows), each once;
  // key_rows[s] is the row whose key range holds s.
  void check_contents(const at::Tensor& target_rows, const at::Tensor& key_rows) {
    const int64_t B = seg.B, T = seg.T, S = seg.S;
    const int64_t *to = seg.target_offsets, *ko = seg.key_offsets;
    TORCH_CHECK(to[0] == 0 && to[B] == T, "attention_core: target_offsets must run from 0 to T = ", T, ", got ",
                to[0], " .. ", to[B]);
    TORCH_CHECK(ko[0] == 0 && ko[B] == S, "attention_core: key_offsets must run from 0 to S = ", S, ", got ", ko[0],
                " .. ", ko[B]);
    const int64_t* trow = target_rows.data_ptr<int64_t>();
    const int64_t* krow = key_rows.data_ptr<int64_t>();
    std::vector<char> seen(T, 0);
    for (int64_t r = 0; r < B; ++r) {
      // non-decreasing and within [0, T] / [0, S] before this row's entries are read
      TORCH_CHECK(to[r] <= to[r + 1] && to[r + 1] <= T, "attention_core: target_offsets must be non-decreasing "
                  "up to T = ", T, " (row ", r, ")");
      TORCH_CHECK(ko[r] <= ko[r + 1] && ko[r + 1] <= S, "attention_core: key_offsets must be non-decreasing "
                  "up to S = ", S, " (row ", r, ")");
      max_keys = std::max(max_keys, ko[r + 1] - ko[r]);
      for (int64_t p = to[r]; p < to[r + 1]; ++p) {
        const int64_t t = seg.order[p];
        TORCH_CHECK(t >= 0 && t < T && !seen[t] && trow[t] == r, "attention_core: order must list each target "
                    "once, grouped by row (target_rows); position ", p, " holds ", t);
        seen[t] = 1;
      }
      for (int64_t s = ko[r]; s < ko[r + 1]; ++s)
        TORCH_CHECK(krow[s] == r, "attention_core: key_rows[", s, "] = ", krow[s], " but key_offsets put it in row ", r);
    }
  }

  template <typename A>
  View<A> view(const at::Tensor& t) const {
    return {t.data_ptr<A>(), t.stride(0), t.stride(1)};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_core_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& target_rows,
    const at::Tensor& key_rows, const at::Tensor& target_offsets, const at::Tensor& key_offsets,
    const at::Tensor& order, const std::optional<at::Tensor>& key_padding_mask, int64_t causal, double sm_scale,
    int64_t max_targets, int64_t max_keys) {
  const Prepared run(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask, causal,
                     max_targets, max_keys);
  const Table& seg = run.seg;
  // out unrounded (float32 / float64), as the schema states (this backward recomputes delta from P dP).
  at::Tensor out = at::empty({seg.T, seg.H * seg.dh}, q.options().dtype(run.acc));
  at::Tensor lse = at::empty({seg.T, seg.H}, q.options().dtype(run.acc));
  if (seg.T * seg.H == 0) return {out, lse};
  // items: each row's targets in pieces of at most 4 kBlock (long rows spread over threads)
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};  // cost: targets x (keys + 1)
  for (int64_t r = 0; r < seg.B; ++r) {
    const int64_t keys = seg.key_offsets[r + 1] - seg.key_offsets[r];
    for (int64_t c = seg.target_offsets[r]; c < seg.target_offsets[r + 1]; c += 4 * kBlock) {
      items.push_back({r, c, std::min(seg.target_offsets[r + 1], c + 4 * kBlock), -1});
      prefix.push_back(prefix.back() + (items.back().b - c) * (keys + 1));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(run.acc, "attention_core_cpu", [&] {
    const auto qv = run.view<scalar_t>(run.q), kv = run.view<scalar_t>(run.k), vv = run.view<scalar_t>(run.v);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    balanced_for(prefix, [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> scratch(scratch_size(seg.max_keys, seg.dh));
      for (int64_t i = i0; i < i1; ++i)
        forward_any(qv, kv, vv, seg, static_cast<scalar_t>(sm_scale), items[i], op, lp, scratch.data());
    });
  });
  return {out, lse};
}

// Every row with targets or keys is at least one item (every element of dQ, dK, dV is written
// by exactly one item or the reduction: no zero fill). Rows with more than `chunk` targets are
// split into items of `chunk` targets, each writing its own partial dK / dV; chunk grows until
// the partial buffers hold at most max(2 S h dh, 2^24) elements.
std::vector<Item> backward_items(const Table& seg, int64_t& partial_elems) {
  const int64_t width = seg.H * seg.dh, threads = at::get_num_threads();
  int64_t chunk = std::max<int64_t>(64, (seg.T + 4 * threads - 1) / (4 * threads));
  const int64_t budget = std::max<int64_t>(2 * seg.S * width, int64_t(1) << 24);
  while (true) {
    std::vector<Item> items;
    partial_elems = 0;
    for (int64_t r = 0; r < seg.B; ++r) {
      const int64_t a = seg.target_offsets[r], b = seg.target_offsets[r + 1];
      const int64_t keys = seg.key_offsets[r + 1] - seg.key_offsets[r];
      if (a == b && keys == 0) continue;
      if (b - a <= chunk || keys == 0) {
        items.push_back({r, a, b, -1});
        continue;
      }
      for (int64_t c = a; c < b; c += chunk) {
        items.push_back({r, c, std::min(b, c + chunk), partial_elems});
        partial_elems += keys * width;
      }
    }
    if (partial_elems <= budget) return items;
    chunk *= 2;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_core_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& target_rows, const at::Tensor& key_rows,
    const at::Tensor& target_offsets, const at::Tensor& key_offsets, const at::Tensor& order,
    const std::optional<at::Tensor>& key_padding_mask, int64_t causal, double sm_scale, int64_t max_targets,
    int64_t max_keys) {
  const Prepared run(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask, causal,
                     max_targets, max_keys);
  check_attention_core_backward_args(grad_out, q, out, lse);
  const Table& seg = run.seg;
  const int64_t width = seg.H * seg.dh;
  const at::Tensor dout = grad_out.to(run.acc).contiguous();  // (T, h*dh)
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty({seg.T, seg.H, seg.dh}, q.options().dtype(run.acc));  // every element written
  at::Tensor dk = at::empty({seg.S, seg.H, seg.dh}, q.options().dtype(run.acc));
  at::Tensor dv = at::empty_like(dk);
  int64_t partial_elems = 0;
  const std::vector<Item> items = backward_items(seg, partial_elems);
  std::vector<int64_t> prefix(items.size() + 1, 0);  // cost: targets x keys
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    prefix[i + 1] = prefix[i] + (it.b - it.a) * (1 + seg.key_offsets[it.row + 1] - seg.key_offsets[it.row]);
  }
  AT_DISPATCH_FLOATING_TYPES(run.acc, "attention_core_backward_cpu", [&] {
    using A = scalar_t;
    const auto qv = run.view<A>(run.q), kv = run.view<A>(run.k), vv = run.view<A>(run.v);
    const A *dop = dout.data_ptr<A>(), *lp = lse_c.data_ptr<A>();
    A *dqp = dq.data_ptr<A>(), *dkp = dk.data_ptr<A>(), *dvp = dv.data_ptr<A>();
    at::Tensor partial = at::empty({2, partial_elems}, dk.options());  // written whole by their items
    A* pk = partial.data_ptr<A>();
    A* pv = pk + partial_elems;
    balanced_for(prefix, [&](int64_t i0, int64_t i1) {
      std::vector<A> scratch(scratch_size(seg.max_keys, seg.dh));
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = items[i];
        const int64_t k0 = seg.key_offsets[it.row];
        A* dk_dst = it.partial < 0 ? dkp + k0 * width : pk + it.partial;
        A* dv_dst = it.partial < 0 ? dvp + k0 * width : pv + it.partial;
        backward_any(qv, kv, vv, seg, static_cast<A>(sm_scale), dop, lp, it, dqp, dk_dst, dv_dst,
                     scratch.data());
      }
    });
    if (partial_elems == 0) return;
    // Sum the split rows' partials: the items of one row are consecutive.
    std::vector<size_t> firsts;
    for (size_t i = 0; i < items.size(); ++i)
      if (items[i].partial >= 0 && (i == 0 || items[i - 1].partial < 0 || items[i - 1].row != items[i].row))
        firsts.push_back(i);
    at::parallel_for(0, static_cast<int64_t>(firsts.size()), 1, [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t row = items[firsts[f]].row, k0 = seg.key_offsets[row];
        const int64_t n = (seg.key_offsets[row + 1] - k0) * width;
        A *dk_row = dkp + k0 * width, *dv_row = dvp + k0 * width;
        for (size_t i = firsts[f]; i < items.size() && items[i].row == row; ++i) {
          const A *sk = pk + items[i].partial, *sv = pv + items[i].partial;
          const bool first = i == firsts[f];
          for (int64_t e = 0; e < n; ++e) {
            dk_row[e] = first ? sk[e] : dk_row[e] + sk[e];
            dv_row[e] = first ? sv[e] : dv_row[e] + sv[e];
          }
        }
      }
    });
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CPU, m) {
  m.impl("attention_core", &attention_core_cpu);
  m.impl("attention_core_backward", &attention_core_backward_cpu);
}

}  // namespace courier_fast
