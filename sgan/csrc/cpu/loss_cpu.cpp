// CPU kernels of sgan::loss_sums and sgan::loss_sums_backward (schemas and autograd: ../loss_op.cpp), and the
// test hook sgan::_vector_math. Rows are split into fixed blocks; each block's exps and logs are evaluated in
// the vectorised loops of vector_math.h, and its per-row terms by ../loss_math.h, which the CUDA kernels use too.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <vector>

#include "../loss_checks.h"
#include "../loss_math.h"
#include "vector_math.h"

namespace sgan {
namespace {

// Work unit of the parallel loops, in logits: large enough to amortise scheduling and fill the vector
// loop of exp_block, small enough to stay in L1 and to split a 4096 x 11 batch between threads.
constexpr int64_t kBlockElements = 2048;

int64_t rows_per_block(int64_t c) { return std::max<int64_t>(1, kBlockElements / c); }

// A large new tensor is fresh memory from mmap: the first write page-faults every 4 KiB page, which at
// B = 10^6 took as long as the kernel itself (25 ms for a 46 MB gradient, 4 ms to copy the same bytes).
// Transparent huge pages make that ~5x cheaper, but most kernels give them only to memory that asks
// ("madvise" mode), so ask for the 2 MiB-aligned part of the tensor before it is written. Advice only: the
// allocator still owns and frees the memory (PyTorch does the same for every tensor under
// THP_MEM_ALLOC_ENABLE=1).
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(kHuge - 1);
  if (end >= begin + 2 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// Per-thread buffers for a block of rows.
template <class A>
struct Scratch {
  std::vector<A> logits;  // per logit: exp(x - shift) or exp(x - m) of the class logits
  std::vector<A> shift, m, r, e, l;  // per row
  Scratch(int64_t rows, int64_t k) : logits(rows * k), shift(rows), m(rows), r(rows), e(rows), l(rows) {}
};

// Loss sums of the n rows of x (c logits each, k classes) into partial[3], their logsumexps into lse; true
// if a target is out of range (the caller reports it, or gives NaN sums).
template <Formulation F, class T, class A>
SGAN_CPU_CLONES bool loss_sums_block(const T* x, const int64_t* tgt, int64_t n, int64_t c, int64_t k, Scratch<A>& s,
                                     A* lse, double* partial) {
  // m = shift + log sum exp(x - shift) over the class logits
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * c;
    const A shift = lse_shift(reduce_row(xr, k, -inf_<A>(), [](A a, A b) { return max_(a, b); }));
    s.shift[i] = shift;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) s.logits[i * k + j] = A(xr[j]) - shift;
  }
  exp_block(s.logits.data(), n * k);
  for (int64_t i = 0; i < n; ++i) {
    s.m[i] = reduce_row(s.logits.data() + i * k, k, A(0), [](A a, A b) { return a + b; });
  }
  log_block(s.m.data(), n);
  // r, and l = log1p(exp(-|r|)) for the softplus terms
  for (int64_t i = 0; i < n; ++i) {
    s.m[i] += s.shift[i];
    lse[i] = s.m[i];
    s.r[i] = real_logit<F>(s.m[i], F == Formulation::KLogit ? A(0) : A(x[i * c + k]));
    s.l[i] = -abs_(s.r[i]);
  }
  exp_block(s.l.data(), n);
  log1p_block(s.l.data(), s.e.data(), n);

  double ce = 0, real = 0, gen = 0;
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tgt[i];
    if (!valid_target(t, k)) {  // never read x[t] out of bounds
      bad = true;
      continue;
    }
    const A x_target = A(x[i * c + target_column(t)]);
    const RowLoss<A> l = row_loss<F>(s.m[i], s.r[i], x_target, t, s.l[i]);
    ce += l.ce;
    real += l.real;
    gen += l.gen;
  }
  partial[0] = ce;
  partial[1] = real;
  partial[2] = gen;
  return bad;
}

// Gradient of the n rows of x into out, from their logsumexps lse and the sums' gradient (g_ce, g_real, g_gen).
template <Formulation F, class T, class A>
SGAN_CPU_CLONES void loss_sums_backward_block(const T* x, const int64_t* tgt, const A* lse, A g_ce, A g_real, A g_gen,
                                              int64_t n, int64_t c, int64_t k, Scratch<A>& s, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * c;
    const A m = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) s.logits[i * k + j] = A(xr[j]) - m;
    s.r[i] = real_logit<F>(m, F == Formulation::KLogit ? A(0) : A(xr[k]));
    s.e[i] = -abs_(s.r[i]);
  }
  exp_block(s.logits.data(), n * k);  // softmax of the class logits
  exp_block(s.e.data(), n);           // exp(-|r|) for the sigmoids
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tgt[i];
    T* gr = out + i * c;
    if (!valid_target(t, k)) {  // only after a forward with check_targets=False, whose sums are NaN too
      std::fill(gr, gr + c, T(NAN));
      continue;
    }
    const RowGrad<A> d = row_grad<F>(s.r[i], t, g_ce, g_real, g_gen, s.e[i]);
    const A* p = s.logits.data() + i * k;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) gr[j] = T(d.on_p * p[j]);
    const int64_t column = target_column(t);
    gr[column] = T(d.on_p * p[column] - d.on_target);
    if (F != Formulation::KLogit) gr[k] = T(d.on_last);
  }
}

