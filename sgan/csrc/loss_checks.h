// Host-side argument checks and dispatch helpers shared by the CPU and CUDA implementations.
// The messages match the reference checks in sgan/losses.py, and so do the exception types:
// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

#include "loss_math.h"

namespace sgan {

inline Formulation parse_formulation(const std::string& name) {
  if (name == "two-head") return Formulation::TwoHead;
  if (name == "k-plus-one") return Formulation::KPlusOne;
  if (name == "k-logit") return Formulation::KLogit;
  TORCH_CHECK_VALUE(false, "unknown formulation '", name, "': choose one of two-head, k-plus-one, k-logit");
  return Formulation::TwoHead;  // unreachable
}

// Calls fn(std::integral_constant<Formulation, F>{}) so kernels are specialised per formulation.
template <class Fn>
void dispatch_formulation(Formulation f, Fn&& fn) {
  switch (f) {
    case Formulation::TwoHead:
      return fn(std::integral_constant<Formulation, Formulation::TwoHead>{});
    case Formulation::KPlusOne:
      return fn(std::integral_constant<Formulation, Formulation::KPlusOne>{});
    case Formulation::KLogit:
      return fn(std::integral_constant<Formulation, Formulation::KLogit>{});
  }
}

// Checks logits [B, C] and target [B]; returns K. Target values are checked by the kernels, which see them.
inline int64_t check_loss_inputs(const at::Tensor& logits, const at::Tensor& target, Formulation f,
                                 const std::string& name) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [batch, C], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "target must be 1-D with one entry per logits row (", logits.size(0), "), got shape ",
                    target.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "logits must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "target must be an int64 or int32 tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(logits.device() == target.device(), "logits are on ", logits.device(), " but target is on ",
                    target.device(), ": move both to one device");
  const int64_t c = logits.size(1);
  const int64_t k = f == Formulation::KLogit ? c : c - 1;
  TORCH_CHECK_VALUE(k >= 1, name, " needs ", f == Formulation::KLogit ? 1 : 2,
                    " or more logits per row (K classes", f == Formulation::KLogit ? "" : " + 1", "), got ", c);
  return k;
}

inline void check_backward_inputs(const at::Tensor& grad_sums, const at::Tensor& logits, const at::Tensor& row_lse) {
  TORCH_CHECK_VALUE(grad_sums.dim() == 1 && grad_sums.size(0) == 3, "grad_sums must have shape [3], got ",
                    grad_sums.sizes());
  TORCH_CHECK_VALUE(row_lse.dim() == 1 && row_lse.size(0) == logits.size(0), "row_lse must have shape [",
                    logits.size(0), "], got ", row_lse.sizes());
  TORCH_CHECK_VALUE(grad_sums.device() == logits.device() && row_lse.device() == logits.device(),
                    "grad_sums, logits and row_lse must be on one device");
}

// Float32 accumulation for float32/float16/bfloat16, float64 for float64 (so gradcheck can run on the op).
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::string bad_target_message(int64_t k, int64_t bad_value) {
  return "target values must lie in [-2, " + std::to_string(k - 1) +
         "] (class, -1 unlabeled, -2 generated), got " + std::to_string(bad_value);
}

}  // namespace sgan
