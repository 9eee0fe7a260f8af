// Argument checks of courier_fast::attention_core and its backward, shared by every C++ backend
// (today the CUDA one, csrc/cuda/attention_core_cuda.cu). Every tensor argument's shape, dtype
// and device is checked here, on the host, before any kernel reads it; each error names the
// argument. The kernels read q, k, v and grad_out through (row, head) strides with the head dim
// contiguous, everything else contiguous (they make their own contiguous copies).
//
// Contents are trusted, not read here (a host read would synchronise the GPU): the segment table
// must be a valid one (courier_fast.attention_layout.segments builds it; the public API checks
// the user's offsets / indices by value in courier_fast._validate):
//   target_offsets, key_offsets (B+1,): non-decreasing, [0] = 0, target_offsets[B] = T,
//                                       key_offsets[B] = S
//   target_rows (T,): in [0, B), target t's row;  key_rows (S,): the r with key_offsets[r] <= s <
//   key_offsets[r+1];  order (T,): a permutation of [0, T) listing row r's targets at
//   [target_offsets[r], target_offsets[r+1]).
//   max_keys >= every row's key count: the backward's dK/dV workspace is sized by it (a row is
//   clamped to max_keys keys there; keys past it would get no gradient).
// The CUDA kernels assert these bounds on the device when built with COURIER_DEVICE_ASSERTS
// (setup.py: COURIER_FAST_DEVICE_ASSERTS=1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace courier_fast {

// The dK/dV split of the backward (issue 27 item 6), host side: a row's targets are cut into pieces
// of dkdv_target_chunk(T, B) targets; a row with more than one piece writes fp32 partials per piece
// (workspace row ws_offsets[r] + c * L_r + slot for chunk c), then each key sums its partials in
// chunk order (deterministic, no atomics). Shapes only: no host read of the device. This mirrors
// kernels/attention_split.py (DKDV_MIN_CHUNK, DKDV_MAX_CHUNK, target_chunk, workspace_rows), which
// the Triton backend and the work model use; tests/ops/test_dkdv_split.py checks the constants.
constexpr int64_t kDkdvMinChunk = 32;   // targets: rows of at most this many stay one piece
constexpr int64_t kDkdvMaxChunk = 256;  // targets: the longest serial walk of one dK/dV warp

inline int64_t dkdv_target_chunk(int64_t n_targets, int64_t n_rows) {
  const int64_t mean = n_targets / (n_rows > 0 ? n_rows : 1);
  return std::max(kDkdvMinChunk, std::min(kDkdvMaxChunk, mean));
}

// Upper bound on the workspace rows (sum over rows with n_r > chunk of m_r * min(L_r, max_keys));
// 0 when no row can have two pieces. See attention_split.workspace_rows.
inline int64_t dkdv_workspace_rows(int64_t n_targets, int64_t n_keys, int64_t chunk, int64_t max_keys,
                                   int64_t max_targets) {
  if (n_targets <= chunk || (max_targets >= 0 && max_targets <= chunk)) return 0;
  const int64_t pieces = (n_targets + (n_targets / (chunk + 1)) * (chunk - 1)) / chunk;
  return std::min(pieces * max_keys, (n_targets * max_keys + (chunk - 1) * n_keys) / chunk);
}

// Upper bound on sum_r m_r * min(L_r, max_keys), the CUDA dK/dV pass's (piece, key) warps per head.
inline int64_t dkdv_key_pieces(int64_t n_targets, int64_t n_keys, int64_t chunk, int64_t max_keys) {
  return (n_targets * max_keys + (chunk - 1) * n_keys) / chunk;
}

inline void check_attention_vector(const char* name, const at::Tensor& t, int64_t len, const char* what,
                                   const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "attention_core: ", name, " must be ", what, " = (", len,
              ",), got shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "attention_core: ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

inline void check_attention_core_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& target_rows, const at::Tensor& key_rows,
                                      const at::Tensor& target_offsets, const at::Tensor& key_offsets,
                                      const at::Tensor& order, const std::optional<at::Tensor>& key_padding_mask,
                                      int64_t causal, int64_t max_targets, int64_t max_keys, int64_t max_head_dim) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attention_core: q, k, v must be (N, h, dh), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention_core: k and v shapes differ: ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(1) == k.size(1) && q.size(2) == k.size(2),
              "attention_core: q and k disagree in heads or head dim: ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(2) <= max_head_dim, "attention_core: head dim ", q.size(2), " > ", max_head_dim,
              " is not supported");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "attention_core: q, k, v on different devices");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "attention_core: q, k, v dtypes differ");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "attention_core: q must be floating point, got ",
                   q.scalar_type());
  for (const auto& [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}})
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == 1, "attention_core: ", name,
                "'s head dim must be contiguous (stride 1), got strides ", t->strides());
  const int64_t n_targets = q.size(0), n_keys = k.size(0);
  TORCH_CHECK(target_offsets.dim() == 1 && target_offsets.size(0) >= 1,
              "attention_core: target_offsets must be (B+1,), got shape ", target_offsets.sizes());
  const int64_t b1 = target_offsets.size(0);
  check_attention_vector("target_rows", target_rows, n_targets, "(T,)", q);
  check_attention_vector("order", order, n_targets, "(T,)", q);
  check_attention_vector("key_rows", key_rows, n_keys, "(S,)", q);
  check_attention_vector("target_offsets", target_offsets, b1, "(B+1,)", q);
  check_attention_vector("key_offsets", key_offsets, b1, "(B+1,) like target_offsets", q);
  for (const auto& [name, t] : {std::pair{"target_rows", &target_rows}, std::pair{"key_rows", &key_rows},
                                std::pair{"target_offsets", &target_offsets}, std::pair{"key_offsets", &key_offsets},
                                std::pair{"order", &order}})
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "attention_core: ", name, " must be int64, got ",
                     t->scalar_type());
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    check_attention_vector("key_padding_mask", *key_padding_mask, n_keys, "(S,)", q);
    TORCH_CHECK_TYPE(key_padding_mask->scalar_type() == at::kBool,
                     "attention_core: key_padding_mask must be bool, got ", key_padding_mask->scalar_type());
  }
  TORCH_CHECK(causal >= 0 && causal <= 2, "attention_core: causal must be 0, 1 or 2, got ", causal);
  TORCH_CHECK(max_targets >= -1 && max_keys >= 0, "attention_core: max_targets must be >= -1 and max_keys >= 0, "
              "got ", max_targets, " and ", max_keys);
}

// The backward's own tensors: grad_out and the forward's out (T, h*dh), lse (T, h) in the
// accumulation dtype (float64 for float64 q, else float32), on q's device.
inline void check_attention_core_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                               const at::Tensor& out, const at::Tensor& lse) {
  const int64_t n_targets = q.size(0), heads = q.size(1), width = q.size(1) * q.size(2);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n_targets && t->size(1) == width, "attention_core: ", name,
                " must be (T, h*dh) = (", n_targets, ", ", width, "), got shape ", t->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "attention_core: ", name, " must be floating point");
  }
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == n_targets && lse.size(1) == heads,
              "attention_core: lse must be (T, h) = (", n_targets, ", ", heads, "), got shape ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "attention_core: lse must be ", acc, " (the forward's), got ",
                   lse.scalar_type());
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}, std::pair{"lse", &lse}})
    TORCH_CHECK(t->device() == q.device(), "attention_core: ", name, " is on ", t->device(), " but q is on ",
                q.device());
}

}  // namespace courier_fast
