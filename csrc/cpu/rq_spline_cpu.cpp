// CPU kernels of rq_spline and rq_spline_backward: a parallel loop over elements calling the
// shared per-element math in nflux/rq_spline.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "nflux/rq_spline.h"

namespace nflux {
namespace {

// Enough elements per task that the scratch allocation and thread wake-up are amortised.
constexpr int64_t kGrainSize = 2048;

template <typename acc_t>
rq::Options<acc_t> make_options(double tail_bound, double min_w, double min_h, double min_d) {
  return {static_cast<acc_t>(tail_bound), static_cast<acc_t>(min_w), static_cast<acc_t>(min_h),
          static_cast<acc_t>(min_d)};
}

std::tuple<at::Tensor, at::Tensor> rq_spline_cpu(const at::Tensor& inputs,
                                                 const at::Tensor& widths,
                                                 const at::Tensor& heights,
                                                 const at::Tensor& derivatives, bool inverse,
                                                 double tail_bound, double min_bin_width,
                                                 double min_bin_height, double min_derivative) {
  const int64_t K = check_rq_spline_args(inputs, widths, heights, derivatives, tail_bound,
                                         min_bin_width, min_bin_height, min_derivative);
  const at::Tensor x = inputs.contiguous();
  const at::Tensor uw = widths.contiguous();
  const at::Tensor uh = heights.contiguous();
  const at::Tensor ud = derivatives.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor logabsdet = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {out, logabsdet};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rq_spline_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto opt = make_options<acc>(tail_bound, min_bin_width, min_bin_height, min_derivative);
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pw = uw.data_ptr<scalar_t>();
    const scalar_t* ph = uh.data_ptr<scalar_t>();
    const scalar_t* pd = ud.data_ptr<scalar_t>();
    scalar_t* py = out.data_ptr<scalar_t>();
    scalar_t* pl = logabsdet.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(rq::forward_scratch(K));
      for (int64_t i = begin; i < end; ++i) {
        acc y, lad;
        rq::evaluate(static_cast<acc>(px[i]), pw + i * K, ph + i * K, pd + i * (K - 1), K,
                     inverse, opt, scratch.data(), y, lad);
        py[i] = static_cast<scalar_t>(y);
        pl[i] = static_cast<scalar_t>(lad);
      }
    });
  });
  return {out, logabsdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rq_spline_backward_cpu(
    const at::Tensor& grad_outputs, const at::Tensor& grad_logabsdet, const at::Tensor& inputs,
    const at::Tensor& widths, const at::Tensor& heights, const at::Tensor& derivatives,
    bool inverse, double tail_bound, double min_bin_width, double min_bin_height,
    double min_derivative) {
  const int64_t K = check_rq_spline_args(inputs, widths, heights, derivatives, tail_bound,
                                         min_bin_width, min_bin_height, min_derivative);
  TORCH_CHECK(grad_outputs.sizes() == inputs.sizes() && grad_logabsdet.sizes() == inputs.sizes(),
              "nflux: rq_spline_backward gradients must have the shape of inputs ", inputs.sizes(),
              ", got ", grad_outputs.sizes(), " and ", grad_logabsdet.sizes());
  check_same_dtype_device(grad_outputs, inputs, "grad_outputs", "inputs");
  check_same_dtype_device(grad_logabsdet, inputs, "grad_logabsdet", "inputs");
  const at::Tensor x = inputs.contiguous();
  const at::Tensor uw = widths.contiguous();
  const at::Tensor uh = heights.contiguous();
  const at::Tensor ud = derivatives.contiguous();
  const at::Tensor go = grad_outputs.contiguous();
  const at::Tensor gl = grad_logabsdet.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(uw);
  at::Tensor gh = at::empty_like(uh);
  at::Tensor gd = at::empty_like(ud);
  const int64_t n = x.numel();
  if (n == 0) return {gx, gw, gh, gd};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rq_spline_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto opt = make_options<acc>(tail_bound, min_bin_width, min_bin_height, min_derivative);
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pw = uw.data_ptr<scalar_t>();
    const scalar_t* ph = uh.data_ptr<scalar_t>();
    const scalar_t* pd = ud.data_ptr<scalar_t>();
    const scalar_t* pgo = go.data_ptr<scalar_t>();
    const scalar_t* pgl = gl.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    scalar_t* pgw = gw.data_ptr<scalar_t>();
    scalar_t* pgh = gh.data_ptr<scalar_t>();
    scalar_t* pgd = gd.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(rq::backward_scratch(K));
      for (int64_t i = begin; i < end; ++i) {
        acc g_in;
        rq::evaluate_backward(static_cast<acc>(px[i]), pw + i * K, ph + i * K, pd + i * (K - 1),
                              K, inverse, opt, static_cast<acc>(pgo[i]), static_cast<acc>(pgl[i]),
                              scratch.data(), g_in, pgw + i * K, pgh + i * K,
                              pgd + i * (K - 1));
        pgx[i] = static_cast<scalar_t>(g_in);
      }
    });
  });
  return {gx, gw, gh, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("rq_spline", &rq_spline_cpu);
  m.impl("rq_spline_backward", &rq_spline_backward_cpu);
}

}  // namespace nflux
