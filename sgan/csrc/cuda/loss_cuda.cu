// CUDA kernels of sgan::loss_sums and sgan::loss_sums_backward (schemas and autograd: ../loss_op.cpp; the
// per-row math, shared with the CPU kernels: ../loss_math.h). Only the ATen/c10 headers this file uses are
// included: torch/extension.h would add minutes of host compilation.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../loss_checks.h"
#include "../loss_math.h"

namespace sgan {
namespace {

constexpr int kWarp = 32;
constexpr int kForwardThreads = 256;     // 8 warps; each warp reduces one row at a time
constexpr int kWarpsPerBlock = kForwardThreads / kWarp;
constexpr int kMaxForwardBlocks = 1024;  // bounds the per-block partial sums that finalize_kernel adds
constexpr int kBackwardThreads = 256;
constexpr int64_t kMaxBackwardBlocks = 65536;

// Butterfly reductions: every lane ends with the result, in a fixed order (deterministic sums).
template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max_(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per row (grid-stride): logsumexp of the class logits, then lane 0 adds the row's loss terms.
// Each block writes its float64 partial sums; finalize_kernel adds them in block order.
template <Formulation F, class T, class A>
__global__ void loss_sums_kernel(const T* __restrict__ x, const int64_t* __restrict__ target, int64_t rows,
                                 int64_t c, int64_t k, A* __restrict__ row_lse, double* __restrict__ partial,
                                 int64_t* __restrict__ bad) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  double ce = 0, real = 0, gen = 0;  // lane 0's running sums
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp; row < rows;
       row += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* xr = x + row * c;
    A row_max = -inf_<A>();
    for (int64_t j = lane; j < k; j += kWarp) row_max = max_(row_max, A(xr[j]));
    const A shift = lse_shift(warp_max(row_max));
    A sum_exp = 0;
    for (int64_t j = lane; j < k; j += kWarp) sum_exp += exp_(A(xr[j]) - shift);
    sum_exp = warp_sum(sum_exp);
    if (lane == 0) {
      const A m = lse_finish(sum_exp, shift);
      row_lse[row] = m;
      const int64_t t = target[row];
      if (!valid_target(t, k)) {  // never read x[t] out of bounds; the host reports it, or the sums are NaN
        bad[0] = 1;
        bad[1] = t;
      } else {
        const A r = real_logit<F>(m, F == Formulation::KLogit ? A(0) : A(xr[k]));
        const RowLoss<A> l = row_loss<F>(m, r, A(xr[target_column(t)]), t, log1p_(exp_(-abs_(r))));
        ce += l.ce;
        real += l.real;
        gen += l.gen;
      }
    }
  }
  __shared__ double block_sums[kWarpsPerBlock][3];
  if (lane == 0) {
    block_sums[warp][0] = ce;
    block_sums[warp][1] = real;
    block_sums[warp][2] = gen;
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    double s = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) s += block_sums[w][threadIdx.x];
    partial[3 * blockIdx.x + threadIdx.x] = s;
  }
}

// One warp adds the per-block partials; a bad target makes the sums NaN (when the host does not check).
template <class A>
__global__ void finalize_kernel(const double* __restrict__ partial, int blocks, const int64_t* __restrict__ bad,
                                A* __restrict__ sums) {
  for (int i = 0; i < 3; ++i) {
    double s = 0;
    for (int b = threadIdx.x; b < blocks; b += kWarp) s += partial[3 * b + i];
    s = warp_sum(s);
    if (threadIdx.x == 0) sums[i] = bad[0] ? A(NAN) : A(s);
  }
}

