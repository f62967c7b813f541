// Monotonic rational-quadratic spline with linear tails (Durkan et al. 2019, "Neural Spline
// Flows"). The CPU and CUDA kernels both call these functions, so the formulas exist once.
// Parameterisation matches the NSF authors' reference:
//   widths/heights = min + (1 - min*K) * softmax(logits), laid over [-B, B];
//   interior derivatives = min_derivative + softplus(logits), boundary derivatives = 1, so the
//   spline joins the identity tails smoothly; identity with log|det| = 0 outside [-B, B].
//
// Lanes: the functions work on L elements side by side, quantity k of lane l stored at
// [k * L + l]. A CUDA thread is one lane (L = 1, the row of logits read in place); the CPU
// kernel transposes L rows so that every loop over l vectorises.
#pragma once

#include "nflux/common.h"

namespace nflux {
inline namespace NFLUX_ISA_NAMESPACE {
namespace rq {

template <typename acc_t>
struct Options {
  acc_t tail_bound;
  acc_t min_bin_width;
  acc_t min_bin_height;
  acc_t min_derivative;
};

// Scratch slots (of acc_t, per lane) for evaluate and evaluate_backward.
NFLUX_HOST_DEVICE int64_t forward_scratch(int64_t K) { return 2 * (K + 1); }
NFLUX_HOST_DEVICE int64_t backward_scratch(int64_t K) { return 4 * K + 2; }

template <typename acc_t>
NFLUX_HOST_DEVICE bool inside(acc_t v, acc_t tail_bound) {
  return v >= -tail_bound && v <= tail_bound;
}

// knots[0..K] = lo + range * cumsum(min_size + (1 - min_size*K) * softmax(logits)), the first
// and last knots exactly lo and lo + range. If probs is given it receives softmax(logits).
template <int L, typename acc_t, typename in_t>
NFLUX_HOST_DEVICE void softmax_knots(const in_t* NFLUX_RESTRICT logits, int64_t K, acc_t lo,
                                     acc_t range, acc_t min_size, acc_t* NFLUX_RESTRICT knots,
                                     acc_t* NFLUX_RESTRICT probs) {
  acc_t top[L], scale[L], cumulative[L];
  NFLUX_LANES for (int l = 0; l < L; ++l) top[l] = static_cast<acc_t>(logits[l]);
  for (int64_t k = 1; k < K; ++k)
    NFLUX_LANES for (int l = 0; l < L; ++l) top[l] = max_of(top[l], static_cast<acc_t>(logits[k * L + l]));
  NFLUX_LANES for (int l = 0; l < L; ++l) scale[l] = 0;
  for (int64_t k = 0; k < K; ++k) {
    NFLUX_LANES for (int l = 0; l < L; ++l) {
      const acc_t e = math_exp_nonpositive(static_cast<acc_t>(logits[k * L + l]) - top[l]);
      knots[(k + 1) * L + l] = e;  // the exponentials wait in the knot slots until normalised
      scale[l] += e;
    }
  }
  const acc_t spread = acc_t(1) - min_size * static_cast<acc_t>(K);
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    scale[l] = acc_t(1) / scale[l];
    cumulative[l] = 0;
    knots[l] = lo;
  }
  if (probs != nullptr) {
    for (int64_t k = 0; k < K; ++k)
      NFLUX_LANES for (int l = 0; l < L; ++l) probs[k * L + l] = knots[(k + 1) * L + l] * scale[l];
  }
  for (int64_t k = 0; k < K; ++k) {
    NFLUX_LANES for (int l = 0; l < L; ++l) {
      cumulative[l] += min_size + spread * (knots[(k + 1) * L + l] * scale[l]);
      knots[(k + 1) * L + l] = lo + range * cumulative[l];
    }
  }
  NFLUX_LANES for (int l = 0; l < L; ++l) knots[K * L + l] = lo + range;
}

// The bin b in [0, K-1] of lane l with knots[b] <= v < knots[b+1]; v == knots[K] falls in the
// last bin. Binary search whose comparisons become conditional moves.
template <int L, typename acc_t>
NFLUX_HOST_DEVICE int64_t find_bin(const acc_t* knots, int64_t K, acc_t v, int l) {
  int64_t lo = 0, hi = K;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    const bool right = v >= knots[mid * L + l];
    lo = right ? mid : lo;
    hi = right ? hi : mid;
  }
  return lo;
}

// One bin: its left knot (cw, ch), size (w, h) and the derivatives at its two knots.
template <typename acc_t>
struct Bin {
  acc_t cw, w, ch, h, d0, d1;
};

// The bins of L lanes, one array per quantity so that loops over lanes vectorise.
template <int L, typename acc_t>
struct Bins {
  int32_t index[L];
  acc_t cw[L], cw1[L], ch[L], ch1[L], d0[L], d1[L];  // left and right knots, derivatives
  acc_t raw0[L], raw1[L];  // logits of d0 and d1 (unused at the boundary knots)

