// CPU kernel of made_inverse (see csrc/made_inverse.cpp for the algorithm). The batch is cut
// into tiles of kTile rows that run independently (at::parallel_for); a tile walks d = 1..D
// with all its hidden activations resident in L2, stored unit-major ([unit][row]) so that the
// per-degree products are axpy loops over rows that vectorise. Small per-step GEMMs through
// ATen would re-read the whole activation prefix from memory at every step and pay dispatch
// overhead D * layers times; this keeps the total work at one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../made_inverse.h"
#include "nflux/rq_spline.h"

// The hot loop is compiled for AVX-512 and AVX2 as well as the baseline, chosen at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NFLUX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NFLUX_MULTIVERSION
#endif

namespace nflux {
namespace {

constexpr int64_t kTile = 64;  // rows per tile: a 256-unit layer is 64 KiB of floats
constexpr int64_t kUnits = 4;  // units computed together, so each row vector is loaded once

enum class Act { relu, elu, tanh, gelu };

Act act_for(const std::string& name) {
  if (name == "elu") return Act::elu;
  if (name == "tanh") return Act::tanh;
  if (name == "gelu") return Act::gelu;
  return Act::relu;
}

template <typename scalar_t>
void activate(Act act, scalar_t* v, int64_t n) {
  switch (act) {
    case Act::relu:
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] > scalar_t(0) ? v[i] : scalar_t(0);
      break;
    case Act::elu:
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] > scalar_t(0) ? v[i] : std::expm1(v[i]);
      break;
    case Act::tanh:
      for (int64_t i = 0; i < n; ++i) v[i] = std::tanh(v[i]);
      break;
    case Act::gelu:
      for (int64_t i = 0; i < n; ++i)
        v[i] = scalar_t(0.5) * v[i] * (scalar_t(1) + std::erf(v[i] * scalar_t(M_SQRT1_2)));
      break;
  }
}

// A 512-bit vector of rows (GCC/Clang vector extension: compiled to zmm, ymm or xmm pairs by
// whichever clone runs). Auto-vectorising plain loops here kept the accumulators in memory.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};

// out[u][t] = bias[u] + ctx[t][u] + sum_{k < kin} w[u][k] * in[k][t], for u < U, t < kTile:
// 2 * U vector accumulators held in registers while k runs.
template <typename scalar_t, int U>
__attribute__((always_inline)) inline void units_kernel(const scalar_t* in, int64_t kin,
                                                        const scalar_t* w, int64_t ldw,
                                                        const scalar_t* bias, const scalar_t* ctx,
                                                        int64_t ldc, int64_t rows,
                                                        scalar_t* out) {
  using V = typename Vec<scalar_t>::type;
  constexpr int L = 64 / sizeof(scalar_t);
  static_assert(kTile % (2 * L) == 0, "kTile must be a multiple of two vectors");
  for (int64_t t0 = 0; t0 < kTile; t0 += 2 * L) {
    V acc[U][2];
    for (int u = 0; u < U; ++u) {
      scalar_t init[2 * L];
      for (int v = 0; v < 2 * L; ++v)
        init[v] = bias[u] + (ctx != nullptr && t0 + v < rows ? ctx[(t0 + v) * ldc + u] : scalar_t(0));
      std::memcpy(&acc[u][0], init, sizeof(V));
      std::memcpy(&acc[u][1], init + L, sizeof(V));
    }
    for (int64_t k = 0; k < kin; ++k) {
      V a0, a1;
      std::memcpy(&a0, in + k * kTile + t0, sizeof(V));
      std::memcpy(&a1, in + k * kTile + t0 + L, sizeof(V));
      for (int u = 0; u < U; ++u) {
        const scalar_t wk = w[u * ldw + k];
        acc[u][0] += wk * a0;
        acc[u][1] += wk * a1;
      }
    }
    for (int u = 0; u < U; ++u) {
      std::memcpy(out + u * kTile + t0, &acc[u][0], sizeof(V));
      std::memcpy(out + u * kTile + t0 + L, &acc[u][1], sizeof(V));
    }
  }
}

template <typename scalar_t>
NFLUX_MULTIVERSION void units(const scalar_t* in, int64_t kin, const scalar_t* w, int64_t ldw,
                              const scalar_t* bias, const scalar_t* ctx, int64_t ldc,
                              int64_t rows, int64_t count, scalar_t* out) {
  int64_t u = 0;
  for (; u + kUnits <= count; u += kUnits)
    units_kernel<scalar_t, kUnits>(in, kin, w + u * ldw, ldw, bias + u, ctx ? ctx + u : nullptr,
                                   ldc, rows, out + u * kTile);
  for (; u < count; ++u)
    units_kernel<scalar_t, 1>(in, kin, w + u * ldw, ldw, bias + u, ctx ? ctx + u : nullptr, ldc,
                              rows, out + u * kTile);
}

