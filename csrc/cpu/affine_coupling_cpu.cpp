// CPU kernels of affine_coupling and affine_coupling_backward: parallel over rows, one pass
// over each row's features calling the element math in nflux/coupling.h, the row's logabsdet
// summed on the way. The backward pass recomputes the scale from the saved inputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// The row loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (the extension itself is built for baseline x86-64, so otherwise they would run 4-wide).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define NFLUX_ROW_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NFLUX_ROW_CLONES
#endif

// Independent partial sums, so the row reduction does not serialise on one add.
constexpr int kLanes = 8;
// Elements per chunk: the chunk's log-scales wait in a stack buffer for the row sums.
constexpr int64_t kChunk = 1024;

// The element loop of the forward (or inverse) pass over n contiguous elements: stores y and
// log(scale) and carries no reduction, so it vectorises for every scale kind (with the row sum
// fused in, GCC could not vectorise the sigmoid variant: it ran ~50x slower than exp).
template <int Kind, bool Clamped, bool Inverse, typename scalar_t, typename acc>
NFLUX_ROW_CLONES void forward_elements(const scalar_t* __restrict x, const scalar_t* __restrict shift,
                                       const scalar_t* __restrict logits, scalar_t* __restrict y,
                                       acc* __restrict log_scale, int64_t n, acc c, acc inv_c) {
  for (int64_t j = 0; j < n; ++j) {
    if (Kind == kAdditive) {
      y[j] = Inverse ? x[j] - shift[j] : x[j] + shift[j];
      continue;
    }
    const auto sc = coupling::eval_scale<Kind, Clamped, acc>(static_cast<acc>(logits[j]), c, inv_c);
    const acc v = static_cast<acc>(x[j]), t = static_cast<acc>(shift[j]);
    y[j] = static_cast<scalar_t>(Inverse ? (v - t) * sc.inv_scale : v * sc.scale + t);
    log_scale[j] = sc.log_scale;
  }
}

template <typename acc>
NFLUX_ROW_CLONES acc sum_elements(const acc* __restrict v, int64_t n) {
  acc part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += v[j + l];
  }
  for (; j < n; ++j) part[0] += v[j];
  acc total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// Rows [b0, b1) of the forward (or inverse) pass. Short rows are taken several at a time, as
// one flat element loop, so a row of 64 features does not pay the loop's set-up (constants,
// remainder) on its own; long rows go chunk by chunk.
template <int Kind, bool Clamped, bool Inverse, typename scalar_t, typename acc>
void forward_block(const scalar_t* x, const scalar_t* shift, const scalar_t* logits, scalar_t* y,
                   scalar_t* lad, int64_t b0, int64_t b1, int64_t D, acc c, acc inv_c) {
  alignas(64) acc log_scale[kChunk];
  if (Kind == kAdditive) {
    forward_elements<Kind, Clamped, Inverse>(x + b0 * D, shift + b0 * D, logits, y + b0 * D,
                                             log_scale, (b1 - b0) * D, c, inv_c);
    for (int64_t b = b0; b < b1; ++b) lad[b] = scalar_t(0);
    return;
  }
  const acc sign = Inverse ? acc(-1) : acc(1);
  if (D <= kChunk) {
    const int64_t rows_per_chunk = kChunk / D;
    for (int64_t r0 = b0; r0 < b1; r0 += rows_per_chunk) {
      const int64_t rows = std::min(rows_per_chunk, b1 - r0), o = r0 * D;
      forward_elements<Kind, Clamped, Inverse>(x + o, shift + o, logits + o, y + o, log_scale,
                                               rows * D, c, inv_c);
      for (int64_t r = 0; r < rows; ++r) {
        lad[r0 + r] = static_cast<scalar_t>(sign * sum_elements(log_scale + r * D, D));
      }
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    acc total = 0;
    for (int64_t j0 = 0; j0 < D; j0 += kChunk) {
      const int64_t n = std::min(kChunk, D - j0), o = b * D + j0;
      forward_elements<Kind, Clamped, Inverse>(x + o, shift + o, logits + o, y + o, log_scale, n,
                                               c, inv_c);
      total += sum_elements(log_scale, n);
    }
    lad[b] = static_cast<scalar_t>(sign * total);
  }
}

template <int Kind, bool Clamped, bool Inverse, typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* shift, const scalar_t* logits, scalar_t* y,
                  scalar_t* lad, int64_t B, int64_t D, double clamp) {
  using acc = acc_t<scalar_t>;
  const acc c = static_cast<acc>(clamp), inv_c = Clamped ? acc(1) / c : acc(0);
  at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    forward_block<Kind, Clamped, Inverse>(x, shift, logits, y, lad, b0, b1, D, c, inv_c);
  });
}