  NFLUX_HOST_DEVICE Bin<acc_t> operator[](int l) const {
    return {cw[l], cw1[l] - cw[l], ch[l], ch1[l] - ch[l], d0[l], d1[l]};
  }
};

// Finds each lane's bin (v in knots of widths, or of heights when inverse) and gathers its
// knots and its two knot derivatives (1 at the boundary knots, where the tails join).
template <int L, typename acc_t, typename in_t>
NFLUX_HOST_DEVICE void locate_bins(const acc_t* NFLUX_RESTRICT wknots,
                                   const acc_t* NFLUX_RESTRICT hknots,
                                   const in_t* NFLUX_RESTRICT ud, int64_t K,
                                   const acc_t* NFLUX_RESTRICT v, bool inverse,
                                   acc_t min_derivative, Bins<L, acc_t>& bins) {
  const acc_t* search = inverse ? hknots : wknots;
  acc_t* raw0 = bins.raw0;
  acc_t* raw1 = bins.raw1;
  if constexpr (L == 1) {
    const int64_t b = find_bin<1>(search, K, v[0], 0);
    bins.index[0] = static_cast<int32_t>(b);
    bins.cw[0] = wknots[b];
    bins.cw1[0] = wknots[b + 1];
    bins.ch[0] = hknots[b];
    bins.ch1[0] = hknots[b + 1];
    raw0[0] = b >= 1 ? static_cast<acc_t>(ud[b - 1]) : acc_t(0);
    raw1[0] = b + 1 < K ? static_cast<acc_t>(ud[b]) : acc_t(0);
  } else {
    // Many lanes: count the knots below v (O(K) compares, all in SIMD), then gather.
    NFLUX_LANES for (int l = 0; l < L; ++l) bins.index[l] = 0;
    for (int32_t k = 1; k < K; ++k)
      NFLUX_LANES for (int l = 0; l < L; ++l) bins.index[l] += v[l] >= search[k * L + l] ? 1 : 0;
    // Indexed loads (AVX2 gathers). Derivative logits are read at indices clamped into range
    // and replaced by the boundary value 1 below where the knot is not interior.
    NFLUX_LANES for (int l = 0; l < L; ++l) {
      const int32_t b = bins.index[l];
      bins.cw[l] = wknots[b * L + l];
      bins.cw1[l] = wknots[(b + 1) * L + l];
      bins.ch[l] = hknots[b * L + l];
      bins.ch1[l] = hknots[(b + 1) * L + l];
    }
    const int32_t last_logit = static_cast<int32_t>(K) - 2;
    if (last_logit >= 0) {
      NFLUX_LANES for (int l = 0; l < L; ++l) {
        const int32_t b = bins.index[l];
        raw0[l] = static_cast<acc_t>(ud[max_of(b - 1, int32_t(0)) * L + l]);
        raw1[l] = static_cast<acc_t>(ud[min_of(b, last_logit) * L + l]);
      }
    } else {
      NFLUX_LANES for (int l = 0; l < L; ++l) raw0[l] = raw1[l] = acc_t(0);
    }
  }
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    const int32_t b = bins.index[l];
    bins.d0[l] = b >= 1 ? min_derivative + softplus(raw0[l]) : acc_t(1);
    bins.d1[l] = b + 1 < K ? min_derivative + softplus(raw1[l]) : acc_t(1);
  }
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
  // One log of the slope: denominator >= s/2 > 0, so its square cannot underflow.
  logabsdet = math_log(slope_numerator / (denominator * denominator));
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
  // The right knot itself is theta = 1 exactly: with d0 >> s the root cancels to just under 1
  // in float32, and y = +tail_bound would then miss the identity tail (evaluate's theta >= 1).
  return dy >= b.h ? acc_t(1) : clamp_to(root, acc_t(0), acc_t(1));
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

// theta of lane value v (x forward, y inverse) in its bin.
template <typename acc_t>
NFLUX_HOST_DEVICE acc_t bin_theta(const Bin<acc_t>& bin, acc_t v, bool inverse) {
  return inverse ? bin_inverse_theta(bin, v)
                 : clamp_to((v - bin.cw) / bin.w, acc_t(0), acc_t(1));
}

// Forward (x -> y, log dy/dx) or inverse (y -> x, log dx/dy) of L elements. Every branch is
// evaluated on a clamped input and then selected, so tails never produce NaN; a NaN input
// gives NaN in both outputs. scratch: forward_scratch(K) * L slots.
template <int L, bool inverse, typename acc_t, typename in_t>
NFLUX_HOST_DEVICE void evaluate_direction(const acc_t* v, const in_t* uw, const in_t* uh,
                                          const in_t* ud, int64_t K, const Options<acc_t>& opt,
                                          acc_t* scratch, acc_t* out, acc_t* logabsdet) {
  const acc_t B = opt.tail_bound;
  acc_t* wknots = scratch;
  acc_t* hknots = scratch + (K + 1) * L;
  softmax_knots<L>(uw, K, -B, acc_t(2) * B, opt.min_bin_width, wknots, static_cast<acc_t*>(nullptr));
  softmax_knots<L>(uh, K, -B, acc_t(2) * B, opt.min_bin_height, hknots, static_cast<acc_t*>(nullptr));
  acc_t vin[L];
  NFLUX_LANES for (int l = 0; l < L; ++l) vin[l] = inside(v[l], B) ? v[l] : acc_t(0);
  Bins<L, acc_t> bins;
  locate_bins<L>(wknots, hknots, ud, K, vin, inverse, opt.min_derivative, bins);
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    const Bin<acc_t> bin = bins[l];
    const acc_t theta = bin_theta(bin, vin[l], inverse);
    acc_t y, lad;
    bin_forward(bin, theta, y, lad);
    const bool in = inside(v[l], B);
    // theta == 1 returns the right knot itself, so +-B map exactly onto the identity tails.
    const acc_t value = inverse ? (theta >= acc_t(1) ? bins.cw1[l] : bin.cw + theta * bin.w)
                                : (theta >= acc_t(1) ? bins.ch1[l] : y);
    out[l] = in ? value : v[l];
    logabsdet[l] = in ? (inverse ? -lad : lad) : (is_nan(v[l]) ? v[l] : acc_t(0));
  }
}

