// What torch.autocast does to nflux ops (CPU and CUDA).
//
// Mixed precision speeds up a flow's conditioner networks (bf16 GEMMs and convolutions on AMX
// or tensor cores), but the invertible transforms themselves must stay in float32: their
// log-determinants sum thousands of terms, and an inverse in bfloat16 (8 bits of mantissa)
// would not reconstruct its input. So:
//   - flow transforms (rq_spline, affine_coupling, lu_conv1x1, made_inverse) cast their
//     floating inputs to float32, or to float64 when one is float64, as torch does for its
//     "fp32" ops (log_softmax, cumsum, ...): a conditioner's bfloat16 output meets a float32 x;
//   - masked_linear is a conditioner layer and runs in the autocast dtype, like torch's linear
//     (its float32 weights are cast once per autocast region, through torch's weight cache).
//     nflux.ops.masked_linear instead takes its reference, torch's linear of the masked weight,
//     which autocast casts like any linear layer (the masked weight is no leaf, so per call);
//   - the *_backward ops run in the dtypes their forward chose.
// Every kernel then calls the op with autocast excluded, so the ATen ops inside (the GEMMs of
// lu_conv1x1 and masked_linear) keep the dtype chosen here instead of being autocast again.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace nflux {
namespace {

// Replaces the stack's tensor arguments by cast(t); a tensor list is copied only if one of its
// elements changes (the Python entry points have usually cast everything already).
template <typename Cast>
void cast_tensors(torch::jit::Stack* stack, size_t arguments, Cast&& cast) {
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(arguments); it != stack->end(); ++it) {
    if (it->isTensor()) {
      *it = cast(it->toTensor());
    } else if (it->isTensorList()) {
      const c10::List<at::Tensor> list = it->toTensorList();
      std::optional<c10::List<at::Tensor>> cast_list;
      for (size_t i = 0; i < list.size(); ++i) {
        const at::Tensor t = list.get(i);
        at::Tensor c = cast(t);
        if (c.is_same(t)) continue;
        if (!cast_list) cast_list = list.copy();
        cast_list->set(i, std::move(c));
      }
      if (cast_list) *it = std::move(*cast_list);
    }
  }
}

bool is_double(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kDouble; }

bool any_double(const torch::jit::Stack* stack, size_t arguments) {
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(arguments); it != stack->end(); ++it) {
    if (it->isTensor() && is_double(it->toTensor())) return true;
    if (it->isTensorList()) {
      for (const at::Tensor& t : it->toTensorList()) {
        if (is_double(t)) return true;
      }
    }
  }
  return false;
}

enum class Policy { kFloat32OrWider, kAutocastDtype, kUnchanged };

template <c10::DeviceType device, Policy policy>
void autocast_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t arguments = op.schema().arguments().size();
  if constexpr (policy == Policy::kFloat32OrWider) {
    const at::ScalarType target = any_double(stack, arguments) ? at::kDouble : at::kFloat;
    cast_tensors(stack, arguments, [&](const at::Tensor& t) {
      return t.defined() && t.is_floating_point() && t.scalar_type() != target ? t.to(target) : t;
    });
  } else if constexpr (policy == Policy::kAutocastDtype) {
    // As torch's lower-precision ops: float64 anywhere means no cast at all.
    if (!any_double(stack, arguments)) {
      const at::ScalarType target = at::autocast::get_autocast_dtype(device);
      cast_tensors(stack, arguments,
                   [&](const at::Tensor& t) { return at::autocast::cached_cast(target, t, device); });
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  constexpr auto float32 = &autocast_kernel<device, Policy::kFloat32OrWider>;
  constexpr auto autocast_dtype = &autocast_kernel<device, Policy::kAutocastDtype>;
  constexpr auto unchanged = &autocast_kernel<device, Policy::kUnchanged>;
  for (const char* name : {"rq_spline", "affine_coupling", "lu_conv1x1", "made_inverse",
                           "_made_inverse_composite"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<float32>());
  }
  m.impl("masked_linear", torch::CppFunction::makeFromBoxedFunction<autocast_dtype>());
  for (const char* name : {"rq_spline_backward", "affine_coupling_backward", "lu_conv1x1_backward",
                           "masked_linear_backward", "made_inverse_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<unchanged>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(nflux, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace nflux