template <typename scalar_t>
void run_tiles(const MadePlan& plan, const at::Tensor& y, at::Tensor& x, at::Tensor& logabsdet) {
  using acc = acc_t<scalar_t>;
  const int64_t B = plan.batch, D = plan.features, P = plan.params, K = plan.bins;
  const int64_t n = static_cast<int64_t>(plan.weights.size()), hidden = n - 1;
  const bool residual = plan.residual, affine = plan.affine;
  const Act act = act_for(plan.activation);
  const rq::Options<acc> opt{static_cast<acc>(plan.tail_bound), static_cast<acc>(plan.min_bin_width),
                             static_cast<acc>(plan.min_bin_height), static_cast<acc>(plan.min_derivative)};
  std::vector<const scalar_t*> w(n), b(n), c(hidden, nullptr);
  for (int64_t l = 0; l < n; ++l) {
    w[l] = plan.weights[l].data_ptr<scalar_t>();
    b[l] = plan.biases[l].data_ptr<scalar_t>();
    if (l < hidden && plan.context[l].defined()) c[l] = plan.context[l].data_ptr<scalar_t>();
  }
  const scalar_t* py = y.data_ptr<scalar_t>();
  scalar_t* px = x.data_ptr<scalar_t>();
  scalar_t* plad = logabsdet.data_ptr<scalar_t>();
  const std::vector<int64_t>& in_perm = plan.sorts_in.perm;
  const int64_t tiles = (B + kTile - 1) / kTile;

  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Per-thread buffers, unit-major: [units][kTile].
    std::vector<scalar_t> xs(D * kTile, 0), params(P * kTile), spline(P);
    std::vector<acc> scratch(rq::forward_scratch(K));
    std::vector<std::vector<scalar_t>> buf(hidden), gated(residual ? hidden : 0);
    for (int64_t l = 0; l < hidden; ++l) buf[l].assign(plan.widths[l] * kTile, 0);
    for (int64_t l = 0; l < static_cast<int64_t>(gated.size()); ++l) gated[l].assign(plan.widths[l] * kTile, 0);
    std::vector<acc> lad(kTile);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b0 = tile * kTile, rows = std::min(kTile, B - b0);
      std::fill(lad.begin(), lad.end(), acc(0));
      for (int64_t d = 1; d <= D; ++d) {
        const int64_t k = d - 1;
        for (int64_t l = 0; l < hidden; ++l) {
          const Sorted& s = plan.sorts[l];
          const int64_t r0 = s.upto(k - 1), r1 = s.upto(k), cnt = r1 - r0;
          if (cnt == 0) continue;
          const int64_t ldw = l == 0 ? D : plan.widths[l - 1];
          const int64_t H = plan.widths[l];
          const scalar_t* ctx = c[l] ? c[l] + b0 * H + r0 : nullptr;
          scalar_t* out = buf[l].data() + r0 * kTile;
          const scalar_t* wl = w[l] + r0 * ldw;
          if (l == 0) {
            units(xs.data(), k, wl, ldw, b[0] + r0, ctx, H, rows, cnt, out);
            if (!residual) activate(act, out, cnt * kTile);
            continue;
          }
          const int64_t kin = plan.sorts[l - 1].upto(k);
          if (!residual) {
            units(buf[l - 1].data(), kin, wl, ldw, b[l] + r0, ctx, H, rows, cnt, out);
            activate(act, out, cnt * kTile);
          } else if (l % 2 == 1) {  // a block's first layer reads act(stream)
            scalar_t* g = gated[l].data();
            std::copy(buf[l - 1].data() + r0 * kTile, buf[l - 1].data() + r1 * kTile, g + r0 * kTile);
            activate(act, g + r0 * kTile, cnt * kTile);
            units(static_cast<const scalar_t*>(g), kin, wl, ldw, b[l] + r0, ctx, H, rows, cnt, out);
            activate(act, out, cnt * kTile);
          } else {  // a block's second layer adds to the stream
            units(buf[l - 1].data(), kin, wl, ldw, b[l] + r0, ctx, H, rows, cnt, out);
            const scalar_t* stream = buf[l - 2].data() + r0 * kTile;
            for (int64_t i = 0; i < cnt * kTile; ++i) out[i] += stream[i];
          }
        }
        const int64_t kin = plan.sorts[hidden - 1].upto(k);
        units(buf[hidden - 1].data(), kin, w[n - 1] + k * P * plan.widths[hidden - 1],
              plan.widths[hidden - 1], b[n - 1] + k * P, static_cast<const scalar_t*>(nullptr), 0,
              rows, P, params.data());
        const int64_t j = in_perm[k];
        for (int64_t t = 0; t < rows; ++t) {
          const acc yv = static_cast<acc>(py[(b0 + t) * D + j]);
          acc xv, l;
          if (affine) {
            const acc log_scale = params[kTile + t];
            xv = (yv - static_cast<acc>(params[t])) * std::exp(-log_scale);
            l = -log_scale;
          } else {
            for (int64_t q = 0; q < P; ++q) spline[q] = params[q * kTile + t];
            rq::evaluate(yv, spline.data(), spline.data() + K, spline.data() + 2 * K, K, true, opt,
                         scratch.data(), xv, l);
          }
          xs[k * kTile + t] = static_cast<scalar_t>(xv);
          lad[t] += l;
        }
      }
      for (int64_t t = 0; t < rows; ++t) {
        for (int64_t p = 0; p < D; ++p) px[(b0 + t) * D + in_perm[p]] = xs[p * kTile + t];
        plad[b0 + t] = static_cast<scalar_t>(lad[t]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> made_inverse_cpu(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative) {
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/false);
  const at::Tensor yc = y.contiguous();
  at::Tensor x = at::empty_like(yc);
  at::Tensor logabsdet = at::empty({plan.batch}, y.options());
  if (plan.batch == 0) return {x, logabsdet};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "made_inverse_cpu",
                             [&] { run_tiles<scalar_t>(plan, yc, x, logabsdet); });
  return {x, logabsdet};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CPU, m) { m.impl("made_inverse", &made_inverse_cpu); }

}  // namespace nflux
