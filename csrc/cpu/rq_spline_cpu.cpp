// CPU glue of rq_spline and rq_spline_backward: checks, then a parallel loop over elements
// that runs the SIMD lanes of rq_spline_lanes_<isa>.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>

#include "../checks.h"
#include "rq_spline_lanes.h"

namespace nflux {
namespace {

// Elements per parallel task: enough that thread wake-up is amortised.
constexpr int64_t kGrainSize = 4096;

enum class Isa { generic, avx2, avx512 };

// The widest SIMD copy of the loops this CPU runs; NFLUX_CPU_ISA=generic|avx2|avx512 caps it
// (tests use that to cover every copy).
Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(NFLUX_HAVE_X86_SIMD)
    const char* cap = std::getenv("NFLUX_CPU_ISA");
    const std::string want = cap != nullptr ? cap : "avx512";
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    if (want == "avx512" && avx512) return Isa::avx512;
    if ((want == "avx512" || want == "avx2") && avx2) return Isa::avx2;
#endif
    return Isa::generic;
  }();
  return isa;
}

template <typename scalar_t>
void run_forward(const RqSplineCall<scalar_t>& call, int64_t n) {
  const Isa isa = cpu_isa();
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
#if defined(NFLUX_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return avx512::rq_spline_forward_range(call, begin, end);
    if (isa == Isa::avx2) return avx2::rq_spline_forward_range(call, begin, end);
#endif
    generic::rq_spline_forward_range(call, begin, end);
  });
}

template <typename scalar_t>
void run_backward(const RqSplineCall<scalar_t>& call, int64_t n) {
  const Isa isa = cpu_isa();
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
#if defined(NFLUX_HAVE_X86_SIMD)
    if (isa == Isa::avx512) return avx512::rq_spline_backward_range(call, begin, end);
    if (isa == Isa::avx2) return avx2::rq_spline_backward_range(call, begin, end);
#endif
    generic::rq_spline_backward_range(call, begin, end);
  });
}

// The inputs and options both directions share; each caller adds its output pointers.
template <typename scalar_t>
RqSplineCall<scalar_t> inputs_call(const at::Tensor& x, const at::Tensor& uw, const at::Tensor& uh,
                                   const at::Tensor& ud, int64_t K, bool inverse,
                                   double tail_bound, double min_bin_width, double min_bin_height,
                                   double min_derivative) {
  RqSplineCall<scalar_t> call{};
  call.x = x.data_ptr<scalar_t>();
  call.uw = uw.data_ptr<scalar_t>();
  call.uh = uh.data_ptr<scalar_t>();
  call.ud = ud.data_ptr<scalar_t>();
  call.K = K;
  call.inverse = inverse;
  call.tail_bound = tail_bound;
  call.min_bin_width = min_bin_width;
  call.min_bin_height = min_bin_height;
  call.min_derivative = min_derivative;
  return call;
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
    auto call = inputs_call<scalar_t>(x, uw, uh, ud, K, inverse, tail_bound, min_bin_width,
                                      min_bin_height, min_derivative);
    call.y = out.data_ptr<scalar_t>();
    call.lad = logabsdet.data_ptr<scalar_t>();
    run_forward(call, n);
  });
  return {out, logabsdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rq_spline_backward_cpu(
    const at::Tensor& grad_outputs, const at::Tensor& grad_logabsdet, const at::Tensor& inputs,
    const at::Tensor& widths, const at::Tensor& heights, const at::Tensor& derivatives,
    bool inverse, double tail_bound, double min_bin_width, double min_bin_height,
    double min_derivative) {
  const int64_t K = check_rq_spline_backward_args(grad_outputs, grad_logabsdet, inputs, widths,
                                                  heights, derivatives, tail_bound, min_bin_width,
                                                  min_bin_height, min_derivative);
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
    auto call = inputs_call<scalar_t>(x, uw, uh, ud, K, inverse, tail_bound, min_bin_width,
                                      min_bin_height, min_derivative);
    call.g_out = go.data_ptr<scalar_t>();
    call.g_lad = gl.data_ptr<scalar_t>();
    call.g_x = gx.data_ptr<scalar_t>();
    call.g_uw = gw.data_ptr<scalar_t>();
    call.g_uh = gh.data_ptr<scalar_t>();
    call.g_ud = gd.data_ptr<scalar_t>();
    run_backward(call, n);
  });
  return {gx, gw, gh, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) {
  m.impl("rq_spline", &rq_spline_cpu);
  m.impl("rq_spline_backward", &rq_spline_backward_cpu);
}

}  // namespace nflux
