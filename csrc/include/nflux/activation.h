// Hidden-layer activations of a MADE (relu, elu, tanh, gelu with erf, as torch's defaults) and
// their derivatives, shared by the CPU and CUDA made_inverse kernels.
#pragma once

#include "nflux/common.h"

namespace nflux {
inline namespace NFLUX_ISA_NAMESPACE {
namespace activation {

// Values of the kind passed to the kernels (the op takes the name).
enum Kind : int { kRelu = 0, kElu = 1, kTanh = 2, kGelu = 3 };

NFLUX_HOST_DEVICE float math_expm1(float v) { return expm1f(v); }
NFLUX_HOST_DEVICE double math_expm1(double v) { return expm1(v); }
NFLUX_HOST_DEVICE float math_erf(float v) { return erff(v); }
NFLUX_HOST_DEVICE double math_erf(double v) { return erf(v); }

template <int A, typename T>
NFLUX_HOST_DEVICE T apply(T v) {
  if (A == kRelu) return v <= T(0) ? T(0) : v;  // NaN stays NaN, as torch.relu
  if (A == kElu) return v > T(0) ? v : math_expm1(v);
  if (A == kTanh) return math_tanh(v);
  return T(0.5) * v * (T(1) + math_erf(v * T(0.70710678118654752440)));
}

// d act / d pre, given pre and post = act(pre) (whichever is cheaper). relu'(0) = 0 and a NaN
// pre passes the gradient on, as torch's threshold_backward.
template <int A, typename T>
NFLUX_HOST_DEVICE T slope(T pre, T post) {
  if (A == kRelu) return pre <= T(0) ? T(0) : T(1);
  if (A == kElu) return pre > T(0) ? T(1) : post + T(1);
  if (A == kTanh) return T(1) - post * post;
  // gelu: Phi(x) + x phi(x)
  return T(0.5) * (T(1) + math_erf(pre * T(0.70710678118654752440))) +
         pre * T(0.39894228040143267794) * math_exp(T(-0.5) * pre * pre);
}

template <typename T>
NFLUX_HOST_DEVICE T apply(int kind, T v) {
  switch (kind) {
    case kRelu: return apply<kRelu>(v);
    case kElu: return apply<kElu>(v);
    case kTanh: return apply<kTanh>(v);
    default: return apply<kGelu>(v);
  }
}

template <typename T>
NFLUX_HOST_DEVICE T slope(int kind, T pre, T post) {
  switch (kind) {
    case kRelu: return slope<kRelu>(pre, post);
    case kElu: return slope<kElu>(pre, post);
    case kTanh: return slope<kTanh>(pre, post);
    default: return slope<kGelu>(pre, post);
  }
}

}  // namespace activation
}  // namespace NFLUX_ISA_NAMESPACE
}  // namespace nflux
