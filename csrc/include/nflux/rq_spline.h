// Monotonic rational-quadratic spline with linear tails (Durkan et al. 2019, "Neural Spline
// Flows"), one element at a time. The CPU and CUDA kernels both call these functions, so the
// formulas exist once. Parameterisation matches the NSF authors' reference:
//   widths/heights = min + (1 - min*K) * softmax(logits), laid over [-B, B];
//   interior derivatives = min_derivative + softplus(logits), boundary derivatives = 1, so the
//   spline joins the identity tails smoothly; identity with log|det| = 0 outside [-B, B].
#pragma once

#include "nflux/common.h"

namespace nflux {
namespace rq {

template <typename acc_t>
struct Options {
  acc_t tail_bound;
  acc_t min_bin_width;
  acc_t min_bin_height;
  acc_t min_derivative;
};

// Scratch an element needs, in accumulation-type slots, for the forward/inverse pass and the
// backward pass. Kernels provide it (a stack buffer on CPU, registers/local memory on CUDA).
NFLUX_HOST_DEVICE int64_t forward_scratch(int64_t K) { return 2 * (K + 1); }
NFLUX_HOST_DEVICE int64_t backward_scratch(int64_t K) { return 4 * K + 2; }

// knots[0..K] = lo + range * cumsum(min_size + (1 - min_size*K) * softmax(logits)), with the
// first and last knots exactly lo and lo + range. If probs is given, it receives softmax(logits).
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE void softmax_knots(const scalar_t* logits, int64_t K, acc_t lo, acc_t range,
                                     acc_t min_size, acc_t* knots, acc_t* probs) {
  acc_t m = static_cast<acc_t>(logits[0]);
  for (int64_t k = 1; k < K; ++k) m = max_of(m, static_cast<acc_t>(logits[k]));
  acc_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t e = math_exp(static_cast<acc_t>(logits[k]) - m);
    knots[k + 1] = e;  // the exponentials wait in the knot slots until normalised
    total += e;
  }
  const acc_t inv_total = acc_t(1) / total;
  const acc_t spread = acc_t(1) - min_size * static_cast<acc_t>(K);
  acc_t cumulative = 0;
  knots[0] = lo;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t p = knots[k + 1] * inv_total;
    if (probs != nullptr) probs[k] = p;
    cumulative += min_size + spread * p;
    knots[k + 1] = lo + range * cumulative;
  }
  knots[K] = lo + range;
}

// The bin b in [0, K-1] with knots[b] <= v < knots[b+1]; v == knots[K] falls in the last bin.
// Branch-free binary search: the comparisons become conditional moves.
template <typename acc_t>
NFLUX_HOST_DEVICE int64_t find_bin(const acc_t* knots, int64_t K, acc_t v) {
  int64_t lo = 0, hi = K;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    const bool right = v >= knots[mid];
    lo = right ? mid : lo;
    hi = right ? hi : mid;
  }
  return lo;
}

// Derivative of the spline at knot i in [0, K].
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE acc_t knot_derivative(const scalar_t* derivative_logits, int64_t K, int64_t i,
                                        acc_t min_derivative) {
  if (i <= 0 || i >= K) return acc_t(1);
  return min_derivative + softplus(static_cast<acc_t>(derivative_logits[i - 1]));
}

// One bin: its left knot (cw, ch), size (w, h) and the derivatives at its two knots.
template <typename acc_t>
struct Bin {
  acc_t cw, w, ch, h, d0, d1;
};

// The bin b cut out of the knot partitions, with the derivatives at its two knots.
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE Bin<acc_t> bin_at(const acc_t* wknots, const acc_t* hknots, const scalar_t* ud,
                                    int64_t K, int64_t b, acc_t min_derivative) {
  Bin<acc_t> bin;
  bin.cw = wknots[b];
  bin.w = wknots[b + 1] - wknots[b];
  bin.ch = hknots[b];
  bin.h = hknots[b + 1] - hknots[b];
  bin.d0 = knot_derivative(ud, K, b, min_derivative);
  bin.d1 = knot_derivative(ud, K, b + 1, min_derivative);
  return bin;
}

