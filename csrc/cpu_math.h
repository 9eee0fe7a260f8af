// Vectorisable float math shared by the CPU kernels (contrastive_lse_cpu.cpp,
// attention_core_cpu.cpp): the instruction-set clones macro and a polynomial exp that GCC
// vectorises (std::exp does not), so that the float32 loops need no -ffast-math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Compile a function for AVX-512, AVX2 and baseline x86-64, chosen at run time: the extension is
// built once and runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COURIER_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define COURIER_CLONES
#endif
#define COURIER_INLINE inline __attribute__((always_inline))

namespace courier_fast {

// exp(x) for float: 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2], degree-6 Taylor polynomial
// (relative error < 2e-7); exactly 0 below -87.3 (including -inf, the masked entries).
COURIER_INLINE float exp_approx(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float k = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - k * 0.693145752f) - k * 1.42860677e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}
// float64 (tests, gradcheck): exact.
COURIER_INLINE double exp_approx(double x) { return std::exp(x); }

}  // namespace courier_fast
