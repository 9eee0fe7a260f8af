// CPU backend of courier_fast::attention_core and its backward: the reconstruction-attention core
// after the Q/K/V projections, over segments (every layout: padded, history_index, jagged; see
// courier_fast/ops/attention_layout.py and the schema in csrc/courier_fast.cpp).
//
// q (T, h, dh), k / v (S, h, dh) are read in place through (row, head) strides (dh contiguous);
// 16-bit inputs are converted to float32 once. Arithmetic in float32 (float64 for float64 inputs,
// then with std::exp: exact enough for gradcheck). Target t attends the keys of its row
// r = target_rows[t], [key_offsets[r], key_offsets[r+1]), less padding, within the causal window.
//
// Forward: work items of up to kItemTargets targets of one row (long rows spread over threads),
// split between threads by cost; per head and block of kBlock targets the scores against the keys
// each attends (dot products of contiguous rows: no copy of q / k / v), the exact softmax (two
// passes, no online rescaling) and O = P V accumulated in registers.
// Backward, atomics-free: a work item is (row, a range of its targets); it writes dQ of its own
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

// ---- the two primitives over one head's dh values ---------------------------------------------
// A score is a dot product of two contiguous dh-vectors (a target's query or dO row, a key's K or
// V row); every output row is a weighted sum of such rows, accumulated in registers over the
// reduction (keys for O and dQ, targets for dK and dV) and stored once. No transposed or padded
// copy of q / k / v, no work for a key that a target does not attend. (Rows here are short, L ~ 5
// .. 50 keys: a packed GEMM would spend more on packing, and on padding to its block width, than
// on the products.)
template <typename A>
COURIER_INLINE A dot(const A* x, const A* y, int64_t n) {
  A s = 0;
  for (int64_t e = 0; e < n; ++e) s += x[e] * y[e];
  return s;
}
// y[0, n) (+)= sum_{i < m} a[i * as] * rows[i][0, n)
template <typename A>
COURIER_INLINE void combine(const A* a, int64_t as, const A* const* rows, int64_t m, A* y, int64_t n, bool accumulate) {
  for (int64_t e = 0; e < n; ++e) {
    A c = accumulate ? y[e] : A(0);
    for (int64_t i = 0; i < m; ++i) c += a[i * as] * rows[i][e];
    y[e] = c;
  }
}

// float32: 16-float vectors (one AVX-512 register; two AVX2 or four SSE registers in the other
// clones); the tail (dh % 16) scalar.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
COURIER_INLINE v16f load16(const float* p) {
  v16f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
COURIER_INLINE void store16(float* p, v16f x) { std::memcpy(p, &x, sizeof(x)); }
COURIER_INLINE float sum16(v16f x) {  // a tree: 16 -> 8 -> 4 lanes, then 2 + 2
  v8f lo, hi;
  std::memcpy(&lo, &x, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
  lo += hi;
  v4f a, b;
  std::memcpy(&a, &lo, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&lo) + sizeof(a), sizeof(b));
  a += b;
  return (a[0] + a[1]) + (a[2] + a[3]);
}
COURIER_INLINE float dot(const float* x, const float* y, int64_t n) {
  v16f a0 = {}, a1 = {};
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    a0 += load16(x + e) * load16(y + e);
    a1 += load16(x + e + 16) * load16(y + e + 16);
  }
  if (e + 16 <= n) {
    a0 += load16(x + e) * load16(y + e);
    e += 16;
  }
  float s = sum16(a0 + a1);
  for (; e < n; ++e) s += x[e] * y[e];
  return s;
}
COURIER_INLINE void combine(const float* a, int64_t as, const float* const* rows, int64_t m, float* y, int64_t n,
                            bool accumulate) {
  int64_t e = 0;
  for (; e + 64 <= n; e += 64) {  // 4 registers per 64 values
    v16f c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (int64_t i = 0; i < m; ++i) {
      const float ai = a[i * as];
      const float* x = rows[i] + e;
      c0 += ai * load16(x);
      c1 += ai * load16(x + 16);
      c2 += ai * load16(x + 32);
      c3 += ai * load16(x + 48);
    }
    if (accumulate) {
      c0 += load16(y + e), c1 += load16(y + e + 16);
      c2 += load16(y + e + 32), c3 += load16(y + e + 48);
    }
    store16(y + e, c0), store16(y + e + 16, c1), store16(y + e + 32, c2), store16(y + e + 48, c3);
  }
  for (; e + 16 <= n; e += 16) {
    v16f c = {};
    for (int64_t i = 0; i < m; ++i) c += a[i * as] * load16(rows[i] + e);
    store16(y + e, accumulate ? c + load16(y + e) : c);
  }
  for (; e < n; ++e) {
    float c = accumulate ? y[e] : 0.f;
    for (int64_t i = 0; i < m; ++i) c += a[i * as] * rows[i][e];
    y[e] = c;
  }
}

