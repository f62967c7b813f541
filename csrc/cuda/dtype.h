// Element types the CUDA launchers accept. Plain C++ (no torch): the .cu files see only this,
// and the torch glue maps at::ScalarType onto it.
#pragma once

namespace nflux {
namespace cuda {

enum class DType { f32, f64, f16, bf16 };

// Bytes of one element of the type.
inline int dtype_size(DType t) {
  switch (t) {
    case DType::f64: return 8;
    case DType::f32: return 4;
    default: return 2;
  }
}

}  // namespace cuda
}  // namespace nflux
