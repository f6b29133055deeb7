// CUDA implementation of sgan::loss_sums and sgan::loss_sums_backward (schemas and the CPU implementation
// are in loss_cpu.cpp; the per-row math is in loss_math.h). Only the ATen/c10 headers this file uses are
// included: torch/extension.h would add minutes of host compilation.
#include <ATen/Dispatch.h>
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
  constexpr int kWarpsPerBlock = kForwardThreads / kWarp;
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
      if (t < kGenerated || t >= k) {  // never read x[t] out of bounds; the host reports it
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

// One warp adds the per-block partials.
template <class A>
__global__ void finalize_kernel(const double* __restrict__ partial, int blocks, A* __restrict__ sums) {
  for (int i = 0; i < 3; ++i) {
    double s = 0;
    for (int b = threadIdx.x; b < blocks; b += kWarp) s += partial[3 * b + i];
    s = warp_sum(s);
    if (threadIdx.x == 0) sums[i] = A(s);
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
    grad[i] = j < k ? T(d.on_p * exp_(A(x[i]) - m) - (j == t ? d.on_target : A(0))) : T(d.on_last);
  }
}

std::tuple<at::Tensor, at::Tensor> loss_sums_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  c10::string_view formulation_name) {
  const std::string name(formulation_name);
  const Formulation f = parse_formulation(name);
  const int64_t k = check_loss_inputs(logits_in, target_in, f, name);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "sgan::loss_sums CUDA kernel got a tensor on ", logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t rows = logits.size(0);
  const auto acc = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor sums = at::empty({3}, acc);
  at::Tensor row_lse = at::empty({rows}, acc);
  const int64_t warps_per_block = kForwardThreads / kWarp;
  const int blocks = int(std::clamp<int64_t>((rows + warps_per_block - 1) / warps_per_block, 1, kMaxForwardBlocks));
  at::Tensor partial = at::empty({3 * blocks}, logits.options().dtype(at::kDouble));
  at::Tensor bad = at::zeros({2}, logits.options().dtype(at::kLong));  // [found, value]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sgan_loss_sums_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_formulation(f, [&](auto form) {
      loss_sums_kernel<decltype(form)::value, scalar_t, A><<<blocks, kForwardThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), rows, logits.size(1), k,
          row_lse.mutable_data_ptr<A>(), partial.mutable_data_ptr<double>(), bad.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finalize_kernel<A><<<1, kWarp, 0, stream>>>(partial.const_data_ptr<double>(), blocks, sums.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Like the reference, check target values (one 16-byte copy, which waits for the kernels).
  const at::Tensor bad_host = bad.cpu();
  const int64_t* found = bad_host.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(found[0] == 0, bad_target_message(k, found[1]));
  return {sums, row_lse};
}

at::Tensor loss_sums_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& logits_in,
                                   const at::Tensor& target_in, const at::Tensor& row_lse_in,
                                   c10::string_view formulation_name) {
  const std::string name(formulation_name);
  const Formulation f = parse_formulation(name);
  const int64_t k = check_loss_inputs(logits_in, target_in, f, name);
  check_backward_inputs(grad_sums, logits_in, row_lse_in);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "sgan::loss_sums_backward CUDA kernel got a tensor on ", logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc = accumulate_type(logits_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  const at::Tensor g = grad_sums.to(acc).contiguous();  // autograd may pass an expanded (stride 0) tensor
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const int64_t n = logits.numel();
  if (n == 0) return grad;
  const int blocks = int(std::min<int64_t>((n + kBackwardThreads - 1) / kBackwardThreads, kMaxBackwardBlocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sgan_loss_sums_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    dispatch_formulation(f, [&](auto form) {
      loss_sums_backward_kernel<decltype(form)::value, scalar_t, A><<<blocks, kBackwardThreads, 0, stream>>>(
          g.const_data_ptr<A>(), logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
          row_lse.const_data_ptr<A>(), logits.size(0), logits.size(1), k, grad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgan, CUDA, m) {
  m.impl("loss_sums", &loss_sums_cuda);
  m.impl("loss_sums_backward", &loss_sums_backward_cuda);
}

}  // namespace sgan
