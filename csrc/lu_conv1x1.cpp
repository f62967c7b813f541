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
  const auto eye = at::eye(lower.size(0), lower.options());
  const auto diag = sign * at::exp(log_scale);
  return {lower.tril(-1) + eye, upper.triu(1) + at::diag(diag), diag};
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

std::tuple<at::Tensor, at::Tensor> lu_conv1x1(const at::Tensor& x, const at::Tensor& perm,
                                              const at::Tensor& lower, const at::Tensor& upper,
                                              const at::Tensor& log_scale, const at::Tensor& sign,
                                              const std::optional<at::Tensor>& bias, bool inverse) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias);
  const auto f = make_factors(lower, upper, log_scale, sign);
  at::Tensor y;
  if (!inverse) {
    y = mix(weight(f, perm), x, bias);
  } else {
    // x = W^-1 (y - b) = W^-1 y + c, c = -W^-1 b: the subtraction rides in the GEMM.
    const auto winv = inverse_weight(f, perm);
    std::optional<at::Tensor> c;
    if (bias) c = -at::mv(winv, *bias);
    y = mix(winv, x, c);
  }
  return {y, row_logabsdet(x, log_scale, inverse)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lu_conv1x1_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_logabsdet, const at::Tensor& x,
    const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& log_scale, const at::Tensor& sign, const std::optional<at::Tensor>& bias,
    bool inverse) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias);
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
  at::Tensor grad_x, grad_w, grad_b;
  if (!inverse) {
    const auto w = weight(f, perm);
    grad_x = mix(w.t(), gy, std::nullopt);
    grad_w = outer_sum(gy, x);
    grad_b = channel_sum(gy);
  } else {
    // out = W^-1 (x - b): d out = -W^-1 dW out, so dL/dW = -(W^-T g) out^T.
    const auto winv = inverse_weight(f, perm);
    std::optional<at::Tensor> c;
    if (bias) c = -at::mv(winv, *bias);
    const auto out = mix(winv, x, c);
    grad_x = mix(winv.t(), gy, std::nullopt);
    grad_w = -outer_sum(grad_x, out);
    grad_b = -channel_sum(grad_x);
  }
  // W = P M: rows of dL/dW go back to the rows of M they came from.
  const auto grad_m = at::empty_like(grad_w).index_copy_(0, perm, grad_w);
  const auto grad_lower = at::mm(grad_m, f.upper_diag.t()).tril(-1);
  const auto grad_upper_diag = at::mm(f.unit_lower.t(), grad_m);
  const double lad_factor = static_cast<double>(pixels(x)) * (inverse ? -1.0 : 1.0);
  const auto grad_log_scale =
      grad_upper_diag.diagonal() * f.diag + grad_logabsdet.sum() * lad_factor;
  return {grad_x, grad_lower, grad_upper_diag.triu(1), grad_log_scale,
          bias ? grad_b : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CompositeExplicitAutograd, m) {
  m.impl("lu_conv1x1", &lu_conv1x1);
  m.impl("lu_conv1x1_backward", &lu_conv1x1_backward);
}

}  // namespace nflux
