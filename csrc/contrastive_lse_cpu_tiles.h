// The CPU epilogues of courier_fast::contrastive_lse on one logits tile (contrastive_lse_cpu.cpp),
// called by the CPU driver (contrastive_lse_cpu_driver.cpp). Single-threaded: the driver runs one
// tile per worker thread, each in its own cache.
//
// A tile s is (h, w) row-major and contiguous: the scaled logits of anchor rows [r0, r0 + h) and
// candidate columns [c0, c0 + w). Row arrays point at the tile's row 0 (length h), column arrays
// at its column 0 (length w). Biases as in contrastive_lse.h: x_bias 0 or -inf (an anchor masked
// out), y_bias 0 or -inf minus y_logq; nullptr for none.
//
// Online log-sum-exp state of one row or column: (m, s) with LSE = m + log(s). m is the largest
// entry seen (NaN once a NaN is seen, +inf once +inf is: then the LSE is m), -inf for nothing
// kept yet (s = 0). A tile's entries are folded in with merge_state; finish_states gives the LSE.
#pragma once

#include <cstdint>

namespace courier_fast::cpu_tiles {

// s[r, i] <- -inf where x_ids[r] == y_ids[i] and i != own + r (accidental hits; own is the tile
// column of row 0's positive, any value: no column matches it outside [0, w)).
void mask_hits(float* s, int64_t h, int64_t w, const int64_t* x_ids, const int64_t* y_ids, int64_t own);
void mask_hits(double* s, int64_t h, int64_t w, const int64_t* x_ids, const int64_t* y_ids, int64_t own);

// Folds the tile into the running row states (row_m, row_s: over s + y_bias) and, with columns,
// the running column states (col_m, col_s: over s + x_bias). scratch: h + 2 w elements.
// float32 with columns and no y_bias takes one exp per logit for both directions where the
// tile allows it (see the .cpp); otherwise one exp per logit and direction.
void forward_tile(const float* s, int64_t h, int64_t w, const float* y_bias, const float* x_bias, bool columns,
                  float* row_m, float* row_s, float* col_m, float* col_s, float* scratch);
void forward_tile(const double* s, int64_t h, int64_t w, const double* y_bias, const double* x_bias,
                  bool columns, double* row_m, double* row_s, double* col_m, double* col_s, double* scratch);

// s <- dL/ds in place: g[r] exp(s + y_bias[i] - row_lse[r]) + hc[i] exp(s + x_bias[r] - col_lse[i])
// (the second term only when hc is given). LSEs arrive with -inf replaced by +inf (an empty set
// has no gradient). scratch: h + w elements.
void grad_tile(float* s, int64_t h, int64_t w, const float* y_bias, const float* x_bias, const float* g,
               const float* row_lse, const float* hc, const float* col_lse, float* scratch);
void grad_tile(double* s, int64_t h, int64_t w, const double* y_bias, const double* x_bias, const double* g,
               const double* row_lse, const double* hc, const double* col_lse, double* scratch);

// Softmax numerators of whole rows in place (the fused loss, contrastive_lse_cpu_fused.cpp): the
// tile spans every column (an x_mask never changes the row direction). row_m[r] = the row's
// largest kept entry of s + y_bias (-inf where nothing is kept; NaN / +inf as in the states
// above), s[r, i] <- exp(s + y_bias[i] - row_m[r]) (0 where masked or a hit), row_sum[r] = the
// row's sum of them. A row with row_m = -inf is all 0 with sum 0; one with a NaN or +inf row_m
// holds no usable values.
void exp_rows(float* s, int64_t h, int64_t w, const float* y_bias, float* row_m, float* row_sum);
void exp_rows(double* s, int64_t h, int64_t w, const double* y_bias, double* row_m, double* row_sum);

// (m, s)[k] <- (m, s)[k] merged with (m2, s2)[k] for k < n.
void merge_states(float* m, float* s, const float* m2, const float* s2, int64_t n);
void merge_states(double* m, double* s, const double* m2, const double* s2, int64_t n);

// out[k] = LSE of the state k: m where m is infinite (-inf: an empty set), m + log(s) otherwise.
void finish_states(const float* m, const float* s, float* out, int64_t n);
void finish_states(const double* m, const double* s, double* out, int64_t n);

}  // namespace courier_fast::cpu_tiles
