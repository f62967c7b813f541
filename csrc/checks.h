// Argument checks shared by the CPU and CUDA torch glue: each names the argument, what was
// expected and what came.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

namespace nflux {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "nflux: ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

// The precision and range the kernels compute in for t's dtype: double for double, float for
// every narrower type.
inline double compute_epsilon(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
}
inline double compute_max(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                        : std::numeric_limits<float>::max();
}
// The smallest normal number: its reciprocal is finite (a subnormal's may not be).
inline double compute_tiny(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                        : std::numeric_limits<float>::min();
}

// `index` >= 0 names an element of a list argument, name[index] (formatted only on failure).
inline void check_same_dtype_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                                    const char* ref_name, int64_t index = -1) {
  const auto label = [&] {
    return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  };
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "nflux: ", label(), " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "nflux: ", label(), " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// rq_spline: inputs [...], widths/heights [..., K], derivatives [..., K-1]. Returns K.
inline int64_t check_rq_spline_args(const at::Tensor& inputs, const at::Tensor& widths,
                                    const at::Tensor& heights, const at::Tensor& derivatives,
                                    double tail_bound, double min_bin_width,
                                    double min_bin_height, double min_derivative) {
  check_floating(inputs, "inputs");
  check_same_dtype_device(widths, inputs, "unnormalized_widths", "inputs");
  check_same_dtype_device(heights, inputs, "unnormalized_heights", "inputs");
  check_same_dtype_device(derivatives, inputs, "unnormalized_derivatives", "inputs");
  const auto lead = inputs.sizes();
  auto check_lead = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == inputs.dim() + 1 && t.sizes().slice(0, inputs.dim()) == lead,
                "nflux: ", name, " must have shape [*inputs.shape, n] = [", lead,
                ", n], got ", t.sizes());
  };
  check_lead(widths, "unnormalized_widths");
  check_lead(heights, "unnormalized_heights");
  check_lead(derivatives, "unnormalized_derivatives");
  const int64_t K = widths.size(-1);
  TORCH_CHECK(K >= 1, "nflux: unnormalized_widths needs at least one bin, got K = ", K);
  TORCH_CHECK(heights.size(-1) == K, "nflux: unnormalized_heights has ", heights.size(-1),
              " bins but unnormalized_widths has ", K);
  TORCH_CHECK(derivatives.size(-1) == K - 1, "nflux: unnormalized_derivatives must have K-1 = ",
              K - 1, " entries in its last dimension, got ", derivatives.size(-1));
  TORCH_CHECK(tail_bound > 0 && std::isfinite(tail_bound),
              "nflux: tail_bound must be positive and finite, got ", tail_bound);
  // A zero minimum lets a bin collapse to zero width or height: a 0/0 slope inside it. So does
  // one below the arithmetic's resolution: its knot rounds onto the neighbour next to
  // +-tail_bound (a bin of 2 * tail_bound * value must span a few units in the last place),
  // and the knots' running sum carries up to ~K/2 units of rounding into the last bin.
  const double smallest_bin = static_cast<double>(K + 2) * compute_epsilon(inputs);
  auto check_min_bin = [&](double value, const char* name) {
    TORCH_CHECK(value > 0 && value * K < 1, "nflux: ", name, " * K must be in (0, 1), got ", value,
                " * ", K);
    TORCH_CHECK(value >= smallest_bin, "nflux: ", name, " = ", value,
                " is below what the kernels' arithmetic resolves with K = ", K,
                " bins (at least (K + 2) * eps = ", smallest_bin, "); use float64 inputs for smaller bins");
  };
  check_min_bin(min_bin_width, "min_bin_width");
  check_min_bin(min_bin_height, "min_bin_height");
  TORCH_CHECK(min_derivative > 0 && std::isfinite(min_derivative),
              "nflux: min_derivative must be positive and finite, got ", min_derivative);
  return K;
}

// rq_spline_backward: the forward's arguments plus two gradients shaped, typed and placed like
// inputs. Returns K.
inline int64_t check_rq_spline_backward_args(const at::Tensor& grad_outputs,
                                             const at::Tensor& grad_logabsdet,
                                             const at::Tensor& inputs, const at::Tensor& widths,
                                             const at::Tensor& heights,
                                             const at::Tensor& derivatives, double tail_bound,
                                             double min_bin_width, double min_bin_height,
                                             double min_derivative) {
  const int64_t K = check_rq_spline_args(inputs, widths, heights, derivatives, tail_bound,
                                         min_bin_width, min_bin_height, min_derivative);
  TORCH_CHECK(grad_outputs.sizes() == inputs.sizes() && grad_logabsdet.sizes() == inputs.sizes(),
              "nflux: rq_spline_backward gradients must have the shape of inputs ", inputs.sizes(),
              ", got ", grad_outputs.sizes(), " and ", grad_logabsdet.sizes());
  check_same_dtype_device(grad_outputs, inputs, "grad_outputs", "inputs");
  check_same_dtype_device(grad_logabsdet, inputs, "grad_logabsdet", "inputs");
  return K;
}

