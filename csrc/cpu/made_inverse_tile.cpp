// The made_inverse tile sweeps (see made_inverse_tile.h and csrc/made_inverse.cpp).
//
// Backward (x = T^-1(y; MADE(x)), outputs x and logabsdet): reverse-mode through the forward
// sweep. A hidden unit of degree k is read only by units of degree >= k in the next layer and
// by the parameters of inputs of degree > k, so walking d = D..1 every reader of the units of
// degree k = d-1 is known at step d, right after x_d's own cotangent: per step, the
// transformer's inverse-direction VJP gives dL/dy_d and the cotangent of x_d's parameters, then
// top down each layer's degree-k units gather their cotangent from their readers (a transposed
// product over the readers, the mirror of the forward's product over the inputs, so the tile is
// read in the same pattern; the first layer's units instead add to the inputs they read). Every admitted weight is read once: the sweep costs one network
// pass. It is exactly the implicit-function-theorem solve J^T v = g (J = dy/dx, triangular in
// the order), one degree group at a time.
#include "made_inverse_tile.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "nflux/activation.h"
#include "nflux/coupling.h"
#include "nflux/rq_spline.h"

// The hot loops are compiled for AVX-512 and AVX2 as well as the baseline, chosen at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NFLUX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NFLUX_MULTIVERSION
#endif

