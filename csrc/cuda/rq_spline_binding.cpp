// CUDA torch glue of rq_spline and rq_spline_backward: the CPU op's checks, contiguous inputs,
// device guard, current stream, dtype mapping and workspace, then the raw-pointer launchers of
// rq_spline.cu. Built only when CMake finds CUDA and torch has it. The stream comes from
// c10/cuda (what at::cuda::getCurrentCUDAStream forwards to), which spares this file the
// cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "rq_spline_cuda.h"

namespace nflux {
namespace {

cuda::DType to_cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::f32;
    case at::kDouble: return cuda::DType::f64;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default:
      TORCH_CHECK(false, "nflux: rq_spline on CUDA supports float32, float64, float16 and "
                         "bfloat16 inputs, got dtype ", t);
  }
}

// A scratch buffer for K above the kernels' largest local bucket; undefined when none is needed.
at::Tensor make_workspace(const at::Tensor& like, cuda::DType dtype, int64_t n, int64_t K,
                          bool backward) {
  const size_t bytes = cuda::rq_spline_workspace_bytes(dtype, n, K, backward);
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> rq_spline_cuda(const at::Tensor& inputs,
                                                  const at::Tensor& widths,
                                                  const at::Tensor& heights,
                                                  const at::Tensor& derivatives, bool inverse,
                                                  double tail_bound, double min_bin_width,
                                                  double min_bin_height, double min_derivative) {
  const int64_t K = check_rq_spline_args(inputs, widths, heights, derivatives, tail_bound,
                                         min_bin_width, min_bin_height, min_derivative);
  TORCH_CHECK(inputs.is_cuda(), "nflux: rq_spline_cuda expects CUDA tensors, got inputs on ",
              inputs.device());
  const cuda::DType dtype = to_cuda_dtype(inputs.scalar_type());
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor uw = widths.contiguous();
  const at::Tensor uh = heights.contiguous();
  const at::Tensor ud = derivatives.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor logabsdet = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {out, logabsdet};

  at::Tensor workspace = make_workspace(x, dtype, n, K, /*backward=*/false);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  C10_CUDA_CHECK(cuda::rq_spline_forward_cuda(
      dtype, x.const_data_ptr(), uw.const_data_ptr(), uh.const_data_ptr(), ud.const_data_ptr(),
      out.mutable_data_ptr(), logabsdet.mutable_data_ptr(), n, K, inverse, tail_bound,
      min_bin_width, min_bin_height, min_derivative,
      workspace.defined() ? workspace.mutable_data_ptr() : nullptr, stream));
  return {out, logabsdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rq_spline_backward_cuda(
    const at::Tensor& grad_outputs, const at::Tensor& grad_logabsdet, const at::Tensor& inputs,
    const at::Tensor& widths, const at::Tensor& heights, const at::Tensor& derivatives,
    bool inverse, double tail_bound, double min_bin_width, double min_bin_height,
    double min_derivative) {
  const int64_t K = check_rq_spline_backward_args(grad_outputs, grad_logabsdet, inputs, widths,
                                                  heights, derivatives, tail_bound, min_bin_width,
                                                  min_bin_height, min_derivative);
  TORCH_CHECK(inputs.is_cuda(),
              "nflux: rq_spline_backward_cuda expects CUDA tensors, got inputs on ",
              inputs.device());
  const cuda::DType dtype = to_cuda_dtype(inputs.scalar_type());
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor uw = widths.contiguous();
  const at::Tensor uh = heights.contiguous();
  const at::Tensor ud = derivatives.contiguous();
  const at::Tensor go = grad_outputs.contiguous();
  const at::Tensor gl = grad_logabsdet.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(uw);
  at::Tensor gh = at::empty_like(uh);
  at::Tensor gd = at::empty_like(ud);
  const int64_t n = x.numel();
  if (n == 0) return {gx, gw, gh, gd};

  at::Tensor workspace = make_workspace(x, dtype, n, K, /*backward=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  C10_CUDA_CHECK(cuda::rq_spline_backward_cuda(
      dtype, go.const_data_ptr(), gl.const_data_ptr(), x.const_data_ptr(), uw.const_data_ptr(),
      uh.const_data_ptr(), ud.const_data_ptr(), gx.mutable_data_ptr(), gw.mutable_data_ptr(),
      gh.mutable_data_ptr(), gd.mutable_data_ptr(), n, K, inverse, tail_bound, min_bin_width,
      min_bin_height, min_derivative,
      workspace.defined() ? workspace.mutable_data_ptr() : nullptr, stream));
  return {gx, gw, gh, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(nflux, CUDA, m) {
  m.impl("rq_spline", &rq_spline_cuda);
  m.impl("rq_spline_backward", &rq_spline_backward_cuda);
}

}  // namespace nflux
