// lu_conv1x1 and lu_conv1x1_backward: Glow's invertible 1x1 convolution (and the LU linear
// layer of MAF/NSF) with W = P (L + I)(U + diag(sign * exp(log_scale))), P = I[perm].
// The GEMMs and triangular solves are ATen calls (MKL/cuBLAS), so one CompositeExplicitAutograd
// kernel serves every device; for CPU float/double the elementwise [C, C] parameter work (the
// factors, and their gradients) is a host loop each instead of ATen calls (see
// host_fast_path). W (or W^-1, from two triangular solves) is built once per call and the data
// crosses one batched GEMM on its [B, C, H*W] view, with the bias folded into it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "lu_conv1x1.h"

namespace nflux {
namespace {

// The op's parameters. input_log_scale (ActNorm's scale, optional) folds into the factors:
// W diag(exp(s)) = P L (U diag(exp(s)) + D diag(exp(s))) scales U's columns by exp(s) and adds
// s to log_scale.
struct LuParams {
  const at::Tensor& perm;
  const at::Tensor& lower;
  const at::Tensor& upper;
  const at::Tensor& log_scale;
  const at::Tensor& sign;
  const std::optional<at::Tensor>& input_log_scale;
};

// The LU factors as dense [C, C] matrices. W = permuted_lower @ upper_diag, one GEMM with no
// row gather; the inverse solves against unit_lower (a permuted one is not triangular).
struct Factors {
  at::Tensor unit_lower;      // L + I (only when asked for)
  at::Tensor permuted_lower;  // P (L + I): row i is row perm[i] of L + I
  at::Tensor upper_diag;      // U + diag(sign * exp(log_scale)), input_log_scale folded in
  at::Tensor column_scale;    // exp(input_log_scale), U's column factors (only with it)
  // Host path only: perm's entries, and sum(log_scale) (+ sum(input_log_scale)) in double.
  bool on_host = false;
  std::vector<int64_t> host_perm;
  double log_scale_sum = 0;
};

std::atomic<bool> host_path_enabled{true};

// CPU float/double parameters take one pass over raw memory instead of about ten ATen calls
// each way: at C = 64 the calls, not the arithmetic, were most of a small batch's time (and
// for large C the passes cost what the ATen calls' passes cost).
bool host_fast_path(const at::Tensor& lower) {
  return lower.is_cpu() &&
         (lower.scalar_type() == at::kFloat || lower.scalar_type() == at::kDouble) &&
         host_path_enabled.load(std::memory_order_relaxed);
}

// perm as host indices, checked to be a permutation of range(C): they index raw memory below,
// and a repeat would make W singular while logabsdet still says sum(log_scale).
std::vector<int64_t> read_host_perm(const at::Tensor& perm) {
  const auto p = perm.contiguous();
  const int64_t C = p.size(0);
  std::vector<int64_t> out(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + C);
  std::vector<bool> seen(C, false);
  for (const int64_t v : out) {
    TORCH_CHECK(v >= 0 && v < C && !seen[v], "nflux: perm must be a permutation of range(", C,
                "), got ", v < 0 || v >= C ? "entry " : "a repeat of ", v);
    seen[v] = true;
  }
  return out;
}

// column: exp(input_log_scale), U's column factors, or nullptr for ones (no input_log_scale).
template <typename T>
void fill_factors(const LuParams& p, const std::vector<int64_t>& perm, const T* column,
                  T* unit_lower, T* permuted_lower, T* upper_diag, double& log_scale_sum) {
  const auto lower_t = p.lower.contiguous(), upper_t = p.upper.contiguous(),
             log_scale_t = p.log_scale.contiguous(), sign_t = p.sign.contiguous();
  const auto in_scale_t = p.input_log_scale ? p.input_log_scale->contiguous() : at::Tensor();
  const T *lower = lower_t.data_ptr<T>(), *upper = upper_t.data_ptr<T>(),
          *log_scale = log_scale_t.data_ptr<T>(), *sign = sign_t.data_ptr<T>();
  const T* input_log_scale = in_scale_t.defined() ? in_scale_t.data_ptr<T>() : nullptr;
  const int64_t C = lower_t.size(0);
  double total = 0;
  for (int64_t i = 0; i < C; ++i) {
    const T s = input_log_scale ? log_scale[i] + input_log_scale[i] : log_scale[i];
    total += static_cast<double>(s);
    const T* l = lower + i * C;
    const T* u = upper + i * C;
    T* ud = upper_diag + i * C;
    for (int64_t j = 0; j < C; ++j) ud[j] = j > i ? (column ? u[j] * column[j] : u[j]) : T(0);
    ud[i] = sign[i] * std::exp(s);
    if (unit_lower != nullptr) {
      T* ul = unit_lower + i * C;
      for (int64_t j = 0; j < C; ++j) ul[j] = j < i ? l[j] : T(0);
      ul[i] = T(1);
    }
    if (permuted_lower != nullptr) {
      const int64_t r = perm[i];
      const T* lr = lower + r * C;
      T* pl = permuted_lower + i * C;
      for (int64_t j = 0; j < C; ++j) pl[j] = j < r ? lr[j] : T(0);
      pl[r] = T(1);
    }
  }
  log_scale_sum = total;
}

// need_unit_lower: the inverse's solves; need_permuted_lower: W itself (forward, backward).
Factors make_factors(const LuParams& p, bool need_unit_lower, bool need_permuted_lower) {
  Factors f;
  if (p.input_log_scale) f.column_scale = at::exp(*p.input_log_scale).contiguous();
  if (host_fast_path(p.lower)) {
    const int64_t C = p.lower.size(0);
    const auto options = p.lower.options();
    f.on_host = true;
    f.host_perm = read_host_perm(p.perm);
    f.upper_diag = at::empty({C, C}, options);
    if (need_permuted_lower) f.permuted_lower = at::empty({C, C}, options);
    if (need_unit_lower) f.unit_lower = at::empty({C, C}, options);
    AT_DISPATCH_FLOATING_TYPES(p.lower.scalar_type(), "lu_factors", [&] {
      fill_factors<scalar_t>(p, f.host_perm,
                             p.input_log_scale ? f.column_scale.data_ptr<scalar_t>() : nullptr,
                             need_unit_lower ? f.unit_lower.data_ptr<scalar_t>() : nullptr,
                             need_permuted_lower ? f.permuted_lower.data_ptr<scalar_t>() : nullptr,
                             f.upper_diag.data_ptr<scalar_t>(), f.log_scale_sum);
    });
    return f;
  }
  // Generic path: upper and log_scale with input_log_scale folded in.
  const auto upper = p.input_log_scale ? p.upper * f.column_scale : p.upper;
  const auto log_scale = p.input_log_scale ? p.log_scale + *p.input_log_scale : p.log_scale;
  // Fresh tensors written in place: fewer small kernels than eye + tril + add.
  auto unit_lower = p.lower.tril(-1);
  unit_lower.diagonal().fill_(1);
  auto upper_diag = upper.triu(1);
  upper_diag.diagonal().copy_(p.sign * at::exp(log_scale));
  if (need_permuted_lower) f.permuted_lower = unit_lower.index_select(0, p.perm);
  f.unit_lower = unit_lower;
  f.upper_diag = upper_diag;
  return f;
}

at::Tensor weight(const Factors& f) { return at::mm(f.permuted_lower, f.upper_diag); }

// W^-1 = (U + D)^-1 (L + I)^-1 P^T by two triangular solves against P^T = I[:, perm].
at::Tensor inverse_weight(const Factors& f, const at::Tensor& perm) {
  const auto pt = at::eye(perm.size(0), f.unit_lower.options()).index_select(1, perm);
  const auto z = at::linalg_solve_triangular(f.unit_lower, pt, /*upper=*/false, /*left=*/true,
                                             /*unitriangular=*/true);
  return at::linalg_solve_triangular(f.upper_diag, z, /*upper=*/true);
}

struct ParameterGrads {
  at::Tensor lower, upper, log_scale, input_log_scale;  // the last only with input_log_scale
};

// Gradients of the parameters from dL/dW (W = P L1 UD, L1 = L + I, UD = U' + D):
// dL/d(P L1) = dL/dW UD^T, whose row i belongs to row perm[i] of L1; dL/dUD = (P L1)^T dL/dW;
// d UD_ii / d log_scale_i = UD_ii; logabsdet adds lad_factor * sum(grad_logabsdet) to each.
// With input_log_scale s: U' = U diag(exp(s)) (UD's strict upper triangle), so
// dL/dU = dL/dU' diag(exp(s)) and dL/ds_j = sum_i dL/dU'_ij U'_ij + dL/dlog_scale_j.
// column_scale: as in fill_factors (nullptr: ones).
template <typename T>
void fill_parameter_grads(const std::vector<int64_t>& perm, const T* column_scale,
                          const T* upper_diag, const T* grad_pl, const T* grad_ud,
                          const T* grad_lad, int64_t B, double lad_factor, T* grad_lower,
                          T* grad_upper, T* grad_log_scale, T* grad_input_log_scale, int64_t C) {
  double lad_total = 0;
  for (int64_t b = 0; b < B; ++b) lad_total += static_cast<double>(grad_lad[b]);
  const T lad_grad = static_cast<T>(lad_factor * lad_total);
  if (grad_input_log_scale != nullptr) std::fill(grad_input_log_scale, grad_input_log_scale + C, T(0));
  for (int64_t i = 0; i < C; ++i) {
    const int64_t r = perm[i];
    const T* gp = grad_pl + i * C;
    T* gl = grad_lower + r * C;
    for (int64_t j = 0; j < C; ++j) gl[j] = j < r ? gp[j] : T(0);
    const T* gu = grad_ud + i * C;
    const T* ud = upper_diag + i * C;
    T* out = grad_upper + i * C;
    for (int64_t j = 0; j < C; ++j) out[j] = j > i ? (column_scale ? gu[j] * column_scale[j] : gu[j]) : T(0);
    if (grad_input_log_scale != nullptr) {
      for (int64_t j = i + 1; j < C; ++j) grad_input_log_scale[j] += gu[j] * ud[j];
    }
    grad_log_scale[i] = gu[i] * ud[i] + lad_grad;
  }
  if (grad_input_log_scale != nullptr) {
    for (int64_t j = 0; j < C; ++j) grad_input_log_scale[j] += grad_log_scale[j];
  }
}

ParameterGrads parameter_grads(const Factors& f, const at::Tensor& grad_w, const LuParams& p,
                               const at::Tensor& grad_logabsdet, double lad_factor) {
  const auto grad_pl = at::mm(grad_w, f.upper_diag.t());
  auto grad_ud = at::mm(f.permuted_lower.t(), grad_w);
  ParameterGrads g;
  if (f.on_host) {
    const int64_t C = grad_w.size(0);
    g.lower = at::empty({C, C}, grad_w.options());  // every row written: perm is a permutation
    g.upper = at::empty({C, C}, grad_w.options());
    g.log_scale = at::empty({C}, grad_w.options());
    if (p.input_log_scale) g.input_log_scale = at::empty({C}, grad_w.options());
    const auto gl = grad_logabsdet.contiguous();
    AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "lu_parameter_grads", [&] {
      fill_parameter_grads<scalar_t>(
          f.host_perm, p.input_log_scale ? f.column_scale.data_ptr<scalar_t>() : nullptr, f.upper_diag.data_ptr<scalar_t>(),
          grad_pl.data_ptr<scalar_t>(), grad_ud.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(),
          gl.numel(), lad_factor, g.lower.data_ptr<scalar_t>(), g.upper.data_ptr<scalar_t>(),
          g.log_scale.data_ptr<scalar_t>(),
          p.input_log_scale ? g.input_log_scale.data_ptr<scalar_t>() : nullptr, C);
    });
    return g;
  }
  g.lower = at::zeros_like(grad_pl).index_copy_(0, p.perm, grad_pl).tril_(-1);
  g.log_scale = (grad_ud.diagonal() * f.upper_diag.diagonal()).add_(grad_logabsdet.sum(), lad_factor);
  g.upper = grad_ud.triu_(1);
  if (p.input_log_scale) {
    // upper_diag holds U' only in its strict upper triangle: entries below it (an inf, say)
    // never meet the gradient as inf * 0.
    g.input_log_scale = (g.upper * f.upper_diag).sum(0) + g.log_scale;
    g.upper = g.upper * f.column_scale;
  }
  return g;
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

at::Tensor row_logabsdet(const at::Tensor& x, const LuParams& p, const Factors& f, bool inverse) {
  const double factor = static_cast<double>(pixels(x)) * (inverse ? -1.0 : 1.0);
  if (f.on_host) return at::full({x.size(0)}, f.log_scale_sum * factor, x.options());
  auto total = p.log_scale.sum();
  if (p.input_log_scale) total = total + p.input_log_scale->sum();
  return (total * factor).expand({x.size(0)}).contiguous();
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
                                              const std::optional<at::Tensor>& input_shift,
                                              const std::optional<at::Tensor>& input_log_scale) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale);
  const LuParams p{perm, lower, upper, log_scale, sign, input_log_scale};
  const auto f = make_factors(p, /*need_unit_lower=*/inverse, /*need_permuted_lower=*/!inverse);
  at::Tensor y;
  if (!inverse) {
    const auto w = weight(f);
    y = mix(w, x, forward_offset(w, bias, input_shift));
  } else {
    // The subtractions ride in the GEMM as one offset.
    const auto winv = inverse_weight(f, perm);
    y = mix(winv, x, inverse_offset(winv, bias, input_shift));
  }
  return {y, row_logabsdet(x, p, f, inverse)};
}

using SevenTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor>;

SevenTensors lu_conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& grad_logabsdet,
                                 const at::Tensor& x, const at::Tensor& perm,
                                 const at::Tensor& lower, const at::Tensor& upper,
                                 const at::Tensor& log_scale, const at::Tensor& sign,
                                 const std::optional<at::Tensor>& bias, bool inverse,
                                 const std::optional<at::Tensor>& input_shift,
                                 const std::optional<at::Tensor>& input_log_scale) {
  check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale);
  check_output_grads(grad_y, grad_logabsdet, x);
  const LuParams p{perm, lower, upper, log_scale, sign, input_log_scale};
  const auto f = make_factors(p, /*need_unit_lower=*/inverse, /*need_permuted_lower=*/true);
  // Materialised once (an expanded gradient, as from y.sum(), would otherwise be copied twice).
  const auto gy = grad_y.contiguous();
  const bool need_offset_grad = bias.has_value() || input_shift.has_value();
  at::Tensor grad_x, grad_w, grad_b, grad_shift;
  if (!inverse) {
    // y = W x + c, c = W s + b: dL/dc = sum of gy; dL/dW = gy x^T + dL/dc s^T; dL/ds = W^T dL/dc.
    const auto w = weight(f);
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
  const double lad_factor = static_cast<double>(pixels(x)) * (inverse ? -1.0 : 1.0);
  const auto g = parameter_grads(f, grad_w, p, grad_logabsdet, lad_factor);
  // An absent input's gradient is empty, each its own tensor: a custom op's outputs may not
  // alias one another.
  const auto or_empty = [&](bool present, const at::Tensor& t) {
    return present ? t : at::empty({0}, x.options());
  };
  return {grad_x,
          g.lower,
          g.upper,
          g.log_scale,
          or_empty(bias.has_value(), grad_b),
          or_empty(input_shift.has_value(), grad_shift),
          or_empty(input_log_scale.has_value(), g.input_log_scale)};
}

}  // namespace

bool set_lu_host_path(bool enabled) { return host_path_enabled.exchange(enabled); }

TORCH_LIBRARY_IMPL(nflux, CompositeExplicitAutograd, m) {
  m.impl("lu_conv1x1", &lu_conv1x1);
  m.impl("lu_conv1x1_backward", &lu_conv1x1_backward);
}

}  // namespace nflux