// Spline value and log dy/dx at theta = (x - cw) / w in [0, 1].
template <typename acc_t>
NFLUX_HOST_DEVICE void bin_forward(const Bin<acc_t>& b, acc_t theta, acc_t& y, acc_t& logabsdet) {
  const acc_t s = b.h / b.w;
  const acc_t omt = acc_t(1) - theta;
  const acc_t t = theta * omt;
  const acc_t numerator = b.h * (s * theta * theta + b.d0 * t);
  const acc_t denominator = s + (b.d0 + b.d1 - acc_t(2) * s) * t;
  y = b.ch + numerator / denominator;
  const acc_t slope_numerator =
      s * s * (b.d1 * theta * theta + acc_t(2) * s * t + b.d0 * omt * omt);
  logabsdet = math_log(slope_numerator) - acc_t(2) * math_log(denominator);
}

// theta in [0, 1] of the bin point whose value is y: the numerically stable root of the
// quadratic, with y clamped into the bin and the discriminant clamped at 0 first.
template <typename acc_t>
NFLUX_HOST_DEVICE acc_t bin_inverse_theta(const Bin<acc_t>& b, acc_t y) {
  const acc_t s = b.h / b.w;
  const acc_t dy = clamp_to(y - b.ch, acc_t(0), b.h);
  const acc_t curvature = b.d0 + b.d1 - acc_t(2) * s;
  const acc_t qa = dy * curvature + b.h * (s - b.d0);
  const acc_t qb = b.h * b.d0 - dy * curvature;
  const acc_t qc = -s * dy;
  const acc_t discriminant = max_of(qb * qb - acc_t(4) * qa * qc, acc_t(0));
  // For dy in [0, h] and s > 0 the denominator -qb - sqrt(disc) is strictly negative: no 0/0.
  const acc_t root = (acc_t(2) * qc) / (-qb - math_sqrt(discriminant));
  return clamp_to(root, acc_t(0), acc_t(1));
}

// Gradients of a loss through y = bin value and l = log dy/dx at theta, given dL/dy = gy and
// dL/dl = gl, with respect to x and the bin's six quantities.
template <typename acc_t>
struct BinGrad {
  acc_t x, cw, w, ch, h, d0, d1;
};

template <typename acc_t>
NFLUX_HOST_DEVICE BinGrad<acc_t> bin_vjp(const Bin<acc_t>& b, acc_t theta, acc_t gy, acc_t gl) {
  const acc_t s = b.h / b.w;
  const acc_t omt = acc_t(1) - theta;
  const acc_t t = theta * omt;
  const acc_t dt = acc_t(1) - acc_t(2) * theta;  // dt/dtheta
  const acc_t curvature = b.d0 + b.d1 - acc_t(2) * s;
  const acc_t shape = s * theta * theta + b.d0 * t;
  const acc_t numerator = b.h * shape;
  const acc_t denominator = s + curvature * t;
  const acc_t slope_poly = b.d1 * theta * theta + acc_t(2) * s * t + b.d0 * omt * omt;
  const acc_t slope_numerator = s * s * slope_poly;

  const acc_t g_num = gy / denominator;
  const acc_t g_den = -(gy * numerator / denominator + acc_t(2) * gl) / denominator;
  const acc_t g_slope = gl / slope_numerator;

  const acc_t g_theta =
      g_num * b.h * (acc_t(2) * s * theta + b.d0 * dt) + g_den * curvature * dt +
      g_slope * s * s * acc_t(2) * (b.d1 * theta + s * dt - b.d0 * omt);
  const acc_t g_s = g_num * b.h * theta * theta + g_den * (acc_t(1) - acc_t(2) * t) +
                    g_slope * acc_t(2) * s * (slope_poly + s * t);

  BinGrad<acc_t> g;
  g.x = g_theta / b.w;
  g.cw = -g.x;
  g.w = -(g_theta * theta + g_s * s) / b.w;
  g.ch = gy;
  g.h = g_num * shape + g_s / b.w;
  g.d0 = (g_num * b.h + g_den) * t + g_slope * s * s * omt * omt;
  g.d1 = g_den * t + g_slope * s * s * theta * theta;
  return g;
}

