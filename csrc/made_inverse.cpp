// made_inverse: inverts a MADE-conditioned autoregressive transform in about one network pass.
//
// Hidden units of degree k depend on inputs 1..k only. With every layer's units sorted by
// degree, step d (d = 1..D) computes, in each layer, only the units of degree d-1 from the
// previous layer's units of degree <= d-1 (all final already: the mask admits every one of
// them, so each step is a dense GEMM on contiguous slices), then the parameters of input d,
// then inverts the elementwise transformer for x_d. Every unit is computed once: the total
// work is one pass (the masked half of each product is skipped, not multiplied by zero).
// The masks are never read: they are implied by the degrees, so the weights may be stored
// unmasked.
//
// This file: the checks and degree-sorted plan (shared with the CPU and CUDA kernels), and an
// implementation composed of ATen ops (one small GEMM per layer and step), which the CUDA
// binding falls back to where its persistent kernel does not fit (csrc/cuda/made_inverse.cu).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "made_inverse.h"
#include "nflux/activation.h"

namespace nflux {
namespace {

using Activation = at::Tensor (*)(const at::Tensor&);

at::Tensor act_relu(const at::Tensor& t) { return at::relu(t); }
at::Tensor act_elu(const at::Tensor& t) { return at::elu(t); }
at::Tensor act_tanh(const at::Tensor& t) { return at::tanh(t); }
at::Tensor act_gelu(const at::Tensor& t) { return at::gelu(t); }

// The ATen activation of each nflux::activation::Kind, in the enum's order.
constexpr Activation kActivations[] = {act_relu, act_elu, act_tanh, act_gelu};

int activation_kind_for(c10::string_view name) {
  if (name == "relu") return nflux::activation::kRelu;
  if (name == "elu") return nflux::activation::kElu;
  if (name == "tanh") return nflux::activation::kTanh;
  if (name == "gelu") return nflux::activation::kGelu;
  TORCH_CHECK(false, "nflux: activation must be one of relu, elu, tanh, gelu, got '",
              std::string(name), "'");
}

Sorted sort_by_degree(const int64_t* degree, int64_t n, int64_t D) {
  Sorted s;
  s.perm.resize(n);
  std::iota(s.perm.begin(), s.perm.end(), 0);
  std::stable_sort(s.perm.begin(), s.perm.end(),
                   [&](int64_t a, int64_t b) { return degree[a] < degree[b]; });
  s.degree.resize(n);
  for (int64_t i = 0; i < n; ++i) s.degree[i] = degree[s.perm[i]];
  s.count_le.assign(D + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (degree[i] <= D) s.count_le[degree[i]] += 1;
  for (int64_t k = 1; k <= D; ++k) s.count_le[k] += s.count_le[k - 1];
  return s;
}

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

// out[:, r0:r1] of a layer: bias + input[:, :k] @ Wt[:k, r0:r1] (+ context).
at::Tensor block(const at::Tensor& input, int64_t k, const at::Tensor& wt, const at::Tensor& bias,
                 const at::Tensor& context, int64_t r0, int64_t r1) {
  at::Tensor pre = at::addmm(bias.narrow(0, r0, r1 - r0), input.narrow(1, 0, k),
                             wt.narrow(0, 0, k).narrow(1, r0, r1 - r0));
  if (context.defined()) pre.add_(context.narrow(1, r0, r1 - r0));
  return pre;
}

}  // namespace

void check_made_inverse_grads(const at::Tensor& grad_x, const at::Tensor& grad_logabsdet,
                              const at::Tensor& y) {
  TORCH_CHECK(grad_x.sizes() == y.sizes(), "nflux: grad_x must have shape ", y.sizes(), ", got ", grad_x.sizes());
  TORCH_CHECK(grad_logabsdet.dim() == 1 && grad_logabsdet.size(0) == y.size(0),
              "nflux: grad_logabsdet must have shape [", y.size(0), "], got ", grad_logabsdet.sizes());
}

MadePlan made_plan(const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                   at::IntArrayRef degrees, at::TensorList context_terms, bool residual,
                   c10::string_view activation, c10::string_view transformer, double tail_bound,
                   double min_bin_width, double min_bin_height, double min_derivative,
                   bool transpose) {
  check_floating(y, "y");
  TORCH_CHECK(y.dim() == 2, "nflux: y must have shape [batch, features], got ", y.sizes());
  const int64_t B = y.size(0), D = y.size(1);
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n >= 2, "nflux: weights needs at least one hidden layer and the output layer, got ",
              n, " matrices");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == n, "nflux: biases must have one entry per weight (",
              n, "), got ", biases.size());
  TORCH_CHECK(!residual || (n % 2 == 0 && n >= 4), "nflux: a residual MADE has weights [initial, "
              "(2 per block)..., output], an even number >= 4, got ", n);
  const int64_t hidden = n - 1;
  TORCH_CHECK(context_terms.empty() || static_cast<int64_t>(context_terms.size()) == hidden,
              "nflux: context_terms must be empty or have one entry per hidden layer (", hidden,
              "), got ", context_terms.size());
  const int activation_kind = activation_kind_for(activation);
  const bool affine = transformer == "affine";
  TORCH_CHECK(affine || transformer == "rq_spline",
              "nflux: transformer must be 'affine' or 'rq_spline', got '", std::string(transformer), "'");

