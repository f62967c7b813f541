// Torch glue of the made_inverse CUDA kernels (forward and backward): the degree-sorted plan,
// device guard, current stream, dtype. Built only in CUDA builds. Where the persistent kernels
// do not apply (more than kMadeMaxLayers layers, or a one-row tile that does not fit in shared
// memory) the forward runs the ATen-composed implementation and the backward the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../made_inverse.h"
#include "made_inverse_cuda.h"

namespace nflux {
namespace {

at::Tensor int32_on(const std::vector<int>& values, const at::Device& device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kInt)).to(device);
}

// The kernel's view of a plan; count_le and in_perm are device copies the caller keeps alive.
cuda::MadeInverseArgs kernel_args(const MadePlan& plan, const at::Tensor& y, const at::Tensor& count_le,
                                  const at::Tensor& in_perm) {
  const int64_t n = static_cast<int64_t>(plan.weights.size()), hidden = n - 1;
  cuda::MadeInverseArgs args;
  args.dtype = y.scalar_type() == at::kDouble ? cuda::DType::f64 : cuda::DType::f32;
  args.layers = static_cast<int>(n);
  for (int64_t l = 0; l < n; ++l) {
    args.weights[l] = plan.weights[l].data_ptr();
    args.biases[l] = plan.biases[l].data_ptr();
    args.context[l] = l < hidden && plan.context[l].defined() ? plan.context[l].data_ptr() : nullptr;
    args.widths[l] = static_cast<int>(plan.widths[l]);
  }
  args.count_le = count_le.data_ptr<int>();
  args.in_perm = in_perm.data_ptr<int>();
  args.y = y.data_ptr();
  args.batch = plan.batch;
  args.features = static_cast<int>(plan.features);
  args.params = static_cast<int>(plan.params);
  args.bins = static_cast<int>(plan.bins);
  args.residual = plan.residual;
  args.affine = plan.affine;
  args.activation = plan.activation_kind;
  args.tail_bound = plan.tail_bound;
  args.min_bin_width = plan.min_bin_width;
  args.min_bin_height = plan.min_bin_height;
  args.min_derivative = plan.min_derivative;
  return args;
}

std::tuple<at::Tensor, at::Tensor> plan_indices(const MadePlan& plan, const at::Device& device) {
  std::vector<int> count_le, in_perm(plan.sorts_in.perm.begin(), plan.sorts_in.perm.end());
  for (const Sorted& s : plan.sorts) count_le.insert(count_le.end(), s.count_le.begin(), s.count_le.end());
  return {int32_on(count_le, device), int32_on(in_perm, device)};
}

bool kernel_supports(const at::Tensor& y, at::TensorList weights) {
  return (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble) &&
         static_cast<int64_t>(weights.size()) <= cuda::kMadeMaxLayers;
}

std::tuple<at::Tensor, at::Tensor> made_inverse_cuda(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto composite = [&] {
    return made_inverse_composite(y, weights, biases, degrees, context_terms, residual, activation,
                                  transformer, tail_bound, min_bin_width, min_bin_height,
                                  min_derivative);
  };
  if (!kernel_supports(y, weights)) return composite();
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const auto [count_le, in_perm] = plan_indices(plan, y.device());
  const at::Tensor yc = y.contiguous();
  at::Tensor x = at::empty_like(yc);
  at::Tensor logabsdet = at::empty({plan.batch}, y.options());
  cuda::MadeInverseArgs args = kernel_args(plan, yc, count_le, in_perm);
  args.x = x.data_ptr();
  args.logabsdet = logabsdet.data_ptr();
  const cudaError_t err = cuda::made_inverse_forward(args, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorInvalidConfiguration) {  // a one-row tile exceeds shared memory
    (void)cudaGetLastError();
    return composite();
  }
  TORCH_CHECK(err == cudaSuccess, "nflux: made_inverse kernel launch failed: ", cudaGetErrorString(err));
  return {x, logabsdet};
}

using BackwardResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Where the kernel does not apply, the CPU kernel computes the backward on copies (a rare shape:
// more than 16 layers, or a one-row tile beyond shared memory), with a warning.
BackwardResult backward_on_cpu(const at::Tensor& grad_x, const at::Tensor& grad_logabsdet, const at::Tensor& y,
                               at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
                               at::TensorList context_terms, bool residual, c10::string_view activation,
                               c10::string_view transformer, double tail_bound, double min_bin_width,
                               double min_bin_height, double min_derivative) {
  TORCH_WARN_ONCE("nflux: made_inverse_backward runs on the CPU for this network (its CUDA kernel "
                  "takes at most ", cuda::kMadeMaxLayers, " layers, float32/float64, and a row of "
                  "units that fits in shared memory)");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nflux::made_inverse_backward", "")
                       .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             at::TensorList, at::TensorList, at::IntArrayRef, at::TensorList,
                                             bool, c10::string_view, c10::string_view, double, double, double,
                                             double)>();
  auto cpu = [](at::TensorList list) {
    std::vector<at::Tensor> out;
    for (const at::Tensor& t : list) out.push_back(t.cpu());
    return out;
  };
  auto back = [&](std::vector<at::Tensor> list) {
    for (at::Tensor& t : list) t = t.to(y.device());
    return list;
  };
  auto [g_y, g_w, g_b, g_c] =
      op.call(grad_x.cpu(), grad_logabsdet.cpu(), y.cpu(), cpu(weights), cpu(biases), degrees, cpu(context_terms),
              residual, activation, transformer, tail_bound, min_bin_width, min_bin_height, min_derivative);
  return {g_y.to(y.device()), back(g_w), back(g_b), back(g_c)};
}

BackwardResult made_inverse_backward_cuda(const at::Tensor& grad_x, const at::Tensor& grad_logabsdet,
                                          const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                                          at::IntArrayRef degrees, at::TensorList context_terms, bool residual,
                                          c10::string_view activation, c10::string_view transformer,
                                          double tail_bound, double min_bin_width, double min_bin_height,
                                          double min_derivative) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto fallback = [&] {
    return backward_on_cpu(grad_x, grad_logabsdet, y, weights, biases, degrees, context_terms, residual,
                           activation, transformer, tail_bound, min_bin_width, min_bin_height, min_derivative);
  };
  if (!kernel_supports(y, weights)) return fallback();
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const int64_t B = plan.batch, n = static_cast<int64_t>(plan.weights.size());
  check_made_inverse_grads(grad_x, grad_logabsdet, y);
  const auto [count_le, in_perm] = plan_indices(plan, y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor gx = grad_x.to(y.scalar_type()).contiguous();
  const at::Tensor glad = grad_logabsdet.to(y.scalar_type()).contiguous();
  at::Tensor grad_y = at::empty_like(yc);
  std::vector<at::Tensor> grad_pre(n), layer_input(n);
  cuda::MadeInverseGrads grads;
  grads.grad_x = gx.data_ptr();
  grads.grad_logabsdet = glad.data_ptr();
  grads.grad_y = grad_y.data_ptr();
  for (int64_t l = 0; l < n; ++l) {
    grad_pre[l] = at::empty({B, plan.weights[l].size(0)}, y.options());
    layer_input[l] = at::empty({B, plan.weights[l].size(1)}, y.options());
    grads.grad_pre[l] = grad_pre[l].data_ptr();
    grads.layer_input[l] = layer_input[l].data_ptr();
  }
  const cudaError_t err =
      cuda::made_inverse_backward(kernel_args(plan, yc, count_le, in_perm), grads, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorInvalidConfiguration) {
    (void)cudaGetLastError();
    return fallback();
  }
  TORCH_CHECK(err == cudaSuccess, "nflux: made_inverse_backward kernel launch failed: ", cudaGetErrorString(err));
  auto [grad_w, grad_b, grad_c] = made_parameter_grads(plan, grad_pre, layer_input, !context_terms.empty());
  return {grad_y, grad_w, grad_b, grad_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CUDA, m) {
  m.impl("made_inverse", &made_inverse_cuda);
  m.impl("made_inverse_backward", &made_inverse_backward_cuda);
}

}  // namespace nflux
