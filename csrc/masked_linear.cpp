// masked_linear: y = x (W * M)^T + b, with dL/dW masked. Composed of ATen ops, so one
// implementation serves CPU and CUDA (cuBLAS through ATen). W * M is formed once per call:
// O(out*in), negligible next to the O(batch*out*in) product, and it keeps the stored weights
// free to be anything (the mask, not the storage, defines the network).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace nflux {
namespace {

at::Tensor masked_linear(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& mask) {
  check_masked_linear_args(input, weight, bias, mask);
  return at::linear(input, weight * mask, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mask) {
  check_masked_linear_args(input, weight, c10::nullopt, mask);
  check_same_dtype_device(grad_output, input, "grad_output", "input");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.size(-1) == out,
              "nflux: grad_output must have shape [..., ", out, "] matching input, got ",
              grad_output.sizes());
  const at::Tensor g2 = grad_output.reshape({-1, out});
  const at::Tensor x2 = input.reshape({-1, in});
  at::Tensor grad_input = at::matmul(grad_output, weight * mask);
  at::Tensor grad_weight = at::mm(g2.t(), x2).mul_(mask);
  at::Tensor grad_bias = g2.sum(0);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

#ifdef NFLUX_WITH_CUDA
TORCH_LIBRARY_IMPL(nflux, CUDA, m) {
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_backward", &masked_linear_backward);
}
#endif

}  // namespace nflux
