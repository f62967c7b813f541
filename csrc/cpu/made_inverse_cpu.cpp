// CPU kernels of made_inverse and its backward (see csrc/made_inverse.cpp for the algorithm and
// csrc/cpu/made_inverse_tile.cpp for the sweeps). The batch is cut into tiles of kTile rows
// that run independently (at::parallel_for), each with its hidden units resident in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../made_inverse.h"
#include "made_inverse_tile.h"

namespace nflux {
namespace {

int64_t tile_count(int64_t batch) { return (batch + kTile - 1) / kTile; }

std::tuple<at::Tensor, at::Tensor> made_inverse_cpu(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative) {
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const at::Tensor yc = y.contiguous();
  at::Tensor x = at::empty_like(yc);
  at::Tensor logabsdet = at::empty({plan.batch}, y.options());
  if (plan.batch == 0) return {x, logabsdet};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "made_inverse_cpu", [&] {
    const scalar_t* py = yc.data_ptr<scalar_t>();
    scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* plad = logabsdet.data_ptr<scalar_t>();
    at::parallel_for(0, tile_count(plan.batch), 1, [&](int64_t begin, int64_t end) {
      MadeTile<scalar_t> tile(plan, /*keep_for_backward=*/false);
      for (int64_t t = begin; t < end; ++t)
        tile.forward(py, t * kTile, std::min(kTile, plan.batch - t * kTile), px, plad);
    });
  });
  return {x, logabsdet};
}

// Recomputes the forward sweep per tile (only the inputs are saved), runs the reverse sweep,
// then forms the parameter gradients with one GEMM per layer.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
made_inverse_backward_cpu(const at::Tensor& grad_x, const at::Tensor& grad_logabsdet,
                          const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                          at::IntArrayRef degrees, at::TensorList context_terms, bool residual,
                          c10::string_view activation, c10::string_view transformer,
                          double tail_bound, double min_bin_width, double min_bin_height,
                          double min_derivative) {
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const int64_t B = plan.batch, n = static_cast<int64_t>(plan.weights.size());
  check_made_inverse_grads(grad_x, grad_logabsdet, y);
  const at::Tensor yc = y.contiguous();
  const at::Tensor gx = grad_x.to(y.scalar_type()).contiguous();
  const at::Tensor glad = grad_logabsdet.to(y.scalar_type()).contiguous();
  at::Tensor grad_y = at::empty_like(yc);
  // Unit-major [units, B], as the tiles hold them; passed on as [B, units] views.
  std::vector<at::Tensor> grad_pre(n), layer_input(n);
  for (int64_t l = 0; l < n; ++l) {
    grad_pre[l] = at::empty({plan.weights[l].size(0), B}, y.options());
    layer_input[l] = at::empty({plan.weights[l].size(1), B}, y.options());
  }
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "made_inverse_backward_cpu", [&] {
      TileGradOutputs<scalar_t> out;
      out.grad_y = grad_y.data_ptr<scalar_t>();
      for (int64_t l = 0; l < n; ++l) {
        out.grad_pre.push_back(grad_pre[l].data_ptr<scalar_t>());
        out.layer_input.push_back(layer_input[l].data_ptr<scalar_t>());
      }
      const scalar_t* py = yc.data_ptr<scalar_t>();
      at::parallel_for(0, tile_count(B), 1, [&](int64_t begin, int64_t end) {
        MadeTile<scalar_t> tile(plan, /*keep_for_backward=*/true);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t rows = std::min(kTile, B - t * kTile);
          tile.forward(py, t * kTile, rows, nullptr, nullptr);
          tile.backward(py, gx.data_ptr<scalar_t>(), glad.data_ptr<scalar_t>(), t * kTile, rows, out);
        }
      });
    });
  }
  for (int64_t l = 0; l < n; ++l) {
    grad_pre[l] = grad_pre[l].t();
    layer_input[l] = layer_input[l].t();
  }
  auto [grad_w, grad_b, grad_c] = made_parameter_grads(plan, grad_pre, layer_input, !context_terms.empty());
  return {grad_y, grad_w, grad_b, grad_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("made_inverse", &made_inverse_cpu);
  m.impl("made_inverse_backward", &made_inverse_backward_cpu);
}

}  // namespace nflux
