// Argument checks shared by the CPU and CUDA torch glue: each names the argument, what was
// expected and what came.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace nflux {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "nflux: ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

inline void check_same_dtype_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                                    const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "nflux: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "nflux: ", name, " is on ", t.device(), " but ",
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
  TORCH_CHECK(tail_bound > 0, "nflux: tail_bound must be positive, got ", tail_bound);
  TORCH_CHECK(min_bin_width >= 0 && min_bin_width * K < 1, "nflux: min_bin_width * K must be in [0, 1), got ",
              min_bin_width, " * ", K);
  TORCH_CHECK(min_bin_height >= 0 && min_bin_height * K < 1,
              "nflux: min_bin_height * K must be in [0, 1), got ", min_bin_height, " * ", K);
  TORCH_CHECK(min_derivative > 0, "nflux: min_derivative must be positive, got ", min_derivative);
  return K;
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
