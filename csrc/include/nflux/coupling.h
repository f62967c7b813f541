// Affine coupling element math (NICE, RealNVP, Glow), shared by the CPU and CUDA kernels.
//   forward: y = x * scale + shift,   log|dy/dx| = log(scale)
//   inverse: x = (y - shift) / scale, log|dx/dy| = -log(scale)
// scale = f(u), u = clamp > 0 ? clamp * tanh(s / clamp) : s, s = the raw logit, with
//   Exp:     f(u) = exp(u)            (RealNVP)
//   Sigmoid: f(u) = sigmoid(u + 2)    (Glow)
// The scale kind and the clamp are template parameters so the kernels' inner loops carry no
// per-element branch on them.
#pragma once

#include "nflux/common.h"

namespace nflux {
namespace coupling {

// log(1 + z) for z in [0, 1], as the sigmoid's z = exp(-|v|) always is. 1 + z = 2^k (1 + f)
// with f in [sqrt(1/2) - 1, sqrt(2) - 1] takes one select, then log_poly's Cephes polynomial:
// none of log_poly's exponent extraction and special cases, which this range never needs.
NFLUX_HOST_DEVICE float log1p_unit(float z) {
#if defined(__CUDA_ARCH__)
  return log1pf(z);
#else
  const bool high = z > 0.41421356237309503f;  // 1 + z > sqrt(2): k = 1
  const float f = high ? (z - 1.0f) * 0.5f : z;
  const float k = high ? 1.0f : 0.0f;
  return log1p_reduced(f, k);
#endif
}

NFLUX_HOST_DEVICE double log1p_unit(double z) { return log1p(z); }

// Values of the Python/schema `scale_kind` int.
enum ScaleKind : int { kAdditive = 0, kExp = 1, kSigmoid = 2 };

// One element's scale, its log, and d log(scale) / d s (the chain through the clamp included).
template <typename T>
struct Scale {
  T scale, inv_scale, log_scale, dlog_ds;
};

template <int Kind, bool Clamped, typename T>
NFLUX_HOST_DEVICE Scale<T> eval_scale(T s, T clamp, T inv_clamp) {
  T u = s, du_ds = T(1);
  if (Clamped) {
    const T t = math_tanh(s * inv_clamp);
    u = clamp * t;
    du_ds = T(1) - t * t;
  }
  Scale<T> r;
  if (Kind == kExp) {
    r.scale = math_exp(u);
    r.inv_scale = math_exp(-u);
    r.log_scale = u;
    r.dlog_ds = du_ds;
  } else {
    // v = u + 2; sigmoid(v) and log sigmoid(v) from e = exp(-|v|), without overflow. One
    // reciprocal serves the scale and its derivative (one division per element, not three).
    const T v = u + T(2);
    const T e = math_exp(-(v < T(0) ? -v : v));
    const T one_e = T(1) + e;
    const T recip = T(1) / one_e;
    const T l1p = log1p_unit(e);
    const bool pos = v >= T(0);
    r.scale = pos ? recip : e * recip;
    // 1 / sigmoid(v) = 1 + exp(-v) for v < 0 directly: (1 + e) / e would divide by an e that
    // the exp flushed to 0 below ~1.7e-38 (v < -87.3), while exp(-v) is finite up to v = -88.7.
    r.inv_scale = pos ? one_e : T(1) + math_exp(-v);
    r.log_scale = pos ? -l1p : v - l1p;
    r.dlog_ds = (pos ? e * recip : recip) * du_ds;  // d log sigmoid(v)/dv = 1 - sigmoid(v)
  }
  return r;
}

// g * v, where a zero g contributes nothing even if v overflowed to inf: a zero cotangent is
// what autograd hands for an unused output, so the gradient of logabsdet alone stays finite
// where exp(s) or x = (y - shift) / scale leaves float range (the reference's graph never
// visits the unused product at all).
template <typename T>
NFLUX_HOST_DEVICE T times_grad(T g, T v) {
  return g == T(0) ? T(0) : g * v;
}

// Gradient of one element, forward direction (x in, y out):
//   gx = gy * scale, gshift = gy, gs = dlog_ds * (gy * x * scale + glad)
// (d scale / d s = scale * dlog_ds for both kinds). Inverse direction (y in,
// x = (y - shift) / scale out): gy = gx / scale, gshift = -gx / scale,
// gs = -dlog_ds * (gx * x + glad). The kernels write gx and gshift inline; gs is below.
template <typename T>
NFLUX_HOST_DEVICE T forward_grad_logit(const Scale<T>& sc, T x, T gy, T glad) {
  return sc.dlog_ds * (times_grad(gy * x, sc.scale) + glad);
}

template <typename T>
NFLUX_HOST_DEVICE T inverse_grad_logit(const Scale<T>& sc, T x_out, T gx, T glad) {
  return -sc.dlog_ds * (times_grad(gx, x_out) + glad);
}

}  // namespace coupling
}  // namespace nflux
