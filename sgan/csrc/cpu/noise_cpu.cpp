// CPU kernel of sgan::add_gaussian_noise (schema and autograd: ../noise_op.cpp), and the test hook
// sgan::_philox. y = x + sigma * n, where n[i] is a standard normal that depends on (key, i) only:
//   Philox4x32-10 (Salmon et al., SC 2011; the generator of torch's CUDA RNG) maps key and the counter
//   i / 4 to four 32-bit words; their top 24 bits give two uniform pairs (u, v), and Box-Muller turns each
//   pair into two normals, sqrt(-2 log u) * (cos 2 pi v, sin 2 pi v), for elements 4c .. 4c + 3.
// Why: torch's CPU normal_ draws from one serial Mersenne Twister, 16% of a salimans step on 2 threads
// (one core idle). Here every block of elements is independent, so the threads split the work, and the
// result does not depend on how many there are. Each stage is a loop GCC vectorises (Cephes polynomials,
// branch-free; AVX2 clone via SGAN_CPU_CLONES). |n| < 5.9 (24-bit u): a tail of probability 4e-9 is cut.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "vector_math.h"

namespace sgan {
namespace {

// Elements per block of the parallel loop (a multiple of 4): the stage buffers stay in L1.
constexpr int64_t kNoiseBlock = 2048;
constexpr int64_t kGroups = kNoiseBlock / 4;  // Philox counters per block

// One Philox4x32-10 evaluation: counter (c0, c1, c2, c3) under key (k0, k1) becomes its 4 words, in place.
// (Scalar references, not an array: GCC vectorises the calling loop only then.)
inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;  // the Weyl sequence of the key
    k1 += 0xBB67AE85u;
  }
}

struct NoiseScratch {
  float radius[kNoiseBlock / 2];  // per pair: u, then -2 log u, then sqrt(-2 log u)
  float turn[kNoiseBlock / 2];    // per pair: v in [0, 1), the angle in turns
  float normal[kNoiseBlock];      // per element
};

// The standard normals of counters [group, group + kGroups) into s.normal (pairs 2c and 2c + 1 of counter c
// hold elements 4c, 4c + 1 and 4c + 2, 4c + 3).
SGAN_CPU_CLONES void normal_block(uint64_t key, int64_t group, NoiseScratch& s) {
  const uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  constexpr float kScale = 1.0f / 16777216.0f;  // 2^-24
#pragma omp simd
  for (int64_t c = 0; c < kGroups; ++c) {
    const uint64_t counter = uint64_t(group + c);
    uint32_t w0 = uint32_t(counter), w1 = uint32_t(counter >> 32), w2 = 0, w3 = 0;
    philox4x32_10(w0, w1, w2, w3, k0, k1);
    s.radius[2 * c] = (float(int32_t(w0 >> 8)) + 0.5f) * kScale;  // (0, 1): log u is finite
    s.turn[2 * c] = float(int32_t(w1 >> 8)) * kScale;              // [0, 1)
    s.radius[2 * c + 1] = (float(int32_t(w2 >> 8)) + 0.5f) * kScale;
    s.turn[2 * c + 1] = float(int32_t(w3 >> 8)) * kScale;
  }
  log_block(s.radius, kNoiseBlock / 2);
#pragma omp simd
  for (int64_t p = 0; p < kNoiseBlock / 2; ++p) {
    const float r = std::sqrt(std::max(-2.0f * s.radius[p], 0.0f));
    // sin and cos of 2 pi v: v * 4 = q + f with q the nearest integer, so 2 pi v = q pi/2 + t, |t| <= pi/4
    const float quarter = s.turn[p] * 4.0f;
    const float q = (quarter + 12582912.0f) - 12582912.0f;
    const float t = (quarter - q) * 1.57079632679489662f;
    const float z = t * t;
    const float sin_t = t + t * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
    const float cos_t = 1.0f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                                                   4.166664568298827e-2f);
    const int quadrant = int(q) & 3;  // rotate (cos t, sin t) by quadrant * 90 degrees
    const float c = quadrant == 0 ? cos_t : quadrant == 1 ? -sin_t : quadrant == 2 ? -cos_t : sin_t;
    const float sn = quadrant == 0 ? sin_t : quadrant == 1 ? cos_t : quadrant == 2 ? -sin_t : -cos_t;
    s.normal[2 * p] = r * c;
    s.normal[2 * p + 1] = r * sn;
  }
}

template <class T>
void add_noise_kernel(const T* x, T* y, int64_t n, double sigma, uint64_t key) {
  using A = at::opmath_type<T>;
  const A scale = A(sigma);
  at::parallel_for(0, (n + kNoiseBlock - 1) / kNoiseBlock, 1, [&](int64_t begin, int64_t end) {
    NoiseScratch s;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kNoiseBlock, count = std::min(kNoiseBlock, n - first);
      normal_block(key, first / 4, s);
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) y[first + i] = T(A(x[first + i]) + scale * A(s.normal[i]));
    }
  });
}

at::Tensor add_gaussian_noise_cpu(const at::Tensor& x, double sigma, const at::Tensor& key) {
  TORCH_CHECK_TYPE(x.is_floating_point(), "sgan::add_gaussian_noise takes floating-point tensors, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(key.numel() == 1 && key.scalar_type() == at::kLong && key.device().is_cpu(),
                    "sgan::add_gaussian_noise takes its key as one int64 on the CPU, got ", key.scalar_type(), " ",
                    key.sizes(), " on ", key.device());
  const int64_t key_value = key.item<int64_t>();
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "add_gaussian_noise", [&] {
    add_noise_kernel(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), input.numel(), sigma,
                     uint64_t(key_value));
  });
  return out;
}

// For tests: the Philox4x32-10 words of counters[n, 4] (int64 holding 32-bit values) under key (k0, k1), as
// int64[n, 4].
at::Tensor philox_cpu(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong, "sgan::_philox takes int64 counters");
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4, "sgan::_philox takes counters[n, 4]");
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  const int64_t* in = c.const_data_ptr<int64_t>();
  int64_t* words = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    uint32_t w0 = uint32_t(in[4 * i]), w1 = uint32_t(in[4 * i + 1]), w2 = uint32_t(in[4 * i + 2]),
             w3 = uint32_t(in[4 * i + 3]);
    philox4x32_10(w0, w1, w2, w3, uint32_t(k0), uint32_t(k1));
    words[4 * i] = w0, words[4 * i + 1] = w1, words[4 * i + 2] = w2, words[4 * i + 3] = w3;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgan, CPU, m) {
  m.impl("add_gaussian_noise", &add_gaussian_noise_cpu);
  m.impl("_philox", &philox_cpu);
}

}  // namespace sgan