// The direction is a template argument inside, so neither direction's loops carry the other's.
template <int L, typename acc_t, typename in_t>
NFLUX_HOST_DEVICE void evaluate(const acc_t* v, const in_t* uw, const in_t* uh, const in_t* ud,
                                int64_t K, bool inverse, const Options<acc_t>& opt,
                                acc_t* scratch, acc_t* out, acc_t* logabsdet) {
  if (inverse)
    evaluate_direction<L, true>(v, uw, uh, ud, K, opt, scratch, out, logabsdet);
  else
    evaluate_direction<L, false>(v, uw, uh, ud, K, opt, scratch, out, logabsdet);
}

// Spreads gradients on knot b (g_left) and knot b+1 (g_right) of each lane's softmax_knots
// partition back to its logits: grad[k * L + l] = d loss / d logits[k] of lane l.
template <int L, typename acc_t, typename out_t>
NFLUX_HOST_DEVICE void knots_vjp(const acc_t* probs, int64_t K, const int32_t* b, acc_t range,
                                 acc_t min_size, const acc_t* g_left, const acc_t* g_right,
                                 out_t* grad) {
  // knot j = lo + range * (min*j + spread * sum_{i<j} p_i): d knot_j / d p_i = range*spread*[i<j].
  const acc_t scale = range * (acc_t(1) - min_size * static_cast<acc_t>(K));
  acc_t g_before[L], g_at[L], mean[L];
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    g_before[l] = scale * (g_left[l] + g_right[l]);  // d loss / d p_i for i < b
    g_at[l] = scale * g_right[l];                    // for i == b
    mean[l] = 0;                                     // sum_i p_i * d loss / d p_i
  }
  // int32 counters: compared with the int32 bin indices, the loops over lanes stay in SIMD.
  for (int32_t i = 0; i < K; ++i)
    NFLUX_LANES for (int l = 0; l < L; ++l)
      mean[l] += probs[i * L + l] * (i < b[l] ? g_before[l] : (i == b[l] ? g_at[l] : acc_t(0)));
  for (int32_t i = 0; i < K; ++i) {
    NFLUX_LANES for (int l = 0; l < L; ++l) {
      const acc_t g_p = i < b[l] ? g_before[l] : (i == b[l] ? g_at[l] : acc_t(0));
      grad[i * L + l] = static_cast<out_t>(probs[i * L + l] * (g_p - mean[l]));
    }
  }
}

