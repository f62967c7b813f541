// CPU kernels of affine_coupling and affine_coupling_backward: parallel over rows, one pass
// over each row's features calling the element math in nflux/coupling.h, the row's logabsdet
// summed on the way. The backward pass recomputes the scale from the saved inputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "nflux/coupling.h"

namespace nflux {
namespace {

using coupling::kAdditive;
using coupling::kExp;
using coupling::kSigmoid;

// Rows per task: enough elements that thread wake-up is amortised.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// Independent partial sums, so the row reduction does not serialise on one add.
constexpr int kLanes = 8;

template <int Kind, bool Clamped, bool Inverse, typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* shift, const scalar_t* logits, scalar_t* y,
                  scalar_t* lad, int64_t B, int64_t D, double clamp) {
  using acc = acc_t<scalar_t>;
  const acc c = static_cast<acc>(clamp), inv_c = Clamped ? acc(1) / c : acc(0);
  at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* xr = x + b * D;
      const scalar_t* tr = shift + b * D;
      scalar_t* yr = y + b * D;
      if (Kind == kAdditive) {
        for (int64_t j = 0; j < D; ++j) yr[j] = Inverse ? xr[j] - tr[j] : xr[j] + tr[j];
        lad[b] = scalar_t(0);
        continue;
      }
      const scalar_t* sr = logits + b * D;
      acc part[kLanes] = {};
      auto element = [&](int64_t j, acc& sum) {
        const auto sc = coupling::eval_scale<Kind, Clamped, acc>(static_cast<acc>(sr[j]), c, inv_c);
        const acc v = static_cast<acc>(xr[j]), t = static_cast<acc>(tr[j]);
        yr[j] = static_cast<scalar_t>(Inverse ? (v - t) * sc.inv_scale : v * sc.scale + t);
        sum += sc.log_scale;
      };
      int64_t j = 0;
      for (; j + kLanes <= D; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) element(j + l, part[l]);
      }
      for (; j < D; ++j) element(j, part[0]);
      acc total = 0;
      for (int l = 0; l < kLanes; ++l) total += part[l];
      lad[b] = static_cast<scalar_t>(Inverse ? -total : total);
    }
  });
}

// g is the gradient of the op's first output; gl of its logabsdet, per row. `in` is the saved
// input (x forward, y inverse).
template <int Kind, bool Clamped, bool Inverse, typename scalar_t>
void backward_rows(const scalar_t* g, const scalar_t* gl, const scalar_t* in, const scalar_t* shift,
                   const scalar_t* logits, scalar_t* g_in, scalar_t* g_shift, scalar_t* g_logits,
                   int64_t B, int64_t D, double clamp) {
  using acc = acc_t<scalar_t>;
  const acc c = static_cast<acc>(clamp), inv_c = Clamped ? acc(1) / c : acc(0);
  at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * D;
      if (Kind == kAdditive) {
        for (int64_t j = 0; j < D; ++j) {
          g_in[o + j] = g[o + j];
          g_shift[o + j] = Inverse ? -g[o + j] : g[o + j];
        }
        continue;
      }
      const acc glad = static_cast<acc>(gl[b]);
      for (int64_t j = 0; j < D; ++j) {
        const auto sc =
            coupling::eval_scale<Kind, Clamped, acc>(static_cast<acc>(logits[o + j]), c, inv_c);
        const acc gv = static_cast<acc>(g[o + j]);
        const acc v = static_cast<acc>(in[o + j]);
        if (Inverse) {
          const acc x_out = (v - static_cast<acc>(shift[o + j])) * sc.inv_scale;
          const acc gy = gv * sc.inv_scale;
          g_in[o + j] = static_cast<scalar_t>(gy);
          g_shift[o + j] = static_cast<scalar_t>(-gy);
          g_logits[o + j] = static_cast<scalar_t>(coupling::inverse_grad_logit(sc, x_out, gv, glad));
        } else {
          g_in[o + j] = static_cast<scalar_t>(gv * sc.scale);
          g_shift[o + j] = static_cast<scalar_t>(gv);
          g_logits[o + j] = static_cast<scalar_t>(coupling::forward_grad_logit(sc, v, gv, glad));
        }
      }
    }
  });
}

