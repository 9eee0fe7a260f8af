// CPU: the row direction of courier_fast::contrastive_lse together with its gradient, for an
// upstream gradient the caller knows up to one scalar (courier_fast::contrastive_lse_and_grad).
//
// A loss reduced with weights known at forward time (mean or sum over anchor weights w) sends its
// row LSEs the upstream gradient c * w for a scalar c that only the backward learns. Given
// row_grad = w, this op computes row_lse and the gradients of sum_j row_grad[j] * row_lse[j] in
// one pass over the logits; the backward then only scales them by c (ops/backends/compiled.py
// checks the proportion and otherwise runs contrastive_lse_backward, which recomputes).
//
// Each worker thread takes whole rows: a block of R anchor rows by all M candidates. It computes
// the block's logits (1 GEMM), turns them into softmax numerators in place (one exp per logit:
// exp_rows), and applies the two gradient GEMMs to the same block while it is in cache:
//   gx_hat[rows] = (E @ y_hat) * row_grad / row_sum,   gy_hat += E.T @ (x_hat[rows] * row_grad / row_sum),
// 3 GEMMs and one exp per logit, where the op and its backward take 4 GEMMs (the backward
// recomputes every tile) and two. Each worker keeps its own (M, d) candidate gradient, summed in
// worker order at the end (the same result on every run with the same thread count).
// Extra memory: workers * (R * M + M * d + R * d); fused_rows() says when that fits, else the
// caller uses the tiled op. Argument checks, normalisation, masks and hits: contrastive_lse.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "contrastive_lse.h"
#include "contrastive_lse_cpu_common.h"
#include "contrastive_lse_cpu_tiles.h"

namespace courier_fast {

namespace {

using namespace cpu_lse;

constexpr int64_t kBlockElems = int64_t{1} << 21;  // logits per worker block: 8 MB fp32 (M = 8192: 256 rows)
constexpr int64_t kMaxRows = 256;
constexpr int64_t kMinRows = 32;                       // fewer rows per GEMM waste the machine
constexpr int64_t kMaxGradBytes = int64_t{256} << 20;  // all workers' (M, d) candidate gradients

int64_t fused_workers(int64_t n, int64_t rows) {
  const int64_t blocks = (n + rows - 1) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_typed(const Prepared& p, const at::Tensor& row_grad,
                                                           int64_t rows) {
  const auto opts = p.xr.hat.options();
  const int64_t n = p.xr.hat.size(0), m = p.yr.hat.size(0), d = p.xr.hat.size(1);
  const int64_t blocks = (n + rows - 1) / rows, workers = fused_workers(n, rows);
  at::Tensor row_lse = at::empty({n}, opts), gx_hat = at::empty({n, d}, opts);
  std::vector<at::Tensor> block, gy_part, x_scaled, row_m, row_sum;  // per worker
  for (int64_t w = 0; w < workers; ++w) {
    block.push_back(at::empty({rows * m}, opts));
    gy_part.push_back(at::zeros({m, d}, opts));
    x_scaled.push_back(at::empty({rows, d}, opts));
    row_m.push_back(at::empty({rows}, opts));
    row_sum.push_back(at::empty({rows}, opts));
  }
  const T* yb = ptr_or_null<T>(p.y_bias);
  const T* g = row_grad.data_ptr<T>();
  T* lse = row_lse.data_ptr<T>();
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    const BelowAutograd below;
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t b = w * blocks / workers; b < (w + 1) * blocks / workers; ++b) {
        const int64_t r0 = b * rows, r1 = std::min(n, r0 + rows), h = r1 - r0;
        at::Tensor e = block[w].narrow(0, 0, h * m).view({h, m});
        logits_tile<T>(e, p, r0, r1, 0, m);
        T* rm = row_m[w].data_ptr<T>();
        T* rs = row_sum[w].data_ptr<T>();
        cpu_tiles::exp_rows(e.data_ptr<T>(), h, m, yb, rm, rs);
        for (int64_t r = 0; r < h; ++r) {  // rs[r] >= 1 where rm[r] is finite (its largest term is 1)
          lse[r0 + r] = std::isinf(rm[r]) ? rm[r] : rm[r] + std::log(rs[r]);
          rs[r] = rm[r] == -kInf ? T(0) : g[r0 + r] / rs[r];  // now the row's gradient coefficient
        }
        const at::Tensor coef = row_sum[w].narrow(0, 0, h).unsqueeze(1);
        at::Tensor gx_rows = gx_hat.slice(0, r0, r1);
        at::mm_out(gx_rows, e, p.yr.hat);
        gx_rows.mul_(coef);
        at::Tensor xs = x_scaled[w].narrow(0, 0, h);
        at::mul_out(xs, p.xr.hat.slice(0, r0, r1), coef);
        gy_part[w].addmm_(e.t(), xs);
      }
    }
  });
  for (int64_t w = 1; w < workers; ++w) gy_part[0].add_(gy_part[w]);  // in worker order
  return {row_lse, gx_hat, gy_part[0]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_lse_and_grad_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, const std::optional<at::Tensor>& y_logq,
    const std::optional<at::Tensor>& x_ids, const std::optional<at::Tensor>& y_ids, int64_t id_offset,
    const at::Tensor& scale, bool normalize, const at::Tensor& row_grad) {
  check_lse_inputs(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale);
  check_vector("row_grad", row_grad, x.size(0), "x.size(0)", x);
  TORCH_CHECK_TYPE(at::isFloatingType(row_grad.scalar_type()), "contrastive_lse_and_grad: row_grad must be a "
                   "float tensor, got ", row_grad.scalar_type());
  const auto dt = compute_dtype(x);
  const int64_t rows = fused_rows(y.size(0), x.size(1), dt == at::kDouble);
  TORCH_CHECK(rows > 0, "contrastive_lse_and_grad: M = ", y.size(0), " candidates of d = ", x.size(1),
              " do not fit the fused blocks (lse_fused_rows gives 0); use contrastive_lse");
  const Prepared p = prepare(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize);
  const at::Tensor g = row_grad.to(dt).contiguous();
  auto [row_lse, gx_hat, gy_hat] = dt == at::kDouble ? fused_typed<double>(p, g, rows) : fused_typed<float>(p, g, rows);
  auto [gx, gy, grad_scale] = finish_gradients(p, gx_hat, gy_hat, x, y, scale);
  return {row_lse, gx, gy, grad_scale};
}

