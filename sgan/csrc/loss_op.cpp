// The fused discriminator loss: op schemas, autograd and the module init. The kernels are in cpu/ and
// cuda/; the per-row math they share is in loss_math.h, their input checks and dispatch in loss_checks.h.
//
//   sgan::loss_sums(logits[B, C], target[B], formulation, check_targets=True) -> (sums[3], row_lse[B])
//   sgan::loss_sums_backward(grad_sums[3], logits, target, row_lse, formulation) -> grad_logits[B, C]
//
// row_lse (m of every row, float32 or float64) is saved by the forward so the backward recomputes each
// gradient row from it in one pass. check_targets=False skips the forward's check of the target values
// (on CUDA a copy to the host, which waits for the GPU): an out-of-range target then makes the sums NaN, and
// its gradient row. The Python wrapper and the fake (meta) kernels are in sgan/ops.py.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace sgan {
namespace {

// --- autograd, for every device ------------------------------------------------------------------------
// In C++: torch.library.register_autograd's Python path cost ~0.07 ms more per forward + backward (0.33 ->
// 0.26 ms at B = 4096, K = 10, one thread), half the time of both CPU kernels there. The forward and backward
// call the ops below autograd, through the dispatcher, so the CPU or CUDA kernel (or the fake kernel, under
// torch.compile) runs. (torch.func transforms do not support C++ autograd functions: use backend="torch".)
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_loss_sums(const at::Tensor& logits, const at::Tensor& target,
                                                  c10::string_view formulation, bool check_targets) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sgan::loss_sums", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       c10::string_view, bool)>();
  return op.call(logits, target, formulation, check_targets);
}

at::Tensor call_loss_sums_backward(const at::Tensor& grad_sums, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& row_lse, c10::string_view formulation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sgan::loss_sums_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, c10::string_view)>();
  return op.call(grad_sums, logits, target, row_lse, formulation);
}

struct LossSumsBackwardFunction : torch::autograd::Function<LossSumsBackwardFunction> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad_sums, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& row_lse, c10::string_view formulation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_loss_sums_backward(grad_sums, logits, target, row_lse, formulation);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "sgan: the fused loss op has no double backward (e.g. for a gradient "
                                       "penalty): use backend='torch'");
  }
};

struct LossSumsFunction : torch::autograd::Function<LossSumsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               c10::string_view formulation, bool check_targets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [sums, row_lse] = call_loss_sums(logits, target, formulation, check_targets);
    ctx->save_for_backward({logits, target, row_lse});
    ctx->saved_data["formulation"] = std::string(formulation);
    ctx->mark_non_differentiable({row_lse});  // an internal statistic the wrappers never return
    return {sums, row_lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (ctx->needs_input_grad(0)) {
      grad = LossSumsBackwardFunction::apply(grad_outputs[0], saved[0], saved[1], saved[2],
                                             ctx->saved_data["formulation"].toStringRef());
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> loss_sums_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                      c10::string_view formulation, bool check_targets) {
  const variable_list out = LossSumsFunction::apply(logits, target, formulation, check_targets);
  return {out[0], out[1]};
}

at::Tensor loss_sums_backward_autograd(const at::Tensor& grad_sums, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& row_lse,
                                       c10::string_view formulation) {
  return LossSumsBackwardFunction::apply(grad_sums, logits, target, row_lse, formulation);
}

}  // namespace

TORCH_LIBRARY(sgan, m) {
  m.def("loss_sums(Tensor logits, Tensor target, str formulation, bool check_targets=True) -> (Tensor, Tensor)");
  m.def("loss_sums_backward(Tensor grad_sums, Tensor logits, Tensor target, Tensor row_lse, str formulation) -> Tensor");
  m.def("_vector_math(Tensor x, str fn) -> Tensor");  // tests only: the CPU kernels' exp and log
}

TORCH_LIBRARY_IMPL(sgan, Autograd, m) {
  m.impl("loss_sums", &loss_sums_autograd);
  m.impl("loss_sums_backward", &loss_sums_backward_autograd);
}

}  // namespace sgan

// `import sgan._C` loads this library, which registers the ops above and the kernels of cpu/ and cuda/ with
// torch.ops.sgan. The module itself is empty (no pybind11: the ops are called through the dispatcher).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