// One thread per gradient element: coalesced reads of x and writes of the gradient.
template <Formulation F, class T, class A>
__global__ void loss_sums_backward_kernel(const A* __restrict__ grad_sums, const T* __restrict__ x,
                                          const int64_t* __restrict__ target, const A* __restrict__ row_lse,
                                          int64_t rows, int64_t c, int64_t k, T* __restrict__ grad) {
  const A g_ce = grad_sums[0], g_real = grad_sums[1], g_gen = grad_sums[2];
  const int64_t n = rows * c;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / c;
    const int64_t j = i - row * c;
    const int64_t t = target[row];
    const A m = row_lse[row];
    const A r = real_logit<F>(m, F == Formulation::KLogit ? A(0) : A(x[row * c + k]));
    const RowGrad<A> d = row_grad<F>(r, t, g_ce, g_real, g_gen, exp_(-abs_(r)));
    const A g = j < k ? d.on_p * exp_(A(x[i]) - m) - (j == t ? d.on_target : A(0)) : d.on_last;
    grad[i] = T(valid_target(t, k) ? g : A(NAN));  // NaN after a forward with check_targets=False, as its sums
  }
}

// Forward blocks for a batch: one warp per row, up to kMaxForwardBlocks (then grid-stride).
int forward_blocks(int64_t rows) {
  return int(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, kMaxForwardBlocks));
}

template <Formulation F, class T>
void launch_loss_sums(FormulationTag<F>, const LossView<T>& in, at::Tensor& sums, at::Tensor& row_lse,
                      at::Tensor& partial, at::Tensor& bad) {
  using A = at::opmath_type<T>;
  const int blocks = int(partial.numel() / 3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  loss_sums_kernel<F, T, A><<<blocks, kForwardThreads, 0, stream>>>(
      in.x, in.target, in.rows, in.c, in.k, row_lse.mutable_data_ptr<A>(), partial.mutable_data_ptr<double>(),
      bad.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<A><<<1, kWarp, 0, stream>>>(partial.const_data_ptr<double>(), blocks, bad.const_data_ptr<int64_t>(),
                                              sums.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Formulation F, class T>
void launch_loss_sums_backward(FormulationTag<F>, const LossView<T>& in, const at::Tensor& grad_sums,
                               const at::Tensor& row_lse, at::Tensor& grad) {
  using A = at::opmath_type<T>;
  const int64_t n = in.rows * in.c;
  if (n == 0) return;
  const int blocks = int(std::min<int64_t>((n + kBackwardThreads - 1) / kBackwardThreads, kMaxBackwardBlocks));
  loss_sums_backward_kernel<F, T, A><<<blocks, kBackwardThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_sums.const_data_ptr<A>(), in.x, in.target, row_lse.const_data_ptr<A>(), in.rows, in.c, in.k,
      grad.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> loss_sums_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                  c10::string_view formulation, bool check_targets) {
  const LossInputs in = prepare_loss_inputs(logits, target, formulation, at::kCUDA);
  const c10::cuda::CUDAGuard guard(in.logits.device());
  at::Tensor sums = at::empty({3}, in.acc_options());
  at::Tensor row_lse = at::empty({in.logits.size(0)}, in.acc_options());
  at::Tensor partial = at::empty({3 * forward_blocks(in.logits.size(0))}, in.logits.options().dtype(at::kDouble));
  at::Tensor bad = at::zeros({2}, in.target.options());  // [found, value]
  dispatch_loss(in, [&](auto form, const auto& view) {
    launch_loss_sums(form, view, sums, row_lse, partial, bad);
  });
  if (check_targets) {  // like the reference; one 16-byte copy, which waits for the kernels
    const at::Tensor bad_host = bad.cpu();
    const int64_t* found = bad_host.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(found[0] == 0, bad_target_message(in.k, found[1]));
  }
  return {sums, row_lse};
}

at::Tensor loss_sums_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& row_lse, c10::string_view formulation) {
  const LossBackwardInputs in = prepare_loss_backward_inputs(grad_sums, logits, target, row_lse, formulation, at::kCUDA);
  const c10::cuda::CUDAGuard guard(in.logits.device());
  at::Tensor grad = at::empty(in.logits.sizes(), in.logits.options());
  dispatch_loss(in, [&](auto form, const auto& view) {
    launch_loss_sums_backward(form, view, in.grad_sums, in.row_lse, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgan, CUDA, m) {
  m.impl("loss_sums", &loss_sums_cuda);
  m.impl("loss_sums_backward", &loss_sums_backward_cuda);
}

}  // namespace sgan