// Calls f with the scale kind, clamp flag and direction as compile-time constants.
template <typename F>
void dispatch_variant(int64_t kind, bool clamped, bool inverse, F&& f) {
  auto with_dir = [&](auto kind_c, auto clamp_c) {
    if (inverse) f(kind_c, clamp_c, std::true_type{});
    else f(kind_c, clamp_c, std::false_type{});
  };
  auto with_clamp = [&](auto kind_c) {
    if (clamped) with_dir(kind_c, std::true_type{});
    else with_dir(kind_c, std::false_type{});
  };
  if (kind == kAdditive) with_dir(std::integral_constant<int, kAdditive>{}, std::false_type{});
  else if (kind == kExp) with_clamp(std::integral_constant<int, kExp>{});
  else with_clamp(std::integral_constant<int, kSigmoid>{});
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                       const std::optional<at::Tensor>& logits,
                                                       int64_t scale_kind,
                                                       std::optional<double> clamp, bool inverse) {
  const auto kind = check_affine_coupling_args(x, shift, logits, scale_kind, clamp);
  const at::Tensor xc = x.contiguous(), tc = shift.contiguous();
  const at::Tensor sc = kind == kAdditive ? xc : logits->contiguous();
  const int64_t B = x.size(0), D = B == 0 ? 0 : x.numel() / B;
  at::Tensor y = at::empty_like(xc);
  at::Tensor lad = at::empty({B}, x.options());
  if (x.numel() == 0) return {y, lad.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_cpu", [&] {
    dispatch_variant(kind, clamp.has_value(), inverse, [&](auto k, auto cl, auto inv) {
      forward_rows<decltype(k)::value, decltype(cl)::value, decltype(inv)::value, scalar_t>(
          xc.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
          y.data_ptr<scalar_t>(), lad.data_ptr<scalar_t>(), B, D, clamp.value_or(0.0));
    });
  });
  return {y, lad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logabsdet, const at::Tensor& x,
    const at::Tensor& shift, const std::optional<at::Tensor>& logits, int64_t scale_kind,
    std::optional<double> clamp, bool inverse) {
  const auto kind = check_affine_coupling_args(x, shift, logits, scale_kind, clamp);
  check_affine_coupling_grads(grad_y, grad_logabsdet, x);
  const at::Tensor xc = x.contiguous(), tc = shift.contiguous(), g = grad_y.contiguous();
  const at::Tensor gl = grad_logabsdet.contiguous();
  const at::Tensor sc = kind == kAdditive ? xc : logits->contiguous();
  const int64_t B = x.size(0), D = B == 0 ? 0 : x.numel() / B;
  at::Tensor g_in = at::empty_like(xc), g_shift = at::empty_like(xc);
  at::Tensor g_logits = kind == kAdditive ? at::empty({0}, x.options()) : at::empty_like(xc);
  if (x.numel() == 0) return {g_in, g_shift, g_logits};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_backward_cpu", [&] {
    dispatch_variant(kind, clamp.has_value(), inverse, [&](auto k, auto cl, auto inv) {
      backward_rows<decltype(k)::value, decltype(cl)::value, decltype(inv)::value, scalar_t>(
          g.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
          tc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), g_in.data_ptr<scalar_t>(),
          g_shift.data_ptr<scalar_t>(), kind == kAdditive ? nullptr : g_logits.data_ptr<scalar_t>(),
          B, D, clamp.value_or(0.0));
    });
  });
  return {g_in, g_shift, g_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("affine_coupling", &affine_coupling_cpu);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cpu);
}

}  // namespace nflux