namespace nflux {
namespace {

constexpr int kUnits = 4;  // units computed together, so each row vector is loaded once

// The kind is a template argument inside, so each loop is one formula.
template <int A, typename scalar_t>
void activate_as(scalar_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = activation::apply<A>(v[i]);
}

template <typename scalar_t>
void activate(int kind, scalar_t* v, int64_t n) {
  switch (kind) {
    case activation::kRelu: return activate_as<activation::kRelu>(v, n);
    case activation::kElu: return activate_as<activation::kElu>(v, n);
    case activation::kTanh: return activate_as<activation::kTanh>(v, n);
    default: return activate_as<activation::kGelu>(v, n);
  }
}

// g[i] *= act'(pre[i]), given pre and post = act(pre).
template <int A, typename scalar_t>
void times_slope_as(const scalar_t* pre, const scalar_t* post, scalar_t* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] *= activation::slope<A>(pre[i], post[i]);
}

template <typename scalar_t>
void times_slope(int kind, const scalar_t* pre, const scalar_t* post, scalar_t* g, int64_t n) {
  switch (kind) {
    case activation::kRelu: return times_slope_as<activation::kRelu>(pre, post, g, n);
    case activation::kElu: return times_slope_as<activation::kElu>(pre, post, g, n);
    case activation::kTanh: return times_slope_as<activation::kTanh>(pre, post, g, n);
    default: return times_slope_as<activation::kGelu>(pre, post, g, n);
  }
}

// A 512-bit vector of rows (GCC/Clang vector extension: compiled to zmm, ymm or xmm pairs by
// whichever clone runs). Auto-vectorising plain loops here kept the accumulators in memory.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};

// out[u][t] = start[u][t] + sum_{k < count} w[u * unit_stride + k * k_stride] * in[k][t], for
// u < U, t < kTile: 2 * U vector accumulators held in registers while k runs. start(u, t0, v)
// writes unit u's starting values for rows [t0, t0 + 2 vectors) to v.
template <typename scalar_t, int U, typename Start>
__attribute__((always_inline)) inline void accumulate_kernel(const scalar_t* in, int64_t count,
                                                             const scalar_t* w, int64_t unit_stride,
                                                             int64_t k_stride, Start start,
                                                             scalar_t* out) {
  using V = typename Vec<scalar_t>::type;
  constexpr int L = 64 / sizeof(scalar_t);
  static_assert(kTile % (2 * L) == 0, "kTile must be a multiple of two vectors");
  for (int64_t t0 = 0; t0 < kTile; t0 += 2 * L) {
    V acc[U][2];
    for (int u = 0; u < U; ++u) {
      scalar_t init[2 * L];
      start(u, t0, init);
      std::memcpy(&acc[u][0], init, sizeof(V));
      std::memcpy(&acc[u][1], init + L, sizeof(V));
    }
    for (int64_t k = 0; k < count; ++k) {
      V a0, a1;
      std::memcpy(&a0, in + k * kTile + t0, sizeof(V));
      std::memcpy(&a1, in + k * kTile + t0 + L, sizeof(V));
      for (int u = 0; u < U; ++u) {
        const scalar_t wk = w[u * unit_stride + k * k_stride];
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

// out[u][t] = bias[u] + ctx[t][u] + sum_{k < kin} w[u][k] * in[k][t], for u < U, t < kTile.
template <typename scalar_t, int U>
__attribute__((always_inline)) inline void units_kernel(const scalar_t* in, int64_t kin,
                                                        const scalar_t* w, int64_t ldw,
                                                        const scalar_t* bias, const scalar_t* ctx,
                                                        int64_t ldc, int64_t rows,
                                                        scalar_t* out) {
  constexpr int L = 64 / sizeof(scalar_t);
  auto start = [&](int u, int64_t t0, scalar_t* v) {
    for (int i = 0; i < 2 * L; ++i)
      v[i] = bias[u] + (ctx != nullptr && t0 + i < rows ? ctx[(t0 + i) * ldc + u] : scalar_t(0));
  };
  accumulate_kernel<scalar_t, U>(in, kin, w, ldw, 1, start, out);
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

// The transposed product, for the backward: out[u][t] += sum_{r < count} w[r][u] * g[r][t]
// for u < U (w points at column u0 of row r0, row stride ldw).
template <typename scalar_t, int U>
__attribute__((always_inline)) inline void transposed_kernel(const scalar_t* g, int64_t count,
                                                       const scalar_t* w, int64_t ldw,
                                                       scalar_t* out) {
  constexpr int L = 64 / sizeof(scalar_t);
  auto start = [&](int u, int64_t t0, scalar_t* v) {
    std::memcpy(v, out + u * kTile + t0, 2 * L * sizeof(scalar_t));
  };
  accumulate_kernel<scalar_t, U>(g, count, w, 1, ldw, start, out);
}

// out[u] += sum_{r < readers} w[r][u] g[r] for u < units: the cotangent of `units` inputs of a
// layer from `readers` of its units (their output cotangents g, weight rows w).
template <typename scalar_t>
NFLUX_MULTIVERSION void gather(const scalar_t* g, int64_t readers, const scalar_t* w, int64_t ldw,
                               int64_t units, scalar_t* out) {
  int64_t u = 0;
  for (; u + kUnits <= units; u += kUnits)
    transposed_kernel<scalar_t, kUnits>(g, readers, w + u, ldw, out + u * kTile);
  for (; u < units; ++u) transposed_kernel<scalar_t, 1>(g, readers, w + u, ldw, out + u * kTile);
}

// Unit-major tile [units][kTile] -> columns b0.. of a unit-major [units, B] buffer.
template <typename scalar_t>
void store_units(const scalar_t* tile, int64_t count, int64_t rows, int64_t batch, scalar_t* dst) {
  for (int64_t u = 0; u < count; ++u) std::copy(tile + u * kTile, tile + u * kTile + rows, dst + u * batch);
}

}  // namespace

template <typename scalar_t>
MadeTile<scalar_t>::MadeTile(const MadePlan& plan, bool keep_for_backward)
    : plan_(plan),
      D_(plan.features),
      P_(plan.params),
      K_(plan.bins),
      n_(static_cast<int64_t>(plan.weights.size())),
      hidden_(n_ - 1),
      keep_(keep_for_backward),
      act_(plan.activation_kind) {
  w_.resize(n_);
  b_.resize(n_);
  c_.assign(hidden_, nullptr);
  for (int64_t l = 0; l < n_; ++l) {
    w_[l] = plan.weights[l].data_ptr<scalar_t>();
    b_[l] = plan.biases[l].data_ptr<scalar_t>();
    if (l < hidden_ && plan.context[l].defined()) c_[l] = plan.context[l].data_ptr<scalar_t>();
  }
  xs_.assign(D_ * kTile, 0);
  params_.assign((keep_ ? D_ : 1) * P_ * kTile, 0);
  buf_.resize(hidden_);
  gated_.resize(plan.residual ? hidden_ : 0);
  pre_.resize(keep_ ? hidden_ : 0);
  for (int64_t l = 0; l < hidden_; ++l) {
    const int64_t size = plan.widths[l] * kTile;
    buf_[l].assign(size, 0);
    if (plan.residual && l % 2 == 1) gated_[l].assign(size, 0);
    if (keep_ && (!plan.residual || l % 2 == 1)) pre_[l].assign(size, 0);
  }
  if (keep_) {
    g_xs_.assign(D_ * kTile, 0);
    g_params_.assign(D_ * P_ * kTile, 0);
    g_buf_.resize(hidden_);
    g_gated_.resize(hidden_);
    g_pre_.resize(hidden_);
    for (int64_t l = 0; l < hidden_; ++l) {
      g_buf_[l].assign(plan.widths[l] * kTile, 0);
      g_pre_[l].assign(plan.widths[l] * kTile, 0);
      if (plan.residual && l % 2 == 1) g_gated_[l].assign(plan.widths[l] * kTile, 0);
    }
    scratch_.resize(std::max(rq::forward_scratch(K_), rq::backward_scratch(K_)));
  } else {
    scratch_.resize(rq::forward_scratch(K_));
  }
  lad_.resize(kTile);
  spline_.resize(2 * P_);
}

template <typename scalar_t>
void MadeTile<scalar_t>::forward(const scalar_t* y, int64_t b0, int64_t rows, scalar_t* x,
                                 scalar_t* logabsdet) {
  const bool residual = plan_.residual, affine = plan_.affine;
  const rq::Options<acc> opt{static_cast<acc>(plan_.tail_bound), static_cast<acc>(plan_.min_bin_width),
                             static_cast<acc>(plan_.min_bin_height), static_cast<acc>(plan_.min_derivative)};
  const std::vector<int64_t>& in_perm = plan_.sorts_in.perm;
  std::fill(lad_.begin(), lad_.end(), acc(0));
  for (int64_t d = 1; d <= D_; ++d) {
    const int64_t k = d - 1;  // the degree of the hidden units that become computable now
    for (int64_t l = 0; l < hidden_; ++l) {
      const Sorted& s = plan_.sorts[l];
      const int64_t r0 = s.upto(k - 1), r1 = s.upto(k), cnt = r1 - r0;
      if (cnt == 0) continue;
      const int64_t ldw = l == 0 ? D_ : plan_.widths[l - 1];
      const int64_t H = plan_.widths[l];
      const scalar_t* ctx = c_[l] ? c_[l] + b0 * H + r0 : nullptr;
      scalar_t* out = buf_[l].data() + r0 * kTile;
      const scalar_t* wl = w_[l] + r0 * ldw;
      // Plain layers and a residual block's first layer are activated; keep their input.
      auto activate_out = [&] {
        if (keep_) std::copy(out, out + cnt * kTile, pre_[l].data() + r0 * kTile);
        activate(act_, out, cnt * kTile);
      };
      if (l == 0) {
        units(xs_.data(), k, wl, ldw, b_[0] + r0, ctx, H, rows, cnt, out);
        if (!residual) activate_out();
        continue;
      }
      const int64_t kin = plan_.sorts[l - 1].upto(k);
      if (!residual) {
        units(buf_[l - 1].data(), kin, wl, ldw, b_[l] + r0, ctx, H, rows, cnt, out);
        activate_out();
      } else if (l % 2 == 1) {  // a block's first layer reads act(stream)
        scalar_t* g = gated_[l].data();
        std::copy(buf_[l - 1].data() + r0 * kTile, buf_[l - 1].data() + r1 * kTile, g + r0 * kTile);
        activate(act_, g + r0 * kTile, cnt * kTile);
        units(static_cast<const scalar_t*>(g), kin, wl, ldw, b_[l] + r0, ctx, H, rows, cnt, out);
        activate_out();
      } else {  // a block's second layer adds to the stream
        units(buf_[l - 1].data(), kin, wl, ldw, b_[l] + r0, ctx, H, rows, cnt, out);
        const scalar_t* stream = buf_[l - 2].data() + r0 * kTile;
        for (int64_t i = 0; i < cnt * kTile; ++i) out[i] += stream[i];
      }
    }
    const int64_t H = plan_.widths[hidden_ - 1];
    const int64_t kin = plan_.sorts[hidden_ - 1].upto(k);
    scalar_t* params = params_.data() + (keep_ ? k * P_ * kTile : 0);
    units(buf_[hidden_ - 1].data(), kin, w_[n_ - 1] + k * P_ * H, H, b_[n_ - 1] + k * P_,
          static_cast<const scalar_t*>(nullptr), 0, rows, P_, params);
    const int64_t j = in_perm[k];
    for (int64_t t = 0; t < rows; ++t) {
      const acc yv = static_cast<acc>(y[(b0 + t) * D_ + j]);
      acc xv, l;
      if (affine) {
        const acc log_scale = params[kTile + t];
        xv = (yv - static_cast<acc>(params[t])) * std::exp(-log_scale);
        l = -log_scale;
      } else {
        for (int64_t q = 0; q < P_; ++q) spline_[q] = params[q * kTile + t];
        rq::evaluate(yv, spline_.data(), spline_.data() + K_, spline_.data() + 2 * K_, K_, true,
                     opt, scratch_.data(), xv, l);
      }
      xs_[k * kTile + t] = static_cast<scalar_t>(xv);
      lad_[t] += l;
    }
  }
  if (x == nullptr) return;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t p = 0; p < D_; ++p) x[(b0 + t) * D_ + in_perm[p]] = xs_[p * kTile + t];
    logabsdet[b0 + t] = static_cast<scalar_t>(lad_[t]);
  }
}

template <typename scalar_t>
const scalar_t* MadeTile<scalar_t>::layer_input(int64_t l) const {
  if (l == 0) return xs_.data();
  if (plan_.residual && l % 2 == 1 && l < hidden_) return gated_[l].data();
  return buf_[l - 1].data();
}

template <typename scalar_t>
void MadeTile<scalar_t>::backward(const scalar_t* y, const scalar_t* grad_x,
                                  const scalar_t* grad_logabsdet, int64_t b0, int64_t rows,
                                  const TileGradOutputs<scalar_t>& out) {
  TORCH_INTERNAL_ASSERT(keep_, "MadeTile::backward needs keep_for_backward");
  const bool residual = plan_.residual, affine = plan_.affine;
  const rq::Options<acc> opt{static_cast<acc>(plan_.tail_bound), static_cast<acc>(plan_.min_bin_width),
                             static_cast<acc>(plan_.min_bin_height), static_cast<acc>(plan_.min_derivative)};
  const std::vector<int64_t>& in_perm = plan_.sorts_in.perm;
  std::fill(g_xs_.begin(), g_xs_.end(), scalar_t(0));
  for (int64_t l = 0; l < hidden_; ++l) {
    std::fill(g_buf_[l].begin(), g_buf_[l].end(), scalar_t(0));
    std::fill(g_pre_[l].begin(), g_pre_[l].end(), scalar_t(0));
    std::fill(g_gated_[l].begin(), g_gated_[l].end(), scalar_t(0));
  }
  std::fill(g_params_.begin(), g_params_.end(), scalar_t(0));  // the ragged rows stay 0
  scalar_t* g_spline = spline_.data() + P_;
  // Readers in layer l of the units of degree >= k in layer l-1: its units of degree >= k that
  // are ever computed (degree < D), a contiguous range of sorted units.
  auto readers = [&](int64_t l, int64_t k) {
    const Sorted& s = plan_.sorts[l];
    return std::make_pair(s.upto(k - 1), s.upto(D_ - 1));
  };
  for (int64_t d = D_; d >= 1; --d) {
    const int64_t k = d - 1, j = in_perm[k];
    const scalar_t* params = params_.data() + k * P_ * kTile;
    scalar_t* g_params = g_params_.data() + k * P_ * kTile;
    // x_d's cotangent is complete: the first layer's units of degree >= d added theirs.
    for (int64_t t = 0; t < rows; ++t) {
      const acc g_x = static_cast<acc>(grad_x[(b0 + t) * D_ + j]) + static_cast<acc>(g_xs_[k * kTile + t]);
      const acc g_lad = static_cast<acc>(grad_logabsdet[b0 + t]);
      acc g_y;
      if (affine) {
        const auto sc = coupling::eval_scale<coupling::kExp, false>(static_cast<acc>(params[kTile + t]), acc(0), acc(0));
        g_y = g_x * sc.inv_scale;
        g_params[t] = static_cast<scalar_t>(-g_y);
        g_params[kTile + t] = static_cast<scalar_t>(
            coupling::inverse_grad_logit(sc, static_cast<acc>(xs_[k * kTile + t]), g_x, g_lad));
      } else {
        for (int64_t q = 0; q < P_; ++q) spline_[q] = params[q * kTile + t];
        rq::evaluate_backward(static_cast<acc>(y[(b0 + t) * D_ + j]), spline_.data(),
                              spline_.data() + K_, spline_.data() + 2 * K_, K_, true, opt, g_x,
                              g_lad, scratch_.data(), g_y, g_spline, g_spline + K_, g_spline + 2 * K_);
        for (int64_t q = 0; q < P_; ++q) g_params[q * kTile + t] = g_spline[q];
      }
      out.grad_y[(b0 + t) * D_ + j] = static_cast<scalar_t>(g_y);
    }
    // Top down: each layer's units of degree k gather from readers complete by now (the layer
    // above's units of degree >= k, or the parameters of inputs d..D).
    for (int64_t l = hidden_ - 1; l >= 0; --l) {
      const Sorted& s = plan_.sorts[l];
      const int64_t r0 = s.upto(k - 1), r1 = s.upto(k), cnt = r1 - r0;
      if (cnt == 0) continue;
      const int64_t H = plan_.widths[l];
      const int64_t begin = r0 * kTile, size = cnt * kTile;
      scalar_t* g_out = g_buf_[l].data() + begin;  // zero until now
      if (l == hidden_ - 1) {
        gather(static_cast<const scalar_t*>(g_params), (D_ - k) * P_, w_[n_ - 1] + k * P_ * H + r0, H, cnt,
               g_out);
      } else {
        const auto [r_begin, r_end] = readers(l + 1, k);
        const scalar_t* g_next = g_pre_[l + 1].data() + r_begin * kTile;
        const scalar_t* w_next = w_[l + 1] + r_begin * H + r0;
        if (!residual || l % 2 == 1) {
          gather(g_next, r_end - r_begin, w_next, H, cnt, g_out);
        } else {  // a stream: read by the next block through act(stream), and by its skip
          scalar_t* g_gated = g_gated_[l + 1].data() + begin;
          gather(g_next, r_end - r_begin, w_next, H, cnt, g_gated);
          times_slope(act_, buf_[l].data() + begin, gated_[l + 1].data() + begin, g_gated, size);
          const scalar_t* g_skip = g_buf_[l + 2].data() + begin;
          for (int64_t i = 0; i < size; ++i) g_out[i] = g_gated[i] + g_skip[i];
        }
      }
      scalar_t* g_pre = g_pre_[l].data() + begin;
      std::copy(g_out, g_out + size, g_pre);
      if (!residual || l % 2 == 1) times_slope(act_, pre_[l].data() + begin, buf_[l].data() + begin, g_pre, size);
      // The inputs are few (D, not a hidden width): the first layer's units add to the inputs
      // they read instead, so each input's gather is not a lone unit over every reader.
      if (l == 0) gather(static_cast<const scalar_t*>(g_pre), cnt, w_[0] + r0 * D_, D_, k, g_xs_.data());
    }
  }
  for (int64_t l = 0; l < n_; ++l) {
    const int64_t width = l < hidden_ ? plan_.widths[l] : D_ * P_;
    const int64_t fan_in = l == 0 ? D_ : plan_.widths[l - 1];
    store_units(l < hidden_ ? g_pre_[l].data() : g_params_.data(), width, rows, plan_.batch, out.grad_pre[l] + b0);
    store_units(layer_input(l), fan_in, rows, plan_.batch, out.layer_input[l] + b0);
  }
}

template class MadeTile<float>;
template class MadeTile<double>;

}  // namespace nflux
