// made_inverse: the argument checks and the degree-sorted copy of the network, shared by the
// CPU kernel and the ATen-composed implementation (CUDA).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace nflux {

// One layer's units sorted by degree: perm[i] is the original index of sorted unit i, and
// the units of degree <= k are the first upto(k) sorted units.
struct Sorted {
  std::vector<int64_t> perm;
  std::vector<int64_t> count_le;  // count_le[k] = #units of degree <= k, k in [0, D]
  std::vector<int64_t> degree;    // degree[i] of sorted unit i
  int64_t upto(int64_t k) const {
    return k < 0 ? 0 : count_le[std::min<int64_t>(k, static_cast<int64_t>(count_le.size()) - 1)];
  }
};

struct MadePlan {
  int64_t batch = 0, features = 0, params = 0, bins = 0;
  bool residual = false, affine = true;
  int activation_kind = 0;            // nflux::activation::Kind
  double tail_bound = 3, min_bin_width = 1e-3, min_bin_height = 1e-3, min_derivative = 1e-3;
  std::vector<int64_t> widths;        // out features per layer, the output layer last
  Sorted sorts_in;                    // the inputs by degree (perm = generation order)
  std::vector<Sorted> sorts;          // per hidden layer
  at::Tensor in_perm;                 // sorts_in.perm on the device
  // Rows (units) and columns (the previous layer's units) in degree order; the output layer's
  // rows are grouped per generation step. [out, in] contiguous, or [in, out] if transposed.
  std::vector<at::Tensor> weights, biases;
  std::vector<at::Tensor> row_perm;   // per layer, sorted row i = original row row_perm[l][i]
  std::vector<at::Tensor> context;    // per hidden layer [B, out] with columns sorted, or undefined
};

MadePlan made_plan(const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                   at::IntArrayRef degrees, at::TensorList context_terms, bool residual,
                   c10::string_view activation, c10::string_view transformer, double tail_bound,
                   double min_bin_width, double min_bin_height, double min_derivative,
                   bool transpose);

// The implementation composed of ATen ops (one small GEMM per layer and step): any device.
// The shapes of made_inverse_backward's incoming gradients: grad_x like y, grad_logabsdet [B].
void check_made_inverse_grads(const at::Tensor& grad_x, const at::Tensor& grad_logabsdet,
                              const at::Tensor& y);

std::tuple<at::Tensor, at::Tensor> made_inverse_composite(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative);

// The backward's parameter gradients from each layer's output cotangent grad_pre [B, out] and
// the input its linear read, layer_input [B, in] (both in the plan's sorted order): one GEMM per
// layer, the entries the degrees do not admit zeroed, then everything in the original order.
// context_terms' gradients are the hidden layers' grad_pre (returned only if has_context).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
made_parameter_grads(const MadePlan& plan, const std::vector<at::Tensor>& grad_pre,
                     const std::vector<at::Tensor>& layer_input, bool has_context);

}  // namespace nflux
