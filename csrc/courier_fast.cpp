// courier_fast._C: the Python module shell and the op schemas.
//
// Importing courier_fast._C runs the static TORCH_LIBRARY registrations below (schemas) and in
// the kernel files (TORCH_LIBRARY_IMPL per backend). Fake (meta) kernels and autograd are
// registered from Python in courier_fast/_ops.py, as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include "contrastive_lse.h"

#ifdef COURIER_WITH_CUDA
#include <cuda.h>
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "courier_fast compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef COURIER_WITH_CUDA
  PyModule_AddObject(m, "cuda_compiled", Py_NewRef(Py_True));
  PyModule_AddIntConstant(m, "cuda_version", CUDA_VERSION);  // e.g. 13020
#else
  PyModule_AddObject(m, "cuda_compiled", Py_NewRef(Py_False));
#endif
  PyModule_AddStringConstant(m, "torch_version", COURIER_TORCH_VERSION);
  return m;
}
}

namespace {
// Rows per logits tile the chunked contrastive driver uses on a CPU or CUDA device (the CUDA
// policy is exposed here so that CPU machines can test it).
int64_t lse_tile_rows(int64_t n, int64_t m, bool cuda) {
  return courier_fast::chunk_rows(n, m, cuda ? courier_fast::kCudaTiles : courier_fast::kCpuTiles);
}
}  // namespace

TORCH_LIBRARY(courier_fast, m) {
  // Masked log-sum-exp of the scaled cosine-similarity matrix S = scale * x_hat @ y_hat.T
  // (x: (N, d) anchors, y: (M, d) candidates; x_hat, y_hat L2-normalised when normalize).
  //   row_lse[j] = log sum_{i : y_mask[i]} exp(S[j, i])          (N,)  -inf for an empty set
  //   col_lse[i] = log sum_{j : x_mask[j]} exp(S[j, i])          (M,)  only when with_columns
  // LSEs are float32 (float64 for float64 inputs). Never materialises S whole.
  m.def("contrastive_lse(Tensor x, Tensor y, Tensor? x_mask, Tensor? y_mask, float scale, "
        "bool normalize, bool with_columns) -> (Tensor row_lse, Tensor col_lse)");
  // Gradients of sum(grad_row * row_lse) + sum(grad_col * col_lse) w.r.t. x and y, recomputed
  // tile by tile from the saved LSEs. Rows/columns whose LSE is -inf get no gradient.
  m.def("contrastive_lse_backward(Tensor grad_row, Tensor grad_col, Tensor x, Tensor y, "
        "Tensor? x_mask, Tensor? y_mask, Tensor row_lse, Tensor col_lse, float scale, "
        "bool normalize, bool with_columns) -> (Tensor grad_x, Tensor grad_y)");
  // Reconstruction-attention core after the projections: q (B, h, P, dh), k/v (B, h, L, dh)
  // views (dh contiguous), key_padding_mask (B, L) bool True = padding, causal: t sees s < t.
  // Returns out (B, P, h*dh) (0 for a target without valid keys) and lse (B, h, P) (-inf there).
  m.def("attention_core(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
        "float sm_scale) -> (Tensor out, Tensor lse)");
  m.def("attention_core_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? key_padding_mask, bool causal, float sm_scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("lse_tile_rows(int n, int m, bool cuda) -> int", &lse_tile_rows);
}
