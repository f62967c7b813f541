// CUDA kernels of affine_coupling: one block per row for the forward pass (the row's
// logabsdet is a block reduction, in float or double), elementwise for the backward pass.
// Raw pointers and a stream only; the element math is nflux/coupling.h, shared with the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "affine_coupling_cuda.h"
#include "nflux/coupling.h"

namespace nflux {
namespace cuda {
namespace {

using coupling::kAdditive;
using coupling::kExp;
using coupling::kSigmoid;

template <typename T> __device__ __forceinline__ acc_t<T> load(const T* p) { return *p; }
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T> __device__ __forceinline__ void store(T* p, acc_t<T> v) { *p = v; }
template <> __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
template <> __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}

constexpr int kMaxThreads = 256;

template <typename acc>
__device__ acc block_sum(acc v) {
  __shared__ acc warp_sums[kMaxThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? warp_sums[threadIdx.x] : acc(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <int Kind, bool Clamped, bool Inverse, typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                               const T* __restrict__ logits, T* __restrict__ y,
                               T* __restrict__ lad, int64_t B, int64_t D, acc_t<T> c,
                               acc_t<T> inv_c) {
  using acc = acc_t<T>;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t o = b * D;
    acc sum = 0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      const acc v = load(x + o + j), t = load(shift + o + j);
      if (Kind == kAdditive) {
        store(y + o + j, Inverse ? v - t : v + t);
        continue;
      }
      const auto sc = coupling::eval_scale<Kind, Clamped, acc>(load(logits + o + j), c, inv_c);
      store(y + o + j, Inverse ? (v - t) * sc.inv_scale : v * sc.scale + t);
      sum += sc.log_scale;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) store(lad + b, Inverse ? -sum : sum);
    __syncthreads();  // warp_sums is reused by the next row
  }
}

template <int Kind, bool Clamped, bool Inverse, bool BroadcastGrad, typename T>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ gl,
                                const T* __restrict__ in, const T* __restrict__ shift,
                                const T* __restrict__ logits, T* __restrict__ g_in,
                                T* __restrict__ g_shift, T* __restrict__ g_logits, int64_t n,
                                int64_t D, acc_t<T> c, acc_t<T> inv_c) {
  using acc = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const acc gv = load(g + (BroadcastGrad ? 0 : i));
    if (Kind == kAdditive) {
      store(g_in + i, gv);
      if (Inverse) store(g_shift + i, -gv);  // forward: grad_shift is grad_y, not written
      continue;
    }
    const acc glad = load(gl + i / D);
    const auto sc = coupling::eval_scale<Kind, Clamped, acc>(load(logits + i), c, inv_c);
    const acc v = load(in + i);
    if (Inverse) {
      const acc x_out = (v - load(shift + i)) * sc.inv_scale;
      const acc gy = coupling::times_grad(gv, sc.inv_scale);
      store(g_in + i, gy);
      store(g_shift + i, -gy);
      store(g_logits + i, coupling::inverse_grad_logit(sc, x_out, gv, glad));
    } else {
      store(g_in + i, coupling::times_grad(gv, sc.scale));
      store(g_logits + i, coupling::forward_grad_logit(sc, v, gv, glad));
    }
  }
}

// Calls f with the scale kind, clamp flag and direction as compile-time constants.
template <typename F>
void dispatch_variant(int kind, bool clamped, bool inverse, F&& f) {
  auto with_dir = [&](auto kind_c, auto clamp_c) {
    if (inverse) f(kind_c, clamp_c, std::true_type{});
    else f(kind_c, clamp_c, std::false_type{});
  };
  auto with_clamp = [&](auto kind_c) {
    if (clamped) with_dir(kind_c, std::true_type{});
    else with_dir(kind_c, std::false_type{});
  };
  if (kind == kAdditive) with_dir(std::integral_constant<int, kAdditive>{}, std::false_type{});
  else if (kind == kExp) with_clamp(std::integral_constant<int, kExp>{});
  else with_clamp(std::integral_constant<int, kSigmoid>{});
}

template <typename F>
cudaError_t dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32: f(float{}); break;
    case Dtype::kFloat64: f(double{}); break;
    case Dtype::kFloat16: f(__half{}); break;
    case Dtype::kBFloat16: f(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int row_threads(int64_t D) {
  int t = 32;
  while (t < kMaxThreads && t < D) t <<= 1;
  return t;
}

}  // namespace

cudaError_t affine_coupling_forward(Dtype dtype, const void* x, const void* shift,
                                    const void* logits, void* y, void* logabsdet, int64_t B,
                                    int64_t D, int scale_kind, double clamp, bool inverse,
                                    cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int threads = row_threads(D);
  const unsigned blocks = static_cast<unsigned>(B < 2147483647 ? B : 2147483647);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_t<T>;
    const acc c = static_cast<acc>(clamp), inv_c = clamp > 0 ? acc(1) / c : acc(0);
    dispatch_variant(scale_kind, clamp > 0, inverse, [&](auto k, auto cl, auto inv) {
      forward_kernel<decltype(k)::value, decltype(cl)::value, decltype(inv)::value, T>
          <<<blocks, threads, 0, stream>>>(
              static_cast<const T*>(x), static_cast<const T*>(shift),
              static_cast<const T*>(logits), static_cast<T*>(y), static_cast<T*>(logabsdet), B,
              D, c, inv_c);
    });
  });
}

cudaError_t affine_coupling_backward(Dtype dtype, const void* grad_y, bool grad_y_broadcast,
                                     const void* grad_logabsdet, const void* x, const void* shift,
                                     const void* logits, void* grad_x, void* grad_shift,
                                     void* grad_logits, int64_t B, int64_t D, int scale_kind,
                                     double clamp, bool inverse, cudaStream_t stream) {
  const int64_t n = B * D;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 * 8 ? want : 65536 * 8);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_t<T>;
    const acc c = static_cast<acc>(clamp), inv_c = clamp > 0 ? acc(1) / c : acc(0);
    dispatch_variant(scale_kind, clamp > 0, inverse, [&](auto k, auto cl, auto inv) {
      auto launch = [&](auto bg) {
        backward_kernel<decltype(k)::value, decltype(cl)::value, decltype(inv)::value,
                        decltype(bg)::value, T><<<blocks, threads, 0, stream>>>(
            static_cast<const T*>(grad_y), static_cast<const T*>(grad_logabsdet),
            static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(logits),
            static_cast<T*>(grad_x), static_cast<T*>(grad_shift), static_cast<T*>(grad_logits), n,
            D, c, inv_c);
      };
      if (grad_y_broadcast) launch(std::true_type{});
      else launch(std::false_type{});
    });
  });
}

}  // namespace cuda
}  // namespace nflux