// dy/dx and d(log dy/dx)/dx at theta; the inverse pass's backward needs both.
template <typename acc_t>
NFLUX_HOST_DEVICE void bin_slope(const Bin<acc_t>& b, acc_t theta, acc_t& dydx, acc_t& dlogdx) {
  const acc_t s = b.h / b.w;
  const acc_t omt = acc_t(1) - theta;
  const acc_t t = theta * omt;
  const acc_t dt = acc_t(1) - acc_t(2) * theta;
  const acc_t curvature = b.d0 + b.d1 - acc_t(2) * s;
  const acc_t denominator = s + curvature * t;
  const acc_t slope_numerator =
      s * s * (b.d1 * theta * theta + acc_t(2) * s * t + b.d0 * omt * omt);
  dydx = slope_numerator / (denominator * denominator);
  const acc_t d_slope = s * s * acc_t(2) * (b.d1 * theta + s * dt - b.d0 * omt);
  dlogdx = (d_slope / slope_numerator - acc_t(2) * curvature * dt / denominator) / b.w;
}

template <typename acc_t>
NFLUX_HOST_DEVICE bool inside(acc_t v, acc_t tail_bound) {
  return v >= -tail_bound && v <= tail_bound;
}

// Forward (x -> y, log dy/dx) or inverse (y -> x, log dx/dy) of one element.
// scratch: forward_scratch(K) slots.
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE void evaluate(acc_t v, const scalar_t* uw, const scalar_t* uh, const scalar_t* ud,
                                int64_t K, bool inverse, const Options<acc_t>& opt, acc_t* scratch,
                                acc_t& out, acc_t& logabsdet) {
  const acc_t B = opt.tail_bound;
  if (!inside(v, B)) {  // identity tails; NaN lands here and stays NaN in both outputs
    out = v;
    logabsdet = is_nan(v) ? v : acc_t(0);
    return;
  }
  acc_t* wknots = scratch;
  acc_t* hknots = scratch + (K + 1);
  softmax_knots(uw, K, -B, acc_t(2) * B, opt.min_bin_width, wknots, static_cast<acc_t*>(nullptr));
  softmax_knots(uh, K, -B, acc_t(2) * B, opt.min_bin_height, hknots, static_cast<acc_t*>(nullptr));
  const int64_t b = find_bin(inverse ? hknots : wknots, K, v);
  const Bin<acc_t> bin = bin_at(wknots, hknots, ud, K, b, opt.min_derivative);
  if (!inverse) {
    const acc_t theta = clamp_to((v - bin.cw) / bin.w, acc_t(0), acc_t(1));
    bin_forward(bin, theta, out, logabsdet);
  } else {
    const acc_t theta = bin_inverse_theta(bin, v);
    out = bin.cw + theta * bin.w;
    acc_t y_unused;
    bin_forward(bin, theta, y_unused, logabsdet);
    logabsdet = -logabsdet;
  }
}

