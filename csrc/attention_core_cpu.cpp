// CPU backend of courier_fast::attention_core and its backward: the reconstruction-attention core
// after the Q/K/V projections, over segments (every layout: padded, history_index, jagged; see
// courier_fast/ops/attention_layout.py and the schema in csrc/courier_fast.cpp).
//
// q (T, h, dh), k / v (S, h, dh) are read in place through (row, head) strides (dh contiguous);
// 16-bit inputs are converted to float32 once. Arithmetic in float32 (float64 for float64 inputs,
// then with std::exp: exact enough for gradcheck). Target t attends the keys of its row
// r = target_rows[t], [key_offsets[r], key_offsets[r+1]), less padding, within the causal window.
//
// Forward: the targets in `order` (grouped by row, so that a row's K/V stay in cache), split
// between threads by their keys' count; per (target, head) the scores, their max, the exact
// softmax (two passes over a scores buffer, no online rescaling) and the weighted sum of V.
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

// Dot products keep kLanes partial sums so that GCC vectorises them over the head dim without
// reassociating floating-point sums on its own.
constexpr int64_t kLanes = 16;

template <typename A>
COURIER_INLINE A dot(const A* a, const A* b, int64_t n) {
  A lane[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) lane[k] = 0;
  const int64_t nv = n - n % kLanes;
  for (int64_t i = 0; i < nv; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lane[k] += a[i + k] * b[i + k];
  // pairwise (a fixed order, vectorised): a sequential sum of the lanes would be a chain of 16
  // dependent adds per dot product
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t k = 0; k < w; ++k) lane[k] += lane[k + w];
  A sum = lane[0];
  for (int64_t i = nv; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename A>
COURIER_INLINE void axpy(A a, const A* x, A* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// out[e] (+)= mult * sum_i coef[i * stride] * rows[i][e] for e < n: a weighted sum of n rows,
// kLanes columns at a time in a local accumulator (kept in registers) instead of a read-modify-
// write of out per row.
template <typename A>
COURIER_INLINE void weighted_rows(const A* coef, int64_t stride, const A* const* rows, int64_t count, int64_t n,
                                  A mult, bool accumulate, A* out) {
  int64_t e0 = 0;
  for (; e0 + kLanes <= n; e0 += kLanes) {
    A acc[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) acc[k] = 0;
    for (int64_t i = 0; i < count; ++i) {
      const A c = coef[i * stride];
      const A* r = rows[i] + e0;
      for (int64_t k = 0; k < kLanes; ++k) acc[k] += c * r[k];
    }
    for (int64_t k = 0; k < kLanes; ++k) out[e0 + k] = (accumulate ? out[e0 + k] : A(0)) + mult * acc[k];
  }
  for (int64_t e = e0; e < n; ++e) {
    A acc = 0;
    for (int64_t i = 0; i < count; ++i) acc += coef[i * stride] * rows[i][e];
    out[e] = (accumulate ? out[e] : A(0)) + mult * acc;
  }
}

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

// ---- forward: targets at order positions [p0, p1) --------------------------------------------
// out (T, h*dh) and lse (T, h) in A; scratch: 3 max_keys + dh values (scores, V row pointers).
template <typename A>
COURIER_INLINE void forward_range(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                  int64_t p0, int64_t p1, A* out, A* lse, A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh;
  A* qs = scratch;
  A* sc = scratch + dh;
  const A** vp = reinterpret_cast<const A**>(sc + seg.max_keys);  // (max_keys,) pointers
  int64_t row = std::upper_bound(seg.target_offsets, seg.target_offsets + seg.B + 1, p0) - seg.target_offsets - 1;
  for (int64_t p = p0; p < p1; ++p) {
    while (p >= seg.target_offsets[row + 1]) ++row;
    const int64_t t = seg.order[p], k0 = seg.key_offsets[row];
    const int64_t end = causal_end(p - seg.target_offsets[row], seg.key_offsets[row + 1] - k0, seg.causal);
    for (int64_t h = 0; h < H; ++h) {
      const A* qr = q.at(t, h);
      for (int64_t i = 0; i < dh; ++i) qs[i] = qr[i] * scale;
      A m = kNegInf;
      for (int64_t j = 0; j < end; ++j) {
        const int64_t s = k0 + j;
        const A score = (seg.pad && seg.pad[s]) ? kNegInf : dot(qs, k.at(s, h), dh);
        sc[j] = score;
        m = score > m ? score : m;
      }
      A* o = out + (t * H + h) * dh;
      if (m == kNegInf) {  // no valid key: out 0, lse -inf
        for (int64_t i = 0; i < dh; ++i) o[i] = 0;
        lse[t * H + h] = kNegInf;
        continue;
      }
      A l = 0;
      for (int64_t j = 0; j < end; ++j) {
        const A e = exp_approx(sc[j] - m);  // exactly 0 for a padded key
        sc[j] = e;
        l += e;
      }
      for (int64_t j = 0; j < end; ++j) vp[j] = v.at(k0 + j, h);
      weighted_rows(sc, 1, vp, end, dh, A(1) / l, false, o);
      lse[t * H + h] = m + std::log(l);
    }
  }
}

// ---- backward: one work item, row `row`'s targets at order positions [a, b) ------------------
// Writes dq (T, h, dh) of those targets (zeros for a target without valid keys) and the row's
// dK / dV, (count, h, dh) from dk / dv, every element (zeros for padding). dout (T, h, dh),
// out (T, h*dh), lse (T, h) in A. Per head, blocks of kBlock targets: their probabilities P and
// dS = P (dP - delta) against every key of the row (scores, then one vectorised exp pass), then
// per key dK_s = scale sum_t dS Q_t and dV_s = sum_t P dO_t summed in a local accumulator and
// stored once per block, and dQ_t = scale sum_s dS K_s, each a weighted sum of rows.
constexpr int64_t kBlock = 32;

// scratch for backward_item, in values of A: probabilities and dS (2 kBlock max_keys), the scaled q
// (dh) and max_keys pointers (at most 2 values each: pointers are <= 8 bytes, A >= 4)
inline int64_t backward_scratch(int64_t max_keys, int64_t dh) { return 2 * kBlock * max_keys + dh + 2 * max_keys + 2; }

template <typename A>
COURIER_INLINE void backward_item(const View<A>& q, const View<A>& k, const View<A>& v, const Table& seg, A scale,
                                  const A* dout, const A* out, const A* lse, int64_t row, int64_t a, int64_t b,
                                  A* dq, A* dk, A* dv, A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t H = seg.H, dh = seg.dh, k0 = seg.key_offsets[row], count = seg.key_offsets[row + 1] - k0;
  A* prob = scratch;               // (kBlock, count)
  A* dsc = prob + kBlock * count;  // (kBlock, count)
  A* qs = dsc + kBlock * count;    // (dh,)
  const A** kp = reinterpret_cast<const A**>(qs + dh);  // (count,) the row's K rows of head h
  const A* qp[kBlock];
  const A* dop[kBlock];
  if (a == b) {  // no targets: the row's keys get no gradient
    for (int64_t e = 0; e < count * H * dh; ++e) dk[e] = dv[e] = 0;
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t blk = a; blk < b; blk += kBlock) {
      const int64_t nb = std::min(kBlock, b - blk);
      for (int64_t i = 0; i < nb; ++i) {  // P and dS of target i against every key
        const int64_t p = blk + i, t = seg.order[p];
        const A row_lse = lse[t * H + h];
        const int64_t end = row_lse == kNegInf ? 0 : causal_end(p - seg.target_offsets[row], count, seg.causal);
        qp[i] = q.at(t, h);
        dop[i] = dout + (t * H + h) * dh;
        A* pi = prob + i * count;
        A* di = dsc + i * count;
        for (int64_t e = 0; e < dh; ++e) qs[e] = qp[i][e] * scale;
        const A delta = end ? dot(dop[i], out + (t * H + h) * dh, dh) : A(0);
        for (int64_t j = 0; j < count; ++j) {
          const bool valid = j < end && !(seg.pad && seg.pad[k0 + j]);
          pi[j] = valid ? dot(qs, k.at(k0 + j, h), dh) - row_lse : kNegInf;
          di[j] = valid ? dot(dop[i], v.at(k0 + j, h), dh) - delta : A(0);
        }
        for (int64_t j = 0; j < count; ++j) {  // vectorised: exp(-inf) = 0 for invalid keys
          pi[j] = exp_approx(pi[j]);
          di[j] *= pi[j];
        }
      }
      for (int64_t j = 0; j < count; ++j) {  // dK_s, dV_s: weighted sums of the block's Q and dO rows
        weighted_rows(dsc + j, count, qp, nb, dh, scale, blk != a, dk + (j * H + h) * dh);
        weighted_rows(prob + j, count, dop, nb, dh, A(1), blk != a, dv + (j * H + h) * dh);
      }
      for (int64_t j = 0; j < count; ++j) kp[j] = k.at(k0 + j, h);
      for (int64_t i = 0; i < nb; ++i)  // dQ_t: a weighted sum of the row's K rows
        weighted_rows(dsc + i * count, 1, kp, count, dh, scale, false, dq + (seg.order[blk + i] * H + h) * dh);
    }
  }
}

// float32 entry points, cloned per instruction set; float64 runs the same loops unclonned.
COURIER_CLONES void forward_range_f32(const View<float>& q, const View<float>& k, const View<float>& v,
                                      const Table& seg, float scale, int64_t p0, int64_t p1, float* out, float* lse,
                                      float* scratch) {
  forward_range(q, k, v, seg, scale, p0, p1, out, lse, scratch);
}
COURIER_CLONES void backward_item_f32(const View<float>& q, const View<float>& k, const View<float>& v,
                                      const Table& seg, float scale, const float* dout, const float* out,
                                      const float* lse, int64_t row, int64_t a, int64_t b, float* dq, float* dk,
                                      float* dv, float* scratch) {
  backward_item(q, k, v, seg, scale, dout, out, lse, row, a, b, dq, dk, dv, scratch);
}
void forward_any(const View<float>& q, const View<float>& k, const View<float>& v, const Table& seg, float scale,
                 int64_t p0, int64_t p1, float* out, float* lse, float* scratch) {
  forward_range_f32(q, k, v, seg, scale, p0, p1, out, lse, scratch);
}
void forward_any(const View<double>& q, const View<double>& k, const View<double>& v, const Table& seg,
                 double scale, int64_t p0, int64_t p1, double* out, double* lse, double* scratch) {
  forward_range(q, k, v, seg, scale, p0, p1, out, lse, scratch);
}
void backward_any(const View<float>& q, const View<float>& k, const View<float>& v, const Table& seg, float scale,
                  const float* dout, const float* out, const float* lse, int64_t row, int64_t a, int64_t b,
                  float* dq, float* dk, float* dv, float* scratch) {
  backward_item_f32(q, k, v, seg, scale, dout, out, lse, row, a, b, dq, dk, dv, scratch);
}
void backward_any(const View<double>& q, const View<double>& k, const View<double>& v, const Table& seg,
                  double scale, const double* dout, const double* out, const double* lse, int64_t row, int64_t a,
                  int64_t b, double* dq, double* dk, double* dv, double* scratch) {
  backward_item(q, k, v, seg, scale, dout, out, lse, row, a, b, dq, dk, dv, scratch);
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
      TORCH_CHECK(to[r] <= to[r + 1], "attention_core: target_offsets must be non-decreasing (row ", r, ")");
      TORCH_CHECK(ko[r] <= ko[r + 1], "attention_core: key_offsets must be non-decreasing (row ", r, ")");
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
  // out unrounded (float32 / float64): the backward's delta = rowsum(dO * O) needs it exact.
  at::Tensor out = at::empty({seg.T, seg.H * seg.dh}, q.options().dtype(run.acc));
  at::Tensor lse = at::empty({seg.T, seg.H}, q.options().dtype(run.acc));
  if (seg.T * seg.H == 0) return {out, lse};
  // cost of each order position: its row's keys (+1 for the target itself)
  std::vector<int64_t> prefix(seg.T + 1, 0);
  for (int64_t r = 0; r < seg.B; ++r)
    for (int64_t p = seg.target_offsets[r]; p < seg.target_offsets[r + 1]; ++p)
      prefix[p + 1] = prefix[p] + 1 + seg.key_offsets[r + 1] - seg.key_offsets[r];
  AT_DISPATCH_FLOATING_TYPES(run.acc, "attention_core_cpu", [&] {
    const auto qv = run.view<scalar_t>(run.q), kv = run.view<scalar_t>(run.k), vv = run.view<scalar_t>(run.v);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    balanced_for(prefix, [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> scratch(3 * seg.max_keys + seg.dh + 2);
      forward_any(qv, kv, vv, seg, static_cast<scalar_t>(sm_scale), p0, p1, op, lp, scratch.data());
    });
  });
  return {out, lse};
}

// A backward work item: row `row`'s targets at order positions [a, b); `partial` -1 when it
// writes dK / dV in place (the row is one item), else the element offset of its partial buffers.
struct Item {
  int64_t row, a, b, partial;
};

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
  const at::Tensor out_c = out.to(run.acc).contiguous();
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
    const A *dop = dout.data_ptr<A>(), *outp = out_c.data_ptr<A>(), *lp = lse_c.data_ptr<A>();
    A *dqp = dq.data_ptr<A>(), *dkp = dk.data_ptr<A>(), *dvp = dv.data_ptr<A>();
    at::Tensor partial = at::empty({2, partial_elems}, dk.options());  // written whole by their items
    A* pk = partial.data_ptr<A>();
    A* pv = pk + partial_elems;
    balanced_for(prefix, [&](int64_t i0, int64_t i1) {
      std::vector<A> scratch(backward_scratch(run.max_keys, seg.dh));
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = items[i];
        const int64_t k0 = seg.key_offsets[it.row];
        A* dk_dst = it.partial < 0 ? dkp + k0 * width : pk + it.partial;
        A* dv_dst = it.partial < 0 ? dvp + k0 * width : pv + it.partial;
        backward_any(qv, kv, vv, seg, static_cast<A>(sm_scale), dop, outp, lp, it.row, it.a, it.b, dqp, dk_dst,
                     dv_dst, scratch.data());
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
