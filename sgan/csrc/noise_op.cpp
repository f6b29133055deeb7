// Gaussian noise for D's layers: the op schema and its autograd. The kernel is in cpu/noise_cpu.cpp.
//
//   sgan::add_gaussian_noise(x, sigma, key) -> x + sigma * n,  n ~ N(0, 1) elementwise, a function of
//                                              (key, element index) only; key: an int64 CPU scalar tensor
//
// The key is a tensor, not an int, so that the Python wrapper draws it from torch's generator without a read
// back to Python (the training loop reads nothing from its tensors between --log-every steps).
//
// CPU only: torch's CUDA normal_ already runs in parallel, so on a GPU the Python wrapper (sgan/ops.py) uses
// it. The gradient with respect to x is the incoming gradient (the noise does not depend on x).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace sgan {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_add_gaussian_noise(const at::Tensor& x, double sigma, const at::Tensor& key) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sgan::add_gaussian_noise", "")
                             .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
  return op.call(x, sigma, key);
}

struct AddGaussianNoiseFunction : torch::autograd::Function<AddGaussianNoiseFunction> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, double sigma, const at::Tensor& key) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_add_gaussian_noise(x, sigma, key);
  }
  static variable_list backward(AutogradContext*, variable_list grad_outputs) {
    return {grad_outputs[0], at::Tensor(), at::Tensor()};
  }
};

at::Tensor add_gaussian_noise_autograd(const at::Tensor& x, double sigma, const at::Tensor& key) {
  return AddGaussianNoiseFunction::apply(x, sigma, key);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgan, m) {
  m.def("add_gaussian_noise(Tensor x, float sigma, Tensor key) -> Tensor");
  m.def("_philox(Tensor counters, int k0, int k1) -> Tensor");  // tests only: the kernel's Philox4x32-10
}

TORCH_LIBRARY_IMPL(sgan, Autograd, m) { m.impl("add_gaussian_noise", &add_gaussian_noise_autograd); }

}  // namespace sgan