// Spreads the gradients on knot b (g_left) and knot b+1 (g_right) of a softmax_knots partition
// back to its logits: grad[k] = d loss / d logits[k] for all k.
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE void knots_vjp(const acc_t* probs, int64_t K, int64_t b, acc_t range,
                                 acc_t min_size, acc_t g_left, acc_t g_right, scalar_t* grad) {
  // knot j = lo + range * (min*j + spread * sum_{i<j} p_i), so d knot_j / d p_i = range*spread*[i<j].
  const acc_t scale = range * (acc_t(1) - min_size * static_cast<acc_t>(K));
  acc_t below = 0;  // sum_{i<b} p_i
  for (int64_t i = 0; i < b; ++i) below += probs[i];
  const acc_t g_before = scale * (g_left + g_right);  // d loss / d p_i for i < b
  const acc_t g_at = scale * g_right;                 // for i == b
  const acc_t mean = g_before * below + g_at * probs[b];
  for (int64_t i = 0; i < K; ++i) {
    const acc_t g_p = i < b ? g_before : (i == b ? g_at : acc_t(0));
    grad[i] = static_cast<scalar_t>(probs[i] * (g_p - mean));
  }
}

// Backward of evaluate: given dL/dout and dL/dlogabsdet, the gradients with respect to the
// input and the three logit tensors of one element (all K, K, K-1 entries are written).
// scratch: backward_scratch(K) slots.
template <typename acc_t, typename scalar_t>
NFLUX_HOST_DEVICE void evaluate_backward(acc_t v, const scalar_t* uw, const scalar_t* uh,
                                         const scalar_t* ud, int64_t K, bool inverse,
                                         const Options<acc_t>& opt, acc_t g_out, acc_t g_lad,
                                         acc_t* scratch, acc_t& g_v, scalar_t* g_uw,
                                         scalar_t* g_uh, scalar_t* g_ud) {
  const acc_t B = opt.tail_bound;
  if (!inside(v, B)) {
    g_v = g_out;
    for (int64_t k = 0; k < K; ++k) g_uw[k] = g_uh[k] = scalar_t(0);
    for (int64_t k = 0; k + 1 < K; ++k) g_ud[k] = scalar_t(0);
    return;
  }
  acc_t* wknots = scratch;
  acc_t* hknots = wknots + (K + 1);
  acc_t* wprobs = hknots + (K + 1);
  acc_t* hprobs = wprobs + K;
  const acc_t range = acc_t(2) * B;
  softmax_knots(uw, K, -B, range, opt.min_bin_width, wknots, wprobs);
  softmax_knots(uh, K, -B, range, opt.min_bin_height, hknots, hprobs);
  const int64_t b = find_bin(inverse ? hknots : wknots, K, v);
  const Bin<acc_t> bin = bin_at(wknots, hknots, ud, K, b, opt.min_derivative);

  BinGrad<acc_t> g;
  if (!inverse) {
    const acc_t theta = clamp_to((v - bin.cw) / bin.w, acc_t(0), acc_t(1));
    g = bin_vjp(bin, theta, g_out, g_lad);
    g_v = g.x;
  } else {
    // x = f^-1(y): dL/dy = (g_x - g_lad * dlog f'/dx) / f'(x), and the parameters see the
    // forward vjp with upstream (-dL/dy, -g_lad) (implicit function theorem).
    const acc_t theta = bin_inverse_theta(bin, v);
    acc_t dydx, dlogdx;
    bin_slope(bin, theta, dydx, dlogdx);
    const acc_t g_y = (g_out - g_lad * dlogdx) / dydx;
    g = bin_vjp(bin, theta, -g_y, -g_lad);
    g_v = g_y;
  }
  // cw = wknots[b], w = wknots[b+1] - wknots[b]; likewise for heights.
  knots_vjp(wprobs, K, b, range, opt.min_bin_width, g.cw - g.w, g.w, g_uw);
  knots_vjp(hprobs, K, b, range, opt.min_bin_height, g.ch - g.h, g.h, g_uh);
  for (int64_t k = 0; k + 1 < K; ++k) g_ud[k] = scalar_t(0);
  if (b >= 1) g_ud[b - 1] = static_cast<scalar_t>(g.d0 * sigmoid(static_cast<acc_t>(ud[b - 1])));
  if (b + 1 <= K - 1) g_ud[b] = static_cast<scalar_t>(g.d1 * sigmoid(static_cast<acc_t>(ud[b])));
}

}  // namespace rq
}  // namespace nflux
