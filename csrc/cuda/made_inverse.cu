// made_inverse on CUDA: the one-pass inversion (csrc/made_inverse.cpp) in one launch of a
// persistent kernel. Each block takes tiles of `rows` batch rows in turn and keeps the tile's
// inputs and every hidden unit in shared memory ([row][unit]); walking d = 1..D it computes, per
// layer, only the units of degree d-1 from the previous layer's units of degree <= d-1 (a dense
// product on a prefix, since units are sorted by degree), then input d's parameters and its
// transformer inverse (affine, or rq_spline through the shared header). A launch per layer and
// step would cost D * layers launches; here the steps are block barriers.
#include <cuda_runtime.h>

#include <algorithm>

#include "made_inverse_cuda.h"
#include "nflux/activation.h"
#include "nflux/rq_spline.h"

namespace nflux {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // lanes that share one dot product (a split k, then a shuffle sum)
constexpr int kGroups = kThreads / kGroup;

// Shared-memory layout of one block, in elements of T (the spline scratch is T too: acc = T).
struct Layout {
  int64_t xs = 0, params = 0, scratch = 0, total = 0;
  int64_t buf[kMadeMaxLayers] = {}, gated[kMadeMaxLayers] = {};
};

Layout layout_for(const MadeInverseArgs& a, int rows) {
  Layout s;
  int64_t at = 0;
  s.xs = at;
  at += int64_t(rows) * a.features;
  for (int l = 0; l + 1 < a.layers; ++l) {
    s.buf[l] = at;
    at += int64_t(rows) * a.widths[l];
    s.gated[l] = at;
    if (a.residual && l % 2 == 1) at += int64_t(rows) * a.widths[l];
  }
  s.params = at;
  at += int64_t(rows) * a.params;
  s.scratch = at;
  at += a.affine ? 0 : int64_t(rows) * rq::forward_scratch(a.bins);
  s.total = at;
  return s;
}

// out[t][r0 + u] = epilogue(t, u, bias[u] + ctx[t][u] + sum_{k < kin} w[u][k] * in[t][k]) for
// u < count, t < rows: each group of kGroup lanes computes one (u, t) at a time. Every lane of
// a warp runs the same number of rounds, so the shuffles never see an exited lane.
template <typename T, typename Epilogue>
__device__ void dense_units(const T* in, int ld_in, int kin, const T* __restrict__ w, int ldw,
                            const T* __restrict__ bias, int count, int rows,
                            Epilogue epilogue) {
  const int group = threadIdx.x / kGroup, lane = threadIdx.x % kGroup;
  const int outputs = count * rows;
  for (int base = 0; base < outputs; base += kGroups) {
    const int o = base + group;
    const bool active = o < outputs;
    const int u = active ? o / rows : 0, t = active ? o % rows : 0;
    T sum = T(0);
    if (active) {
      const T* wu = w + int64_t(u) * ldw;
      const T* it = in + int64_t(t) * ld_in;
      for (int k = lane; k < kin; k += kGroup) sum += wu[k] * it[k];
    }
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset /= 2)
      sum += __shfl_xor_sync(0xffffffffu, sum, offset, kGroup);
    if (active && lane == 0) epilogue(t, u, sum + bias[u]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
made_inverse_kernel(MadeInverseArgs a, Layout s, int tile_rows) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* smem = reinterpret_cast<T*>(shared_bytes);
  const int D = a.features, P = a.params, K = a.bins, hidden = a.layers - 1;
  const int H_last = a.widths[hidden - 1];
  const T* y = static_cast<const T*>(a.y);
  const rq::Options<T> opt{T(a.tail_bound), T(a.min_bin_width), T(a.min_bin_height), T(a.min_derivative)};
  T* xs = smem + s.xs;
  T* params = smem + s.params;
  const int64_t tiles = (a.batch + tile_rows - 1) / tile_rows;
  // count_le of layer l at degree k, with degree -1 -> 0 units.
  auto upto = [&](int l, int k) { return k < 0 ? 0 : a.count_le[l * (D + 1) + min(k, D)]; };

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b0 = tile * tile_rows;
    const int rows = int(a.batch - b0 < tile_rows ? a.batch - b0 : tile_rows);
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) xs[i] = T(0);
    T lad = T(0);  // thread t < rows owns row t's logabsdet
    __syncthreads();
    for (int k = 0; k < D; ++k) {  // step d = k + 1: units of degree k, then input k
      for (int l = 0; l < hidden; ++l) {
        const int r0 = upto(l, k - 1), r1 = upto(l, k), count = r1 - r0;
        if (count == 0) continue;  // uniform over the block
        const int H = a.widths[l];
        T* out = smem + s.buf[l];
        const T* w = static_cast<const T*>(a.weights[l]) + int64_t(r0) * (l == 0 ? D : a.widths[l - 1]);
        const T* bias = static_cast<const T*>(a.biases[l]) + r0;
        const T* ctx = static_cast<const T*>(a.context[l]);
        auto context_at = [&](int t, int u) { return ctx ? ctx[(b0 + t) * H + r0 + u] : T(0); };
        if (l == 0) {
          dense_units(xs, D, k, w, D, bias, count, rows, [&](int t, int u, T v) {
            v += context_at(t, u);
            out[t * H + r0 + u] = a.residual ? v : activation::apply(a.activation, v);
          });
        } else {
          const int H_in = a.widths[l - 1], kin = upto(l - 1, k);
          const T* in = smem + s.buf[l - 1];
          if (a.residual && l % 2 == 1) {  // a block's first layer reads act(stream)
            T* gated = smem + s.gated[l];
            for (int i = threadIdx.x; i < rows * count; i += blockDim.x) {
              const int t = i / count, u = r0 + i % count;
              gated[t * H + u] = activation::apply(a.activation, in[t * H_in + u]);
            }
            __syncthreads();
            in = gated;
          }
          const T* stream = a.residual && l % 2 == 0 ? smem + s.buf[l - 2] : nullptr;
          dense_units(in, H_in, kin, w, H_in, bias, count, rows, [&](int t, int u, T v) {
            v += context_at(t, u);
            out[t * H + r0 + u] = stream ? v + stream[t * H + r0 + u] : activation::apply(a.activation, v);
          });
        }
        __syncthreads();
      }
      const T* w_out = static_cast<const T*>(a.weights[hidden]) + int64_t(k) * P * H_last;
      const T* b_out = static_cast<const T*>(a.biases[hidden]) + k * P;
      dense_units(smem + s.buf[hidden - 1], H_last, upto(hidden - 1, k), w_out, H_last, b_out, P,
                  rows, [&](int t, int q, T v) { params[t * P + q] = v; });
      __syncthreads();
      const int t = threadIdx.x;
      if (t < rows) {
        const T yv = y[(b0 + t) * D + a.in_perm[k]];
        const T* p = params + t * P;
        T xv, l;
        if (a.affine) {
          xv = (yv - p[0]) * math_exp(-p[1]);
          l = -p[1];
        } else {
          rq::evaluate(yv, p, p + K, p + 2 * K, K, true, opt, smem + s.scratch + int64_t(t) * rq::forward_scratch(K),
                       xv, l);
        }
        xs[t * D + k] = xv;
        lad += l;
      }
      __syncthreads();
    }
    T* x = static_cast<T*>(a.x);
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
      const int t = i / D, k = i % D;
      x[(b0 + t) * D + a.in_perm[k]] = xs[i];
    }
    if (threadIdx.x < rows) static_cast<T*>(a.logabsdet)[b0 + threadIdx.x] = lad;
    __syncthreads();  // the next tile overwrites shared memory
  }
}

