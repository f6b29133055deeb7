// Per-row math of the fused discriminator loss, shared by the CPU kernel (loss_cpu.cpp) and the CUDA
// kernel (loss_cuda.cu). Plain C++ with no torch headers, so nvcc compiles it for host and device.
//
// The contract and its derivation are in sgan/losses.py (the reference implementation). Every formulation
// reduces a row of logits to two numbers:
//   m = logsumexp of the K class logits
//   r = logit(D(x)):  two-head r = x[K],  k-plus-one r = m - x[K],  k-logit r = m
// and the loss terms of the row are
//   ce   = m - x[t]  (+ softplus(-r) for k-plus-one)   if t >= 0   (labeled real)
//   real = softplus(-r)                                if t >= -1  (labeled or unlabeled real)
//   gen  = softplus(r)                                 if t == -2  (generated)
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SGAN_HD __host__ __device__ __forceinline__
#else
#define SGAN_HD inline
#endif

namespace sgan {

enum class Formulation : int { TwoHead = 0, KPlusOne = 1, KLogit = 2 };

constexpr int64_t kUnlabeled = -1;
constexpr int64_t kGenerated = -2;

// Explicit float/double overloads: the same call resolves on the host and in device code.
SGAN_HD float exp_(float x) { return ::expf(x); }
SGAN_HD double exp_(double x) { return ::exp(x); }
SGAN_HD float log_(float x) { return ::logf(x); }
SGAN_HD double log_(double x) { return ::log(x); }
SGAN_HD float log1p_(float x) { return ::log1pf(x); }
SGAN_HD double log1p_(double x) { return ::log1p(x); }
SGAN_HD float abs_(float x) { return ::fabsf(x); }
SGAN_HD double abs_(double x) { return ::fabs(x); }

template <class A>
SGAN_HD A inf_() { return A(INFINITY); }

// Max for the logsumexp shift. It skips a NaN, which still reaches m through exp(NaN - shift):
// a NaN logit always gives a NaN m.
template <class A>
SGAN_HD A max_(A a, A b) { return b > a ? b : a; }

// The logsumexp shift: the row max, or 0 when the max is infinite (as torch.logsumexp does), so that an
// all -inf row gives -inf and a row with +inf gives +inf instead of NaN from inf - inf.
template <class A>
SGAN_HD A lse_shift(A row_max) { return abs_(row_max) == inf_<A>() ? A(0) : row_max; }

// logsumexp from the sum of exp(x - shift) over the row.
template <class A>
SGAN_HD A lse_finish(A sum_exp, A shift) { return log_(sum_exp) + shift; }

// softplus and sigmoid, split so the CPU kernel can compute their transcendental part for a block of rows
// in vectorised loops. With e = exp(-|x|) and l = log1p(e), both without overflow:
//   softplus(x) = max(x, 0) + l,   softplus(-x) = max(-x, 0) + l
//   sigmoid(x)  = 1 / (1 + e) if x >= 0 else e / (1 + e)
// NaN stays NaN (through e and l).
template <class A>
SGAN_HD A softplus_from(A x, A log1p_exp_neg_abs) { return (x > A(0) ? x : A(0)) + log1p_exp_neg_abs; }

template <class A>
SGAN_HD A sigmoid_from(A x, A exp_neg_abs) {
  return x >= A(0) ? A(1) / (A(1) + exp_neg_abs) : exp_neg_abs / (A(1) + exp_neg_abs);
}

// Number of class logits K in a row of C logits.
template <Formulation F>
SGAN_HD int64_t num_classes(int64_t c) { return F == Formulation::KLogit ? c : c - 1; }

// r = logit(D(x)) from m and x[K] (x_last; unused for k-logit, which has no extra logit).
template <Formulation F, class A>
SGAN_HD A real_logit(A m, A x_last) {
  if (F == Formulation::TwoHead) return x_last;
  if (F == Formulation::KPlusOne) return m - x_last;
  return m;
}

template <class A>
struct RowLoss {
  A ce, real, gen;
};

// Whether t is a class (0..K-1), kUnlabeled or kGenerated. Kernels never read x[t] for other values: the
// forward reports them (or gives NaN sums when the caller skipped the check), the backward gives NaN.
SGAN_HD bool valid_target(int64_t t, int64_t k) { return t >= kGenerated && t < k; }

// Column of x to read as x[t]: t itself for a labeled row, any valid column (0) otherwise, so the read is
// unconditional (no branch on the random targets) and in bounds.
SGAN_HD int64_t target_column(int64_t t) { return t >= 0 ? t : 0; }

// The three loss terms of one row with target t (assumed in [-2, K)), from m, r = real_logit, x_target =
// x[target_column(t)] and l = log1p(exp(-|r|)). Terms of unselected kinds are exactly 0 (selected, never
// multiplied by a 0/1 mask, which would turn inf into NaN); selected terms carry NaN through.
template <Formulation F, class A>
SGAN_HD RowLoss<A> row_loss(A m, A r, A x_target, int64_t t, A log1p_exp_neg_abs_r) {
  const A softplus_neg_r = softplus_from(-r, log1p_exp_neg_abs_r);  // -log D
  // k-plus-one's softmax runs over all K + 1 logits, whose logsumexp is m + softplus(-r)
  const A ce = m - x_target + (F == Formulation::KPlusOne ? softplus_neg_r : A(0));
  return RowLoss<A>{
      t >= 0 ? ce : A(0),
      t >= kUnlabeled ? softplus_neg_r : A(0),
      t == kGenerated ? softplus_from(r, log1p_exp_neg_abs_r) : A(0),  // -log(1 - D)
  };
}

// Gradient of g_ce * ce + g_real * real + g_gen * gen of one row, in the form
//   d/dx[j] = on_p * exp(x[j] - m) - (j == t ? on_target : 0)   for the class logits j < K
//   d/dx[K] = on_last                                           (two-head and k-plus-one)
// since dm/dx[j] = softmax(x[:K])[j] and dr/dx follows from real_logit. e = exp(-|r|).
template <class A>
struct RowGrad {
  A on_p, on_target, on_last;
};

// Selects rather than branches, as in row_loss. on_target is 0 unless t >= 0, so a kernel may apply it at
// target_column(t) for every row.
template <Formulation F, class A>
SGAN_HD RowGrad<A> row_grad(A r, int64_t t, A g_ce, A g_real, A g_gen, A exp_neg_abs_r) {
  const A g_labeled = t >= 0 ? g_ce : A(0);
  const A sigmoid_neg_r = sigmoid_from(-r, exp_neg_abs_r);
  // dL/dr: d softplus(-r)/dr = -sigmoid(-r) (real rows, and k-plus-one's CE), d softplus(r)/dr = sigmoid(r)
  const A g_neg = (t >= kUnlabeled ? g_real : A(0)) + (F == Formulation::KPlusOne ? g_labeled : A(0));
  const A d_r = t == kGenerated ? g_gen * sigmoid_from(r, exp_neg_abs_r) : -g_neg * sigmoid_neg_r;

  RowGrad<A> out{g_labeled, g_labeled, A(0)};
  if (F == Formulation::TwoHead) {
    out.on_last = d_r;  // r = x[K]
  } else if (F == Formulation::KPlusOne) {
    out.on_p += d_r;  // r = m - x[K]
    out.on_last = -d_r;
  } else {
    out.on_p += d_r;  // r = m
  }
  return out;
}

}  // namespace sgan
