// Host side of every kernel entry point, CPU and CUDA: the argument checks, and the one preparation
// (prepare_loss_inputs) and dispatch (dispatch_loss) that each entry point calls.
// The messages match the reference checks in sgan/losses.py, and so do the exception types:
// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

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

// A formulation as a type, so kernels are specialised per formulation (and can deduce it).
template <Formulation F>
using FormulationTag = std::integral_constant<Formulation, F>;

// Calls fn(FormulationTag<f>{}).
template <class Fn>
void dispatch_formulation(Formulation f, Fn&& fn) {
  switch (f) {
    case Formulation::TwoHead:
      return fn(FormulationTag<Formulation::TwoHead>{});
    case Formulation::KPlusOne:
      return fn(FormulationTag<Formulation::KPlusOne>{});
    case Formulation::KLogit:
      return fn(FormulationTag<Formulation::KLogit>{});
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

// --- the preparation and dispatch of every entry point -------------------------------------------------

// The inputs of either op, checked and laid out as the kernels read them.
struct LossInputs {
  Formulation formulation;
  int64_t k;            // classes
  at::Tensor logits;    // [B, C], contiguous
  at::Tensor target;    // [B], int64, contiguous
  at::ScalarType acc;   // what the kernels accumulate and return sums in (accumulate_type)

  at::TensorOptions acc_options() const { return logits.options().dtype(acc); }
};

// The backward's inputs: the forward's, and grad_sums and row_lse contiguous in the accumulate type.
struct LossBackwardInputs : LossInputs {
  at::Tensor grad_sums;  // [3]
  at::Tensor row_lse;    // [B]
};

// What a kernel reads of LossInputs: raw pointers and sizes, for logits of type T.
template <class T>
struct LossView {
  const T* x;              // logits, rows x c, row-major
  const int64_t* target;   // rows
  int64_t rows, c, k;
};

// Checks the forward's inputs for the kernels of `device` and lays them out for them.
inline LossInputs prepare_loss_inputs(const at::Tensor& logits, const at::Tensor& target,
                                      c10::string_view formulation, c10::DeviceType device) {
  const std::string name(formulation);
  const Formulation f = parse_formulation(name);
  const int64_t k = check_loss_inputs(logits, target, f, name);
  TORCH_CHECK_VALUE(logits.device().type() == device, "sgan's ", device, " kernel got tensors on ", logits.device());
  return {f, k, logits.contiguous(), target.to(at::kLong).contiguous(), accumulate_type(logits.scalar_type())};
}

inline LossBackwardInputs prepare_loss_backward_inputs(const at::Tensor& grad_sums, const at::Tensor& logits,
                                                       const at::Tensor& target, const at::Tensor& row_lse,
                                                       c10::string_view formulation, c10::DeviceType device) {
  const LossInputs in = prepare_loss_inputs(logits, target, formulation, device);
  check_backward_inputs(grad_sums, logits, row_lse);
  // .contiguous(): autograd may pass grad_sums expanded (stride 0)
  return {in, grad_sums.to(in.acc).contiguous(), row_lse.to(in.acc).contiguous()};
}

// Calls fn(FormulationTag<F>{}, LossView<T>) for the inputs' formulation F and logits type T: the one place
// where the kernels are instantiated for every (formulation, dtype) pair. (check_loss_inputs has rejected
// other dtypes already, so the dispatch's own error never shows.)
template <class Fn>
void dispatch_loss(const LossInputs& in, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "sgan::loss_sums", [&] {
    const LossView<scalar_t> view{in.logits.const_data_ptr<scalar_t>(), in.target.const_data_ptr<int64_t>(),
                                  in.logits.size(0), in.logits.size(1), in.k};
    dispatch_formulation(in.formulation, [&](auto form) { fn(form, view); });
  });
}

}  // namespace sgan
