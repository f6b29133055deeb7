// The CPU kernels' vectorised math: exp and log of whole buffers, and row reductions that vectorise.
// Included by cpu/loss_cpu.cpp (which also exposes exp and log to the tests as sgan::_vector_math) and
// cpu/noise_cpu.cpp (log only); its functions are internal to each (hence [[maybe_unused]]).
//
// Transcendentals are most of the work: an exp per logit in the forward and in the backward, and a few
// per row. glibc's scalar expf/logf would make the op several times slower than memory bandwidth, so the
// CPU kernels gather the arguments of a block of rows into buffers and evaluate them in loops the compiler
// vectorises: Cephes' expf and logf polynomials (relative error ~1e-7), branch-free arithmetic (which
// needs -fno-trapping-math to vectorise with GCC). On x86-64 Linux with GCC, an AVX2 + FMA clone of those
// loops and of the per-block kernels (their short per-row loops, ~5% faster) is also compiled and picked at
// load time (target_clones), so the library still runs on CPUs without AVX2. (Clang does not clone
// templates.) float64 (for gradcheck) uses the scalar library functions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../loss_math.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SGAN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SGAN_CPU_CLONES
#endif

namespace sgan {
namespace {

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// y = exp(y), elementwise.
[[maybe_unused]] SGAN_CPU_CLONES void exp_block(float* __restrict y, int64_t n) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = y[i];
    const float xc = std::min(std::max(x, -87.0f), 88.0f);  // keeps 2^e a normal float
    const float big = xc * 1.44269504088896341f + kRound;
    const float e = big - kRound;                              // round(x / ln 2)
    const float r = xc - e * 0.693359375f + e * 2.12194440e-4f;  // x - e ln 2, in two parts: |r| <= ln 2 / 2
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    float out = p * bits_to_float((float_to_bits(big) - float_to_bits(kRound) + 127) << 23);  // p * 2^e
    out = x < -87.0f ? 0.0f : out;      // underflow, and exp(-inf) = 0
    out = x > 88.0f ? INFINITY : out;   // overflow (only after an infinite max, see lse_shift)
    y[i] = x != x ? x : out;            // NaN stays NaN
  }
}

// y = log(y), elementwise, for y that are 0, normal floats or inf (here: sums of exps >= 1, or 1 + e).
[[maybe_unused]] SGAN_CPU_CLONES void log_block(float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = y[i];
    const int32_t bits = float_to_bits(x);
    float e = float(((bits >> 23) & 0xff) - 126);
    float f = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // x = f * 2^e, f in [0.5, 1)
    const bool low = f < 0.707106781186547524f;
    e = low ? e - 1.0f : e;
    f = low ? f + f - 1.0f : f - 1.0f;  // log x = log(1 + f) + e ln 2, |f| < 0.42
    const float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float out = (p * f * z - 2.12194440e-4f * e - 0.5f * z) + f + 0.693359375f * e;
    out = x == 0.0f ? -INFINITY : out;
    out = x == INFINITY ? x : out;
    out = x < 0.0f ? NAN : out;
    y[i] = x != x ? x : out;
  }
}

[[maybe_unused]] void exp_block(double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_(y[i]);
}

[[maybe_unused]] void log_block(double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = log_(y[i]);
}

// y = log1p(y) for y in [0, 1], via log(1 + y) corrected for the rounding of 1 + y (Goldberg's trick).
template <class A>
void log1p_block(A* y, A* scratch, int64_t n) {
  for (int64_t i = 0; i < n; ++i) scratch[i] = A(1) + y[i];
  log_block(scratch, n);
  for (int64_t i = 0; i < n; ++i) {
    const A u = A(1) + y[i];
    y[i] = u == A(1) ? y[i] : scratch[i] * (y[i] / (u - A(1)));
  }
}

// Reduction of x[0..k) with 8 independent partial results, combined in a fixed order: no serial
// dependency chain, and GCC vectorises the inner loop (a plain loop-carried max or sum would need
// -ffast-math to vectorise).
template <class A, class T, class Op>
inline A reduce_row(const T* x, int64_t k, A init, Op op) {
  A acc[8];
  for (int q = 0; q < 8; ++q) acc[q] = init;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    for (int q = 0; q < 8; ++q) acc[q] = op(acc[q], A(x[j + q]));
  }
  for (; j < k; ++j) acc[0] = op(acc[0], A(x[j]));
  A out = init;
  for (int q = 0; q < 8; ++q) out = op(out, acc[q]);
  return out;
}

}  // namespace
}  // namespace sgan
