// The chunked contrastive log-sum-exp of the CUDA backend, and the checks and helpers every C++
// backend shares (the CPU backend runs its own 2-D tiled driver: contrastive_lse_cpu_driver.cpp).
//
// Anchors are processed in row chunks of c rows (chunk_rows): one GEMM gives the (c, M) tile of scaled
// cosine logits, a backend-specific epilogue (TileOps) reduces it, and the tile is dropped.
// Memory stays O(c * M + (N + M) * d); the N x M matrix never exists. The backward recomputes
// each tile from the saved LSEs, turns it into dL/dS in place, and applies two GEMMs.
//
// TileOps (CPU: ATen ops; CUDA: fused kernels) provides, for a logits tile s (c, M):
//   mask_hits(s, x_ids, y_ids, positive)       s[r, i] <- -inf where x_ids[r] == y_ids[i] and
//                                              i != positive + r (accidental hits; ids given)
//   row_lse(s, y_bias, out)                    out[r] = logsumexp_i(s[r, i] + y_bias[i])
//   col_update(s, x_bias, col_max, col_sum)    online column max / sum over the tile's rows
//   grad_tile(s, ...)                          s <- dL/ds (see contrastive_lse_backward)
// x_bias is 0 (kept) or -inf (masked out); y_bias the same minus y_logq (the row direction's
// per-candidate correction); undefined tensors for "no mask, no logq". A hit's -inf makes every
// later term of it exactly 0, so the other epilogues need not know about ids.
//
// Forced tile rows (tests and the self-check only): courier_fast::set_lse_tile_rows(rows) makes
// every later call in this process, on CPU and CUDA, use tiles of `rows` rows (0 restores the
// automatic policy below), so that small problems run the multi-tile path (the online column
// update across tiles, the gradient sums across tiles). It is process-wide state that only an
// explicit call changes (no environment variable): use it through
// courier_fast._ops.forced_lse_tile_rows, a context manager that restores the previous value.
// courier_fast::lse_tile_rows reports the rows the driver uses, override included.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>