// Backward of evaluate for L elements: given dL/dout and dL/dlogabsdet, the gradients with
// respect to the input and the three logit tensors (all K, K, K-1 entries per lane written).
// scratch: backward_scratch(K) * L slots.
template <int L, bool inverse, typename acc_t, typename in_t, typename out_t>
NFLUX_HOST_DEVICE void evaluate_backward_direction(const acc_t* v, const in_t* uw,
                                                   const in_t* uh, const in_t* ud, int64_t K,
                                                   const Options<acc_t>& opt, const acc_t* g_out,
                                                   const acc_t* g_lad, acc_t* scratch,
                                                   acc_t* g_v, out_t* g_uw, out_t* g_uh,
                                                   out_t* g_ud) {
  const acc_t B = opt.tail_bound;
  const acc_t range = acc_t(2) * B;
  acc_t* wknots = scratch;
  acc_t* hknots = wknots + (K + 1) * L;
  acc_t* wprobs = hknots + (K + 1) * L;
  acc_t* hprobs = wprobs + K * L;
  softmax_knots<L>(uw, K, -B, range, opt.min_bin_width, wknots, wprobs);
  softmax_knots<L>(uh, K, -B, range, opt.min_bin_height, hknots, hprobs);
  acc_t vin[L];
  NFLUX_LANES for (int l = 0; l < L; ++l) vin[l] = inside(v[l], B) ? v[l] : acc_t(0);
  Bins<L, acc_t> bins;
  locate_bins<L>(wknots, hknots, ud, K, vin, inverse, opt.min_derivative, bins);

  acc_t gw_left[L], gw_right[L], gh_left[L], gh_right[L], g_d0[L], g_d1[L];
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    const Bin<acc_t> bin = bins[l];
    const acc_t theta = bin_theta(bin, vin[l], inverse);
    // Outside the interval the spline is the identity: no gradient reaches the parameters.
    const bool in = inside(v[l], B);
    const acc_t go = in ? g_out[l] : acc_t(0);
    const acc_t gl = in ? g_lad[l] : acc_t(0);
    // Inverse, x = f^-1(y): dL/dy = (g_x - g_lad * dlog f'/dx) / f'(x), and the parameters
    // see the forward vjp with upstream (-dL/dy, -g_lad) (implicit function theorem).
    acc_t dydx, dlogdx;
    bin_slope(bin, theta, dydx, dlogdx);
    const acc_t g_y = (go - gl * dlogdx) / dydx;
    const BinGrad<acc_t> g = inverse ? bin_vjp(bin, theta, -g_y, -gl) : bin_vjp(bin, theta, go, gl);
    g_v[l] = in ? (inverse ? g_y : g.x) : g_out[l];
    // cw = wknots[b], w = wknots[b+1] - wknots[b]; likewise for heights.
    gw_left[l] = g.cw - g.w;
    gw_right[l] = g.w;
    gh_left[l] = g.ch - g.h;
    gh_right[l] = g.h;
    g_d0[l] = g.d0;
    g_d1[l] = g.d1;
  }
  knots_vjp<L>(wprobs, K, bins.index, range, opt.min_bin_width, gw_left, gw_right, g_uw);
  knots_vjp<L>(hprobs, K, bins.index, range, opt.min_bin_height, gh_left, gh_right, g_uh);
  // Interior knot k+1 has derivative min + softplus(ud[k]); it is knot b or b+1 of the bin.
  NFLUX_LANES for (int l = 0; l < L; ++l) {
    g_d0[l] *= sigmoid(bins.raw0[l]);
    g_d1[l] *= sigmoid(bins.raw1[l]);
  }
  for (int32_t k = 0; k + 1 < K; ++k) {
    NFLUX_LANES for (int l = 0; l < L; ++l) {
      const int32_t b = bins.index[l];
      g_ud[k * L + l] = static_cast<out_t>(k + 1 == b ? g_d0[l] : (k == b ? g_d1[l] : acc_t(0)));
    }
  }
}