// Work items: row `row`'s targets at order positions [a, b), processed kBlock at a time.
struct Item {
  int64_t row, a, b, partial;  // partial: -1, or the element offset of the item's dK / dV buffers
};
constexpr int64_t kBlock = 32;
constexpr int64_t kItemTargets = 4 * kBlock;  // forward: targets per item (longer rows spread over threads)

// Scratch (values of A) per thread: two (kBlock, max_keys) matrices and pointer lists for the
// row's keys and a block's targets (2 values each, for float32).
inline int64_t scratch_size(int64_t max_keys) {
  const int64_t keys = std::max<int64_t>(max_keys, 1);
  return 2 * kBlock * keys + 2 * 2 * (keys + kBlock) + 8;
}

// scale <x, y>, rounded to A: the forward and the backward then see the same score bit for bit
// (without the store, the compiler may fuse the product into the backward's `- lse` with one
// rounding less, and a target with one valid key would get P != 1, dS != 0).
template <typename A>
COURIER_INLINE A score(A scale, const A* x, const A* y, int64_t n) {
  volatile A s = scale * dot(x, y, n);
  return s;
}

// Whether a target at causal window end `end` attends key j of the row starting at k0.
COURIER_INLINE bool attends(const Table& seg, int64_t k0, int64_t j, int64_t end) {
  return j < end && !(seg.pad && seg.pad[k0 + j]);
}

// ---- forward: one item ------------------------------------------------------------------------
// out (T, h*dh) and lse (T, h) in A. Per head (the row's K and V slices stay in L1) and block of
// targets: the scores s_j = scale <q, k_j> of the keys each attends, the exact softmax (two
// passes, no online rescaling) normalised in place, then O = P V. A target without a valid key
// gets O = 0 and lse = -inf.
template <typename A>
COURIER_INLINE void forward_item(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                 const Item& it, A* out, A* lse, A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh, row = it.row, k0 = seg.key_offsets[row];
  const int64_t count = seg.key_offsets[row + 1] - k0, first = seg.target_offsets[row];
  const int64_t ld = std::max<int64_t>(count, 1);
  A* prob = scratch;  // (kBlock, ld) scores, then probabilities
  const A** vrows = reinterpret_cast<const A**>(scratch + 2 * kBlock * ld);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < count; ++j) vrows[j] = v.at(k0 + j, h);
    for (int64_t blk = it.a; blk < it.b; blk += kBlock) {
      const int64_t nb = std::min(kBlock, it.b - blk);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = seg.order[blk + i];
        const int64_t end = causal_end(blk + i - first, count, seg.causal);
        const A* qt = q.at(t, h);
        A* s = prob + i * ld;
        A m = kNegInf;
        for (int64_t j = 0; j < count; ++j) {
          const A x = attends(seg, k0, j, end) ? score(scale, qt, k.at(k0 + j, h), dh) : kNegInf;
          s[j] = x;
          m = x > m ? x : m;
        }
        if (m == kNegInf) {  // no valid key: O = 0
          for (int64_t j = 0; j < count; ++j) s[j] = 0;
          lse[t * H + h] = kNegInf;
          continue;
        }
        A l = 0;
        for (int64_t j = 0; j < count; ++j) {
          const A e = exp_approx(s[j] - m);  // exactly 0 for a masked key
          s[j] = e;
          l += e;
        }
        const A inv = A(1) / l;
        for (int64_t j = 0; j < count; ++j) s[j] *= inv;
        lse[t * H + h] = m + std::log(l);
      }
      for (int64_t i = 0; i < nb; ++i)
        combine(prob + i * ld, 1, vrows, count, out + (seg.order[blk + i] * H + h) * dh, dh, false);
    }
  }
}