namespace courier_fast {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
constexpr double kInf = std::numeric_limits<double>::infinity();

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// One input after optional L2 normalisation, in the compute dtype.
struct Rows {
  at::Tensor hat;       // (n, d)  x / max(||x||, eps)  (x itself when !normalize)
  at::Tensor inv_norm;  // (n, 1)  1 / max(||x||, eps); undefined when !normalize
  at::Tensor clamped;   // (n, 1)  ||x|| <= eps: there x_hat = x / eps is linear in x
};

inline Rows normalize_rows(const at::Tensor& x, bool normalize, at::ScalarType dt) {
  at::Tensor xc = x.to(dt).contiguous();
  if (!normalize) return {xc, at::Tensor(), at::Tensor()};
  at::Tensor norm = at::linalg_vector_norm(xc, 2, {1}, /*keepdim=*/true);
  at::Tensor clamped = norm <= kNormEps;
  at::Tensor inv_norm = norm.clamp_min(kNormEps).reciprocal();
  return {xc * inv_norm, inv_norm, clamped};
}

// Gradient through x_hat = x / max(||x||, eps), given g = dL/dx_hat, computed in g's storage (g
// is the caller's own buffer): (g - x_hat <g, x_hat>) / max(||x||, eps), without the radial term
// where the norm is clamped (there x_hat = x / eps is linear in x). No (n, d) temporary is kept.
inline at::Tensor normalize_rows_backward_(at::Tensor g, const Rows& rows) {
  if (!rows.inv_norm.defined()) return g;
  at::Tensor radial = (g * rows.hat).sum(1, /*keepdim=*/true).masked_fill_(rows.clamped, 0);
  return g.addcmul_(rows.hat, radial, -1).mul_(rows.inv_norm);
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// 0 where mask is true, -inf where false, minus logq where given; undefined for neither.
inline at::Tensor mask_bias(const std::optional<at::Tensor>& mask, const at::TensorOptions& opts,
                            const std::optional<at::Tensor>& logq = std::nullopt) {
  if (!given(mask) && !given(logq)) return at::Tensor();
  at::Tensor bias = given(logq) ? logq->to(opts).neg().contiguous() : at::zeros(mask->sizes(), opts);
  if (!given(mask)) return bias;
  return bias.masked_fill_(mask->to(opts.device(), at::kBool).logical_not(), -kInf);
}

// The scale as a 0-d tensor of the compute dtype (it stays on the device: never read back).
inline at::Tensor scale_tensor(const at::Tensor& scale, at::ScalarType dt) { return scale.reshape({}).to(dt); }

// Rows per logits tile: about target_elems logits, but never fewer than min_rows rows (a GEMM
// with a handful of rows wastes the machine) nor more than there are. Extra memory is
// O(rows * M): at M = 2^20 candidates the CUDA policy's 256 rows are a 1 GB fp32 tile.
struct TilePolicy {
  int64_t target_elems;
  int64_t min_rows;
};
constexpr TilePolicy kCpuTiles{0, 256};  // 256 rows whatever M (CPU tiles are 2-D: contrastive_lse_cpu_driver.cpp)
constexpr TilePolicy kCudaTiles{int64_t{1} << 26, 256};   // 256 MB fp32 while M <= 2^18

// Rows per tile forced by set_lse_tile_rows; 0 = the automatic policy. One variable shared by
// the CPU and CUDA objects (an inline function's static is one object per shared library).
inline std::atomic<int64_t>& forced_tile_rows() {
  static std::atomic<int64_t> rows{0};
  return rows;
}

// Rows per worker block of the CPU fused row LSE + gradient (contrastive_lse_cpu_fused.cpp) for M
// candidates of d features, a forced setting included; 0 where its blocks or its per-worker
// candidate gradients would not fit its memory bounds (then callers use contrastive_lse).
int64_t fused_rows(int64_t m, int64_t d, bool is_double);

inline int64_t chunk_rows(int64_t n, int64_t m, TilePolicy policy) {
  const int64_t forced = forced_tile_rows().load();
  int64_t c = forced > 0 ? forced
                         : std::max<int64_t>(policy.min_rows, policy.target_elems / std::max<int64_t>(m, 1));
  return std::max<int64_t>(1, std::min(n, c));
}

// Checks of every tensor argument of contrastive_lse (forward and backward, CPU and CUDA) before
// any raw access; each error names the argument. Contents are trusted as they are (any float
// values, NaN included, and any int64 ids: ids are only compared, never used as indices).
inline void check_vector(const char* name, const std::optional<at::Tensor>& t, int64_t len, const char* what,
                         const at::Tensor& x) {
  if (!given(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "contrastive_lse: ", name, " must be ", what, " = (", len,
              ",), got shape ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "contrastive_lse: ", name, " is on ", t->device(), " but x is on ",
              x.device());
}

inline void check_lse_inputs(const at::Tensor& x, const at::Tensor& y,
                             const std::optional<at::Tensor>& x_mask,
                             const std::optional<at::Tensor>& y_mask,
                             const std::optional<at::Tensor>& y_logq,
                             const std::optional<at::Tensor>& x_ids,
                             const std::optional<at::Tensor>& y_ids, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "contrastive_lse: x and y must be 2-D, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "contrastive_lse: x and y need the same feature dim, got ",
              x.size(1), " and ", y.size(1));
  TORCH_CHECK(x.device() == y.device(), "contrastive_lse: x and y on different devices");
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "contrastive_lse: x and y differ in dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "contrastive_lse: x must be floating point, got ",
                   x.scalar_type());
  const int64_t n = x.size(0), m = y.size(0);
  check_vector("x_mask", x_mask, n, "(N,)", x);
  check_vector("y_mask", y_mask, m, "(M,)", x);
  check_vector("y_logq", y_logq, m, "(M,)", x);
  check_vector("x_ids", x_ids, n, "(N,)", x);
  check_vector("y_ids", y_ids, m, "(M,)", x);
  for (const auto& [name, mask] : {std::pair{"x_mask", &x_mask}, std::pair{"y_mask", &y_mask}})
    if (given(*mask))
      TORCH_CHECK_TYPE((*mask)->scalar_type() == at::kBool, "contrastive_lse: ", name, " must be bool, got ",
                       (*mask)->scalar_type());
  if (given(y_logq))
    TORCH_CHECK_TYPE(at::isFloatingType(y_logq->scalar_type()), "contrastive_lse: y_logq must be floating point");
  TORCH_CHECK(given(x_ids) == given(y_ids), "contrastive_lse: give both x_ids and y_ids, or neither");
  if (given(x_ids))
    TORCH_CHECK_TYPE(x_ids->scalar_type() == at::kLong && y_ids->scalar_type() == at::kLong,
                     "contrastive_lse: x_ids and y_ids must be int64, got ", x_ids->scalar_type(), " and ",
                     y_ids->scalar_type());
  TORCH_CHECK(scale.numel() == 1 && scale.device() == x.device(),
              "contrastive_lse: scale must be a 1-element tensor on the inputs' device, got shape ", scale.sizes(),
              " on ", scale.device());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "contrastive_lse: scale must be floating point");
}

