// The CPU loops of rq_spline, compiled once per instruction set (rq_spline_lanes_*.cpp) and
// chosen at run time by rq_spline_cpu.cpp. These files include no torch header, so no torch
// inline function is ever compiled with AVX2 and then shared with generic code.
#pragma once

#include <cstdint>

#include "nflux/common.h"

namespace nflux {

template <typename scalar_t>
struct RqSplineCall {
  // Forward reads x, uw, uh, ud and writes y, lad. Backward also reads g_out, g_lad and writes
  // g_x, g_uw, g_uh, g_ud. All contiguous: x [n], uw/uh [n, K], ud [n, K-1].
  const scalar_t *x, *uw, *uh, *ud;
  scalar_t *y, *lad;
  const scalar_t *g_out, *g_lad;
  scalar_t *g_x, *g_uw, *g_uh, *g_ud;
  int64_t K;
  bool inverse;
  double tail_bound, min_bin_width, min_bin_height, min_derivative;
};

#define NFLUX_DECLARE_RQ_SPLINE_LANES(isa)                                                 \
  namespace isa {                                                                         \
  void rq_spline_forward_range(const RqSplineCall<float>& call, int64_t begin, int64_t end);  \
  void rq_spline_forward_range(const RqSplineCall<double>& call, int64_t begin, int64_t end); \
  void rq_spline_backward_range(const RqSplineCall<float>& call, int64_t begin, int64_t end); \
  void rq_spline_backward_range(const RqSplineCall<double>& call, int64_t begin, int64_t end);\
  }

NFLUX_DECLARE_RQ_SPLINE_LANES(generic)
#if defined(NFLUX_HAVE_X86_SIMD)
NFLUX_DECLARE_RQ_SPLINE_LANES(avx2)
NFLUX_DECLARE_RQ_SPLINE_LANES(avx512)
#endif

}  // namespace nflux