// ---- backward: one item -----------------------------------------------------------------------
// Writes dq (T, h, dh) of the item's targets (zeros for a target without valid keys) and the
// row's dK / dV, (count, h, dh) from dk / dv, every element (zeros for a key no target attends).
// dout (T, h, dh), lse (T, h) in A (the forward's out is not read: delta = <dO, O> = sum_j P dP).
// Per head and block of targets: P = exp(scale <q, k_j> - lse) and dP = <dO, v_j> of the keys
// each target attends, dS = scale P (dP - delta); then dQ_t = sum_j dS_tj k_j and, over the
// block's targets, dK_j (+)= sum_t dS_tj q_t and dV_j (+)= sum_t P_tj dO_t.
template <typename A>
COURIER_INLINE void backward_item(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                  const A* dout, const A* lse, const Item& it, A* dq, A* dk, A* dv,
                                  A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh, row = it.row, k0 = seg.key_offsets[row];
  const int64_t count = seg.key_offsets[row + 1] - k0, first = seg.target_offsets[row];
  const int64_t ld = std::max<int64_t>(count, 1);
  if (it.a == it.b) {  // no targets: the row's keys get no gradient
    for (int64_t e = 0; e < count * H * dh; ++e) dk[e] = dv[e] = 0;
    return;
  }
  A* prob = scratch;            // (kBlock, ld) P
  A* dsc = scratch + kBlock * ld;  // (kBlock, ld) dP, then dS
  const A** krows = reinterpret_cast<const A**>(scratch + 2 * kBlock * ld);
  const A** qrows = krows + ld;
  const A** orows = qrows + kBlock;  // dO rows of the block
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < count; ++j) krows[j] = k.at(k0 + j, h);
    for (int64_t blk = it.a; blk < it.b; blk += kBlock) {
      const int64_t nb = std::min(kBlock, it.b - blk);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = seg.order[blk + i];
        const A row_lse = lse[t * H + h];
        // no valid key (lse = -inf): no gradient
        const int64_t end = row_lse == kNegInf ? 0 : causal_end(blk + i - first, count, seg.causal);
        const A* qt = qrows[i] = q.at(t, h);
        const A* dot_ = orows[i] = dout + (t * H + h) * dh;
        A* pi = prob + i * ld;
        A* di = dsc + i * ld;
        // delta = <dO, O> = sum_j P dP, from the same products as dP: a target with one valid key
        // (P = 1) gets dS = 0 exactly, as the contract of the other backends
        A delta = 0;
        for (int64_t j = 0; j < count; ++j) {
          const bool on = attends(seg, k0, j, end);
          pi[j] = on ? exp_approx(score(scale, qt, krows[j], dh) - row_lse) : A(0);
          di[j] = on ? dot(dot_, v.at(k0 + j, h), dh) : A(0);
          delta += pi[j] * di[j];
        }
        for (int64_t j = 0; j < count; ++j) di[j] = scale * pi[j] * (di[j] - delta);
        combine(di, 1, krows, count, dq + (t * H + h) * dh, dh, false);  // written once: its own target
      }
      for (int64_t j = 0; j < count; ++j) {
        combine(dsc + j, ld, qrows, nb, dk + (j * H + h) * dh, dh, blk != it.a);
        combine(prob + j, ld, orows, nb, dv + (j * H + h) * dh, dh, blk != it.a);
      }
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
  // items: each row's targets in pieces of at most kItemTargets (long rows spread over threads)
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};  // cost: targets x (keys + 1)
  for (int64_t r = 0; r < seg.B; ++r) {
    const int64_t keys = seg.key_offsets[r + 1] - seg.key_offsets[r];
    for (int64_t c = seg.target_offsets[r]; c < seg.target_offsets[r + 1]; c += kItemTargets) {
      items.push_back({r, c, std::min(seg.target_offsets[r + 1], c + kItemTargets), -1});
      prefix.push_back(prefix.back() + (items.back().b - c) * (keys + 1));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(run.acc, "attention_core_cpu", [&] {
    const auto qv = run.view<scalar_t>(run.q), kv = run.view<scalar_t>(run.k), vv = run.view<scalar_t>(run.v);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    balanced_for(prefix, [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> scratch(scratch_size(seg.max_keys));
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
      std::vector<A> scratch(scratch_size(seg.max_keys));
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
