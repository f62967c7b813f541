// Torch glue of the affine_coupling CUDA kernels: checks, device guard, current stream, dtype.
// Built only in CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "affine_coupling_cuda.h"

namespace nflux {
namespace {

cuda::Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "nflux: affine_coupling on CUDA supports float32, float64, "
                                "float16 and bfloat16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "nflux: ", what, " kernel launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_cuda(const at::Tensor& x,
                                                        const at::Tensor& shift,
                                                        const std::optional<at::Tensor>& logits,
                                                        int64_t scale_kind,
                                                        std::optional<double> clamp,
                                                        bool inverse) {
  const auto kind = check_affine_coupling_args(x, shift, logits, scale_kind, clamp);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), tc = shift.contiguous();
  const at::Tensor sc = kind == 0 ? at::Tensor() : logits->contiguous();
  const int64_t B = x.size(0), D = B == 0 ? 0 : x.numel() / B;
  at::Tensor y = at::empty_like(xc);
  at::Tensor lad = at::zeros({B}, x.options());
  if (x.numel() == 0) return {y, lad};
  check_launch(cuda::affine_coupling_forward(
                   to_dtype(x.scalar_type()), xc.data_ptr(), tc.data_ptr(),
                   kind == 0 ? nullptr : sc.data_ptr(), y.data_ptr(), lad.data_ptr(), B, D,
                   static_cast<int>(kind), clamp.value_or(0.0), inverse,
                   c10::cuda::getCurrentCUDAStream()),
               "affine_coupling");
  return {y, lad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_logabsdet, const at::Tensor& x,
    const at::Tensor& shift, const std::optional<at::Tensor>& logits, int64_t scale_kind,
    std::optional<double> clamp, bool inverse) {
  const auto kind = check_affine_coupling_args(x, shift, logits, scale_kind, clamp);
  check_output_grads(grad_y, grad_logabsdet, x);
  const c10::cuda::CUDAGuard guard(x.device());
  // A gradient expanded from one value (the gradient of y.sum()) is read as that value.
  bool broadcast = grad_y.numel() > 0;
  for (const auto st : grad_y.strides()) broadcast = broadcast && st == 0;
  const at::Tensor g = broadcast ? grad_y : grad_y.contiguous();
  const at::Tensor gl = grad_logabsdet.contiguous();
  const at::Tensor xc = x.contiguous(), tc = shift.contiguous();
  const at::Tensor sc = kind == 0 ? at::Tensor() : logits->contiguous();
  const int64_t B = x.size(0), D = B == 0 ? 0 : x.numel() / B;
  // Forward direction: grad_shift equals grad_y, so it is returned empty and not written.
  at::Tensor g_in = at::empty_like(xc);
  at::Tensor g_shift = inverse ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor g_logits = kind == 0 ? at::empty({0}, x.options()) : at::empty_like(xc);
  if (x.numel() == 0) return {g_in, g_shift, g_logits};
  check_launch(cuda::affine_coupling_backward(
                   to_dtype(x.scalar_type()), g.data_ptr(), broadcast, gl.data_ptr(),
                   xc.data_ptr(), tc.data_ptr(), kind == 0 ? nullptr : sc.data_ptr(),
                   g_in.data_ptr(), inverse ? g_shift.data_ptr() : nullptr,
                   kind == 0 ? nullptr : g_logits.data_ptr(), B, D, static_cast<int>(kind),
                   clamp.value_or(0.0), inverse, c10::cuda::getCurrentCUDAStream()),
               "affine_coupling_backward");
  return {g_in, g_shift, g_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CUDA, m) {
  m.impl("affine_coupling", &affine_coupling_cuda);
  m.impl("affine_coupling_backward", &affine_coupling_backward_cuda);
}

}  // namespace nflux