// affine_coupling: x [B, ...]; shift and scale_logits exactly x's shape. scale_kind is
// 0 (additive: no logits), 1 (exp) or 2 (sigmoid). Returns scale_kind.
inline int64_t check_affine_coupling_args(const at::Tensor& x, const at::Tensor& shift,
                                          const std::optional<at::Tensor>& logits,
                                          int64_t scale_kind, std::optional<double> clamp) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "nflux: x must have a batch dimension, got a 0-d tensor");
  check_same_dtype_device(shift, x, "shift", "x");
  TORCH_CHECK(shift.sizes() == x.sizes(), "nflux: shift must have the shape of x ", x.sizes(),
              ", got ", shift.sizes());
  TORCH_CHECK(scale_kind >= 0 && scale_kind <= 2,
              "nflux: scale_kind must be 0 (additive), 1 (exp) or 2 (sigmoid), got ", scale_kind);
  TORCH_CHECK((scale_kind == 0) == !logits.has_value(), "nflux: scale_logits ",
              logits.has_value() ? "was given" : "is missing", " but scale_kind is ", scale_kind);
  if (logits.has_value()) {
    check_same_dtype_device(*logits, x, "scale_logits", "x");
    TORCH_CHECK(logits->sizes() == x.sizes(), "nflux: scale_logits must have the shape of x ",
                x.sizes(), ", got ", logits->sizes());
  }
  // clamp * tanh(s / clamp) needs clamp and 1 / clamp finite in the kernels' arithmetic.
  TORCH_CHECK(!clamp.has_value() || (*clamp >= compute_tiny(x) && *clamp <= compute_max(x)),
              "nflux: clamp must be positive and finite, with 1 / clamp finite in the kernels' "
              "arithmetic, got ", clamp.value_or(0.0));
  return scale_kind;
}

// The gradients of an op's (y, logabsdet) outputs: y shaped, typed and placed like x, and one
// logabsdet gradient per row.
inline void check_output_grads(const at::Tensor& grad_y, const at::Tensor& grad_lad,
                               const at::Tensor& x) {
  check_same_dtype_device(grad_y, x, "grad_y", "x");
  check_same_dtype_device(grad_lad, x, "grad_logabsdet", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "nflux: grad_y must have the shape of x ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_lad.dim() == 1 && grad_lad.size(0) == x.size(0),
              "nflux: grad_logabsdet must have shape [", x.size(0), "], got ", grad_lad.sizes());
}

// lu_conv1x1: x [B, C] or [B, C, H, W]; perm int64 [C]; lower, upper [C, C]; log_scale, sign
// and bias, input_shift, input_log_scale (ActNorm's, folded in) [C]. Returns C.
inline int64_t check_lu_conv1x1_args(const at::Tensor& x, const at::Tensor& perm,
                                     const at::Tensor& lower, const at::Tensor& upper,
                                     const at::Tensor& log_scale, const at::Tensor& sign,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& input_shift = std::nullopt,
                                     const std::optional<at::Tensor>& input_log_scale = std::nullopt) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 4, "nflux: x must have shape [B, C] or [B, C, H, W], got ",
              x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(perm.scalar_type() == at::kLong, "nflux: perm must be an int64 tensor, got dtype ",
              perm.scalar_type());
  TORCH_CHECK(perm.device() == x.device(), "nflux: perm is on ", perm.device(), " but x is on ",
              x.device());
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == C, "nflux: perm must have shape [", C, "], got ",
              perm.sizes());
  auto check_square = [&](const at::Tensor& t, const char* name) {
    check_same_dtype_device(t, x, name, "x");
    TORCH_CHECK(t.dim() == 2 && t.size(0) == C && t.size(1) == C, "nflux: ", name,
                " must have shape [", C, ", ", C, "], got ", t.sizes());
  };
  auto check_vector = [&](const at::Tensor& t, const char* name) {
    check_same_dtype_device(t, x, name, "x");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "nflux: ", name, " must have shape [", C,
                "], got ", t.sizes());
  };
  check_square(lower, "lower");
  check_square(upper, "upper");
  check_vector(log_scale, "log_scale");
  check_vector(sign, "sign");
  if (bias.has_value()) check_vector(*bias, "bias");
  if (input_shift.has_value()) check_vector(*input_shift, "input_shift");
  if (input_log_scale.has_value()) check_vector(*input_log_scale, "input_log_scale");
  return C;
}

}  // namespace nflux

namespace nflux {

// masked_linear: input [..., I], weight and mask [O, I], bias [O] or absent.
inline void check_masked_linear_args(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mask) {
  check_floating(input, "input");
  check_same_dtype_device(weight, input, "weight", "input");
  check_same_dtype_device(mask, input, "mask", "input");
  TORCH_CHECK(weight.dim() == 2, "nflux: weight must have shape [out, in], got ", weight.sizes());
  TORCH_CHECK(mask.sizes() == weight.sizes(), "nflux: mask must have the shape of weight ",
              weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "nflux: input must have shape [..., ",
              weight.size(1), "], got ", input.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(*bias, input, "bias", "input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "nflux: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
  }
}

}  // namespace nflux
