// Launcher of the made_inverse CUDA kernel, on raw pointers and a stream: the torch glue
// (made_inverse_binding.cpp) and the kernel (made_inverse.cu) share no header but this one.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace nflux {
namespace cuda {

constexpr int kMadeMaxLayers = 16;  // hidden layers + the output layer

// A MADE whose every layer has its units sorted by degree (csrc/made_inverse.h: MadePlan),
// all pointers on the device, element type `dtype` (f32 or f64).
struct MadeInverseArgs {
  DType dtype = DType::f32;
  const void* weights[kMadeMaxLayers] = {};  // [out, in] row-major, rows and columns sorted
  const void* biases[kMadeMaxLayers] = {};
  const void* context[kMadeMaxLayers] = {};  // hidden layers: [B, out] (columns sorted) or null
  int widths[kMadeMaxLayers] = {};           // out features per layer, the output layer last
  int layers = 0;                            // hidden layers + 1
  const int* count_le = nullptr;  // [hidden][D + 1]: a hidden layer's units of degree <= k
  const int* in_perm = nullptr;   // [D]: generation step k makes input in_perm[k]
  const void* y = nullptr;        // [B, D]
  void* x = nullptr;              // [B, D]
  void* logabsdet = nullptr;      // [B]
  int64_t batch = 0;
  int features = 0, params = 0, bins = 0;
  bool residual = false, affine = true;
  int activation = 0;  // nflux::activation::Kind
  double tail_bound = 3, min_bin_width = 1e-3, min_bin_height = 1e-3, min_derivative = 1e-3;
};

// The backward's inputs and outputs (device pointers, the dtype of MadeInverseArgs).
struct MadeInverseGrads {
  const void* grad_x = nullptr;          // [B, D]
  const void* grad_logabsdet = nullptr;  // [B]
  void* grad_y = nullptr;                // [B, D]
  // Per layer (hidden layers, then the output layer), sorted as the plan: the cotangent of the
  // linear output [B, width] and the input the linear read [B, fan_in].
  void* grad_pre[kMadeMaxLayers] = {};
  void* layer_input[kMadeMaxLayers] = {};
};

// One launch of a persistent kernel: each block takes tiles of rows in turn and walks the
// degrees with the tile's hidden units in shared memory. Returns cudaErrorInvalidConfiguration
// if even a one-row tile does not fit in shared memory (the caller then takes another path).
cudaError_t made_inverse_forward(const MadeInverseArgs& args, cudaStream_t stream);

// The backward in one launch: recomputes the sweep per tile, then the reverse sweep; the same
// shared-memory rule (and cudaErrorInvalidConfiguration) as the forward, with more per row.
cudaError_t made_inverse_backward(const MadeInverseArgs& args, const MadeInverseGrads& grads,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace nflux
