// CPU backend of courier_fast::contrastive_lse and its backward: 2-D tiles run in parallel.
//
// The N x M logits are cut into tiles of `rows` x `cols` (256 x 1024 fp32: 1 MB, in one core's L2)
// and the columns into one contiguous range of column blocks per worker thread. Each worker
// computes its tiles one at a time with a single-threaded GEMM (it runs inside at::parallel_for,
// where MKL does not spawn threads) and folds the tile at once with the epilogues of
// contrastive_lse_cpu.cpp, while the tile is in its own cache: both cores do GEMMs and
// epilogues, and no tile travels to memory. A worker owns its columns' LSE states and
// candidate gradients; anchor rows are shared, so each worker keeps its own row states and
// anchor gradients for a panel of rows (`panel` rows at a time, so that the extra memory stays
// O(workers * panel * d)), merged in worker order after the panel.
// The backward recomputes each tile (1 GEMM), turns it into dL/dS in place and applies two
// GEMMs. Memory stays O((N + M) d + workers * (tile + panel * d)); the N x M matrix never exists.
// One direction with its upstream gradient known up to a scalar takes a fused path instead:
// contrastive_lse_cpu_fused.cpp (3 GEMMs, no recompute). What both share: contrastive_lse_cpu_common.h.
// Argument checks, normalisation, masks and the accidental-hit rule: contrastive_lse.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "contrastive_lse.h"
#include "contrastive_lse_cpu_common.h"
#include "contrastive_lse_cpu_tiles.h"

