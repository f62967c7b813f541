// made_inverse on CUDA: the one-pass inversion (csrc/made_inverse.cpp) in one launch of a
// persistent kernel. Each block takes tiles of `rows` batch rows in turn and keeps the tile's
// inputs and every hidden unit in shared memory ([row][unit]); walking d = 1..D it computes, per
// layer, only the units of degree d-1 from the previous layer's units of degree <= d-1 (a dense
// product on a prefix, since units are sorted by degree), then input d's parameters and its
// transformer inverse (affine, or rq_spline through the shared header). A launch per layer and
// step would cost D * layers launches; here the steps are block barriers.
//
// The backward kernel recomputes that sweep per tile, keeping pre-activations and parameters,
// then walks d = D..1 as the CPU kernel does (csrc/cpu/made_inverse_tile.cpp): x_d's cotangent,
// the transformer's inverse-direction VJP, and the push of the degree-(d-1) units' cotangents
// one layer down (transposed products). It writes dL/dy and, per layer, the cotangent of the
// linear output and the input it read; the parameter gradients are one GEMM per layer after it
// (csrc/made_inverse_backward.cpp).
#include <cuda_runtime.h>

#include <algorithm>

#include "made_inverse_cuda.h"
#include "nflux/activation.h"
#include "nflux/coupling.h"
#include "nflux/rq_spline.h"

