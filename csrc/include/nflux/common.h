// Portable helpers for math shared by the CPU and CUDA kernels. No torch includes here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NFLUX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NFLUX_HOST_DEVICE inline
#endif

// Placed before each loop over SIMD lanes: GCC would otherwise unroll the short constant-trip
// loop completely and then fail to vectorise the unrolled statements.
#if defined(__CUDACC__) || !defined(__GNUC__) || defined(__clang__)
#define NFLUX_LANES
#else
#define NFLUX_LANES _Pragma("GCC unroll 1") _Pragma("GCC ivdep")
#endif

// The CPU kernels are compiled once per instruction set (generic, AVX2); each copy of the
// inline math lives in its own inline namespace so the linker never mixes them up.
#ifndef NFLUX_ISA_NAMESPACE
#define NFLUX_ISA_NAMESPACE generic
#endif

namespace nflux {
inline namespace NFLUX_ISA_NAMESPACE {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

#if defined(__CUDACC__)
#define NFLUX_RESTRICT __restrict__
#else
#define NFLUX_RESTRICT __restrict
#endif

NFLUX_HOST_DEVICE int32_t bits_of(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(v);
#else
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return i;
#endif
}

NFLUX_HOST_DEVICE float float_of(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float v;
  std::memcpy(&v, &i, sizeof v);
  return v;
#endif
}

// e^x = 2^n * y / Scale: n = round(x / ln 2), y = Scale * e^r with |r| <= ln2 / 2 from Cephes
// expf's polynomial (Scale, a power of two, folded exactly into its coefficients). Rounds with
// the 1.5*2^23 trick: t = x / ln2 + 1.5*2^23 holds n in its low mantissa bits, and n = t - 1.5*2^23
// (no libm call, vectorises on SSE2); the integer n comes from t's bits, for building 2^n.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

template <int Scale = 1>
NFLUX_HOST_DEVICE float exp_reduced(float x, int32_t& n_int) {
  constexpr float s = static_cast<float>(Scale);
  const float t = x * 1.44269504088896341f + kRoundMagic;
  const float n = t - kRoundMagic;
  n_int = bits_of(t) - bits_of(kRoundMagic);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = s * 1.9875691500e-4f;
  p = p * r + s * 1.3981999507e-3f;
  p = p * r + s * 8.3334519073e-3f;
  p = p * r + s * 4.1665795894e-2f;
  p = p * r + s * 1.6666665459e-1f;
  p = p * r + s * 5.0000001201e-1f;
  return (p * r * r + s * r) + s;
}

// Branch-free float exp and log (Cephes polynomials, within 2 ulp of libm, inf/NaN kept).
// A loop over elements that calls them vectorises; a loop calling libm's expf does not.
// exp_poly takes y = 2 e^r and scales by 2^(n-1), so the top of the range (n = 128) needs no
// special case: the clamps keep n - 1 in [-145, 127], results beyond FLT_MAX overflow to inf by
// themselves, and 2^(n-1) is 0 once n - 1 < -126 (results below ~1.7e-38 flush to 0). NaN
// passes the clamps and poisons y. Two clamps and no select: ~30% cheaper than range checks.
NFLUX_HOST_DEVICE float exp_poly(float x) {
  float xc = x < -100.0f ? -100.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  int32_t n;
  const float y2 = exp_reduced<2>(xc, n);
  int32_t biased = n + 126;  // n - 1 + 127
  biased = biased < 0 ? 0 : biased;
  return y2 * float_of(biased << 23);
}

// exp(x) for x <= 0 or NaN (softmax shifts, exp(-|u|)): no overflow handling needed, results
// below e^-87.3 flush to ~1e-38 instead of 0. A little cheaper than exp_poly.
NFLUX_HOST_DEVICE float exp_poly_nonpositive(float x) {
  const float lo = -87.33654475f;
  const float xc = x < lo ? lo : x;  // NaN stays NaN
  int32_t n;
  const float y = exp_reduced(xc, n);
  return y * float_of((n + 127) << 23);  // n in [-126, 0]
}

// Branch-free float tanh: odd Taylor series to a^9 for |a| < 1/4 (truncation < 1e-8 relative),
// else (1 - e) / (1 + e) with e = exp(-2|a|), where 1 - e no longer cancels (within ~3 ulp of
// libm). Unlike tanhf, a loop calling it vectorises (RealNVP's soft clamp of the log scale).
NFLUX_HOST_DEVICE float tanh_poly(float x) {
  const float a = x < 0.0f ? -x : x;
  const float e = exp_poly_nonpositive(-2.0f * a);
  const float far = (1.0f - e) / (1.0f + e);
  const float a2 = a * a;
  float p = 2.1869488536e-2f;            // 62/2835
  p = p * a2 - 5.3968253968e-2f;         // 17/315
  p = p * a2 + 1.3333333333e-1f;         // 2/15
  p = p * a2 - 3.3333333333e-1f;         // 1/3
  const float near = a + a * a2 * p;
  const float t = a < 0.25f ? near : far;
  return x < 0.0f ? -t : t;  // NaN: far and near are NaN, and so is t
}

// log(1 + f) + k ln 2 for f in [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf's polynomial), the
// core of log_poly and of coupling's log1p_unit once each has reduced its argument to f and k.
NFLUX_HOST_DEVICE float log1p_reduced(float f, float k) {
  const float f2 = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * f2 - 2.12194440e-4f * k - 0.5f * f2;
  return f + y + 0.693359375f * k;  // ln 2 in two parts
}

NFLUX_HOST_DEVICE float log_poly(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 8388608.0f : x;  // * 2^23
  const int32_t bits = bits_of(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126 - (subnormal ? 23 : 0);
  float m = float_of((bits & 0x007fffff) | 0x3f000000);  // xs = m * 2^e, m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float result = log1p_reduced(m, static_cast<float>(e));
  const float inf = float_of(0x7f800000);
  const float nan = float_of(0x7fc00000);
  // x == inf -> inf, x == 0 -> -inf, x < 0 or NaN -> NaN.
  return x == inf ? inf : (x == 0.0f ? -inf : (x > 0.0f ? result : nan));
}

// Overloads that pick the float or double function on host and device alike. Host float uses
// the branch-free polynomials above so the CPU kernels vectorise; device float uses CUDA's.
// math_exp_nonpositive promises v <= 0 (or NaN), which lets the host take the cheaper path.
#if defined(__CUDA_ARCH__)
NFLUX_HOST_DEVICE float math_exp(float v) { return expf(v); }
NFLUX_HOST_DEVICE float math_exp_nonpositive(float v) { return expf(v); }
NFLUX_HOST_DEVICE float math_log(float v) { return logf(v); }
#else
NFLUX_HOST_DEVICE float math_exp(float v) { return exp_poly(v); }
NFLUX_HOST_DEVICE float math_exp_nonpositive(float v) { return exp_poly_nonpositive(v); }
NFLUX_HOST_DEVICE float math_log(float v) { return log_poly(v); }
#endif
#if defined(__CUDA_ARCH__)
NFLUX_HOST_DEVICE float math_tanh(float v) { return tanhf(v); }
#else
NFLUX_HOST_DEVICE float math_tanh(float v) { return tanh_poly(v); }
#endif
NFLUX_HOST_DEVICE double math_exp(double v) { return exp(v); }
NFLUX_HOST_DEVICE double math_exp_nonpositive(double v) { return exp(v); }
NFLUX_HOST_DEVICE double math_log(double v) { return log(v); }
NFLUX_HOST_DEVICE float math_sqrt(float v) { return sqrtf(v); }
NFLUX_HOST_DEVICE double math_sqrt(double v) { return sqrt(v); }
NFLUX_HOST_DEVICE double math_tanh(double v) { return tanh(v); }

// log(1 + z) accurate for tiny z, from log alone: the factor z / ((1 + z) - 1) cancels the
// rounding of 1 + z (Goldberg's trick), so it vectorises like math_log.
template <typename T> NFLUX_HOST_DEVICE T math_log1p(T z) {
  const T u = T(1) + z;
  const T d = u - T(1);
  return d == T(0) ? z : math_log(u) * (z / d);
}

template <typename T> NFLUX_HOST_DEVICE T min_of(T a, T b) { return b < a ? b : a; }
template <typename T> NFLUX_HOST_DEVICE T max_of(T a, T b) { return a < b ? b : a; }
template <typename T> NFLUX_HOST_DEVICE T clamp_to(T v, T lo, T hi) { return min_of(max_of(v, lo), hi); }
template <typename T> NFLUX_HOST_DEVICE bool is_nan(T v) { return v != v; }

// log(1 + exp(u)) without overflow.
template <typename T> NFLUX_HOST_DEVICE T softplus(T u) {
  return max_of(u, T(0)) + math_log1p(math_exp_nonpositive(-(u < T(0) ? -u : u)));
}

// 1 / (1 + exp(-u)) without overflow, branch-free; it is the derivative of softplus.
template <typename T> NFLUX_HOST_DEVICE T sigmoid(T u) {
  const T e = math_exp_nonpositive(-(u < T(0) ? -u : u));
  const T r = T(1) / (T(1) + e);
  return u >= T(0) ? r : e * r;
}

}  // namespace NFLUX_ISA_NAMESPACE
}  // namespace nflux