template <Formulation F, class T>
void loss_sums_kernel(FormulationTag<F>, const LossView<T>& in, bool check_targets, at::Tensor& sums,
                      at::Tensor& row_lse) {
  using A = at::opmath_type<T>;
  A* lse = row_lse.mutable_data_ptr<A>();
  // Fixed blocks of rows whose partial sums are added in block order: the result does not depend on the
  // number of threads. Partials are float64 so 10^6 rows sum as accurately as torch.sum does.
  const int64_t block_rows = rows_per_block(in.c);
  const int64_t blocks = (in.rows + block_rows - 1) / block_rows;
  std::vector<double> partial(3 * blocks, 0.0);
  std::vector<char> block_bad(blocks, 0);

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    Scratch<A> s(block_rows, in.k);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first = block * block_rows;
      const int64_t n = std::min(in.rows, first + block_rows) - first;
      block_bad[block] = loss_sums_block<F>(in.x + first * in.c, in.target + first, n, in.c, in.k, s, lse + first,
                                            &partial[3 * block]);
    }
  });

  // A bad target: report the first one, or, with check_targets off, give NaN sums.
  const auto first_bad = std::find(block_bad.begin(), block_bad.end(), 1);
  const bool any_bad = first_bad != block_bad.end();
  if (any_bad && check_targets) {
    for (int64_t row = (first_bad - block_bad.begin()) * block_rows;; ++row) {  // the block holds one: find it
      TORCH_CHECK_VALUE(valid_target(in.target[row], in.k), bad_target_message(in.k, in.target[row]));
    }
  }
  double total[3] = {0, 0, 0};
  for (int64_t block = 0; block < blocks; ++block) {
    for (int i = 0; i < 3; ++i) total[i] += partial[3 * block + i];
  }
  A* out = sums.mutable_data_ptr<A>();
  for (int i = 0; i < 3; ++i) out[i] = any_bad ? A(NAN) : A(total[i]);
}

template <Formulation F, class T>
void loss_sums_backward_kernel(FormulationTag<F>, const LossView<T>& in, const at::Tensor& grad_sums,
                               const at::Tensor& row_lse, at::Tensor& grad) {
  using A = at::opmath_type<T>;
  const A* g = grad_sums.const_data_ptr<A>();
  const A* lse = row_lse.const_data_ptr<A>();
  T* out = grad.mutable_data_ptr<T>();
  const int64_t block_rows = rows_per_block(in.c);

  at::parallel_for(0, in.rows, block_rows, [&](int64_t begin, int64_t end) {
    Scratch<A> s(block_rows, in.k);
    for (int64_t first = begin; first < end; first += block_rows) {
      const int64_t n = std::min(end, first + block_rows) - first;
      loss_sums_backward_block<F>(in.x + first * in.c, in.target + first, lse + first, g[0], g[1], g[2], n, in.c,
                                  in.k, s, out + first * in.c);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> loss_sums_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                 c10::string_view formulation, bool check_targets) {
  const LossInputs in = prepare_loss_inputs(logits, target, formulation, at::kCPU);
  at::Tensor sums = at::empty({3}, in.acc_options());
  at::Tensor row_lse = empty_huge({in.logits.size(0)}, in.acc_options());
  dispatch_loss(in, [&](auto form, const auto& view) {
    loss_sums_kernel(form, view, check_targets, sums, row_lse);
  });
  return {sums, row_lse};
}

at::Tensor loss_sums_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& row_lse, c10::string_view formulation) {
  const LossBackwardInputs in = prepare_loss_backward_inputs(grad_sums, logits, target, row_lse, formulation, at::kCPU);
  at::Tensor grad = empty_huge(in.logits.sizes(), in.logits.options());
  dispatch_loss(in, [&](auto form, const auto& view) {
    loss_sums_backward_kernel(form, view, in.grad_sums, in.row_lse, grad);
  });
  return grad;
}

// For tests: the kernels' vectorised exp or log (fn "exp" or "log") of a float32 CPU tensor.
at::Tensor vector_math_cpu(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "sgan::_vector_math takes float32, got ", x.scalar_type());
  at::Tensor y = x.clone(at::MemoryFormat::Contiguous);
  if (fn == "exp") {
    exp_block(y.mutable_data_ptr<float>(), y.numel());
  } else {
    TORCH_CHECK_VALUE(fn == "log", "sgan::_vector_math: fn must be 'exp' or 'log', got '", std::string(fn), "'");
    log_block(y.mutable_data_ptr<float>(), y.numel());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgan, CPU, m) {
  m.impl("loss_sums", &loss_sums_cpu);
  m.impl("loss_sums_backward", &loss_sums_backward_cpu);
  m.impl("_vector_math", &vector_math_cpu);
}

}  // namespace sgan