// The backward's own tensors: the upstream gradients (any floating dtype) and the saved LSEs (the
// forward's dtype: float32, float64 for float64 x; their values are trusted), all read for every row
// (grad_row, row_lse: (N,)) and, with columns, every column (grad_col, col_lse: (M,)); without
// columns grad_col and col_lse are not read (any 1-D length; autograd passes (0,)).
inline void check_lse_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                      const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& x,
                                      int64_t m, bool with_columns) {
  const int64_t n = x.size(0);
  const std::pair<const char*, const at::Tensor*> rows[] = {{"grad_row", &grad_row}, {"row_lse", &row_lse}};
  const std::pair<const char*, const at::Tensor*> cols[] = {{"grad_col", &grad_col}, {"col_lse", &col_lse}};
  for (const auto& [name, t] : rows) check_vector(name, *t, n, "(N,)", x);
  for (const auto& [name, t] : cols) {
    if (with_columns) check_vector(name, *t, m, "(M,) (with_columns)", x);
    TORCH_CHECK(t->dim() == 1, "contrastive_lse: ", name, " must be 1-D, got shape ", t->sizes());
  }
  for (const auto& [name, t] : {rows[0], cols[0]})
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "contrastive_lse: ", name, " must be floating point, got ",
                     t->scalar_type());
  for (const auto& [name, t] : {rows[1], cols[1]})  // the forward's own outputs: its dtype
    TORCH_CHECK_TYPE(t->scalar_type() == compute_dtype(x), "contrastive_lse: ", name, " must be ",
                     compute_dtype(x), " (the forward's LSE dtype), got ", t->scalar_type());
}

// The accidental-hit rule of one tile (rows [r0, r1)): ids contiguous int64, or undefined.
struct TileIds {
  at::Tensor x_ids, y_ids;  // the tile's row ids (a slice), every column's ids
  int64_t positive = 0;     // column of the tile's row 0's positive: row r's is positive + r
};

inline TileIds tile_ids(const at::Tensor& x_ids, const at::Tensor& y_ids, int64_t id_offset, int64_t r0,
                        int64_t r1) {
  if (!x_ids.defined()) return {};
  return {x_ids.slice(0, r0, r1), y_ids, id_offset + r0};
}

// An id_offset outside [-N, M] puts no row's positive in y, like -N or M: clamped so that
// id_offset + row never overflows (any int64 is a valid id_offset).
inline int64_t clamp_id_offset(int64_t id_offset, int64_t n, int64_t m) {
  return std::clamp<int64_t>(id_offset, -n, m);
}