// Rows [b0, b1) of the backward pass (the row loop inside the multiversioned function, so the
// element loop's constants are set up once, not per row). g is the gradient of the op's first
// output (BroadcastGrad: one value for every element, as from y.sum(), read without
// materialising it); gl the rows' logabsdet gradients; `in` the saved input (x forward, y
// inverse).
template <int Kind, bool Clamped, bool Inverse, bool BroadcastGrad, typename scalar_t, typename acc>
NFLUX_ROW_CLONES void backward_block(const scalar_t* __restrict g, const scalar_t* __restrict gl,
                                     const scalar_t* __restrict in, const scalar_t* __restrict shift,
                                     const scalar_t* __restrict logits, scalar_t* __restrict g_in,
                                     scalar_t* __restrict g_shift, scalar_t* __restrict g_logits,
                                     int64_t b0, int64_t b1, int64_t D, acc c, acc inv_c) {
  const acc g0 = static_cast<acc>(g[0]);
  for (int64_t b = b0; b < b1; ++b) {
    const acc glad = static_cast<acc>(gl[b]);
    const int64_t o = b * D;
    for (int64_t j = o; j < o + D; ++j) {
      const acc gv = BroadcastGrad ? g0 : static_cast<acc>(g[j]);
      if (Kind == kAdditive) {
        g_in[j] = static_cast<scalar_t>(gv);
        if (Inverse) g_shift[j] = static_cast<scalar_t>(-gv);  // forward: grad_y itself, not written
        continue;
      }
      const auto sc = coupling::eval_scale<Kind, Clamped, acc>(static_cast<acc>(logits[j]), c, inv_c);
      const acc v = static_cast<acc>(in[j]);
      if (Inverse) {
        const acc x_out = (v - static_cast<acc>(shift[j])) * sc.inv_scale;
        const acc gy = coupling::times_grad(gv, sc.inv_scale);
        g_in[j] = static_cast<scalar_t>(gy);
        g_shift[j] = static_cast<scalar_t>(-gy);
        g_logits[j] = static_cast<scalar_t>(coupling::inverse_grad_logit(sc, x_out, gv, glad));
      } else {
        g_in[j] = static_cast<scalar_t>(coupling::times_grad(gv, sc.scale));
        g_logits[j] = static_cast<scalar_t>(coupling::forward_grad_logit(sc, v, gv, glad));
      }
    }
  }
}

template <int Kind, bool Clamped, bool Inverse, bool BroadcastGrad, typename scalar_t>
void backward_rows(const scalar_t* g, const scalar_t* gl, const scalar_t* in, const scalar_t* shift,
                   const scalar_t* logits, scalar_t* g_in, scalar_t* g_shift, scalar_t* g_logits,
                   int64_t B, int64_t D, double clamp) {
  using acc = acc_t<scalar_t>;
  const acc c = static_cast<acc>(clamp), inv_c = Clamped ? acc(1) / c : acc(0);
  at::parallel_for(0, B, row_grain(D), [&](int64_t b0, int64_t b1) {
    // The additive variant has no logits and no logits gradient: any pointer will do.
    backward_block<Kind, Clamped, Inverse, BroadcastGrad>(
        g, gl, in, shift, logits, g_in, g_shift == nullptr ? g_in : g_shift,
        g_logits == nullptr ? g_in : g_logits, b0, b1, D, c, inv_c);
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
  check_output_grads(grad_y, grad_logabsdet, x);
  // A gradient expanded from one value (the gradient of y.sum()) is read as that value.
  bool broadcast_grad = grad_y.numel() > 0;
  for (const auto st : grad_y.strides()) broadcast_grad = broadcast_grad && st == 0;
  const at::Tensor g = broadcast_grad ? grad_y : grad_y.contiguous();
  const at::Tensor xc = x.contiguous(), tc = shift.contiguous();
  const at::Tensor gl = grad_logabsdet.contiguous();
  const at::Tensor sc = kind == kAdditive ? xc : logits->contiguous();
  const int64_t B = x.size(0), D = B == 0 ? 0 : x.numel() / B;
  // Forward direction: grad_shift equals grad_y, so it is returned empty and not written.
  at::Tensor g_in = at::empty_like(xc);
  at::Tensor g_shift = inverse ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor g_logits = kind == kAdditive ? at::empty({0}, x.options()) : at::empty_like(xc);
  if (x.numel() == 0) return {g_in, g_shift, g_logits};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_backward_cpu", [&] {
    dispatch_variant(kind, clamp.has_value(), inverse, [&](auto k, auto cl, auto inv) {
      auto run = [&](auto bg) {
        backward_rows<decltype(k)::value, decltype(cl)::value, decltype(inv)::value,
                      decltype(bg)::value, scalar_t>(
            g.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
            tc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), g_in.data_ptr<scalar_t>(),
            inverse ? g_shift.data_ptr<scalar_t>() : nullptr,
            kind == kAdditive ? nullptr : g_logits.data_ptr<scalar_t>(), B, D,
            clamp.value_or(0.0));
      };
      if (broadcast_grad) run(std::true_type{});
      else run(std::false_type{});
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
