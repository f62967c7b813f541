// CUDA kernels of rq_spline and rq_spline_backward: one thread per element (grid-stride, 64-bit
// indices) calling the shared per-element math in nflux/rq_spline.h. No torch headers here.
//
// Each element needs rq::forward_scratch(K) / rq::backward_scratch(K) accumulator slots. For
// K <= 128 they are a per-thread local array sized by a compile-time bucket (8..128); where K
// equals a bucket of 8, 16 or 32 exactly, K is a compile-time constant, so the loops unroll (K = 8
// forward then keeps its scratch in registers). Above 128 each thread uses its own slice of a
// global workspace that the caller allocates.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "nflux/rq_spline.h"
#include "rq_spline_cuda.h"

namespace nflux {
namespace cuda {
namespace {

// A 16-bit float stored as itself but converting to and from float explicitly, so the shared
// math (which casts with static_cast<acc_t> / static_cast<scalar_t>) works even when torch's
// build defines __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Raw> __host__ __device__ __forceinline__ Raw from_float(float v);
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename Raw>
struct Half16 {
  Raw raw;
  Half16() = default;
  __host__ __device__ __forceinline__ Half16(float v) : raw(from_float<Raw>(v)) {}
  __host__ __device__ __forceinline__ operator float() const { return to_float(raw); }
};
static_assert(sizeof(Half16<__half>) == 2 && alignof(Half16<__half>) == alignof(__half),
              "Half16 must share __half's layout");
static_assert(sizeof(Half16<__nv_bfloat16>) == 2, "Half16 must share __nv_bfloat16's layout");

}  // namespace
}  // namespace cuda

// Accumulate 16-bit types in float (the primary acc_type template already says so; spelled
// out so a change there cannot silently make half kernels accumulate in half).
template <> struct acc_type<cuda::Half16<__half>> { using type = float; };
template <> struct acc_type<cuda::Half16<__nv_bfloat16>> { using type = float; };

namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kMaxBucket = 128;
// Grids never exceed this many blocks; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// Workspace path (K > kMaxBucket): at most this many threads and this many bytes in all.
constexpr int64_t kMaxWorkspaceThreads = 65536;
constexpr int64_t kWorkspaceBudget = int64_t(256) << 20;

// Scratch slots of a bucket, as compile-time constants for the local arrays. They must cover
// rq::forward_scratch / rq::backward_scratch, which the launchers check on the host.
template <int KMAX> struct Slots {
  static constexpr int forward = KMAX > 0 ? 2 * (KMAX + 1) : 1;
  static constexpr int backward = KMAX > 0 ? 4 * KMAX + 2 : 1;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int acc_size(DType t) { return t == DType::f64 ? 8 : 4; }

int64_t scratch_slots(int64_t K, bool backward) {
  return backward ? rq::backward_scratch(K) : rq::forward_scratch(K);
}

// Threads of the workspace path: one per element up to the caps, whole blocks only.
int64_t workspace_threads(DType t, int64_t n, int64_t K, bool backward) {
  const int64_t per_thread = scratch_slots(K, backward) * acc_size(t);
  const int64_t by_budget = std::max<int64_t>(kWorkspaceBudget / per_thread / kBlock, 1) * kBlock;
  return std::min({ceil_div(n, kBlock) * kBlock, kMaxWorkspaceThreads, by_budget});
}

template <typename acc>
rq::Options<acc> make_options(double tail_bound, double min_w, double min_h, double min_d) {
  return {static_cast<acc>(tail_bound), static_cast<acc>(min_w), static_cast<acc>(min_h),
          static_cast<acc>(min_d)};
}

// KMAX > 0: local scratch for K <= KMAX (K == KMAX at compile time when EXACT).
// KMAX == 0: scratch in workspace, forward_scratch(K) slots per thread.
template <typename scalar_t, int KMAX, bool EXACT>
__global__ void __launch_bounds__(kBlock)
    rq_spline_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ uw,
                             const scalar_t* __restrict__ uh, const scalar_t* __restrict__ ud,
                             scalar_t* __restrict__ y, scalar_t* __restrict__ lad, int64_t n,
                             int64_t K_runtime, bool inverse, rq::Options<acc_t<scalar_t>> opt,
                             acc_t<scalar_t>* __restrict__ workspace) {
  using acc = acc_t<scalar_t>;
  const int64_t K = EXACT ? int64_t(KMAX) : K_runtime;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  acc local[Slots<KMAX>::forward];
  acc* scratch = KMAX > 0 ? local : workspace + tid * rq::forward_scratch(K);
  for (int64_t i = tid; i < n; i += stride) {
    acc out, logabsdet;
    rq::evaluate(static_cast<acc>(x[i]), uw + i * K, uh + i * K, ud + i * (K - 1), K, inverse,
                 opt, scratch, out, logabsdet);
    y[i] = static_cast<scalar_t>(out);
    lad[i] = static_cast<scalar_t>(logabsdet);
  }
}

template <typename scalar_t, int KMAX, bool EXACT>
__global__ void __launch_bounds__(kBlock)
    rq_spline_backward_kernel(const scalar_t* __restrict__ grad_y,
                              const scalar_t* __restrict__ grad_lad,
                              const scalar_t* __restrict__ x, const scalar_t* __restrict__ uw,
                              const scalar_t* __restrict__ uh, const scalar_t* __restrict__ ud,
                              scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_uw,
                              scalar_t* __restrict__ grad_uh, scalar_t* __restrict__ grad_ud,
                              int64_t n, int64_t K_runtime, bool inverse,
                              rq::Options<acc_t<scalar_t>> opt,
                              acc_t<scalar_t>* __restrict__ workspace) {
  using acc = acc_t<scalar_t>;
  const int64_t K = EXACT ? int64_t(KMAX) : K_runtime;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  acc local[Slots<KMAX>::backward];
  acc* scratch = KMAX > 0 ? local : workspace + tid * rq::backward_scratch(K);
  for (int64_t i = tid; i < n; i += stride) {
    acc g_x;
    rq::evaluate_backward(static_cast<acc>(x[i]), uw + i * K, uh + i * K, ud + i * (K - 1), K,
                          inverse, opt, static_cast<acc>(grad_y[i]),
                          static_cast<acc>(grad_lad[i]), scratch, g_x, grad_uw + i * K,
                          grad_uh + i * K, grad_ud + i * (K - 1));
    grad_x[i] = static_cast<scalar_t>(g_x);
  }
}

// The arguments of one call, typed.
template <typename scalar_t>
struct Args {
  const scalar_t *grad_y, *grad_lad, *x, *uw, *uh, *ud;
  scalar_t *y, *lad, *grad_x, *grad_uw, *grad_uh, *grad_ud;
  int64_t n, K;
  bool inverse;
  rq::Options<acc_t<scalar_t>> opt;
  acc_t<scalar_t>* workspace;
  cudaStream_t stream;
};

template <typename scalar_t, int KMAX, bool EXACT>
cudaError_t launch(const Args<scalar_t>& a, bool backward, int64_t threads) {
  if (KMAX > 0 && (Slots<KMAX>::forward < rq::forward_scratch(KMAX) ||
                   Slots<KMAX>::backward < rq::backward_scratch(KMAX))) {
    return cudaErrorInvalidValue;  // the header's scratch sizes grew: Slots must follow
  }
  const unsigned blocks = static_cast<unsigned>(ceil_div(threads, kBlock));
  if (backward) {
    rq_spline_backward_kernel<scalar_t, KMAX, EXACT><<<blocks, kBlock, 0, a.stream>>>(
        a.grad_y, a.grad_lad, a.x, a.uw, a.uh, a.ud, a.grad_x, a.grad_uw, a.grad_uh, a.grad_ud,
        a.n, a.K, a.inverse, a.opt, a.workspace);
  } else {
    rq_spline_forward_kernel<scalar_t, KMAX, EXACT><<<blocks, kBlock, 0, a.stream>>>(
        a.x, a.uw, a.uh, a.ud, a.y, a.lad, a.n, a.K, a.inverse, a.opt, a.workspace);
  }
  return cudaGetLastError();
}

// Buckets up to kMaxExact also get an exact-K kernel (the common bin counts); unrolling the
// larger ones costs compile time for little gain.
constexpr int kMaxExact = 32;

template <typename scalar_t, int KMAX>
cudaError_t launch_bucket(const Args<scalar_t>& a, bool backward, int64_t threads) {
  if (KMAX <= kMaxExact && a.K == KMAX) {
    return launch<scalar_t, KMAX, (KMAX <= kMaxExact)>(a, backward, threads);
  }
  return launch<scalar_t, KMAX, false>(a, backward, threads);
}

template <typename scalar_t>
cudaError_t dispatch_k(const Args<scalar_t>& a, bool backward, DType dtype) {
  const int64_t threads = std::min(ceil_div(a.n, kBlock), kMaxBlocks) * kBlock;
  if (a.K <= 8) return launch_bucket<scalar_t, 8>(a, backward, threads);
  if (a.K <= 16) return launch_bucket<scalar_t, 16>(a, backward, threads);
  if (a.K <= 32) return launch_bucket<scalar_t, 32>(a, backward, threads);
  if (a.K <= 64) return launch_bucket<scalar_t, 64>(a, backward, threads);
  if (a.K <= kMaxBucket) return launch_bucket<scalar_t, kMaxBucket>(a, backward, threads);
  if (a.workspace == nullptr) return cudaErrorInvalidValue;
  return launch<scalar_t, 0, false>(a, backward, workspace_threads(dtype, a.n, a.K, backward));
}

template <typename scalar_t>
cudaError_t run(DType dtype, bool backward, const void* grad_y, const void* grad_lad,
                const void* x, const void* uw, const void* uh, const void* ud, void* y, void* lad,
                void* grad_x, void* grad_uw, void* grad_uh, void* grad_ud, int64_t n, int64_t K,
                bool inverse, double tail_bound, double min_w, double min_h, double min_d,
                void* workspace, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  Args<scalar_t> a;
  a.grad_y = static_cast<const scalar_t*>(grad_y);
  a.grad_lad = static_cast<const scalar_t*>(grad_lad);
  a.x = static_cast<const scalar_t*>(x);
  a.uw = static_cast<const scalar_t*>(uw);
  a.uh = static_cast<const scalar_t*>(uh);
  a.ud = static_cast<const scalar_t*>(ud);
  a.y = static_cast<scalar_t*>(y);
  a.lad = static_cast<scalar_t*>(lad);
  a.grad_x = static_cast<scalar_t*>(grad_x);
  a.grad_uw = static_cast<scalar_t*>(grad_uw);
  a.grad_uh = static_cast<scalar_t*>(grad_uh);
  a.grad_ud = static_cast<scalar_t*>(grad_ud);
  a.n = n;
  a.K = K;
  a.inverse = inverse;
  a.opt = make_options<acc>(tail_bound, min_w, min_h, min_d);
  a.workspace = static_cast<acc*>(workspace);
  a.stream = stream;
  return dispatch_k(a, backward, dtype);
}

template <typename... Ts>
cudaError_t run_dtype(DType dtype, Ts... args) {
  switch (dtype) {
    case DType::f32: return run<float>(dtype, args...);
    case DType::f64: return run<double>(dtype, args...);
    case DType::f16: return run<Half16<__half>>(dtype, args...);
    case DType::bf16: return run<Half16<__nv_bfloat16>>(dtype, args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t rq_spline_workspace_bytes(DType dtype, int64_t n, int64_t K, bool backward) {
  if (n <= 0 || K <= kMaxBucket) return 0;
  return static_cast<size_t>(workspace_threads(dtype, n, K, backward) *
                             scratch_slots(K, backward) * acc_size(dtype));
}

cudaError_t rq_spline_forward_cuda(DType dtype, const void* x, const void* uw, const void* uh,
                                   const void* ud, void* y, void* lad, int64_t n, int64_t K,
                                   bool inverse, double tail_bound, double min_bin_width,
                                   double min_bin_height, double min_derivative, void* workspace,
                                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (K < 1) return cudaErrorInvalidValue;
  return run_dtype(dtype, /*backward=*/false, static_cast<const void*>(nullptr),
                   static_cast<const void*>(nullptr), x, uw, uh, ud, y, lad,
                   static_cast<void*>(nullptr), static_cast<void*>(nullptr),
                   static_cast<void*>(nullptr), static_cast<void*>(nullptr), n, K, inverse,
                   tail_bound, min_bin_width, min_bin_height, min_derivative, workspace, stream);
}

cudaError_t rq_spline_backward_cuda(DType dtype, const void* grad_y, const void* grad_lad,
                                    const void* x, const void* uw, const void* uh, const void* ud,
                                    void* grad_x, void* grad_uw, void* grad_uh, void* grad_ud,
                                    int64_t n, int64_t K, bool inverse, double tail_bound,
                                    double min_bin_width, double min_bin_height,
                                    double min_derivative, void* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (K < 1) return cudaErrorInvalidValue;
  return run_dtype(dtype, /*backward=*/true, grad_y, grad_lad, x, uw, uh, ud,
                   static_cast<void*>(nullptr), static_cast<void*>(nullptr), grad_x, grad_uw,
                   grad_uh, grad_ud, n, K, inverse, tail_bound, min_bin_width, min_bin_height,
                   min_derivative, workspace, stream);
}

}  // namespace cuda
}  // namespace nflux