  MadePlan plan;
  plan.batch = B;
  plan.features = D;
  plan.residual = residual;
  plan.affine = affine;
  plan.activation_kind = activation_kind;
  plan.tail_bound = tail_bound;
  plan.min_bin_width = min_bin_width;
  plan.min_bin_height = min_bin_height;
  plan.min_derivative = min_derivative;
  std::vector<int64_t>& width = plan.widths;
  width.resize(n);
  for (int64_t l = 0; l < n; ++l) {
    check_same_dtype_device(weights[l], y, "weights", "y", l);
    check_same_dtype_device(biases[l], y, "biases", "y", l);
    const int64_t fan_in = l == 0 ? D : width[l - 1];
    TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(1) == fan_in, "nflux: weights[", l,
                "] must have shape [out, ", fan_in, "], got ", weights[l].sizes());
    width[l] = weights[l].size(0);
    TORCH_CHECK(biases[l].dim() == 1 && biases[l].size(0) == width[l], "nflux: biases[", l,
                "] must have shape [", width[l], "], got ", biases[l].sizes());
    if (l < hidden && !context_terms.empty()) {
      check_same_dtype_device(context_terms[l], y, "context_terms", "y", l);
      TORCH_CHECK(context_terms[l].dim() == 2 && context_terms[l].size(0) == B &&
                      context_terms[l].size(1) == width[l],
                  "nflux: context_terms[", l, "] must have shape [", B, ", ", width[l], "], got ",
                  context_terms[l].sizes());
    }
  }
  TORCH_CHECK(D >= 1 && width[n - 1] % D == 0, "nflux: the output layer must have features * "
              "params rows, got ", width[n - 1], " for ", D, " features");
  const int64_t P = width[n - 1] / D;
  const int64_t K = (P + 1) / 3;
  plan.params = P;
  plan.bins = K;
  if (affine) {
    TORCH_CHECK(P == 2, "nflux: the affine transformer needs 2 params per feature (shift, log_scale), got ", P);
  } else {
    TORCH_CHECK(P >= 2 && (P + 1) % 3 == 0, "nflux: the rq_spline transformer needs 3K-1 params per feature, got ", P);
    check_rq_spline_args(y.select(1, 0), y.new_empty({B, K}), y.new_empty({B, K}),
                         y.new_empty({B, K - 1}), tail_bound, min_bin_width, min_bin_height,
                         min_derivative);
  }
  int64_t total = D;
  for (int64_t l = 0; l < hidden; ++l) total += width[l];
  TORCH_CHECK(static_cast<int64_t>(degrees.size()) == total, "nflux: degrees must hold the ", D,
              " input degrees and then every hidden unit's degree (", total, " in all), got ",
              degrees.size());

  // Sorting: inputs by degree (a permutation of 1..D), hidden units by degree.
  std::vector<int64_t> seen(D + 1, 0);
  for (int64_t i = 0; i < D; ++i) {
    TORCH_CHECK(degrees[i] >= 1 && degrees[i] <= D && !seen[degrees[i]]++,
                "nflux: the input degrees must be a permutation of 1..", D, ", got ",
                degrees.slice(0, D));
  }
  plan.sorts_in = sort_by_degree(degrees.data(), D, D);
  int64_t offset = D;
  for (int64_t l = 0; l < hidden; ++l) {
    for (int64_t i = 0; i < width[l]; ++i)
      TORCH_CHECK(degrees[offset + i] >= 0, "nflux: hidden degrees must be >= 0, got ", degrees[offset + i]);
    if (residual && l > 0) {
      TORCH_CHECK(width[l] == width[0] && std::equal(degrees.begin() + offset, degrees.begin() + offset + width[l],
                                                     degrees.begin() + D),
                  "nflux: a residual MADE needs the same degrees in every hidden layer");
    }
    plan.sorts.push_back(sort_by_degree(degrees.data() + offset, width[l], D));
    offset += width[l];
  }

  // Weights permuted once per call (O(params)), so every step reads contiguous slices.
  const at::Device device = y.device();
  plan.in_perm = index_tensor(plan.sorts_in.perm, device);
  std::vector<int64_t> out_rows(D * P);
  for (int64_t p = 0; p < D; ++p)
    for (int64_t q = 0; q < P; ++q) out_rows[p * P + q] = plan.sorts_in.perm[p] * P + q;
  plan.weights.resize(n);
  plan.biases.resize(n);
  plan.context.resize(hidden);
  plan.row_perm.resize(n);
  at::Tensor prev_perm = plan.in_perm;
  for (int64_t l = 0; l < n; ++l) {
    const at::Tensor rows = l < hidden ? index_tensor(plan.sorts[l].perm, device) : index_tensor(out_rows, device);
    const at::Tensor w = weights[l].index_select(0, rows).index_select(1, prev_perm);
    plan.weights[l] = transpose ? w.t().contiguous() : w.contiguous();
    plan.biases[l] = biases[l].index_select(0, rows).contiguous();
    plan.row_perm[l] = rows;
    if (l < hidden && !context_terms.empty()) plan.context[l] = context_terms[l].index_select(1, rows).contiguous();
    prev_perm = rows;
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor> made_inverse_composite(
    const at::Tensor& y, at::TensorList weights, at::TensorList biases, at::IntArrayRef degrees,
    at::TensorList context_terms, bool residual, c10::string_view activation,
    c10::string_view transformer, double tail_bound, double min_bin_width,
    double min_bin_height, double min_derivative) {
  const MadePlan plan =
      made_plan(y, weights, biases, degrees, context_terms, residual, activation, transformer,
                tail_bound, min_bin_width, min_bin_height, min_derivative, /*transpose=*/true);
  const Activation act = kActivations[plan.activation_kind];
  const int64_t B = plan.batch, D = plan.features, P = plan.params, K = plan.bins;
  const int64_t n = static_cast<int64_t>(plan.weights.size()), hidden = n - 1;
  const std::vector<int64_t>& width = plan.widths;
  const std::vector<at::Tensor>& wt = plan.weights;
  const std::vector<at::Tensor>& bs = plan.biases;
  const std::vector<at::Tensor>& ctx = plan.context;
  const std::vector<Sorted>& sorts = plan.sorts;
  const bool affine = plan.affine;

  static auto spline = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("nflux::rq_spline", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, bool, double, double, double, double)>();

  const at::Tensor ys = y.index_select(1, plan.in_perm);
  at::Tensor xs = at::zeros_like(ys);
  at::Tensor logabsdet = at::zeros({B}, y.options());
  // Per hidden layer the values the next layer reads (plain: activations; residual: below).
  std::vector<at::Tensor> buf(hidden);
  for (int64_t l = 0; l < hidden; ++l) buf[l] = at::empty({B, width[l]}, y.options());
  // Residual: buf[0] = stream after the initial layer, buf[2b+2] = stream after block b, and
  // buf[2b+1] = the block's inner activations; act(stream) is kept per block in gated[b].
  const int64_t blocks = residual ? (n - 2) / 2 : 0;
  std::vector<at::Tensor> gated(blocks);
  for (int64_t b = 0; b < blocks; ++b) gated[b] = at::empty({B, width[0]}, y.options());
  const at::Tensor none;
  for (int64_t d = 1; d <= D; ++d) {
    const int64_t k = d - 1;  // the degree of the hidden units that become computable now
    for (int64_t l = 0; l < hidden; ++l) {
      const int64_t r0 = sorts[l].upto(k - 1), r1 = sorts[l].upto(k);
      if (r1 == r0) continue;
      const at::Tensor& c = ctx[l];
      if (l == 0) {
        const at::Tensor pre = block(xs, k, wt[0], bs[0], c, r0, r1);
        buf[0].narrow(1, r0, r1 - r0).copy_(residual ? pre : act(pre));
        continue;
      }
      const int64_t kin = sorts[l - 1].upto(k);
      if (!residual) {
        buf[l].narrow(1, r0, r1 - r0).copy_(act(block(buf[l - 1], kin, wt[l], bs[l], c, r0, r1)));
      } else if (l % 2 == 1) {  // first linear of block (l-1)/2 reads act(stream)
        const at::Tensor& g = gated[(l - 1) / 2];
        g.narrow(1, r0, r1 - r0).copy_(act(buf[l - 1].narrow(1, r0, r1 - r0)));
        buf[l].narrow(1, r0, r1 - r0).copy_(act(block(g, kin, wt[l], bs[l], c, r0, r1)));
      } else {  // second linear: stream += block output
        const at::Tensor t = block(buf[l - 1], kin, wt[l], bs[l], c, r0, r1);
        buf[l].narrow(1, r0, r1 - r0).copy_(t.add_(buf[l - 2].narrow(1, r0, r1 - r0)));
      }
    }
    const int64_t kin = sorts[hidden - 1].upto(k);
    const at::Tensor params = block(buf[hidden - 1], kin, wt[n - 1], bs[n - 1], none, k * P, d * P);
    const at::Tensor yd = ys.select(1, k);
    if (affine) {
      const at::Tensor log_scale = params.select(1, 1);
      xs.select(1, k).copy_((yd - params.select(1, 0)) * at::exp(-log_scale));
      logabsdet.sub_(log_scale);
    } else {
      auto [xd, lad] = spline.call(yd, params.narrow(1, 0, K), params.narrow(1, K, K),
                                   params.narrow(1, 2 * K, K - 1), true, tail_bound,
                                   min_bin_width, min_bin_height, min_derivative);
      xs.select(1, k).copy_(xd);
      logabsdet.add_(lad);
    }
  }
  at::Tensor x = at::empty_like(ys);
  x.index_copy_(1, plan.in_perm, xs);
  return {x, logabsdet};
}

TORCH_LIBRARY_IMPL(nflux, CPU, m) { m.impl("_made_inverse_composite", &made_inverse_composite); }

#ifdef NFLUX_WITH_CUDA
// made_inverse itself is registered for CUDA by csrc/cuda/made_inverse_binding.cpp.
TORCH_LIBRARY_IMPL(nflux, CUDA, m) { m.impl("_made_inverse_composite", &made_inverse_composite); }
#endif

}  // namespace nflux
