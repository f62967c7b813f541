// lu_conv1x1 and lu_conv1x1_backward: Glow's invertible 1x1 convolution (and the LU linear
// layer of MAF/NSF) with W = P (L + I)(U + diag(sign * exp(log_scale))), P = I[perm].
// Composed of ATen calls only (the GEMMs go to MKL/cuBLAS), so one CompositeExplicitAutograd
// kernel serves every device. W (or W^-1, from two triangular solves) is built once per call
// and the data crosses one batched GEMM on its [B, C, H*W] view, with the bias folded into it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace nflux {
namespace {

struct Factors {
  at::Tensor unit_lower;  // L + I
  at::Tensor upper_diag;  // U + diag(sign * exp(log_scale))
  at::Tensor diag;        // sign * exp(log_scale)
};

Factors make_factors(const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& log_scale,
                     const at::Tensor& sign) {
  // Fresh tensors written in place: fewer small kernels than eye + tril + add (this runs below
  // autograd, called from the C++ autograd kernel).
  const auto diag = sign * at::exp(log_scale);
  auto unit_lower = lower.tril(-1);
  unit_lower.diagonal().fill_(1);
  auto upper_diag = upper.triu(1);
  upper_diag.diagonal().copy_(diag);
  return {unit_lower, upper_diag, diag};
}

at::Tensor weight(const Factors& f, const at::Tensor& perm) {
  return at::mm(f.unit_lower, f.upper_diag).index_select(0, perm);
}

// W^-1 = (U + D)^-1 (L + I)^-1 P^T by two triangular solves against P^T = I[:, perm].
at::Tensor inverse_weight(const Factors& f, const at::Tensor& perm) {
  const auto pt = at::eye(perm.size(0), f.unit_lower.options()).index_select(1, perm);
  const auto z = at::linalg_solve_triangular(f.unit_lower, pt, /*upper=*/false, /*left=*/true,
                                             /*unitriangular=*/true);
  return at::linalg_solve_triangular(f.upper_diag, z, /*upper=*/true);
}

// m applied over the channel dimension of x, plus bias: one GEMM on the [B, C, HW] view.
at::Tensor mix(const at::Tensor& m, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  if (x.dim() == 2) return bias ? at::addmm(*bias, x, m.t()) : at::mm(x, m.t());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto x3 = x.contiguous().view({B, C, HW});
  const auto mb = m.expand({B, C, C});
  const auto y3 = bias ? at::baddbmm(bias->view({1, C, 1}).expand({B, C, HW}), mb, x3)
                       : at::bmm(mb, x3);
  return y3.view(x.sizes());
}

// sum over the batch (and pixels) of a b^T, for a and b of x's shape: [C, C].
at::Tensor outer_sum(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() == 2) return at::mm(a.t(), b);
  const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  const auto a3 = a.contiguous().view({B, C, HW}), b3 = b.contiguous().view({B, C, HW});
  return at::bmm(a3, b3.transpose(1, 2)).sum(0);
}

at::Tensor channel_sum(const at::Tensor& t) {
  return t.dim() == 2 ? t.sum(0) : t.sum(at::IntArrayRef{0, 2, 3});
}

int64_t pixels(const at::Tensor& x) { return x.dim() == 2 ? 1 : x.size(2) * x.size(3); }

at::Tensor row_logabsdet(const at::Tensor& x, const at::Tensor& log_scale, bool inverse) {
  const double factor = static_cast<double>(pixels(x)) * (inverse ? -1.0 : 1.0);
  return (log_scale.sum() * factor).expand({x.size(0)}).contiguous();
}

void check_input_shift(const std::optional<at::Tensor>& input_shift, const at::Tensor& x) {
  if (!input_shift) return;
  check_same_dtype_device(*input_shift, x, "input_shift", "x");
  TORCH_CHECK(input_shift->dim() == 1 && input_shift->size(0) == x.size(1),
              "nflux: input_shift must have shape [", x.size(1), "], got ", input_shift->sizes());
}

// y = W (x + input_shift) + bias = W x + (W input_shift + bias): the shift (ActNorm's bias, when
// ActNorm's scale is folded into the LU factors) costs one [C] matrix-vector product.
std::optional<at::Tensor> forward_offset(const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& input_shift) {
  if (!input_shift) return bias;
  return bias ? at::addmv(*bias, w, *input_shift) : at::mv(w, *input_shift);
}

