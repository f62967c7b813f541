// Portable helpers for math shared by the CPU and CUDA kernels. No torch includes here.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NFLUX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NFLUX_HOST_DEVICE inline
#endif

namespace nflux {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Overloads that pick the float or double libm function on host and device alike.
NFLUX_HOST_DEVICE float math_exp(float v) { return expf(v); }
NFLUX_HOST_DEVICE double math_exp(double v) { return exp(v); }
NFLUX_HOST_DEVICE float math_log(float v) { return logf(v); }
NFLUX_HOST_DEVICE double math_log(double v) { return log(v); }
NFLUX_HOST_DEVICE float math_log1p(float v) { return log1pf(v); }
NFLUX_HOST_DEVICE double math_log1p(double v) { return log1p(v); }
NFLUX_HOST_DEVICE float math_sqrt(float v) { return sqrtf(v); }
NFLUX_HOST_DEVICE double math_sqrt(double v) { return sqrt(v); }
NFLUX_HOST_DEVICE float math_tanh(float v) { return tanhf(v); }
NFLUX_HOST_DEVICE double math_tanh(double v) { return tanh(v); }

template <typename T> NFLUX_HOST_DEVICE T min_of(T a, T b) { return b < a ? b : a; }
template <typename T> NFLUX_HOST_DEVICE T max_of(T a, T b) { return a < b ? b : a; }
template <typename T> NFLUX_HOST_DEVICE T clamp_to(T v, T lo, T hi) { return min_of(max_of(v, lo), hi); }
template <typename T> NFLUX_HOST_DEVICE bool is_nan(T v) { return v != v; }

// log(1 + exp(u)) without overflow.
template <typename T> NFLUX_HOST_DEVICE T softplus(T u) {
  return max_of(u, T(0)) + math_log1p(math_exp(-(u < T(0) ? -u : u)));
}

// 1 / (1 + exp(-u)) without overflow; it is the derivative of softplus.
template <typename T> NFLUX_HOST_DEVICE T sigmoid(T u) {
  if (u >= T(0)) return T(1) / (T(1) + math_exp(-u));
  const T e = math_exp(u);
  return e / (T(1) + e);
}

}  // namespace nflux
