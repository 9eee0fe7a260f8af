// What the two CPU drivers of courier_fast::contrastive_lse share: the tiled op and its backward
// (contrastive_lse_cpu_driver.cpp) and the fused one-direction loss with its gradient
// (contrastive_lse_cpu_fused.cpp): the prepared inputs, the logits GEMM of one tile, and the
// gradients' last steps.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "contrastive_lse.h"
#include "contrastive_lse_cpu_tiles.h"

namespace courier_fast::cpu_lse {

// A worker thread of at::parallel_for does not inherit the caller's dispatch state: there the
// ATen calls of a tile (addmm on inputs that require grad) would reach autograd, which rejects
// out= arguments. Each worker runs below autograd, as the op itself does.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// The inputs both directions share: normalised rows, biases, ids, and the logits GEMM's operand
// and alpha. A finite scale is read as a number (CPU: that costs nothing) and becomes the alpha:
// no scaled copy of x. A zero, NaN or infinite one is folded into a copy of x_hat instead (alpha
// 1): BLAS may skip the product for such alphas (a NaN scale must make every logit NaN, and a
// zero one keeps the NaN of a NaN input).
struct Prepared {
  Rows xr, yr;
  at::Tensor x_bias, y_bias, x_ids, y_ids;
  int64_t id_offset;
  at::Tensor xs;  // x_hat, or x_hat * scale where the scale is not finite
  double alpha;
};

inline Prepared prepare(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
                 const std::optional<at::Tensor>& y_mask, const std::optional<at::Tensor>& y_logq,
                 const std::optional<at::Tensor>& x_ids, const std::optional<at::Tensor>& y_ids, int64_t id_offset,
                 const at::Tensor& scale, bool normalize) {
  const auto dt = compute_dtype(x);
  Rows xr = normalize_rows(x, normalize, dt), yr = normalize_rows(y, normalize, dt);
  const auto opts = xr.hat.options();
  const at::Tensor sc = scale_tensor(scale, dt);
  const double alpha = sc.item<double>();
  const bool finite = std::isfinite(alpha) && alpha != 0;
  return {xr, yr, mask_bias(x_mask, opts), mask_bias(y_mask, opts, y_logq), ids_or_undefined(x_ids),
          ids_or_undefined(y_ids), clamp_id_offset(id_offset, x.size(0), y.size(0)),
          finite ? xr.hat : xr.hat * sc, finite ? alpha : 1.0};
}

// tile <- scale * x_hat[r0:r1] @ y_hat[c0:c1].T with the accidental hits at -inf.
template <typename T>
inline void logits_tile(at::Tensor& tile, const Prepared& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  at::addmm_out(tile, tile, p.xs.slice(0, r0, r1), p.yr.hat.slice(0, c0, c1).t(), /*beta=*/0, p.alpha);
  if (p.x_ids.defined())
    cpu_tiles::mask_hits(tile.data_ptr<T>(), r1 - r0, c1 - c0, p.x_ids.data_ptr<int64_t>() + r0,
                         p.y_ids.data_ptr<int64_t>() + c0, p.id_offset + r0 - c0);
}

// The gradients w.r.t. x, y and scale from the unscaled sums gx_hat = dS @ y_hat (N, d) and
// gy_hat = dS.T @ x_hat (M, d), both in the compute dtype and overwritten: dL/dscale =
// sum_j <x_hat_j, gx_hat_j>; then scale times each, through the normalisation, in x's dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_gradients(const Prepared& p, at::Tensor gx_hat,
                                                                      at::Tensor gy_hat, const at::Tensor& x,
                                                                      const at::Tensor& y, const at::Tensor& scale) {
  at::Tensor grad_scale = (gx_hat * p.xr.hat).sum().to(scale.scalar_type()).reshape(scale.sizes());
  const at::Tensor sc = scale_tensor(scale, compute_dtype(x));
  gx_hat.mul_(sc);
  gy_hat.mul_(sc);
  at::Tensor gx = normalize_rows_backward_(gx_hat, p.xr).to(x.scalar_type());
  at::Tensor gy = normalize_rows_backward_(gy_hat, p.yr).to(y.scalar_type());
  return {gx, gy, grad_scale};
}

}  // namespace courier_fast::cpu_lse