// Inverse: x = W^-1 (y - bias) - input_shift = W^-1 y + c.
std::optional<at::Tensor> inverse_offset(const at::Tensor& winv,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& input_shift) {
  std::optional<at::Tensor> c;
  if (bias) c = -at::mv(winv, *bias);
  if (input_shift) c = c ? *c - *input_shift : -*input_shift;
  return c;
}

std::tuple<at::Tensor, at::Tensor> lu_conv1x1(const at::Tensor& x, const at::Tensor& perm,
                                              const at::Tensor& lower, const at::Tensor& upper,
                                              const at::Tensor& log_scale, const at::Tensor& sign,
                                              const std::optional<at::Tensor>& bias, bool inverse,
                                              const std::optional<at::Tensor>& input_shift) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias);
  check_input_shift(input_shift, x);
  const auto f = make_factors(lower, upper, log_scale, sign);
  at::Tensor y;
  if (!inverse) {
    const auto w = weight(f, perm);
    y = mix(w, x, forward_offset(w, bias, input_shift));
  } else {
    // The subtractions ride in the GEMM as one offset.
    const auto winv = inverse_weight(f, perm);
    y = mix(winv, x, inverse_offset(winv, bias, input_shift));
  }
  return {y, row_logabsdet(x, log_scale, inverse)};
}

using SixTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SixTensors lu_conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& grad_logabsdet,
                               const at::Tensor& x, const at::Tensor& perm,
                               const at::Tensor& lower, const at::Tensor& upper,
                               const at::Tensor& log_scale, const at::Tensor& sign,
                               const std::optional<at::Tensor>& bias, bool inverse,
                               const std::optional<at::Tensor>& input_shift) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias);
  check_input_shift(input_shift, x);
  check_same_dtype_device(grad_y, x, "grad_y", "x");
  check_same_dtype_device(grad_logabsdet, x, "grad_logabsdet", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "nflux: grad_y must have the shape of x ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_logabsdet.dim() == 1 && grad_logabsdet.size(0) == x.size(0),
              "nflux: grad_logabsdet must have shape [", x.size(0), "], got ",
              grad_logabsdet.sizes());
  const auto f = make_factors(lower, upper, log_scale, sign);
  // Materialised once (an expanded gradient, as from y.sum(), would otherwise be copied twice).
  const auto gy = grad_y.contiguous();
  const bool need_offset_grad = bias.has_value() || input_shift.has_value();
  at::Tensor grad_x, grad_w, grad_b, grad_shift;
  if (!inverse) {
    // y = W x + c, c = W s + b: dL/dc = sum of gy; dL/dW = gy x^T + dL/dc s^T; dL/ds = W^T dL/dc.
    const auto w = weight(f, perm);
    grad_x = mix(w.t(), gy, std::nullopt);
    grad_w = outer_sum(gy, x);
    if (need_offset_grad) grad_b = channel_sum(gy);
    if (input_shift) {
      grad_w.addr_(grad_b, *input_shift);
      grad_shift = at::mv(w.t(), grad_b);
    }
  } else {
    // out = W^-1 (x - b) - s: d out = -W^-1 dW (out + s), so dL/dW = -(W^-T g)(out + s)^T.
    const auto winv = inverse_weight(f, perm);
    std::optional<at::Tensor> c;
    if (bias) c = -at::mv(winv, *bias);
    const auto out = mix(winv, x, c);  // W^-1 (x - b), without the shift
    grad_x = mix(winv.t(), gy, std::nullopt);
    grad_w = -outer_sum(grad_x, out);
    if (bias) grad_b = -channel_sum(grad_x);
    if (input_shift) grad_shift = -channel_sum(gy);
  }
  // W = P M: rows of dL/dW go back to the rows of M they came from.
  const auto grad_m = at::empty_like(grad_w).index_copy_(0, perm, grad_w);
  const auto grad_lower = at::mm(grad_m, f.upper_diag.t()).tril_(-1);
  auto grad_upper_diag = at::mm(f.unit_lower.t(), grad_m);
  const double lad_factor = static_cast<double>(pixels(x)) * (inverse ? -1.0 : 1.0);
  const auto grad_log_scale =
      (grad_upper_diag.diagonal() * f.diag).add_(grad_logabsdet.sum(), lad_factor);
  const auto empty = at::empty({0}, x.options());
  return {grad_x,
          grad_lower,
          grad_upper_diag.triu_(1),
          grad_log_scale,
          bias ? grad_b : empty,
          input_shift ? grad_shift : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CompositeExplicitAutograd, m) {
  m.impl("lu_conv1x1", &lu_conv1x1);
  m.impl("lu_conv1x1_backward", &lu_conv1x1_backward);
}

}  // namespace nflux
