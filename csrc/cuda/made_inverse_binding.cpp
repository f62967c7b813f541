// Torch glue of the made_inverse CUDA kernel: the degree-sorted plan, device guard, current
// stream, dtype. Built only in CUDA builds. Where the persistent kernel does not apply (more
// than kMadeMaxLayers layers, or a tile that does not fit in shared memory) the ATen-composed
// implementation runs instead.
#include <ATen/ATen.h>
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

std::tuple<at::Tensor, at::Tensor> made_inverse_cuda(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative) {
  const c10::cuda::CUDAGuard guard(y.device());
  const bool supported = (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble) &&
                         static_cast<int64_t>(weights.size()) <= cuda::kMadeMaxLayers;
  auto composite = [&] {
    return made_inverse_composite(y, weights, biases, degrees, context_terms, residual, activation,
                                  transformer, tail_bound, min_bin_width, min_bin_height,
                                  min_derivative);
  };
  if (!supported) return composite();
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const int64_t D = plan.features, n = static_cast<int64_t>(plan.weights.size()), hidden = n - 1;
  std::vector<int> count_le, in_perm(plan.sorts_in.perm.begin(), plan.sorts_in.perm.end());
  for (int64_t l = 0; l < hidden; ++l)
    count_le.insert(count_le.end(), plan.sorts[l].count_le.begin(), plan.sorts[l].count_le.end());
  const at::Tensor count_le_d = int32_on(count_le, y.device());
  const at::Tensor in_perm_d = int32_on(in_perm, y.device());
  const at::Tensor yc = y.contiguous();
  at::Tensor x = at::empty_like(yc);
  at::Tensor logabsdet = at::empty({plan.batch}, y.options());

  cuda::MadeInverseArgs args;
  args.dtype = y.scalar_type() == at::kDouble ? cuda::DType::f64 : cuda::DType::f32;
  args.layers = static_cast<int>(n);
  for (int64_t l = 0; l < n; ++l) {
    args.weights[l] = plan.weights[l].data_ptr();
    args.biases[l] = plan.biases[l].data_ptr();
    args.context[l] = l < hidden && plan.context[l].defined() ? plan.context[l].data_ptr() : nullptr;
    args.widths[l] = static_cast<int>(plan.widths[l]);
  }
  args.count_le = count_le_d.data_ptr<int>();
  args.in_perm = in_perm_d.data_ptr<int>();
  args.y = yc.data_ptr();
  args.x = x.data_ptr();
  args.logabsdet = logabsdet.data_ptr();
  args.batch = plan.batch;
  args.features = static_cast<int>(D);
  args.params = static_cast<int>(plan.params);
  args.bins = static_cast<int>(plan.bins);
  args.residual = plan.residual;
  args.affine = plan.affine;
  args.activation = plan.activation_kind;
  args.tail_bound = plan.tail_bound;
  args.min_bin_width = plan.min_bin_width;
  args.min_bin_height = plan.min_bin_height;
  args.min_derivative = plan.min_derivative;
  const cudaError_t err = cuda::made_inverse_forward(args, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorInvalidConfiguration) {  // a one-row tile exceeds shared memory
    (void)cudaGetLastError();
    return composite();
  }
  TORCH_CHECK(err == cudaSuccess, "nflux: made_inverse kernel launch failed: ", cudaGetErrorString(err));
  return {x, logabsdet};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CUDA, m) { m.impl("made_inverse", &made_inverse_cuda); }

}  // namespace nflux