inline at::Tensor ids_or_undefined(const std::optional<at::Tensor>& ids) {
  return given(ids) ? ids->contiguous() : at::Tensor();
}

// log(sum) + max of an online column reduction; -inf where the column saw no valid entry.
inline at::Tensor finish_columns(const at::Tensor& col_max, const at::Tensor& col_sum) {
  return at::where(at::isinf(col_max), col_max, col_max + at::log(col_sum));
}

// The device guard of the CPU kernels: none.
struct NoDeviceGuard {
  explicit NoDeviceGuard(at::Device) {}
};

template <class TileOps, class Guard>
std::tuple<at::Tensor, at::Tensor> contrastive_lse_forward(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, const std::optional<at::Tensor>& y_logq,
    const std::optional<at::Tensor>& x_ids_opt, const std::optional<at::Tensor>& y_ids_opt, int64_t id_offset,
    const at::Tensor& scale, bool normalize, bool with_columns) {
  check_lse_inputs(x, y, x_mask, y_mask, y_logq, x_ids_opt, y_ids_opt, scale);
  const Guard guard(x.device());
  const auto dt = compute_dtype(x);
  const int64_t n = x.size(0), m = y.size(0);
  Rows xr = normalize_rows(x, normalize, dt), yr = normalize_rows(y, normalize, dt);
  at::Tensor xs = xr.hat * scale_tensor(scale, dt);  // fold the scale into the anchors once
  at::Tensor yt = yr.hat.t();
  const auto opts = xs.options();
  at::Tensor x_bias = mask_bias(x_mask, opts), y_bias = mask_bias(y_mask, opts, y_logq);
  at::Tensor x_ids = ids_or_undefined(x_ids_opt), y_ids = ids_or_undefined(y_ids_opt);
  id_offset = clamp_id_offset(id_offset, n, m);

  at::Tensor row_lse = at::empty({n}, opts);
  at::Tensor col_max, col_sum;
  if (with_columns) {
    col_max = at::full({m}, -kInf, opts);
    col_sum = at::zeros({m}, opts);
  }
  const int64_t c = chunk_rows(n, m, TileOps::kTiles);
  at::Tensor tile = at::empty({c, m}, opts);  // reused: no allocation (or page faults) per tile
  for (int64_t r0 = 0; r0 < n; r0 += c) {
    const int64_t r1 = std::min(n, r0 + c);
    at::Tensor s = tile.narrow(0, 0, r1 - r0);
    at::mm_out(s, xs.slice(0, r0, r1), yt);  // (c, M) scaled logits
    if (x_ids.defined()) TileOps::mask_hits(s, tile_ids(x_ids, y_ids, id_offset, r0, r1));
    if (with_columns)
      TileOps::col_update(s, x_bias.defined() ? x_bias.slice(0, r0, r1) : x_bias, col_max, col_sum);
    at::Tensor out = row_lse.slice(0, r0, r1);
    TileOps::row_lse(s, y_bias, out);
  }
  at::Tensor col_lse = with_columns ? finish_columns(col_max, col_sum) : at::empty({0}, opts);
  return {row_lse, col_lse};
}