template <typename T>
cudaError_t launch(const MadeInverseArgs& a, cudaStream_t stream) {
  int device = 0, smem_optin = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  // The most rows (a power of two <= 32: one per thread of the transformer step, few idle
  // groups in dense_units) whose tile fits in a third of the opt-in shared memory, so that
  // several blocks share an SM and hide each other's barriers.
  int rows = 32;
  while (rows > 1 && layout_for(a, rows).total * int64_t(sizeof(T)) * 3 > smem_optin) rows /= 2;
  const Layout s = layout_for(a, rows);
  const size_t bytes = size_t(s.total) * sizeof(T);
  if (bytes > size_t(smem_optin)) return cudaErrorInvalidConfiguration;
  if ((err = cudaFuncSetAttribute(made_inverse_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(bytes))) != cudaSuccess)
    return err;
  int per_sm = 0;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, made_inverse_kernel<T>, kThreads, bytes)) !=
      cudaSuccess)
    return err;
  const int64_t tiles = (a.batch + rows - 1) / rows;
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * sms)));
  made_inverse_kernel<T><<<blocks, kThreads, bytes, stream>>>(a, s, rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t made_inverse_forward(const MadeInverseArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.layers < 2 || args.layers > kMadeMaxLayers) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::f32: return launch<float>(args, stream);
    case DType::f64: return launch<double>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace nflux