// c with grad_row[j] == c * row_grad[j] for every j (each to 4 ulps of the compute dtype), where
// every row LSE is finite or -inf; NaN otherwise (the caller then recomputes). Reads the CPU
// tensors in place, after checking them: no value goes through a Python-visible read.
template <typename T>
double proportion_typed(const T* g, const T* w, const T* lse, int64_t n) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(lse[j]) || lse[j] == kInf) return nan;
    if (std::abs(w[j]) > std::abs(w[k])) k = j;
  }
  const T c = n == 0 || w[k] == 0 ? T(0) : g[k] / w[k];
  const T tol = 4 * std::numeric_limits<T>::epsilon();
  for (int64_t j = 0; j < n; ++j) {
    const T target = c * w[j];
    if (!(std::abs(g[j] - target) <= tol * std::abs(target))) return nan;
  }
  return static_cast<double>(c);
}

double lse_grad_proportion_cpu(const at::Tensor& grad_row, const at::Tensor& row_grad, const at::Tensor& row_lse) {
  const int64_t n = row_lse.dim() == 1 ? row_lse.size(0) : -1;
  TORCH_CHECK(n >= 0, "lse_grad_proportion: row_lse must be 1-D, got shape ", row_lse.sizes());
  TORCH_CHECK_TYPE(row_lse.scalar_type() == at::kFloat || row_lse.scalar_type() == at::kDouble,
                   "lse_grad_proportion: row_lse must be float32 or float64, got ", row_lse.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_row", &grad_row}, {"row_grad", &row_grad}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "lse_grad_proportion: ", name, " must be (", n, ",) as row_lse, got ",
                t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == row_lse.scalar_type(), "lse_grad_proportion: ", name, " must be ",
                     row_lse.scalar_type(), " as row_lse, got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "lse_grad_proportion: ", name, " must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(row_lse.device().is_cpu(), "lse_grad_proportion: row_lse must be on the CPU, got ", row_lse.device());
  const at::Tensor g = grad_row.contiguous(), w = row_grad.contiguous(), l = row_lse.contiguous();
  if (l.scalar_type() == at::kDouble) return proportion_typed(g.data_ptr<double>(), w.data_ptr<double>(), l.data_ptr<double>(), n);
  return proportion_typed(g.data_ptr<float>(), w.data_ptr<float>(), l.data_ptr<float>(), n);
}

}  // namespace

int64_t fused_rows(int64_t m, int64_t d, bool is_double) {
  const int64_t forced = forced_tile_rows().load();
  if (forced > 0) return forced;
  const int64_t bytes = is_double ? 8 : 4;
  const int64_t rows = std::min(kMaxRows, kBlockElems / std::max<int64_t>(m, 1) / 8 * 8);
  if (rows < kMinRows) return 0;
  if (at::get_num_threads() * m * d * bytes > kMaxGradBytes) return 0;
  return rows;
}

TORCH_LIBRARY_IMPL(courier_fast, CPU, m) {
  m.impl("contrastive_lse_and_grad", &contrastive_lse_and_grad_cpu);
  m.impl("lse_grad_proportion", &lse_grad_proportion_cpu);
}

}  // namespace courier_fast