// dL/dS[j, i] = g[j] * exp(S[j, i] - y_logq[i] - row_lse[j]) * y_mask[i] * keep[j, i]
//             + h[i] * exp(S[j, i] - col_lse[i]) * x_mask[j] * keep[j, i]   (second term with columns)
// dL/dx_hat = scale * dS @ y_hat,  dL/dy_hat = scale * dS.T @ x_hat,
// dL/dscale = sum_ji dS[j, i] <x_hat_j, y_hat_i> = sum_j <x_hat_j, (dS @ y_hat)_j>: from the first
// GEMM's output before it is scaled, so the scale costs no pass over the tiles.
template <class TileOps, class Guard>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& x,
    const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, const std::optional<at::Tensor>& y_logq,
    const std::optional<at::Tensor>& x_ids_opt, const std::optional<at::Tensor>& y_ids_opt, int64_t id_offset,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& scale, bool normalize,
    bool with_columns) {
  check_lse_inputs(x, y, x_mask, y_mask, y_logq, x_ids_opt, y_ids_opt, scale);
  check_lse_backward_inputs(grad_row, grad_col, row_lse, col_lse, x, y.size(0), with_columns);
  const Guard guard(x.device());
  const auto dt = compute_dtype(x);
  const int64_t n = x.size(0), m = y.size(0);
  Rows xr = normalize_rows(x, normalize, dt), yr = normalize_rows(y, normalize, dt);
  at::Tensor sc = scale_tensor(scale, dt);
  at::Tensor xs = xr.hat * sc;
  at::Tensor yt = yr.hat.t();
  const auto opts = xs.options();
  at::Tensor x_bias = mask_bias(x_mask, opts), y_bias = mask_bias(y_mask, opts, y_logq);
  at::Tensor x_ids = ids_or_undefined(x_ids_opt), y_ids = ids_or_undefined(y_ids_opt);
  id_offset = clamp_id_offset(id_offset, n, m);
  // An empty set's LSE is the constant -inf: no gradient. Using +inf there makes exp(S - lse) = 0.
  auto safe = [&](const at::Tensor& lse) {
    at::Tensor l = lse.to(dt);
    return at::where(at::isinf(l), at::full({}, kInf, opts), l);
  };
  at::Tensor g = grad_row.to(dt).contiguous(), rl = safe(row_lse).contiguous();
  at::Tensor h, cl;
  if (with_columns) {
    h = grad_col.to(dt).contiguous();
    cl = safe(col_lse).contiguous();
  }
  at::Tensor gx_hat = at::empty({n, x.size(1)}, opts);
  at::Tensor gy_hat = at::zeros({m, y.size(1)}, opts);
  const int64_t c = chunk_rows(n, m, TileOps::kTiles);
  at::Tensor tile = at::empty({c, m}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += c) {
    const int64_t r1 = std::min(n, r0 + c);
    at::Tensor s = tile.narrow(0, 0, r1 - r0);
    at::mm_out(s, xs.slice(0, r0, r1), yt);
    if (x_ids.defined()) TileOps::mask_hits(s, tile_ids(x_ids, y_ids, id_offset, r0, r1));
    TileOps::grad_tile(s, y_bias, x_bias.defined() ? x_bias.slice(0, r0, r1) : x_bias,
                       g.slice(0, r0, r1), rl.slice(0, r0, r1), h, cl);
    at::Tensor gx_rows = gx_hat.slice(0, r0, r1);
    at::mm_out(gx_rows, s, yr.hat);                // unscaled until the end
    gy_hat.addmm_(s.t(), xr.hat.slice(0, r0, r1));  // likewise
  }
  xs = at::Tensor();  // released: the step's peak is then the loop's, not the loop's plus what follows
  tile = at::Tensor();
  at::Tensor grad_scale = (gx_hat * xr.hat).sum().to(scale.scalar_type()).reshape(scale.sizes());
  gx_hat.mul_(sc);
  gy_hat.mul_(sc);
  at::Tensor gx = normalize_rows_backward_(gx_hat, xr).to(x.scalar_type());
  at::Tensor gy = normalize_rows_backward_(gy_hat, yr).to(y.scalar_type());
  return {gx, gy, grad_scale};
}

// The CPU or CUDA kernels of contrastive_lse and its backward: the driver above with the
// backend's TileOps and device guard (CPU: NoDeviceGuard; CUDA: c10::cuda::CUDAGuard). Called
// from the backend's TORCH_LIBRARY_IMPL block.
template <class TileOps, class Guard>
void register_contrastive_lse(torch::Library& m) {
  m.impl("contrastive_lse", &contrastive_lse_forward<TileOps, Guard>);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward<TileOps, Guard>);
}

}  // namespace courier_fast
