// Autograd kernel of masked_linear, in C++ like those of csrc/autograd.cpp: a MADE calls it
// several times per layer, and a Python setup_context/backward per call costs about as much as
// the small GEMMs of a D = 16 flow. The forward redispatches below autograd; the backward calls
// the explicit masked_linear_backward op (the weight gradient masked), so torch.compile traces
// both like any other op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "backward_guard.h"

namespace nflux {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor masked_linear_call(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                              at::IntArrayRef blocks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nflux::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         at::IntArrayRef)>();
  return op.call(input, weight, bias, mask, blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_call(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mask, at::IntArrayRef blocks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nflux::masked_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, at::IntArrayRef)>();
  return op.call(grad_output, input, weight, mask, blocks);
}

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& mask, at::IntArrayRef blocks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = masked_linear_call(input, weight, bias, mask, blocks);
    ctx->save_for_backward({input, weight, mask});
    ctx->saved_data["blocks"] = blocks.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> blocks = ctx->saved_data["blocks"].toIntVector();
    BackwardOpGuard guard;
    auto [grad_input, grad_weight, grad_bias] =
        masked_linear_backward_call(grads[0], saved[0], saved[1], saved[2], blocks);
    return {grad_input, grad_weight,
            ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                  at::IntArrayRef blocks) {
  return MaskedLinearFunction::apply(input, weight, bias, mask, blocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, Autograd, m) { m.impl("masked_linear", &masked_linear_autograd); }

}  // namespace nflux
