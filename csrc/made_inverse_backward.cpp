// made_inverse's parameter gradients, device-agnostic (ATen): given every layer's output
// cotangent from the reverse sweep (csrc/cpu/made_inverse_tile.cpp), dL/dW is one ordinary
// GEMM per layer. A full GEMM then a mask beats per-degree slices: it is one BLAS call.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "made_inverse.h"

namespace nflux {

namespace {

// row i of a sorted layer admits the columns [0, admitted[i]) of its sorted input.
at::Tensor admitted_mask(const std::vector<int64_t>& admitted, int64_t fan_in, const at::TensorOptions& options) {
  const at::Tensor lengths = at::tensor(admitted, at::TensorOptions().dtype(at::kLong)).to(options.device());
  const at::Tensor columns = at::arange(fan_in, at::TensorOptions().dtype(at::kLong).device(options.device()));
  return columns.unsqueeze(0).lt(lengths.unsqueeze(1)).to(options.dtype());
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
made_parameter_grads(const MadePlan& plan, const std::vector<at::Tensor>& grad_pre,
                     const std::vector<at::Tensor>& layer_input, bool has_context) {
  const int64_t n = static_cast<int64_t>(plan.weights.size()), hidden = n - 1;
  const int64_t D = plan.features, P = plan.params;
  std::vector<at::Tensor> grad_w(n), grad_b(n), grad_c;
  for (int64_t l = 0; l < n; ++l) {
    const int64_t fan_in = layer_input[l].size(1);
    std::vector<int64_t> admitted;
    if (l < hidden) {
      for (int64_t k : plan.sorts[l].degree)  // a unit of degree k sees inputs of degree <= k
        admitted.push_back(l == 0 ? std::min(k, D) : plan.sorts[l - 1].upto(k));
    } else {
      for (int64_t k = 0; k < D; ++k)  // input of degree k+1 sees units of degree <= k
        admitted.insert(admitted.end(), P, plan.sorts[hidden - 1].upto(k));
    }
    const at::Tensor sorted = at::mm(grad_pre[l].t(), layer_input[l])
                                  .mul_(admitted_mask(admitted, fan_in, grad_pre[l].options()));
    const at::Tensor& cols = l == 0 ? plan.in_perm : plan.row_perm[l - 1];
    // sorted[i, j] belongs at original [row_perm[i], cols[j]] (both permutations).
    grad_w[l] = at::empty_like(sorted).index_copy_(0, plan.row_perm[l], sorted);
    grad_w[l] = at::empty_like(sorted).index_copy_(1, cols, grad_w[l]);
    grad_b[l] = at::empty({sorted.size(0)}, sorted.options()).index_copy_(0, plan.row_perm[l], grad_pre[l].sum(0));
    if (has_context && l < hidden)
      grad_c.push_back(at::empty(grad_pre[l].sizes(), grad_pre[l].options()).index_copy_(1, plan.row_perm[l], grad_pre[l]));
  }
  return {grad_w, grad_b, grad_c};
}

}  // namespace nflux
