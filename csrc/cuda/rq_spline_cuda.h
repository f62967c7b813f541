// Launchers of the CUDA rq_spline kernels: raw pointers, sizes and a stream only, so that the
// .cu files compile with nvcc and no torch (see DESIGN.md). The torch glue lives in
// rq_spline_binding.cpp.
//
// Layout (all contiguous, of element type `dtype`): x, y, lad, grads of x: [n];
// uw, uh and their grads: [n, K]; ud and its grad: [n, K-1].
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace nflux {
namespace cuda {

// Bytes of device workspace the forward (backward = false) or backward launcher needs for n
// elements with K bins. Zero for K <= 128, where each thread's scratch is a local array; above
// that every thread gets a slice of a global buffer the caller allocates (any alignment of 16
// bytes or more, e.g. a fresh allocation from the caching allocator).
size_t rq_spline_workspace_bytes(DType dtype, int64_t n, int64_t K, bool backward);

// y, lad = rq_spline(x; uw, uh, ud) (inverse = false) or its inverse. Returns the launch error.
cudaError_t rq_spline_forward_cuda(DType dtype, const void* x, const void* uw, const void* uh,
                                   const void* ud, void* y, void* lad, int64_t n, int64_t K,
                                   bool inverse, double tail_bound, double min_bin_width,
                                   double min_bin_height, double min_derivative, void* workspace,
                                   cudaStream_t stream);

// Gradients of a loss with respect to x, uw, uh, ud, given its gradients grad_y and grad_lad
// with respect to the outputs of rq_spline_forward_cuda (recomputed from the inputs).
cudaError_t rq_spline_backward_cuda(DType dtype, const void* grad_y, const void* grad_lad,
                                    const void* x, const void* uw, const void* uh, const void* ud,
                                    void* grad_x, void* grad_uw, void* grad_uh, void* grad_ud,
                                    int64_t n, int64_t K, bool inverse, double tail_bound,
                                    double min_bin_width, double min_bin_height,
                                    double min_derivative, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace nflux