template <int L, typename acc_t, typename in_t, typename out_t>
NFLUX_HOST_DEVICE void evaluate_backward(const acc_t* v, const in_t* uw, const in_t* uh,
                                         const in_t* ud, int64_t K, bool inverse,
                                         const Options<acc_t>& opt, const acc_t* g_out,
                                         const acc_t* g_lad, acc_t* scratch, acc_t* g_v,
                                         out_t* g_uw, out_t* g_uh, out_t* g_ud) {
  if (inverse)
    evaluate_backward_direction<L, true>(v, uw, uh, ud, K, opt, g_out, g_lad, scratch, g_v, g_uw,
                                         g_uh, g_ud);
  else
    evaluate_backward_direction<L, false>(v, uw, uh, ud, K, opt, g_out, g_lad, scratch, g_v,
                                          g_uw, g_uh, g_ud);
}

// One element (a CUDA thread): the L = 1 case with scalar arguments.
template <typename acc_t, typename in_t>
NFLUX_HOST_DEVICE void evaluate(acc_t v, const in_t* uw, const in_t* uh, const in_t* ud,
                                int64_t K, bool inverse, const Options<acc_t>& opt,
                                acc_t* scratch, acc_t& out, acc_t& logabsdet) {
  evaluate<1>(&v, uw, uh, ud, K, inverse, opt, scratch, &out, &logabsdet);
}

template <typename acc_t, typename in_t, typename out_t>
NFLUX_HOST_DEVICE void evaluate_backward(acc_t v, const in_t* uw, const in_t* uh, const in_t* ud,
                                         int64_t K, bool inverse, const Options<acc_t>& opt,
                                         acc_t g_out, acc_t g_lad, acc_t* scratch, acc_t& g_v,
                                         out_t* g_uw, out_t* g_uh, out_t* g_ud) {
  evaluate_backward<1>(&v, uw, uh, ud, K, inverse, opt, &g_out, &g_lad, scratch, &g_v, g_uw,
                       g_uh, g_ud);
}

}  // namespace rq
}  // namespace NFLUX_ISA_NAMESPACE
}  // namespace nflux