namespace nflux {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // lanes that share one dot product (a split k, then a shuffle sum)
constexpr int kGroups = kThreads / kGroup;

// Shared-memory layout of one block, in elements of T (the spline scratch is T too: acc = T).
// The backward also keeps pre-activations, every step's parameters and the cotangents.
struct Layout {
  int64_t xs = 0, params = 0, scratch = 0, g_xs = 0, g_params = 0, total = 0;
  int64_t buf[kMadeMaxLayers] = {}, gated[kMadeMaxLayers] = {}, pre[kMadeMaxLayers] = {};
  int64_t g_buf[kMadeMaxLayers] = {}, g_gated[kMadeMaxLayers] = {};
};

Layout layout_for(const MadeInverseArgs& a, int rows, bool backward) {
  Layout s;
  int64_t at = 0;
  auto take = [&](int64_t count) {
    const int64_t offset = at;
    at += int64_t(rows) * count;
    return offset;
  };
  s.xs = take(a.features);
  for (int l = 0; l + 1 < a.layers; ++l) {
    const bool gated = a.residual && l % 2 == 1, activated = !a.residual || l % 2 == 1;
    s.buf[l] = take(a.widths[l]);
    s.gated[l] = take(gated ? a.widths[l] : 0);
    s.pre[l] = take(backward && activated ? a.widths[l] : 0);
    s.g_buf[l] = take(backward ? a.widths[l] : 0);
    s.g_gated[l] = take(backward && gated ? a.widths[l] : 0);
  }
  s.params = take(int64_t(backward ? a.features : 1) * a.params);
  s.g_xs = take(backward ? a.features : 0);
  s.g_params = take(backward ? a.params : 0);
  s.scratch = take(a.affine ? 0 : backward ? rq::backward_scratch(a.bins) : rq::forward_scratch(a.bins));
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

// out[t][i] += sum_{r < count} w[r][i] * g[t][r] for i < inputs, t < rows: the transposed
// product of the backward, one thread per output (count, the units of one degree, is small).
template <typename T>
__device__ void push_units(const T* g, int ld_g, int count, const T* __restrict__ w, int ldw,
                           int inputs, int rows, T* out, int ld_out) {
  for (int o = threadIdx.x; o < rows * inputs; o += blockDim.x) {
    const int t = o / inputs, i = o % inputs;
    T sum = T(0);
    for (int r = 0; r < count; ++r) sum += w[int64_t(r) * ldw + i] * g[t * ld_g + r];
    out[t * ld_out + i] += sum;
  }
}

template <typename T>
struct Tile {
  const MadeInverseArgs& a;
  const Layout& s;
  T* smem;
  int64_t b0;
  int rows;

  __device__ int upto(int l, int k) const {  // units of degree <= k in hidden layer l
    return k < 0 ? 0 : a.count_le[l * (a.features + 1) + min(k, a.features)];
  }
  __device__ T* at(int64_t offset) const { return smem + offset; }

  // The one-pass inversion of the tile; thread t < rows returns row t's logabsdet. kKeep: keep
  // pre-activations and each step's parameters for the backward.
  template <bool kKeep>
  __device__ T forward() const {
    const int D = a.features, P = a.params, K = a.bins, hidden = a.layers - 1;
    const int H_last = a.widths[hidden - 1];
    const T* y = static_cast<const T*>(a.y);
    const rq::Options<T> opt{T(a.tail_bound), T(a.min_bin_width), T(a.min_bin_height), T(a.min_derivative)};
    T* xs = at(s.xs);
    T lad = T(0);
    for (int k = 0; k < D; ++k) {  // step d = k + 1: units of degree k, then input k
      for (int l = 0; l < hidden; ++l) {
        const int r0 = upto(l, k - 1), r1 = upto(l, k), count = r1 - r0;
        if (count == 0) continue;  // uniform over the block
        const int H = a.widths[l];
        T* out = at(s.buf[l]);
        T* pre = at(s.pre[l]);
        const T* w = static_cast<const T*>(a.weights[l]) + int64_t(r0) * (l == 0 ? D : a.widths[l - 1]);
        const T* bias = static_cast<const T*>(a.biases[l]) + r0;
        const T* ctx = static_cast<const T*>(a.context[l]);
        const int64_t b0_ = b0;
        auto finish = [&](int t, int u, T v, const T* stream) {  // context, then act or skip
          if (ctx) v += ctx[(b0_ + t) * H + r0 + u];
          const int i = t * H + r0 + u;
          if (stream) {
            out[i] = v + stream[i];
          } else if (l == 0 && a.residual) {
            out[i] = v;
          } else {
            if (kKeep) pre[i] = v;
            out[i] = activation::apply(a.activation, v);
          }
        };
        if (l == 0) {
          dense_units(xs, D, k, w, D, bias, count, rows,
                      [&](int t, int u, T v) { finish(t, u, v, static_cast<const T*>(nullptr)); });
        } else {
          const int H_in = a.widths[l - 1], kin = upto(l - 1, k);
          const T* in = at(s.buf[l - 1]);
          if (a.residual && l % 2 == 1) {  // a block's first layer reads act(stream)
            T* gated = at(s.gated[l]);
            for (int i = threadIdx.x; i < rows * count; i += blockDim.x) {
              const int t = i / count, u = r0 + i % count;
              gated[t * H + u] = activation::apply(a.activation, in[t * H_in + u]);
            }
            __syncthreads();
            in = gated;
          }
          const T* stream = a.residual && l % 2 == 0 ? at(s.buf[l - 2]) : nullptr;
          dense_units(in, H_in, kin, w, H_in, bias, count, rows,
                      [&](int t, int u, T v) { finish(t, u, v, stream); });
        }
        __syncthreads();
      }
      T* params = at(s.params) + (kKeep ? k * P : 0);
      const int ld_params = kKeep ? D * P : P;
      const T* w_out = static_cast<const T*>(a.weights[hidden]) + int64_t(k) * P * H_last;
      const T* b_out = static_cast<const T*>(a.biases[hidden]) + k * P;
      dense_units(at(s.buf[hidden - 1]), H_last, upto(hidden - 1, k), w_out, H_last, b_out, P, rows,
                  [&](int t, int q, T v) { params[t * ld_params + q] = v; });
      __syncthreads();
      const int t = threadIdx.x;
      if (t < rows) {
        const T yv = y[(b0 + t) * D + a.in_perm[k]];
        const T* p = params + t * ld_params;
        T xv, l;
        if (a.affine) {
          xv = (yv - p[0]) * math_exp(-p[1]);
          l = -p[1];
        } else {
          rq::evaluate(yv, p, p + K, p + 2 * K, K, true, opt,
                       at(s.scratch) + int64_t(t) * rq::forward_scratch(K), xv, l);
        }
        xs[t * D + k] = xv;
        lad += l;
      }
      __syncthreads();
    }
    return lad;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
made_inverse_kernel(MadeInverseArgs a, Layout s, int tile_rows) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* smem = reinterpret_cast<T*>(shared_bytes);
  const int D = a.features;
  const int64_t tiles = (a.batch + tile_rows - 1) / tile_rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b0 = tile * tile_rows;
    const int rows = int(a.batch - b0 < tile_rows ? a.batch - b0 : tile_rows);
    const Tile<T> tl{a, s, smem, b0, rows};
    const T lad = tl.template forward<false>();
    T* x = static_cast<T*>(a.x);
    const T* xs = smem + s.xs;
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
      const int t = i / D, k = i % D;
      x[(b0 + t) * D + a.in_perm[k]] = xs[i];
    }
    if (threadIdx.x < rows) static_cast<T*>(a.logabsdet)[b0 + threadIdx.x] = lad;
    __syncthreads();  // the next tile overwrites shared memory
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
made_inverse_backward_kernel(MadeInverseArgs a, MadeInverseGrads g, Layout s, int tile_rows) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* smem = reinterpret_cast<T*>(shared_bytes);
  const int D = a.features, P = a.params, K = a.bins, hidden = a.layers - 1;
  const int H_last = a.widths[hidden - 1];
  const T* y = static_cast<const T*>(a.y);
  const rq::Options<T> opt{T(a.tail_bound), T(a.min_bin_width), T(a.min_bin_height), T(a.min_derivative)};
  const int64_t tiles = (a.batch + tile_rows - 1) / tile_rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b0 = tile * tile_rows;
    const int rows = int(a.batch - b0 < tile_rows ? a.batch - b0 : tile_rows);
    const Tile<T> tl{a, s, smem, b0, rows};
    // Zeros everywhere: units of degree >= D are never computed, and must read as 0 (finite)
    // in the layer inputs written out; the cotangents accumulate.
    for (int64_t i = threadIdx.x; i < s.total; i += blockDim.x) smem[i] = T(0);
    __syncthreads();
    tl.template forward<true>();
    T* xs = tl.at(s.xs);
    T* g_xs = tl.at(s.g_xs);
    T* g_params = tl.at(s.g_params);
    for (int k = D - 1; k >= 0; --k) {
      const int j = a.in_perm[k];
      const int t = threadIdx.x;
      if (t < rows) {  // x_k's cotangent is complete: the transformer's VJP
        const T g_x = static_cast<const T*>(g.grad_x)[(b0 + t) * D + j] + g_xs[t * D + k];
        const T g_lad = static_cast<const T*>(g.grad_logabsdet)[b0 + t];
        const T* p = tl.at(s.params) + t * D * P + k * P;
        T* gp = g_params + t * P;
        T g_y;
        if (a.affine) {  // the CPU tile's math: a zero g_x contributes 0 even where x overflowed
          const auto sc = coupling::eval_scale<coupling::kExp, false, T>(p[1], T(0), T(0));
          g_y = g_x * sc.inv_scale;
          gp[0] = -g_y;
          gp[1] = coupling::inverse_grad_logit(sc, xs[t * D + k], g_x, g_lad);
        } else {
          rq::evaluate_backward(y[(b0 + t) * D + j], p, p + K, p + 2 * K, K, true, opt, g_x, g_lad,
                                tl.at(s.scratch) + int64_t(t) * rq::backward_scratch(K), g_y, gp, gp + K,
                                gp + 2 * K);
        }
        static_cast<T*>(g.grad_y)[(b0 + t) * D + j] = g_y;
        T* out = static_cast<T*>(g.grad_pre[hidden]) + (b0 + t) * D * P + k * P;
        for (int q = 0; q < P; ++q) out[q] = gp[q];
      }
      __syncthreads();
      push_units(g_params, P, P, static_cast<const T*>(a.weights[hidden]) + int64_t(k) * P * H_last, H_last,
                 tl.upto(hidden - 1, k), rows, tl.at(s.g_buf[hidden - 1]), H_last);
      __syncthreads();
      // Top down, the units of degree k are complete in each layer once the layer above pushed.
      for (int l = hidden - 1; l >= 0; --l) {
        const int r0 = tl.upto(l, k - 1), r1 = tl.upto(l, k), count = r1 - r0;
        if (count == 0) continue;
        const int H = a.widths[l];
        T* g_out = tl.at(s.g_buf[l]);  // becomes the linear output's cotangent in place
        if (!a.residual || l % 2 == 1) {
          const T* pre = tl.at(s.pre[l]);
          const T* post = tl.at(s.buf[l]);
          for (int i = threadIdx.x; i < rows * count; i += blockDim.x) {
            const int idx = (i / count) * H + r0 + i % count;
            g_out[idx] *= activation::slope(a.activation, pre[idx], post[idx]);
          }
          __syncthreads();
        }
        const int ldw = l == 0 ? D : a.widths[l - 1];
        const T* w = static_cast<const T*>(a.weights[l]) + int64_t(r0) * ldw;
        if (l == 0) {
          push_units(g_out + r0, H, count, w, ldw, k, rows, g_xs, D);
        } else if (!a.residual) {
          push_units(g_out + r0, H, count, w, ldw, tl.upto(l - 1, k), rows, tl.at(s.g_buf[l - 1]), ldw);
        } else if (l % 2 == 1) {  // through act(stream), whose degree-k units are complete next
          T* g_gated = tl.at(s.g_gated[l]);
          push_units(g_out + r0, H, count, w, ldw, tl.upto(l - 1, k), rows, g_gated, H);
          __syncthreads();
          const T* stream = tl.at(s.buf[l - 1]);
          const T* gated = tl.at(s.gated[l]);
          T* g_stream = tl.at(s.g_buf[l - 1]);
          for (int i = threadIdx.x; i < rows * count; i += blockDim.x) {
            const int idx = (i / count) * H + r0 + i % count;
            g_stream[idx] += g_gated[idx] * activation::slope(a.activation, stream[idx], gated[idx]);
          }
        } else {  // the block's output, and the skip connection
          T* g_stream = tl.at(s.g_buf[l - 2]);
          push_units(g_out + r0, H, count, w, ldw, tl.upto(l - 1, k), rows, tl.at(s.g_buf[l - 1]), ldw);
          for (int i = threadIdx.x; i < rows * count; i += blockDim.x) {
            const int idx = (i / count) * H + r0 + i % count;
            g_stream[idx] += g_out[idx];
          }
        }
        __syncthreads();
      }
    }
    // Per layer: the linear output's cotangent (hidden layers; the output layer's went out per
    // step) and the input the linear read, rows b0.. of [B, width] and [B, fan_in].
    for (int l = 0; l <= hidden; ++l) {
      const int fan_in = l == 0 ? D : a.widths[l - 1];
      const T* in = l == 0 ? xs : (a.residual && l % 2 == 1 && l < hidden) ? tl.at(s.gated[l]) : tl.at(s.buf[l - 1]);
      T* dst = static_cast<T*>(g.layer_input[l]) + b0 * fan_in;
      for (int i = threadIdx.x; i < rows * fan_in; i += blockDim.x) dst[i] = in[i];
      if (l < hidden) {
        const int H = a.widths[l];
        const T* src = tl.at(s.g_buf[l]);
        T* out = static_cast<T*>(g.grad_pre[l]) + b0 * H;
        for (int i = threadIdx.x; i < rows * H; i += blockDim.x) out[i] = src[i];
      }
    }
    __syncthreads();  // the next tile overwrites shared memory
  }
}

// Rows per tile and the launch shape for a kernel whose tile needs layout_for(rows) elements.
struct Launch {
  int rows = 0, blocks = 0;
  Layout layout;
  size_t bytes = 0;
};

template <typename T, typename Kernel>
cudaError_t plan_launch(const MadeInverseArgs& a, bool backward, Kernel kernel, Launch& out) {
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
  while (rows > 1 && layout_for(a, rows, backward).total * int64_t(sizeof(T)) * 3 > smem_optin) rows /= 2;
  out.rows = rows;
  out.layout = layout_for(a, rows, backward);
  out.bytes = size_t(out.layout.total) * sizeof(T);
  if (out.bytes > size_t(smem_optin)) return cudaErrorInvalidConfiguration;
  // The device's opt-in maximum, the same value on every call: a per-call size would race with
  // another host thread's launch of a larger tile between its set and its launch.
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin)) != cudaSuccess)
    return err;
  int per_sm = 0;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, out.bytes)) != cudaSuccess)
    return err;
  const int64_t tiles = (a.batch + rows - 1) / rows;
  out.blocks = int(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * sms)));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_forward(const MadeInverseArgs& a, cudaStream_t stream) {
  Launch l;
  const cudaError_t err = plan_launch<T>(a, false, made_inverse_kernel<T>, l);
  if (err != cudaSuccess) return err;
  made_inverse_kernel<T><<<l.blocks, kThreads, l.bytes, stream>>>(a, l.layout, l.rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const MadeInverseArgs& a, const MadeInverseGrads& g, cudaStream_t stream) {
  Launch l;
  const cudaError_t err = plan_launch<T>(a, true, made_inverse_backward_kernel<T>, l);
  if (err != cudaSuccess) return err;
  made_inverse_backward_kernel<T><<<l.blocks, kThreads, l.bytes, stream>>>(a, g, l.layout, l.rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t made_inverse_forward(const MadeInverseArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.layers < 2 || args.layers > kMadeMaxLayers) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::f32: return launch_forward<float>(args, stream);
    case DType::f64: return launch_forward<double>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t made_inverse_backward(const MadeInverseArgs& args, const MadeInverseGrads& grads,
                                  cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.layers < 2 || args.layers > kMadeMaxLayers) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::f32: return launch_backward<float>(args, grads, stream);
    case DType::f64: return launch_backward<double>(args, grads, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace nflux
