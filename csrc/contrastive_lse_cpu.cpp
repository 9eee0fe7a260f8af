// CPU backend of courier_fast::contrastive_lse: the shared chunked driver with ATen epilogues.
#include <torch/library.h>

#include "contrastive_lse.h"

namespace courier_fast {
namespace {

struct CpuTileOps {
  static constexpr int64_t kTileElems = int64_t{1} << 20;

  // s is scratch: the driver drops it after this call.
  static void row_lse(at::Tensor& s, const at::Tensor& y_bias, at::Tensor& out) {
    if (y_bias.defined()) s.add_(y_bias);
    at::logsumexp_out(out, s, {1});
  }

  static void col_update(const at::Tensor& s, const at::Tensor& x_bias, at::Tensor& col_max,
                         at::Tensor& col_sum) {
    at::Tensor sc = x_bias.defined() ? s + x_bias.unsqueeze(1) : s;
    at::Tensor new_max = at::maximum(col_max, std::get<0>(sc.max(0)));
    // Where every entry so far is -inf, shift by 0 so that exp(-inf - shift) = 0, not NaN.
    at::Tensor shift = at::where(at::isinf(new_max), at::zeros_like(new_max), new_max);
    col_sum.mul_(at::exp(col_max - shift)).add_(at::exp(sc - shift).sum(0));
    col_max.copy_(new_max);
  }

  static void grad_tile(at::Tensor& s, const at::Tensor& y_bias, const at::Tensor& x_bias,
                        const at::Tensor& g, const at::Tensor& row_lse, const at::Tensor& h,
                        const at::Tensor& col_lse) {
    at::Tensor cols;
    if (h.defined()) {
      at::Tensor t = x_bias.defined() ? s + x_bias.unsqueeze(1) : s.clone();
      cols = t.sub_(col_lse).exp_().mul_(h);
    }
    if (y_bias.defined()) s.add_(y_bias);
    s.sub_(row_lse.unsqueeze(1)).exp_().mul_(g.unsqueeze(1));
    if (cols.defined()) s.add_(cols);
  }
};

std::tuple<at::Tensor, at::Tensor> lse_cpu(const at::Tensor& x, const at::Tensor& y,
                                           const std::optional<at::Tensor>& x_mask,
                                           const std::optional<at::Tensor>& y_mask, double scale,
                                           bool normalize, bool with_columns) {
  return contrastive_lse_forward<CpuTileOps>(x, y, x_mask, y_mask, scale, normalize, with_columns);
}

std::tuple<at::Tensor, at::Tensor> lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& x,
    const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, const at::Tensor& row_lse, const at::Tensor& col_lse,
    double scale, bool normalize, bool with_columns) {
  return contrastive_lse_backward<CpuTileOps>(grad_row, grad_col, x, y, x_mask, y_mask, row_lse,
                                              col_lse, scale, normalize, with_columns);
}

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CPU, m) {
  m.impl("contrastive_lse", &lse_cpu);
  m.impl("contrastive_lse_backward", &lse_backward_cpu);
}

}  // namespace courier_fast
