// Launchers of the affine_coupling CUDA kernels, on raw pointers and a stream, so that the
// torch glue (affine_coupling_binding.cpp) and the kernels (affine_coupling.cu) share no
// headers but this one. All tensors are contiguous [B, D] rows of the given dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nflux {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Forward (or inverse) pass: y and the per-row logabsdet. logits may be null for the additive
// kind (scale_kind 0); clamp <= 0 means no soft clamp.
cudaError_t affine_coupling_forward(Dtype dtype, const void* x, const void* shift,
                                    const void* logits, void* y, void* logabsdet, int64_t B,
                                    int64_t D, int scale_kind, double clamp, bool inverse,
                                    cudaStream_t stream);

// Backward pass from the saved input. grad_y_broadcast: grad_y holds one value for every
// element (an expanded gradient). grad_logits may be null for the additive kind.
cudaError_t affine_coupling_backward(Dtype dtype, const void* grad_y, bool grad_y_broadcast,
                                     const void* grad_logabsdet, const void* x, const void* shift,
                                     const void* logits, void* grad_x, void* grad_shift,
                                     void* grad_logits, int64_t B, int64_t D, int scale_kind,
                                     double clamp, bool inverse, cudaStream_t stream);

}  // namespace cuda
}  // namespace nflux
