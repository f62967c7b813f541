// One batch tile of the made_inverse CPU kernels (forward and backward): kTile rows walk the
// degrees with every hidden unit resident in cache, stored unit-major ([unit][row]) so that the
// per-degree products are axpy loops over rows that vectorise. Small per-step GEMMs through
// ATen would re-read the whole activation prefix from memory at every step and pay dispatch
// overhead D * layers times; this keeps the total work at one pass per sweep.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../made_inverse.h"
#include "nflux/common.h"

namespace nflux {

constexpr int64_t kTile = 64;  // rows per tile: a 256-unit layer is 64 KiB of floats

// What a tile writes to the backward's global buffers, all in the plan's degree-sorted order;
// unit-major like the tile (contiguous copies; the GEMMs after take them transposed).
template <typename scalar_t>
struct TileGradOutputs {
  scalar_t* grad_y = nullptr;              // [B, D], original column order
  std::vector<scalar_t*> grad_pre;         // per layer [width, B]: d loss / d (layer's linear output)
  std::vector<scalar_t*> layer_input;      // per layer [fan_in, B]: what the layer's linear read
};

template <typename scalar_t>
class MadeTile {
 public:
  // keep_for_backward: also keep pre-activations and every step's transformer parameters.
  MadeTile(const MadePlan& plan, bool keep_for_backward);

  // The one-pass inversion of rows b0 .. b0+rows-1 of y [B, D] (contiguous); leaves x (sorted
  // order) and every hidden unit in the tile. Writes x and logabsdet if given.
  void forward(const scalar_t* y, int64_t b0, int64_t rows, scalar_t* x, scalar_t* logabsdet);

  // After forward on the same rows: the reverse sweep D..1 (the transposed triangular solve of
  // the implicit function theorem), then the per-layer gradients written to `out`.
  void backward(const scalar_t* y, const scalar_t* grad_x, const scalar_t* grad_logabsdet,
                int64_t b0, int64_t rows, const TileGradOutputs<scalar_t>& out);

 private:
  using acc = acc_t<scalar_t>;
  const MadePlan& plan_;
  int64_t D_, P_, K_, n_, hidden_;
  bool keep_;
  int act_;  // activation::Kind
  std::vector<const scalar_t*> w_, b_, c_;
  // Unit-major [units][kTile] buffers. buf: what the next layer reads (plain: activations;
  // residual: the stream at even layers, a block's inner activations at odd ones); gated:
  // act(stream) read by a residual block's first layer; pre: pre-activations (backward only).
  std::vector<scalar_t> xs_, params_;
  std::vector<std::vector<scalar_t>> buf_, gated_, pre_;
  // Backward: cotangents of xs, buf and gated, and of each layer's linear output.
  std::vector<scalar_t> g_xs_, g_params_;
  std::vector<std::vector<scalar_t>> g_buf_, g_gated_, g_pre_;
  std::vector<acc> scratch_, lad_;
  std::vector<scalar_t> spline_;

  const scalar_t* layer_input(int64_t l) const;
};

}  // namespace nflux