namespace courier_fast {
namespace {

using namespace cpu_lse;

constexpr int64_t kCpuTileCols = 1024;  // with kCpuTiles' 256 rows: a 1 MB fp32 tile
constexpr int64_t kPanelTiles = 16;     // rows per panel: 16 tiles' rows (4096 automatically)

struct CpuTiling {
  int64_t rows, cols, panel, blocks, workers;
};

// Tiles for an (n, m) problem: rows as chunk_rows(kCpuTiles) (a forced setting gives square
// tiles of that many rows and columns, so that small tests run many tiles both ways); columns
// so that every worker thread gets at least one block.
CpuTiling cpu_tiling(int64_t n, int64_t m) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = chunk_rows(n, m, kCpuTiles);
  int64_t cols = forced_tile_rows().load();
  if (cols <= 0) cols = std::min(kCpuTileCols, ((m + threads - 1) / threads + 15) / 16 * 16);
  cols = std::max<int64_t>(1, std::min(cols, m));
  const int64_t blocks = m == 0 ? 0 : (m + cols - 1) / cols;
  return {rows, cols, rows * kPanelTiles, blocks, std::max<int64_t>(1, std::min(threads, blocks))};
}

// One worker's column blocks: a contiguous share of [0, blocks).
std::pair<int64_t, int64_t> worker_blocks(const CpuTiling& t, int64_t worker) {
  return {worker * t.blocks / t.workers, (worker + 1) * t.blocks / t.workers};
}

// The (h, w) tile of the given worker's buffer as a contiguous tensor.
at::Tensor tile_view(const at::Tensor& buffer, int64_t h, int64_t w) {
  return buffer.narrow(0, 0, h * w).view({h, w});
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_typed(const Prepared& p, int64_t n, int64_t m, bool with_columns) {
  const auto opts = p.xr.hat.options();
  const CpuTiling t = cpu_tiling(n, m);
  at::Tensor row_lse = at::empty({n}, opts);
  at::Tensor col_m = at::full({with_columns ? m : 0}, -kInf, opts), col_s = at::zeros({with_columns ? m : 0}, opts);
  // per worker: the tile, the epilogue's scratch, its row states (m, s) of the panel
  std::vector<at::Tensor> tiles, scratch, row_m, row_s;
  for (int64_t w = 0; w < t.workers; ++w) {
    tiles.push_back(at::zeros({t.rows * t.cols}, opts));
    scratch.push_back(at::empty({t.rows + 2 * t.cols}, opts));
    row_m.push_back(at::empty({t.panel}, opts));
    row_s.push_back(at::empty({t.panel}, opts));
  }
  const T* yb = ptr_or_null<T>(p.y_bias);
  T* cm = with_columns ? col_m.data_ptr<T>() : nullptr;
  T* cs = with_columns ? col_s.data_ptr<T>() : nullptr;
  for (int64_t p0 = 0; p0 < n; p0 += t.panel) {
    const int64_t p1 = std::min(n, p0 + t.panel);
    for (int64_t w = 0; w < t.workers; ++w) row_m[w].fill_(-kInf), row_s[w].zero_();
    at::parallel_for(0, t.workers, 1, [&](int64_t w0, int64_t w1) {
      const BelowAutograd below;
      for (int64_t w = w0; w < w1; ++w) {
        const auto [b0, b1] = worker_blocks(t, w);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * t.cols, c1 = std::min(m, c0 + t.cols);
          for (int64_t r0 = p0; r0 < p1; r0 += t.rows) {
            const int64_t r1 = std::min(p1, r0 + t.rows);
            at::Tensor s = tile_view(tiles[w], r1 - r0, c1 - c0);
            logits_tile<T>(s, p, r0, r1, c0, c1);
            cpu_tiles::forward_tile(s.data_ptr<T>(), r1 - r0, c1 - c0, yb ? yb + c0 : nullptr,
                                    ptr_or_null<T>(p.x_bias, r0), with_columns, row_m[w].data_ptr<T>() + (r0 - p0),
                                    row_s[w].data_ptr<T>() + (r0 - p0), cm ? cm + c0 : nullptr,
                                    cs ? cs + c0 : nullptr, scratch[w].data_ptr<T>());
          }
        }
      }
    });
    for (int64_t w = 1; w < t.workers; ++w)  // in worker order: the same result on every run
      cpu_tiles::merge_states(row_m[0].data_ptr<T>(), row_s[0].data_ptr<T>(), row_m[w].data_ptr<T>(),
                              row_s[w].data_ptr<T>(), p1 - p0);
    cpu_tiles::finish_states(row_m[0].data_ptr<T>(), row_s[0].data_ptr<T>(), row_lse.data_ptr<T>() + p0, p1 - p0);
  }
  at::Tensor col_lse = at::empty({with_columns ? m : 0}, opts);
  if (with_columns) cpu_tiles::finish_states(col_m.data_ptr<T>(), col_s.data_ptr<T>(), col_lse.data_ptr<T>(), m);
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, const std::optional<at::Tensor>& y_logq,
    const std::optional<at::Tensor>& x_ids, const std::optional<at::Tensor>& y_ids, int64_t id_offset,
    const at::Tensor& scale, bool normalize, bool with_columns) {
  check_lse_inputs(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale);
  const Prepared p = prepare(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize);
  if (compute_dtype(x) == at::kDouble) return forward_typed<double>(p, x.size(0), y.size(0), with_columns);
  return forward_typed<float>(p, x.size(0), y.size(0), with_columns);
}

// dL/dx_hat = scale * dS @ y_hat and dL/dy_hat = scale * dS.T @ x_hat, accumulated unscaled;
// dL/dscale = sum_j <x_hat_j, (dS @ y_hat)_j> (see contrastive_lse.h's backward).
template <typename T>
std::pair<at::Tensor, at::Tensor> backward_typed(const Prepared& p, const at::Tensor& g, const at::Tensor& rl,
                                                 const at::Tensor& h, const at::Tensor& cl) {
  const auto opts = p.xr.hat.options();
  const int64_t n = p.xr.hat.size(0), m = p.yr.hat.size(0), d = p.xr.hat.size(1);
  const CpuTiling t = cpu_tiling(n, m);
  at::Tensor gx_hat = at::empty({n, d}, opts), gy_hat = at::zeros({m, d}, opts);
  std::vector<at::Tensor> tiles, scratch, gx_part;  // per worker; gx_part: its share of the panel's gx
  for (int64_t w = 0; w < t.workers; ++w) {
    tiles.push_back(at::zeros({t.rows * t.cols}, opts));
    scratch.push_back(at::empty({t.rows + t.cols}, opts));
    gx_part.push_back(at::empty({t.panel, d}, opts));
  }
  const T* yb = ptr_or_null<T>(p.y_bias);
  for (int64_t p0 = 0; p0 < n; p0 += t.panel) {
    const int64_t p1 = std::min(n, p0 + t.panel);
    for (auto& part : gx_part) part.zero_();
    at::parallel_for(0, t.workers, 1, [&](int64_t w0, int64_t w1) {
      const BelowAutograd below;
      for (int64_t w = w0; w < w1; ++w) {
        const auto [b0, b1] = worker_blocks(t, w);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * t.cols, c1 = std::min(m, c0 + t.cols);
          at::Tensor gy_block = gy_hat.slice(0, c0, c1);
          for (int64_t r0 = p0; r0 < p1; r0 += t.rows) {
            const int64_t r1 = std::min(p1, r0 + t.rows);
            at::Tensor s = tile_view(tiles[w], r1 - r0, c1 - c0);
            logits_tile<T>(s, p, r0, r1, c0, c1);
            cpu_tiles::grad_tile(s.data_ptr<T>(), r1 - r0, c1 - c0, yb ? yb + c0 : nullptr,
                                 ptr_or_null<T>(p.x_bias, r0), g.data_ptr<T>() + r0, rl.data_ptr<T>() + r0,
                                 ptr_or_null<T>(h, c0), h.defined() ? cl.data_ptr<T>() + c0 : nullptr,
                                 scratch[w].data_ptr<T>());
            gx_part[w].slice(0, r0 - p0, r1 - p0).addmm_(s, p.yr.hat.slice(0, c0, c1));
            gy_block.addmm_(s.t(), p.xr.hat.slice(0, r0, r1));
          }
        }
      }
    });
    at::Tensor gx_rows = gx_hat.slice(0, p0, p1);
    gx_rows.copy_(gx_part[0].narrow(0, 0, p1 - p0));
    for (int64_t w = 1; w < t.workers; ++w) gx_rows.add_(gx_part[w].narrow(0, 0, p1 - p0));
  }
  return {gx_hat, gy_hat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& x_mask, const std::optional<at::Tensor>& y_mask,
    const std::optional<at::Tensor>& y_logq, const std::optional<at::Tensor>& x_ids,
    const std::optional<at::Tensor>& y_ids, int64_t id_offset, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& scale, bool normalize, bool with_columns) {
  check_lse_inputs(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale);
  check_lse_backward_inputs(grad_row, grad_col, row_lse, col_lse, x, y.size(0), with_columns);
  const auto dt = compute_dtype(x);
  const Prepared p = prepare(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize);
  // An empty set's LSE is the constant -inf: no gradient. Using +inf there makes exp(S - lse) = 0.
  auto safe = [&](const at::Tensor& lse) {
    at::Tensor l = lse.to(dt);
    return at::where(at::isinf(l), at::full({}, kInf, l.options()), l).contiguous();
  };
  at::Tensor g = grad_row.to(dt).contiguous(), rl = safe(row_lse), h, cl;
  if (with_columns) {
    h = grad_col.to(dt).contiguous();
    cl = safe(col_lse);
  }
  auto [gx_hat, gy_hat] = dt == at::kDouble ? backward_typed<double>(p, g, rl, h, cl)
                                            : backward_typed<float>(p, g, rl, h, cl);
  return finish_gradients(p, gx_hat, gy_hat, x, y, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(courier_fast, CPU, m) {
  m.impl("contrastive_lse", &contrastive_lse_cpu);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cpu);
}

}  // namespace courier_fast
